"""Distillation-scale KL from logits: KL(softmax(t/T) || softmax(s/T)), 'batchmean'.

    python -m benchmarks.distill                 # 2048 x 32000 float32 on the CPU backends
    python -m benchmarks.distill --rows 8192 --vocab 128256 --dtype bfloat16 --backward  # GPU
    python -m benchmarks.distill --axis 0       # (vocab, rows): distributions along axis 0

Peers: torch eager (two log_softmax, then kl_div with log_target=True), the same under
torch.compile, jax.jit of the same formula, and Liger Kernel's LigerKLDIVLoss on
log_softmax outputs where installed. The bound is the time to read both inputs once.
Prints a table and writes distill.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import benchmarks
import klx
from benchmarks.backends import available
from benchmarks.cli import parser
from benchmarks.timing import busy, extra_peak_bytes, load_average, median_time, synchronizer


def _klx(t: Any, s: Any, temperature: float, axis: int = -1) -> Any:
    return klx.kl_divergence(
        t,
        s,
        p_form="logits",
        q_form="logits",
        temperature=temperature,
        reduction="batchmean",
        axis=axis,
    )


def cases(backend: str, device: str, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    rows, vocab, T, ax = args.rows, args.vocab, args.temperature, args.axis
    shape = (rows, vocab) if ax == -1 else (vocab, rows)
    if backend == "torch":
        import torch
        import torch.nn.functional as F

        dtype = getattr(torch, args.dtype)
        g = torch.Generator(device=device).manual_seed(0)
        t = torch.randn(*shape, generator=g, device=device).to(dtype)
        s = torch.randn(*shape, generator=g, device=device).to(dtype)
        s.requires_grad_(args.backward)

        def eager(a: Any, b: Any) -> Any:
            lp, lq = F.log_softmax(a / T, ax), F.log_softmax(b / T, ax)
            return F.kl_div(lq, lp, reduction="sum", log_target=True) / rows

        fns: dict[str, Any] = {
            "klx": lambda: _klx(t, s, T, ax),
            "torch eager": lambda: eager(t, s),
        }
        if not args.no_compile:
            compiled = torch.compile(eager)
            fns["torch.compile"] = lambda: compiled(t, s)
        try:
            from liger_kernel.transformers import LigerKLDIVLoss

            liger = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            fns["Liger LigerKLDIVLoss"] = lambda: liger(
                F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
            )
            if ax != -1:  # Liger's kernel takes rows along the last axis only
                del fns["Liger LigerKLDIVLoss"]
        except ImportError:
            pass
        if args.backward:
            fns = {k: _with_backward(f, s) for k, f in fns.items()}
        read = lambda: torch.dot(t.reshape(-1).float(), t.reshape(-1).float())  # noqa: E731
        return fns, read
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        k1, k2 = jax.random.split(jax.random.key(0))
        t = jax.random.normal(k1, shape, dtype=getattr(jnp, args.dtype))
        s = jax.random.normal(k2, shape, dtype=getattr(jnp, args.dtype))

        def formula(a: Any, b: Any) -> Any:
            lp = jax.nn.log_softmax(a.astype(jnp.float32) / T, ax)
            lq = jax.nn.log_softmax(b.astype(jnp.float32) / T, ax)
            return jnp.sum(jnp.exp(lp) * (lp - lq)) / rows

        f_klx = jax.jit(lambda a, b: _klx(a, b, T, ax))
        f_ref = jax.jit(formula)
        dot = jax.jit(lambda a, b: jnp.vdot(a, b))
        return {"jax.jit(klx)": lambda: f_klx(t, s), "jax.jit(formula)": lambda: f_ref(t, s)}, (
            lambda: dot(t, s)
        )
    import numpy as np

    rng = np.random.default_rng(0)
    t = rng.standard_normal(shape, dtype=np.float32)
    s = rng.standard_normal(shape, dtype=np.float32)

    def np_formula() -> Any:
        from scipy.special import log_softmax

        lp, lq = log_softmax(t / T, ax), log_softmax(s / T, ax)
        return np.sum(np.exp(lp) * (lp - lq)) / rows

    return {"klx": lambda: _klx(t, s, T, ax), "numpy/scipy formula": np_formula}, (
        lambda: np.dot(t.reshape(-1), s.reshape(-1))
    )


def _with_backward(fn: Any, s: Any) -> Any:
    def run() -> Any:
        s.grad = None
        out = fn()
        out.backward()
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=2048, help="tokens")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--dtype", default="float32", help="logits dtype")
    ap.add_argument("--temperature", type=float, default=2.0, help="softmax temperature")
    ap.add_argument(
        "--axis",
        type=int,
        choices=(0, -1),
        default=-1,
        help="the vocabulary axis: -1 (rows, vocab) or 0 (vocab, rows)",
    )
    ap.add_argument("--backward", action="store_true", help="time forward plus backward (torch)")
    ap.add_argument(
        "--backends", nargs="*", default=None, help="numpy torch jax (None: every installed)"
    )
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for the results")
    args = ap.parse_args(argv)
    with busy(args.load):
        rows_out = measure_all(args)
    print(f"load average {load_average():.1f}, {args.load} busy processes", file=sys.stderr)
    print("| backend | device | implementation | ms | x bound | extra peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        mem = "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.0f}"
        print(
            f"| {r['backend']} | {r['device']} | {r['impl']} | {r['median_ms']:.2f} "
            f"| {r['x_bound']:.1f} | {mem} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(rows_out, indent=1))
    return 0


def measure_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_out = []
    for backend, device in available(args.backends):
        if backend not in ("numpy", "torch", "jax"):
            continue
        if args.dtype == "bfloat16" and backend == "numpy":
            continue
        fns, read = cases(backend, device, args)
        sync = synchronizer(backend, device)
        bound = median_time(read, sync)[0]
        for name, fn in fns.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, _ = median_time(fn, sync, budget_s=2.0, max_runs=20)
                mem = extra_peak_bytes(fn, sync, backend, device)
            rows_out.append(
                {
                    "backend": backend,
                    "device": device,
                    "impl": name,
                    "shape": [args.rows, args.vocab]
                    if args.axis == -1
                    else [args.vocab, args.rows],
                    "axis": args.axis,
                    "dtype": args.dtype,
                    "backward": args.backward,
                    "median_ms": t * 1e3,
                    "bound_ms": bound * 1e3,
                    "x_bound": t / bound,
                    "extra_peak_mb": None if mem is None else mem / 2**20,
                }
            )
            print(f"{backend}/{device} {name}: {t * 1e3:.2f} ms", file=sys.stderr, flush=True)
    return rows_out


if __name__ == "__main__":
    raise SystemExit(main())
