"""The forward/reverse KL mixture ('mix') against one KL, on the CPU (issue 26, item 3).

    python -m benchmarks.mix            # 2048 x 32000 rows; fused 1024 x 512 x 32000
    python -m benchmarks.mix --quick    # smaller: a minute

``lam KL(P || Q) + (1 - lam) KL(Q || P)`` is computed in one pass over the two inputs;
the issue's target is at most 1.1x the time of one KL. Timed in alternation with the KL
on the same inputs (so both see the same machine), each case:

* the row path: ``klx.divergence(zp, zq, "mix", lam=lam)`` against
  ``klx.kl_divergence(zp, zq)``, logits at T = 2, 'batchmean', torch and NumPy;
* fused-linear: ``fused_linear_divergence(..., divergence="mix", lam=lam)`` against "kl",
  forward and backward with respect to the student's hidden states and weights, torch and
  JAX;

each at ``lam = 1/2`` (the symmetric KL, the default) and ``lam = 0.3`` (``--lam``).

Prints a markdown table (ratio and whether it meets 1.1) and writes mix.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import warnings
from collections.abc import Callable
from typing import Any

import benchmarks
import klx
from benchmarks.backends import available
from benchmarks.cli import parser
from benchmarks.timing import interleaved, load_average, synchronizer

TARGET = 1.1


def _has(lib: str) -> bool:
    return any(name == lib for name, _ in available(None))


def _row_cases(
    rows: int, vocab: int, lam: float
) -> list[tuple[str, Callable[[], Any], Callable[[], Any], Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    zp = rng.normal(size=(rows, vocab)).astype(np.float32)
    zq = (zp + 0.5 * rng.normal(size=(rows, vocab))).astype(np.float32)
    kw = {"p_form": "logits", "q_form": "logits", "temperature": 2.0, "reduction": "batchmean"}
    cases = []
    libs = [("numpy", zp, zq)]
    if _has("torch"):
        import torch

        libs.append(("torch", torch.from_numpy(zp), torch.from_numpy(zq)))
    for lib, a, b in libs:
        cases.append(
            (
                f"{lib} rows {rows}x{vocab}, lam {lam}",
                lambda a=a, b=b: klx.divergence(a, b, "mix", lam=lam, **kw),
                lambda a=a, b=b: klx.kl_divergence(a, b, **kw),
                synchronizer(lib, "cpu"),
            )
        )
    return cases


def _fused_cases(
    tokens: int, hidden: int, vocab: int, lam: float
) -> list[tuple[str, Any, Any, Any]]:
    import numpy as np

    rng = np.random.default_rng(1)
    h = rng.normal(size=(tokens, hidden)).astype(np.float32)
    w_t = (rng.normal(size=(vocab, hidden)) / hidden**0.5).astype(np.float32)
    w_s = (w_t + 0.1 * rng.normal(size=w_t.shape) / hidden**0.5).astype(np.float32)
    cases = []
    if _has("torch"):
        import torch

        th, tt = torch.from_numpy(h), torch.from_numpy(w_t)

        def torch_step(kind: str) -> Any:
            hs = torch.from_numpy(h).requires_grad_(True)
            ws = torch.from_numpy(w_s).requires_grad_(True)
            opt = {"lam": lam} if kind == "mix" else {}
            loss = klx.fused_linear_divergence(
                th, tt, hs, ws, divergence=kind, temperature=2.0, **opt
            )
            loss.backward()
            return ws.grad

        cases.append(
            (
                f"torch fused {tokens}x{hidden}x{vocab} fwd+bwd, lam {lam}",
                lambda: torch_step("mix"),
                lambda: torch_step("kl"),
                synchronizer("torch", "cpu"),
            )
        )
    if _has("jax"):
        import jax
        import jax.numpy as jnp

        jh, jt, js = jnp.asarray(h), jnp.asarray(w_t), jnp.asarray(w_s)

        def jax_step(kind: str) -> Any:
            opt = {"lam": lam} if kind == "mix" else {}

            def loss(hs: Any, ws: Any) -> Any:
                return klx.fused_linear_divergence(
                    jh, jt, hs, ws, divergence=kind, temperature=2.0, **opt
                )

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

        mix, kl = jax_step("mix"), jax_step("kl")
        cases.append(
            (
                f"jax fused {tokens}x{hidden}x{vocab} jit(value_and_grad), lam {lam}",
                lambda: mix(jh, js)[1][1],
                lambda: kl(jh, js)[1][1],
                synchronizer("jax", "cpu"),
            )
        )
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument(
        "--lam", type=float, nargs="+", default=[0.5, 0.3], help="the mixture's weights"
    )
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for mix.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows, tokens = (512, 256) if args.quick else (2048, 1024)
    cases = [c for lam in args.lam for c in _row_cases(rows, 32000, lam)]
    cases += [c for lam in args.lam for c in _fused_cases(tokens, 512, 32000, lam)]
    lines = [
        "| case | mix ms | KL ms | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    results = []
    for name, mix, kl, sync in cases:
        t = interleaved({"mix": mix, "kl": kl}, sync, budget_s=20.0, min_rounds=5)
        ratio = t["mix"].median_s / t["kl"].median_s
        met = "yes" if ratio <= TARGET else "**no**"
        lines.append(
            f"| {name} | {t['mix'].median_s * 1e3:.1f}{t['mix'].flag()} | "
            f"{t['kl'].median_s * 1e3:.1f}{t['kl'].flag()} | {ratio:.2f} | {TARGET} | {met} |"
        )
        results.append({"case": name, "mix_s": t["mix"].median_s, "kl_s": t["kl"].median_s})
        print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    print(f"\nload average: {load_average():.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mix.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
