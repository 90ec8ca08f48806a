"""klx's benchmark: klx on every installed backend and device (Dask included) against its
native peers and against the memory-bandwidth bound measured in the same run.

    python -m benchmarks.run            # the default sizes (a few minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # about a minute on a 2-core CPU
    python -m benchmarks.run --full     # up to sizes that fill device memory
    python benchmarks/run.py --load 1   # from any directory; with one busy process

Every size runs twice: with dense targets, and with 1/8 of the target entries exactly 0
(one-hot and smoothed labels, top-k teachers). Each figure is repeated until the spread
of its runs is small, and flagged ('noisy') if it stays large; the load average is
recorded with each row. It prints a table, and writes ``results.json`` and
``results.png`` (one panel per backend and reduction) to ``--out``. Columns: median time;
effective GB/s (bytes read, plus written for 'none'); the ratio to the best peer (below
1 is faster); the ratio to the bound (the time to read both inputs once, measured with a
dot product; for 'none', also write one output, measured with an addition); the extra
peak memory of one call; the load average; the spread.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import platform
import time
from typing import Any

import benchmarks
import klx
from benchmarks import peers as peer_lib
from benchmarks.backends import available, make_inputs
from benchmarks.cli import parser, pyplot
from benchmarks.timing import busy, extra_peak_bytes, load_average, measure, synchronizer

SIZES = {
    "quick": [(32, 100), (1024, 4096)],
    "default": [(32, 100), (1024, 4096), (4096, 4096)],
    "full": [(32, 100), (1024, 4096), (4096, 4096), (16384, 4096), (65536, 4096)],
}
REDUCTIONS = {"quick": ["sum", "none"], "default": ["none", "sum", "mean", "batchmean"]}


def bound_fns(backend: str, x: Any, y: Any) -> dict[str, Any]:
    """Calls that only move the bytes: read both inputs (dot), and read two, write one (add)."""
    if backend == "torch":
        import torch

        xf, yf = x.reshape(-1), y.reshape(-1)
        return {"read": lambda: torch.dot(xf, yf), "copy": lambda: torch.add(x, y)}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        dot = jax.jit(lambda a, b: jnp.vdot(a, b))
        add = jax.jit(lambda a, b: a + b)
        return {"read": lambda: dot(x, y), "copy": lambda: add(x, y)}
    if backend == "cupy":
        import cupy

        xf, yf = x.ravel(), y.ravel()
        return {"read": lambda: cupy.dot(xf, yf), "copy": lambda: cupy.add(x, y)}
    if backend == "dask":
        return {"read": lambda: (x * y).sum(), "copy": lambda: x + y}
    import numpy as np

    xf, yf = x.reshape(-1), y.reshape(-1)
    return {"read": lambda: np.dot(xf, yf), "copy": lambda: np.add(x, y)}


def peers_for(backend: str, compile_peers: bool) -> dict[str, Any]:
    if backend == "numpy":
        return peer_lib.numpy_peers()
    if backend == "torch":
        return peer_lib.torch_peers(compile_peers)
    if backend == "jax":
        return peer_lib.jax_peers()
    if backend == "cupy":
        return peer_lib.cupy_peers()
    return peer_lib.dask_peers()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    mode = "quick" if args.quick else "full" if args.full else "default"
    sizes = SIZES[mode]
    reductions = args.reductions or REDUCTIONS.get(mode, REDUCTIONS["default"])
    targets = ["dense", "zeros 1/8"] if not args.dense_only else ["dense"]
    budget = 0.25 if args.quick else 1.0
    rows: list[dict[str, Any]] = []
    pairs = available(args.backends)
    total = len(pairs) * len(sizes) * len(targets)
    step = 0
    t_start = time.perf_counter()
    for backend, device in pairs:
        impls = peers_for(backend, compile_peers=not args.no_compile)
        sync = synchronizer(backend, device)
        for shape in sizes:
            for target in targets:
                step += 1
                if backend == "dask" and shape[0] * shape[1] < 1 << 20:
                    continue
                try:
                    x, y = make_inputs(backend, device, shape, zeros=target != "dense")
                except Exception as exc:  # out of memory at the largest sizes
                    print(f"  {backend}/{device} {shape}: cannot allocate ({exc})", file=sys.stderr)
                    continue
                where = f"[{step}/{total}] {backend}/{device} {shape[0]}x{shape[1]} {target}"
                bounds = {
                    k: measure(f, sync, budget_s=budget).median_s
                    for k, f in bound_fns(backend, x, y).items()
                }
                for reduction in reductions:
                    rows += _one_reduction(
                        backend,
                        device,
                        shape,
                        target,
                        reduction,
                        impls,
                        x,
                        y,
                        sync,
                        bounds,
                        budget,
                        where,
                    )
                elapsed = time.perf_counter() - t_start
                print(f"{where} done ({elapsed:.0f} s)", file=sys.stderr, flush=True)
                del x, y
    return rows


def _one_reduction(
    backend: str,
    device: str,
    shape: tuple[int, int],
    target: str,
    reduction: str,
    impls: dict[str, Any],
    x: Any,
    y: Any,
    sync: Any,
    bounds: dict[str, float],
    budget: float,
    where: str,
) -> list[dict[str, Any]]:
    n = shape[0] * shape[1]
    bytes_moved = 2 * n * 4 + (n * 4 if reduction == "none" else 0)
    bound = bounds["copy" if reduction == "none" else "read"]
    results = []
    for name, make in impls.items():
        fn = make(x, y, reduction)
        try:
            t = measure(fn, sync, budget_s=budget)
            mem = extra_peak_bytes(fn, sync, backend, device)
        except Exception as exc:
            print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        results.append((name, t, mem))
        print(
            f"  {where} {reduction} {name}: {t.median_s * 1e3:.3f} ms{t.flag()}",
            file=sys.stderr,
            flush=True,
        )
    peer_times = [t.median_s for name, t, _ in results if "klx" not in name]
    best_peer = min(peer_times) if peer_times else math.nan
    return [
        {
            "backend": backend,
            "device": device,
            "shape": list(shape),
            "dtype": "float32",
            "target": target,
            "reduction": reduction,
            "impl": name,
            "median_ms": t.median_s * 1e3,
            "spread": t.spread,
            "noisy": t.noisy,
            "runs": t.runs,
            "load": max(t.load),
            "gb_per_s": bytes_moved / t.median_s / 1e9,
            "x_best_peer": t.median_s / best_peer,
            "x_bound": t.median_s / bound,
            "bound_ms": bound * 1e3,
            "extra_peak_mb": None if mem is None else mem / 2**20,
        }
        for name, t, mem in results
    ]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| backend | device | shape | target | reduction | implementation | ms | GB/s "
        "| x best peer | x bound | extra MB | load avg | spread |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mem = "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}"
        spread = f"{r['spread']:.0%}" + (" noisy" if r["noisy"] else "")
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['shape'][0]}x{r['shape'][1]} "
            f"| {r['target']} | {r['reduction']} "
            f"| {r['impl']} | {r['median_ms']:.3f} | {r['gb_per_s']:.1f} | {r['x_best_peer']:.2f} "
            f"| {r['x_bound']:.2f} | {mem} | {r['load']:.1f} | {spread} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """One panel per (backend, device) and reduction: time over the bound against size."""
    plt = pyplot()
    if plt is None:
        return False
    groups = sorted({(r["backend"], r["device"]) for r in rows})
    reductions = [red for red in REDUCTIONS["default"] if any(r["reduction"] == red for r in rows)]
    fig, axes = plt.subplots(
        len(reductions),
        len(groups),
        figsize=(4.5 * len(groups), 3.5 * len(reductions)),
        squeeze=False,
    )
    for row_axes, reduction in zip(axes, reductions, strict=True):
        for ax, (backend, device) in zip(row_axes, groups, strict=True):
            sel = [
                r
                for r in rows
                if (r["backend"], r["device"]) == (backend, device) and r["reduction"] == reduction
            ]
            for impl, target in sorted({(r["impl"], r["target"]) for r in sel}):
                pts = sorted(
                    (r["shape"][0] * r["shape"][1], r["x_bound"])
                    for r in sel
                    if (r["impl"], r["target"]) == (impl, target)
                )
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    linestyle="-" if target == "dense" else "--",
                    label=f"{impl} ({target})",
                    linewidth=2.5 if "klx" in impl else 1.2,
                )
            ax.set(
                xscale="log",
                yscale="log",
                title=f"{backend}/{device}, '{reduction}'",
                xlabel="elements",
                ylabel="time / bandwidth bound",
            )
            ax.axhline(1.0, color="grey", linestyle=":")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, short timing")
    size.add_argument("--full", action="store_true", help="up to sizes that fill device memory")
    ap.add_argument(
        "--backends",
        nargs="*",
        help="numpy torch jax cupy dask (default: every installed one)",
    )
    ap.add_argument(
        "--reductions",
        nargs="*",
        choices=["none", "sum", "mean", "batchmean"],
        help="default: all four ('sum' and 'none' with --quick)",
    )
    ap.add_argument("--dense-only", action="store_true", help="leave out the targets with zeros")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile peers")
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for results.json/.png")
    args = ap.parse_args(argv)

    with busy(args.load):
        rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "klx": klx.__version__,
        "klx_path": klx.__file__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "argv": sys.argv,
        "busy_processes": args.load,
        "load_at_end": load_average(),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    plotted = plot(rows, out / "results.png") if rows else False
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
