"""``klx.token_stats`` against the plain recipe of each library, and the memory of
``fused_linear_token_stats`` (issue 27), on the CPU.

    python -m benchmarks.token_stats              # 1024 x 32000 float32; fused 2048 x 512
    python -m benchmarks.token_stats --rows 4096  # 4096 x 32000
    python -m benchmarks.token_stats --quick      # 256 x 32000: about a minute
    python -m benchmarks.token_stats --smoke      # tiny shapes, one round (the test suite's)

Cases, each timed in alternation with its baseline on the same inputs (medians):

* torch eager: ``klx.token_stats(z, labels, ref)`` (log-probability of the label,
  entropy, KL to the reference, log-sum-exp) against ``log_softmax`` + ``gather`` +
  entropy (``-(p * logp).sum(-1)``) + KL (``(p * (logp - logq)).sum(-1)``) +
  ``logsumexp``, under ``no_grad``; and forward + backward of ``logprob.sum() - 0.01
  entropy.sum() + 0.1 kl.sum()`` with respect to the logits, the same two ways;
* NumPy: the values against the same recipe by ``scipy.special.logsumexp``;
* ``jax.jit`` and ``torch.compile(fullgraph=True)``: the values, and the value and
  gradient of the loss, each way traced the same way (compilation in the warm-up);
* memory: the extra peak resident memory of the forward and backward from hidden states
  [tokens, 512] and a [32000, 512] output layer, ``fused_linear_token_stats`` against
  the logits formed whole then the eager formulas.

``--only`` picks libraries (torch, numpy, jax, compile; those not installed are left
out). Prints a markdown table and
writes token_stats.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import warnings
from typing import Any

import benchmarks
import klx
from benchmarks.cli import parser
from benchmarks.timing import extra_peak_bytes, interleaved, load_average, synchronizer

#: The loss both ways: weights of the summed log-probabilities, entropies and KLs.
WEIGHTS = (1.0, -0.01, 0.1)


def eager_stats(torch: Any, z: Any, labels: Any, ref: Any) -> tuple[Any, Any, Any, Any]:
    """What RL code writes: log_softmax, gather, entropy and KL in eager torch."""
    logp = torch.log_softmax(z, dim=-1)
    logprob = torch.gather(logp, -1, labels[:, None])[:, 0]
    p = torch.exp(logp)
    entropy = -(p * logp).sum(-1)
    logq = torch.log_softmax(ref, dim=-1)
    kl = (p * (logp - logq)).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    return logprob, entropy, kl, lse


def _loss(stats: tuple[Any, Any, Any]) -> Any:
    logprob, entropy, kl = stats
    a, b, c = WEIGHTS
    return a * logprob.sum() + b * entropy.sum() + c * kl.sum()


def numpy_stats(np: Any, z: Any, labels: Any, ref: Any) -> tuple[Any, Any, Any, Any]:
    """The same recipe in NumPy, the log-sum-exps by SciPy."""
    from scipy.special import logsumexp

    lse = logsumexp(z, axis=-1, keepdims=True)
    logp = z - lse
    p = np.exp(logp)
    logprob = np.take_along_axis(logp, labels[:, None], -1)[:, 0]
    entropy = -(p * logp).sum(-1)
    logq = ref - logsumexp(ref, axis=-1, keepdims=True)
    kl = (p * (logp - logq)).sum(-1)
    return logprob, entropy, kl, lse[:, 0]


def jax_stats(jnp: Any, z: Any, labels: Any, ref: Any) -> tuple[Any, Any, Any, Any]:
    """The same recipe in jax.numpy."""
    import jax

    logp = jax.nn.log_softmax(z, axis=-1)
    logprob = jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    p = jnp.exp(logp)
    entropy = -(p * logp).sum(-1)
    logq = jax.nn.log_softmax(ref, axis=-1)
    kl = (p * (logp - logq)).sum(-1)
    return logprob, entropy, kl, jax.nn.logsumexp(z, axis=-1)


Case = tuple[str, dict[str, Any], Any]


def _inputs(rows: int, vocab: int) -> tuple[Any, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(rows, vocab)).astype(np.float32)
    ref = (z + rng.normal(scale=0.3, size=z.shape)).astype(np.float32)
    return z, ref, rng.integers(0, vocab, size=rows)


def _torch_cases(rows: int, vocab: int, compiled: bool) -> list[Case]:
    import torch

    z_np, ref_np, y_np = _inputs(rows, vocab)
    z, ref, labels = torch.from_numpy(z_np), torch.from_numpy(ref_np), torch.from_numpy(y_np)

    def klx_stats(x: Any, r: Any) -> tuple[Any, ...]:
        out = klx.token_stats(x, labels, r)
        return out["logprob"], out["entropy"], out["kl"], out["lse"]

    def plain_stats(x: Any, r: Any) -> tuple[Any, ...]:
        return eager_stats(torch, x, labels, r)

    def values(stats: Any) -> Any:
        fn = torch.compile(stats, fullgraph=True) if compiled else stats

        def run() -> Any:
            with torch.no_grad():
                return fn(z, ref)

        return run

    def step(stats: Any) -> Any:
        def loss(x: Any, r: Any) -> Any:
            return _loss(stats(x, r)[:3])

        fn = torch.compile(loss, fullgraph=True) if compiled else loss

        def run() -> Any:
            x = z.detach().requires_grad_(True)
            fn(x, ref).backward()
            return x.grad

        return run

    sync = synchronizer("torch", "cpu")
    size = f"{rows}x{vocab}"
    if compiled:
        torch._dynamo.reset()
        return [
            (
                f"torch.compile values {size}",
                {"klx": values(klx_stats), "plain": values(plain_stats)},
                sync,
            ),
            (
                f"torch.compile value+grad {size}",
                {"klx": step(klx_stats), "plain": step(plain_stats)},
                sync,
            ),
        ]
    return [
        (f"torch values {size}", {"klx": values(klx_stats), "plain": values(plain_stats)}, sync),
        (f"torch fwd+bwd {size}", {"klx": step(klx_stats), "plain": step(plain_stats)}, sync),
    ]


def _numpy_cases(rows: int, vocab: int) -> list[Case]:
    import numpy as np

    z, ref, labels = _inputs(rows, vocab)

    def klx_values() -> Any:
        return klx.token_stats(z, labels, ref)["kl"]

    def plain_values() -> Any:
        return numpy_stats(np, z, labels, ref)[2]

    sync = synchronizer("numpy", "cpu")
    return [(f"numpy values {rows}x{vocab}", {"klx": klx_values, "plain": plain_values}, sync)]


def _jax_cases(rows: int, vocab: int) -> list[Case]:
    import jax
    import jax.numpy as jnp

    z_np, ref_np, y_np = _inputs(rows, vocab)
    z, ref, labels = jnp.asarray(z_np), jnp.asarray(ref_np), jnp.asarray(y_np)

    def klx_stats(x: Any, r: Any) -> tuple[Any, ...]:
        out = klx.token_stats(x, labels, r)
        return out["logprob"], out["entropy"], out["kl"], out["lse"]

    def plain_stats(x: Any, r: Any) -> tuple[Any, ...]:
        return jax_stats(jnp, x, labels, r)

    def values(stats: Any) -> Any:
        fn = jax.jit(stats)
        return lambda: fn(z, ref)

    def step(stats: Any) -> Any:
        fn = jax.jit(jax.value_and_grad(lambda x, r: _loss(stats(x, r)[:3])))
        return lambda: fn(z, ref)

    def sync(out: Any) -> None:
        jax.block_until_ready(out)

    size = f"{rows}x{vocab}"
    return [
        (f"jax.jit values {size}", {"klx": values(klx_stats), "plain": values(plain_stats)}, sync),
        (f"jax.jit value+grad {size}", {"klx": step(klx_stats), "plain": step(plain_stats)}, sync),
    ]


def _memory(tokens: int, hidden: int, vocab: int) -> dict[str, float | None]:
    """Extra peak RSS (bytes) of one forward + backward from hidden states, each way."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    h = torch.from_numpy(rng.normal(size=(tokens, hidden)).astype(np.float32))
    w = torch.from_numpy((rng.normal(size=(vocab, hidden)) / hidden**0.5).astype(np.float32))
    rw = w + 0.01
    labels = torch.from_numpy(rng.integers(0, vocab, size=tokens))

    def fused() -> Any:
        hs = h.detach().requires_grad_(True)
        out = klx.fused_linear_token_stats(
            hs,
            w,
            labels,
            reference_hidden=h,
            reference_weight=rw,
            stats=("logprob", "entropy", "kl"),
        )
        _loss((out["logprob"], out["entropy"], out["kl"])).backward()
        return hs.grad

    def whole() -> Any:
        hs = h.detach().requires_grad_(True)
        z = hs @ w.T
        with torch.no_grad():
            ref = h @ rw.T
        _loss(eager_stats(torch, z, labels, ref)[:3]).backward()
        return hs.grad

    sync = synchronizer("torch", "cpu")
    # warm on a few tokens (imports, first calls); measured before anything large was
    # freed (glibc then serves large blocks from its heap, which RSS no longer sees grow)
    hs = h[:8].detach().requires_grad_(True)
    out = klx.fused_linear_token_stats(
        hs, w, labels[:8], reference_hidden=h[:8], reference_weight=rw
    )
    _loss((out["logprob"], out["entropy"], out["kl"])).backward()
    _loss(eager_stats(torch, hs @ w.T, labels[:8], h[:8] @ rw.T)[:3]).backward()
    return {
        "fused": extra_peak_bytes(fused, sync, "torch", "cpu"),
        "logits whole": extra_peak_bytes(whole, sync, "torch", "cpu"),
    }


LIBRARIES = ("torch", "numpy", "jax", "compile")


def installed(libraries: list[str]) -> list[str]:
    """The libraries of `libraries` whose modules are installed ('compile' is torch's)."""
    import importlib.util

    def module(lib: str) -> str:
        return "torch" if lib == "compile" else lib

    return [lib for lib in libraries if importlib.util.find_spec(module(lib)) is not None]


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="256 x 32000: about a minute")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    size.add_argument("--rows", type=int, default=1024, help="tokens (default 1024)")
    ap.add_argument("--only", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    ap.add_argument("--rounds", type=int, default=5, help="fewest rounds per case")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for token_stats.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.smoke:
        rows, vocab, hidden, budget, rounds = 16, 64, 8, 0.0, 1
    elif args.quick:
        rows, vocab, hidden, budget, rounds = 256, 32000, 512, 3.0, 3
    else:
        rows, vocab, hidden, budget, rounds = args.rows, 32000, 512, 10.0, args.rounds
    tokens = rows if args.smoke else max(rows, 2048)
    mem = _memory(tokens, hidden, vocab)  # first: see _memory
    cases: list[Case] = []
    args.only = installed(args.only)
    if "torch" in args.only:
        cases += _torch_cases(rows, vocab, compiled=False)
    if "numpy" in args.only:
        cases += _numpy_cases(rows, vocab)
    if "jax" in args.only:
        cases += _jax_cases(rows, vocab)
    if "compile" in args.only:
        cases += _torch_cases(rows, vocab, compiled=True)
    lines = ["| case | klx ms | plain recipe ms | ratio |", "|---|---|---|---|"]
    results: list[dict[str, Any]] = []
    for name, fns, sync in cases:
        t = interleaved(fns, sync, budget_s=budget, min_rounds=rounds, warmup=1)
        k, e = t["klx"], t["plain"]
        lines.append(
            f"| {name} | {k.median_s * 1e3:.1f}{k.flag()} | {e.median_s * 1e3:.1f}{e.flag()} | "
            f"{k.median_s / e.median_s:.2f} |"
        )
        results.append({"case": name, "klx_s": k.median_s, "plain_s": e.median_s})
        print(lines[-1], file=sys.stderr, flush=True)
    logits_mb = tokens * vocab * 4 / 2**20
    lines += [
        "",
        f"| fwd+bwd from hidden states {tokens}x{hidden}x{vocab} | extra peak RSS MiB |",
        "|---|---|",
    ]
    for name, peak in mem.items():
        shown = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        lines.append(f"| {name} | {shown} |")
        results.append({"case": f"memory {name}", "peak_bytes": peak})
    lines.append(f"| (one [tokens, vocab] float32 array) | {logits_mb:.0f} |")
    print("\n".join(lines))
    print(f"\nload average: {load_average():.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_stats.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
