"""Distillation from hidden states: klx.fused_linear_divergence against the eager formula.

    python -m benchmarks.fused_linear            # 1024..4096 tokens x 512 x 32000 float32, CPU
    python -m benchmarks.fused_linear --quick    # small sizes, a minute or two
    python -m benchmarks.fused_linear --full     # a GPU: 8192 tokens x 4096 x 128256 bfloat16

What is timed, per number of tokens (teacher hidden states and weights without gradients,
student's with), forward plus backward with respect to the student's hidden states and
weights (NumPy: forward only):

* torch: klx; eager (``h @ W.T`` for both models, two ``log_softmax``, ``kl_div``
  with ``log_target=True``, 'batchmean'); ``torch.compile`` of the same eager code.
* JAX: ``jax.jit(jax.value_and_grad(...))`` of klx and of the eager formula.
* NumPy: klx's forward and the formula's (full logits, SciPy's ``log_softmax``).

Columns: median time of a few runs after a warm-up, and the extra peak memory of one
call (CPU: the peak resident set size above what was resident before, with glibc's
mmap threshold fixed at 1 MiB so that freed blocks leave the resident set; CUDA: the
allocator's peak). Prints a markdown table, writes fused_linear.json and
fused_linear.png (memory and time against tokens) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import klx
from benchmarks.backends import available
from benchmarks.cli import pyplot
from benchmarks.timing import extra_peak_bytes, median_time, synchronizer

PRESETS = {
    "default": {"tokens": [1024, 2048, 4096], "hidden": 512, "vocab": 32000, "dtype": "float32"},
    "quick": {"tokens": [256, 512, 1024], "hidden": 256, "vocab": 32000, "dtype": "float32"},
    "full": {"tokens": [2048, 4096, 8192], "hidden": 4096, "vocab": 128256, "dtype": "bfloat16"},
}


def torch_cases(n: int, args: argparse.Namespace, device: str) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden, vocab, T = args.hidden, args.vocab, args.temperature

    def randn(*shape: int, scale: float = 1.0) -> Any:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    hp, wp = randn(n, hidden), randn(vocab, hidden, scale=hidden**-0.5)
    hq = randn(n, hidden).requires_grad_(True)
    wq = randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True)

    def eager(hp: Any, wp: Any, hq: Any, wq: Any) -> Any:
        with torch.no_grad():
            lp = F.log_softmax((hp @ wp.T).float() / T, -1)
        lq = F.log_softmax((hq @ wq.T).float() / T, -1)
        return F.kl_div(lq, lp, reduction="batchmean", log_target=True)

    def fused(hp: Any, wp: Any, hq: Any, wq: Any) -> Any:
        return klx.fused_linear_divergence(
            hp, wp, hq, wq, temperature=T, divergence=args.divergence, chunk_size=args.chunk_size
        )

    def step(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            hq.grad = wq.grad = None
            out = fn(hp, wp, hq, wq)
            out.backward()
            return out

        return run

    fns = {"klx": step(fused), "eager": step(eager)}
    if not args.no_compile:
        fns["torch.compile(eager)"] = step(torch.compile(eager))
    return fns


def jax_cases(n: int, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    dt = getattr(jnp, args.dtype)
    hidden, vocab, T = args.hidden, args.vocab, args.temperature
    hp = jax.random.normal(keys[0], (n, hidden), dtype=dt)
    wp = jax.random.normal(keys[1], (vocab, hidden), dtype=dt) * hidden**-0.5
    hq = jax.random.normal(keys[2], (n, hidden), dtype=dt)
    wq = jax.random.normal(keys[3], (vocab, hidden), dtype=dt) * hidden**-0.5

    def eager(hp: Any, wp: Any, hq: Any, wq: Any) -> Any:
        lp = jax.nn.log_softmax(jax.lax.stop_gradient(hp @ wp.T).astype(jnp.float32) / T)
        lq = jax.nn.log_softmax((hq @ wq.T).astype(jnp.float32) / T)
        return jnp.sum(jnp.exp(lp) * (lp - lq)) / hp.shape[0]

    def fused(hp: Any, wp: Any, hq: Any, wq: Any) -> Any:
        return klx.fused_linear_divergence(
            hp, wp, hq, wq, temperature=T, divergence=args.divergence, chunk_size=args.chunk_size
        )

    out = {}
    for name, f in (("jit(value_and_grad(klx))", fused), ("jit(value_and_grad(eager))", eager)):
        vg = jax.jit(jax.value_and_grad(f, argnums=(2, 3)))
        out[name] = lambda vg=vg: vg(hp, wp, hq, wq)[0]
    return out


def numpy_cases(n: int, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    import numpy as np
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    dt = np.dtype(args.dtype)
    hidden, vocab, T = args.hidden, args.vocab, args.temperature
    hp = rng.standard_normal((n, hidden)).astype(dt)
    wp = (rng.standard_normal((vocab, hidden)) * hidden**-0.5).astype(dt)
    hq = rng.standard_normal((n, hidden)).astype(dt)
    wq = (rng.standard_normal((vocab, hidden)) * hidden**-0.5).astype(dt)

    def formula() -> Any:
        lp = log_softmax(hp @ wp.T / T, -1)
        lq = log_softmax(hq @ wq.T / T, -1)
        return np.sum(np.exp(lp) * (lp - lq)) / n

    def fused() -> Any:
        return klx.fused_linear_divergence(
            hp, wp, hq, wq, temperature=T, divergence=args.divergence, chunk_size=args.chunk_size
        )

    return {"klx (forward)": fused, "formula (forward)": formula}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for backend, device in available(args.backends):
        if backend not in ("numpy", "torch", "jax"):
            continue
        if backend == "numpy" and args.dtype == "bfloat16":
            continue
        sync = synchronizer(backend, device)
        for n in args.tokens:
            if backend == "torch":
                fns = torch_cases(n, args, device)
            elif backend == "jax":
                fns = jax_cases(n, args)
            else:
                fns = numpy_cases(n, args)
            for name, fn in fns.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t, spread = median_time(
                        fn, sync, min_runs=args.runs, max_runs=args.runs, budget_s=0, warmup=1
                    )
                    mem = extra_peak_bytes(fn, sync, backend, device)
                rows.append(
                    {
                        "backend": backend,
                        "device": device,
                        "impl": name,
                        "tokens": n,
                        "hidden": args.hidden,
                        "vocab": args.vocab,
                        "dtype": args.dtype,
                        "median_s": t,
                        "spread_s": spread,
                        "extra_peak_mb": None if mem is None else mem / 2**20,
                    }
                )
                print(
                    f"{backend}/{device} {n} tokens {name}: {t:.3f} s, "
                    f"{'-' if mem is None else f'{mem / 2**20:.0f} MiB'}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | device | tokens | implementation | s | x eager | extra peak MiB | "
        "x eager's memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(
            (
                e
                for e in rows
                if (e["backend"], e["device"], e["tokens"])
                == (r["backend"], r["device"], r["tokens"])
                and ("eager" in e["impl"] or "formula" in e["impl"])
                and "compile" not in e["impl"]
            ),
            None,
        )
        ratio = "-" if ref is None else f"{r['median_s'] / ref['median_s']:.2f}"
        mem = r["extra_peak_mb"]
        mem_s = "-" if mem is None else f"{mem:.0f}"
        ref_mem = None if ref is None else ref["extra_peak_mb"]
        mem_ratio = "-" if mem is None or not ref_mem else f"{mem / ref_mem:.3f}"
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['tokens']} | {r['impl']} | "
            f"{r['median_s']:.3f} | {ratio} | {mem_s} | {mem_ratio} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['backend']}/{r['device']}: {r['impl']}", []).append(r)
    for label, pts in series.items():
        xs = [p["tokens"] for p in pts]
        style = "-" if "klx" in label else "--"
        mem = [p["extra_peak_mb"] for p in pts]
        if all(m is not None for m in mem):
            ax_m.plot(xs, mem, style, marker="o", label=label)
        ax_t.plot(xs, [p["median_s"] for p in pts], style, marker="o", label=label)
    r0 = rows[0]
    title = f"hidden {r0['hidden']}, vocab {r0['vocab']}, {r0['dtype']}"
    ax_m.set(xlabel="tokens", ylabel="extra peak memory (MiB)", title=f"memory ({title})")
    ax_t.set(xlabel="tokens", ylabel="seconds (median)", title="time (torch/JAX: fwd + bwd)")
    for ax in (ax_m, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"sizes {PRESETS['quick']}")
    size.add_argument("--full", action="store_true", help=f"sizes {PRESETS['full']} (a GPU)")
    d = PRESETS["default"]
    ap.add_argument("--tokens", type=int, nargs="*", help=f"default {d['tokens']}")
    ap.add_argument("--hidden", type=int, help=f"default {d['hidden']}")
    ap.add_argument("--vocab", type=int, help=f"default {d['vocab']}")
    ap.add_argument("--dtype", help=f"default {d['dtype']}")
    ap.add_argument("--temperature", type=float, default=2.0, help="default 2.0")
    ap.add_argument("--divergence", default="kl", help="klx's divergence= (default 'kl')")
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="klx's chunk_size= (default: its budget)"
    )
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (3)")
    ap.add_argument("--backends", nargs="*", help="default: numpy torch jax (installed ones)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", default="benchmarks/out", help="folder for the json and png")
    args = ap.parse_args(argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform == "linux":
        # glibc keeps freed blocks below a threshold that grows as blocks are freed, so
        # the resident set would not fall between calls: a fixed 1 MiB threshold returns
        # every large block to the system at once, and each call's peak is its own.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.fused_linear", *argv], env)
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    for key, value in preset.items():
        if getattr(args, key) in (None, []):
            setattr(args, key, value)
    load = os.getloadavg()
    rows = measure(args)
    text = table(rows)
    print(text)
    print(f"\nload average before the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_linear.json").write_text(json.dumps(rows, indent=1))
    if rows and plot(rows, out / "fused_linear.png"):
        print(f"wrote {out / 'fused_linear.json'} and {out / 'fused_linear.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
