"""klx where users trace it: inside ``jax.jit`` and ``torch.compile(fullgraph=True)``,
against the plain formula traced the same way (issue 24).

    python -m benchmarks.traced                    # every backend that traces (JAX, torch)
    python -m benchmarks.traced --quick            # smaller shapes
    python -m benchmarks.traced --backends jax --load 1

Each row is one traced call, values alone and values with gradients, timed in one
process after compiling (compile time is not counted): klx against the plain formula a
user would write without klx, on dense inputs, targets with 1/8 exact zeros, masks
(``where=``) and a temperature. The ratio is klx's median over the formula's; the issue's
targets are at most 1.15 for values and 1.2 with gradients. The formula has no guard (it
is NaN at exact zeros against ``-inf``, and loses every digit near P = Q), so a ratio
below 1 is not expected. Prints a Markdown table and writes traced.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import warnings
from collections.abc import Callable
from typing import Any

import benchmarks
import klx
from benchmarks.cli import parser
from benchmarks.timing import busy, load_average, median_time

#: (name, kl_div shape, logits shape) per size.
SIZES = {
    "default": ((1024, 4096), (512, 32000)),
    "quick": ((256, 4096), (64, 32000)),
}
#: The targets: klx / formula at most this, for values and for values with gradients.
TARGETS = {"value": 1.15, "grad": 1.2}


def _inputs(np: Any, kl_shape: tuple[int, int], logit_shape: tuple[int, int]) -> dict[str, Any]:
    """float32 NumPy inputs: kl_div's (log q, p), p with 1/8 zeros, and two logits."""
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(kl_shape[1]), size=kl_shape[0])
    p = rng.dirichlet(np.ones(kl_shape[1]), size=kl_shape[0])
    p0 = p.copy()
    p0[:, ::8] = 0.0
    p0 /= p0.sum(-1, keepdims=True)
    t = 2.0 * rng.normal(size=logit_shape)
    s = t + 0.5 * rng.normal(size=logit_shape)
    keep = rng.random(logit_shape[0]) > 0.125
    f32 = np.float32
    return {
        "x": np.log(q).astype(f32),
        "y": p.astype(f32),
        "y0": p0.astype(f32),
        "t": t.astype(f32),
        "s": s.astype(f32),
        "keep": keep,
    }


def k_kl_div(x: Any, y: Any) -> Any:
    """klx's call: the same code for every library."""
    return klx.kl_div(x, y, reduction="batchmean")


def k_logits(s: Any, t: Any, temperature: float = 1.0, mask: Any = None) -> Any:
    """KL(softmax(t / T) || softmax(s / T)) by klx, the student `s` first (its gradient)."""
    return klx.kl_divergence(
        t,
        s,
        p_form="logits",
        q_form="logits",
        temperature=temperature,
        where=mask,
        reduction="batchmean",
    )


def _every_row(
    add: Callable[..., None], f_kl_div: Any, f_logits: Any, arrays: tuple[Any, ...]
) -> None:
    """The rows of the table, each added (klx against the formula) by the backend's `add`."""
    x, y, y0, s, t, keep = arrays
    add(f"kl_div batchmean {tuple(x.shape)}", k_kl_div, f_kl_div, (x, y))
    add("kl_div, 1/8 zero targets", k_kl_div, f_kl_div, (x, y0))
    add(f"KL from logits {tuple(t.shape)}", k_logits, f_logits, (s, t))
    add(
        "KL from logits, T = 2, masked",
        lambda a, b: k_logits(a, b, 2.0, keep),
        lambda a, b: f_logits(a, b, 2.0, keep),
        (s, t),
    )


def jax_cases(data: dict[str, Any]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (klx, formula), each a jitted call on JAX arrays."""
    import jax
    import jax.numpy as jnp

    x, y, y0, t, s = (jnp.asarray(data[k]) for k in ("x", "y", "y0", "t", "s"))
    keep = jnp.asarray(data["keep"])
    n = x.shape[0]

    def f_kl_div(x: Any, y: Any) -> Any:
        return jnp.sum(jax.scipy.special.xlogy(y, y) - y * x) / n

    def f_logits(s: Any, t: Any, temperature: float = 1.0, mask: Any = None) -> Any:
        lp = jax.nn.log_softmax(t / temperature, -1)
        lq = jax.nn.log_softmax(s / temperature, -1)
        rows = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
        if mask is None:
            return jnp.mean(rows)
        return jnp.sum(jnp.where(mask, rows, 0.0)) / jnp.sum(mask)

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}

    def add(name: str, k: Callable[..., Any], f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        kj, fj = jax.jit(k), jax.jit(f)
        cases[f"{name} value"] = (lambda: kj(*args), lambda: fj(*args))
        kg, fg = jax.jit(jax.grad(k)), jax.jit(jax.grad(f))
        cases[f"{name} grad"] = (lambda: kg(*args), lambda: fg(*args))

    _every_row(add, f_kl_div, f_logits, (x, y, y0, s, t, keep))
    return cases


def torch_cases(data: dict[str, Any]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (klx, formula), each torch.compile(fullgraph=True) of the same call."""
    import torch
    import torch.nn.functional as F

    x, y, y0, t, s = (torch.from_numpy(data[k]) for k in ("x", "y", "y0", "t", "s"))
    keep = torch.from_numpy(data["keep"])

    def f_kl_div(x: Any, y: Any) -> Any:
        return F.kl_div(x, y, reduction="batchmean")

    def f_logits(s: Any, t: Any, temperature: float = 1.0, mask: Any = None) -> Any:
        lp = torch.log_softmax(t / temperature, -1)
        lq = torch.log_softmax(s / temperature, -1)
        if mask is None:
            return F.kl_div(lq, lp, reduction="batchmean", log_target=True)
        rows = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
        return torch.where(mask, rows, 0.0).sum() / mask.sum()

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}

    def add(name: str, k: Callable[..., Any], f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        kc = torch.compile(k, fullgraph=True)
        fc = torch.compile(f, fullgraph=True)
        cases[f"{name} value"] = (lambda: kc(*args), lambda: fc(*args))
        leaf = args[0].clone().requires_grad_(True)
        rest = args[1:]

        def grad_of(fn: Callable[..., Any]) -> Callable[[], Any]:
            def run() -> Any:
                leaf.grad = None
                out = fn(leaf, *rest)
                out.backward()
                return leaf.grad

            return run

        cases[f"{name} grad"] = (grad_of(kc), grad_of(fc))

    _every_row(add, f_kl_div, f_logits, (x, y, y0, s, t, keep))
    return cases


CASES = {"jax": jax_cases, "torch": torch_cases}


def measure(backends: list[str], size: str) -> list[dict[str, Any]]:
    import numpy as np

    kl_shape, logit_shape = SIZES[size]
    data = _inputs(np, kl_shape, logit_shape)
    rows = []
    for backend in backends:
        for name, (k, f) in CASES[backend](data).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tk = median_time(k, _sync(backend), budget_s=2.0, max_runs=50, warmup=3)[0]
                tf = median_time(f, _sync(backend), budget_s=2.0, max_runs=50, warmup=3)[0]
            kind = "grad" if name.endswith("grad") else "value"
            ratio = tk / tf
            rows.append(
                {
                    "backend": "jax.jit" if backend == "jax" else "torch.compile",
                    "case": name,
                    "klx_ms": tk * 1e3,
                    "formula_ms": tf * 1e3,
                    "ratio": ratio,
                    "target": TARGETS[kind],
                    "met": ratio <= TARGETS[kind],
                }
            )
            print(f"{backend} {name}: {ratio:.2f}", file=sys.stderr, flush=True)
    return rows


def _sync(backend: str) -> Callable[[Any], None]:
    if backend == "jax":
        return lambda out: out.block_until_ready()
    return lambda _: None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| traced call | case | klx ms | formula ms | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r["met"] else " (over)"
        lines.append(
            f"| {r['backend']} | {r['case']} | {r['klx_ms']:.2f} | {r['formula_ms']:.2f} "
            f"| {r['ratio']:.2f}{mark} | {r['target']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap: argparse.ArgumentParser = parser(__doc__)
    ap.add_argument("--backends", nargs="*", default=None, help="jax torch (default: both)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for traced.json")
    args = ap.parse_args(argv)
    import importlib.util

    backends = args.backends or [b for b in CASES if importlib.util.find_spec(b) is not None]
    with busy(args.load):
        rows = measure(backends, "quick" if args.quick else "default")
    print(f"load average {load_average():.1f}, {args.load} busy processes", file=sys.stderr)
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traced.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
