"""klx's benchmark: klx on every installed backend and device against its native peers
and against the memory-bandwidth bound measured in the same run.

    python -m benchmarks.run            # the default sizes (a few minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # under a minute on a 2-core CPU
    python -m benchmarks.run --full     # up to sizes that fill device memory

It prints a table, and writes ``results.json`` and ``results.png`` to ``--out``.
Columns: median time; effective GB/s (bytes read, plus written for 'none'); the ratio
to the best peer (below 1 is faster); the ratio to the bound (the time to read both
inputs once, measured with a dot product; for 'none', also write one output, measured
with an addition); and the extra peak memory of one call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import klx
from benchmarks import peers as peer_lib
from benchmarks.timing import extra_peak_bytes, median_time, synchronizer

SIZES = {
    "quick": [(32, 100), (1024, 4096)],
    "default": [(32, 100), (1024, 4096), (4096, 4096)],
    "full": [(32, 100), (1024, 4096), (4096, 4096), (16384, 4096), (65536, 4096)],
}
REDUCTIONS = {"quick": ["sum", "none"], "default": ["none", "sum", "mean", "batchmean"]}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available(requested: list[str] | None) -> list[tuple[str, str]]:
    """(backend, device) pairs to run: every installed backend and its devices."""
    names = requested or ["numpy", "torch", "jax", "cupy"]
    out = []
    for name in names:
        if not _installed(name):
            if requested:
                sys.exit(f"backend {name!r} was asked for but is not installed")
            continue
        if name == "torch":
            import torch

            out.append(("torch", "cpu"))
            if torch.cuda.is_available():
                out.append(("torch", "cuda"))
        elif name == "jax":
            import jax

            out.append(("jax", jax.devices()[0].platform))
        elif name == "cupy":
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() > 0:
                    out.append(("cupy", "cuda"))
            except Exception as exc:  # no CUDA driver
                print(f"skipping cupy: {exc}", file=sys.stderr)
        else:
            out.append((name, "cpu"))
    return out


def make_inputs(
    backend: str, device: str, shape: tuple[int, int], seed: int = 0
) -> tuple[Any, Any]:
    """log Q and P as float32 arrays of `backend` on `device`, made on the device."""
    if backend == "torch":
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        y = torch.rand(shape, generator=g, device=device) + 1e-3
        y /= y.sum(-1, keepdim=True)
        x = torch.log_softmax(torch.randn(shape, generator=g, device=device), -1)
        return x, y
    if backend == "jax":
        import jax

        k1, k2 = jax.random.split(jax.random.key(seed))
        y = jax.random.uniform(k1, shape) + 1e-3
        y = y / y.sum(-1, keepdims=True)
        x = jax.nn.log_softmax(jax.random.normal(k2, shape), -1)
        return x.block_until_ready(), y.block_until_ready()
    if backend == "cupy":
        import cupy

        rs = cupy.random.RandomState(seed)
        y = rs.random_sample(shape, dtype=cupy.float32) + cupy.float32(1e-3)
        y /= y.sum(-1, keepdims=True)
        z = rs.standard_normal(shape, dtype=cupy.float32)
        x = z - cupy.log(cupy.exp(z).sum(-1, keepdims=True))
        return x, y
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.random(shape, dtype=np.float32) + np.float32(1e-3)
    y /= y.sum(-1, keepdims=True)
    z = rng.standard_normal(shape, dtype=np.float32)
    x = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if backend == "dask":
        import dask.array as da

        return da.from_array(x, chunks=(max(1, shape[0] // 4), shape[1])), da.from_array(
            y, chunks=(max(1, shape[0] // 4), shape[1])
        )
    return x, y


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
    budget = 0.25 if args.quick else 1.0
    rows: list[dict[str, Any]] = []
    pairs = available(args.backends)
    total = len(pairs) * len(sizes)
    step = 0
    t_start = time.perf_counter()
    for backend, device in pairs:
        impls = peers_for(backend, compile_peers=not args.no_compile)
        sync = synchronizer(backend, device)
        for shape in sizes:
            step += 1
            if backend == "dask" and shape[0] * shape[1] < 1 << 20:
                continue
            try:
                x, y = make_inputs(backend, device, shape)
            except Exception as exc:  # out of memory at the largest sizes
                print(f"  {backend}/{device} {shape}: cannot allocate ({exc})", file=sys.stderr)
                continue
            n = shape[0] * shape[1]
            bounds = {
                k: median_time(f, sync, budget_s=budget)[0]
                for k, f in bound_fns(backend, x, y).items()
            }
            for reduction in reductions:
                bytes_moved = 2 * n * 4 + (n * 4 if reduction == "none" else 0)
                bound = bounds["copy" if reduction == "none" else "read"]
                results = []
                for name, make in impls.items():
                    fn = make(x, y, reduction)
                    try:
                        t, spread = median_time(fn, sync, budget_s=budget)
                        mem = extra_peak_bytes(fn, sync, backend, device)
                    except Exception as exc:
                        print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    results.append((name, t, spread, mem))
                peer_times = [t for name, t, _, _ in results if "klx" not in name]
                best_peer = min(peer_times) if peer_times else math.nan
                for name, t, spread, mem in results:
                    rows.append(
                        {
                            "backend": backend,
                            "device": device,
                            "shape": list(shape),
                            "dtype": "float32",
                            "reduction": reduction,
                            "impl": name,
                            "median_ms": t * 1e3,
                            "iqr_ms": spread * 1e3,
                            "gb_per_s": bytes_moved / t / 1e9,
                            "x_best_peer": t / best_peer,
                            "x_bound": t / bound,
                            "bound_ms": bound * 1e3,
                            "extra_peak_mb": None if mem is None else mem / 2**20,
                        }
                    )
            elapsed = time.perf_counter() - t_start
            print(
                f"[{step}/{total}] {backend}/{device} {shape[0]}x{shape[1]} done ({elapsed:.0f} s)",
                file=sys.stderr,
            )
            del x, y
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| backend | device | shape | reduction | implementation | ms | GB/s "
        "| x best peer | x bound | extra MB |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        mem = "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}"
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['shape'][0]}x{r['shape'][1]} "
            f"| {r['reduction']} "
            f"| {r['impl']} | {r['median_ms']:.3f} | {r['gb_per_s']:.1f} | {r['x_best_peer']:.2f} "
            f"| {r['x_bound']:.2f} | {mem} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    groups = sorted({(r["backend"], r["device"]) for r in rows})
    reduction = "sum" if any(r["reduction"] == "sum" for r in rows) else rows[0]["reduction"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (backend, device) in zip(axes[0], groups, strict=False):
        sel = [
            r
            for r in rows
            if (r["backend"], r["device"]) == (backend, device) and r["reduction"] == reduction
        ]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted(
                (r["shape"][0] * r["shape"][1], r["x_bound"]) for r in sel if r["impl"] == impl
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=impl,
                linewidth=2.5 if "klx" in impl else 1.2,
            )
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{backend} / {device}, reduction='{reduction}'",
            xlabel="elements",
            ylabel="time / bandwidth bound",
        )
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, short timing (< 1 min)")
    size.add_argument("--full", action="store_true", help="up to sizes that fill device memory")
    ap.add_argument("--backends", nargs="*", help="numpy torch jax cupy dask (default: installed)")
    ap.add_argument("--reductions", nargs="*", choices=["none", "sum", "mean", "batchmean"])
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile peers")
    ap.add_argument("--out", default="benchmarks/out", help="folder for results.json / results.png")
    args = ap.parse_args(argv)

    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "klx": klx.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "argv": sys.argv,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    plotted = plot(rows, out / "results.png") if rows else False
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
