"""klx's benchmark: klx against each library's own KL divergence, on every installed backend
and device (Dask included), and against the memory-bandwidth bound measured in the same run.

    python -m benchmarks.run            # the short default: about 2 minutes on a 2-core CPU
    python -m benchmarks.run --quick    # a smoke run: two sizes, 'sum', dense targets
    python -m benchmarks.run --full     # every reduction, up to 65536 x 4096
    python benchmarks/run.py --load 1   # from any directory; with one busy process

What it prints, first: a one-screen summary, one line per backend and size: klx's time,
its ratio to the fastest other implementation (the best peer: below 1 is faster) and to
the bound, and a verdict, then notes (cells not measured and why, figures dropped). The
full table (every implementation, reduction and target, with dtype, GB/s, extra peak
memory, load average and spread) goes to ``results.md`` in ``--out``, with the summary;
``results.json`` holds every figure and ``results.png`` plots them.

The default: float32, shapes 32 x 100, 128 x 512, 512 x 2048 and 2048 x 4096 (the last
beyond the cache of most CPUs), reductions 'sum' and 'none' ('mean' and 'batchmean' are
'sum' divided by a number: the same passes over the same bytes; ``--full`` or
``--reductions`` run them), each with a dense target and with 1/8 of the target entries
exactly 0 (one-hot and smoothed labels, top-k teachers).

The bound: the bytes a call must move (both inputs read once; for 'none' also its output
written once) at the read bandwidth of the device, measured once at the start of the run:
the best of several passes over two arrays 4 times the last-level cache (NumPy's dot split
over every core; torch's sum where torch runs; on a GPU, the GPU libraries' dot). A time
below the bound is flagged ('!N' in the summary, 'below bound: check' in the table, and
a note); where the bytes fit in the last-level cache the bound does not apply, and the
ratio is marked 'in cache'.

Noise: klx and its peers are first timed in alternation (each sees the same machine), a
call faster than a millisecond is repeated within each sample, and runs go on until the
spread (interquartile range over the median) is small. A figure whose spread stays above
10% is measured again, twice at most, in alternation with the cell's other noisy figures
only (so it may come from another moment than its peers'); still above 10% it is 'noisy'
(kept, with its spread); above 50% its figure is dropped and the summary says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import benchmarks
import klx
from benchmarks import peers as peer_lib
from benchmarks import report
from benchmarks.backends import available, make_inputs, unknown_backend_error
from benchmarks.cli import parser
from benchmarks.timing import busy, extra_peak_bytes, interleaved, load_average, synchronizer

#: Rows x columns. The default's spread evenly on a log scale (3.2e3 to 8.4e6 elements);
#: its largest reads 64 MiB, beyond a 32 MiB last-level cache.
SIZES = {
    "quick": [(32, 100), (2048, 4096)],
    "default": [(32, 100), (128, 512), (512, 2048), (2048, 4096)],
    "full": [
        (32, 100),
        (128, 512),
        (512, 2048),
        (1024, 4096),
        (2048, 4096),
        (4096, 4096),
        (16384, 4096),
        (65536, 4096),
    ],
}
REDUCTIONS = {
    "quick": ["sum"],
    "default": ["sum", "none"],
    "full": ["sum", "none", "mean", "batchmean"],
}
TARGETS = {"quick": ["dense"], "default": ["dense", "zeros 1/8"], "full": ["dense", "zeros 1/8"]}
#: Seconds of timing per cell (all its implementations together).
BUDGET_S = {"quick": 0.25, "default": 0.3, "full": 1.0}
DTYPE, ITEMSIZE = "float32", 4

#: Below this many elements a Dask cell is not measured (see :func:`skip_reason`).
DASK_MIN_ELEMENTS = 1 << 20


def skip_reason(
    backend: str, shape: tuple[int, int], overhead_ms: float | None = None
) -> str | None:
    """Why a cell is not measured, or None where it is.

    Dask below :data:`DASK_MIN_ELEMENTS` elements: every Dask call builds a task graph and
    hands it to a scheduler, which costs milliseconds whatever the size (`overhead_ms`,
    where it was measured), so the figure would time the scheduler, not the KL divergence
    (klx's Dask path runs the NumPy kernels on each chunk: the numpy lines time those).
    """
    if backend == "dask" and shape[0] * shape[1] < DASK_MIN_ELEMENTS:
        cost = "milliseconds" if overhead_ms is None else f"{overhead_ms:.1f} ms here"
        return (
            f"below {DASK_MIN_ELEMENTS:,} elements a Dask call times its scheduler ({cost} "
            "per call, whatever the size), not the computation; the numpy lines time the "
            "kernels klx runs on each Dask chunk"
        )
    return None


def dask_overhead_ms(calls: int = 20) -> float:
    """The median time of a Dask sum over a 32 x 100 array in 4 chunks: the scheduler's
    cost of one call, next to nothing computed."""
    import dask.array as da
    import numpy as np

    a = da.from_array(np.ones((32, 100), np.float32), chunks=(8, 100))
    a.sum().compute()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        a.sum().compute()
        times.append(time.perf_counter() - t0)
    return sorted(times)[calls // 2] * 1e3


# ---------------------------------------------------------------------------- bandwidth


def cache_bytes(device: str) -> int:
    """The largest cache of `device` in bytes (the CPU's last level, a GPU's L2); 0 if
    unknown."""
    if device == "cpu":
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            try:
                text = (index / "size").read_text().strip()
            except OSError:
                continue
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        return max(sizes, default=0)
    try:
        import torch

        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))
    except Exception:  # no torch, or no CUDA device
        return 0


def _readers(
    device: str, backends: list[str], nbytes: int
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
    """Calls that read two arrays of `nbytes` each once, on `device`, one per library."""
    import numpy as np

    n = nbytes // ITEMSIZE
    out: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
    if device == "cpu":
        a = np.random.default_rng(0).random(n, dtype=np.float32)
        b = np.random.default_rng(1).random(n, dtype=np.float32)
        threads = os.cpu_count() or 1
        cuts = [n * i // threads for i in range(threads + 1)]
        parts = [slice(cuts[i], cuts[i + 1]) for i in range(threads)]
        pool = ThreadPoolExecutor(threads)

        def threaded_dot() -> Any:
            return list(pool.map(lambda s: np.dot(a[s], b[s]), parts))

        out[f"numpy dot on {threads} threads"] = (threaded_dot, lambda _: None)
        if "torch" in backends:
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            out["torch sum"] = (lambda: (ta.sum(), tb.sum()), lambda _: None)
        return out
    if "torch" in backends and device == "cuda":
        import torch

        ta = torch.rand(n, device="cuda")
        tb = torch.rand(n, device="cuda")
        out["torch.dot"] = (lambda: torch.dot(ta, tb), lambda _: torch.cuda.synchronize())
    if "cupy" in backends and device == "cuda":
        import cupy

        ca = cupy.random.random(n, dtype=cupy.float32)
        cb = cupy.random.random(n, dtype=cupy.float32)
        out["cupy.dot"] = (
            lambda: cupy.dot(ca, cb),
            lambda _: cupy.cuda.get_current_stream().synchronize(),
        )
    if "jax" in backends and device not in ("cpu", "cuda"):
        import jax
        import jax.numpy as jnp

        ja = jax.random.uniform(jax.random.key(0), (n,))
        jb = jax.random.uniform(jax.random.key(1), (n,))
        dot = jax.jit(jnp.vdot)
        out["jax vdot"] = (lambda: dot(ja, jb), lambda r: r.block_until_ready())
    return out


def read_bandwidth(device: str, backends: list[str], passes: int = 8) -> tuple[float, str]:
    """The read bandwidth of `device` (bytes per second) and how it was measured: the best
    pass of each reader over two arrays of at least 4 times the device's largest cache
    (64 MiB at least), the best reader's figure."""
    nbytes = max(4 * cache_bytes(device), 64 * 2**20)
    best: tuple[float, str] = (0.0, "")
    for name, (fn, sync) in _readers(device, backends, nbytes).items():
        sync(fn())  # warm-up: pages touched, kernels compiled
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - t0)
        bw = 2 * nbytes / min(times)
        if bw > best[0]:
            best = (bw, f"{name}, 2 x {nbytes // 2**20} MiB, best of {passes}")
    return best


# -------------------------------------------------------------------------------- runs


def peers_for(backend: str, compile_peers: bool) -> dict[str, Any]:
    """klx and the implementations a user of `backend` would pick instead."""
    if backend == "numpy":
        return peer_lib.numpy_peers()
    if backend == "torch":
        return peer_lib.torch_peers(compile_peers)
    if backend == "jax":
        return peer_lib.jax_peers()
    if backend == "cupy":
        return peer_lib.cupy_peers()
    return peer_lib.dask_peers()


def mode_of(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every cell; returns the rows, the cells skipped and the bandwidths."""
    mode = mode_of(args)
    sizes = SIZES[mode]
    reductions = args.reductions or REDUCTIONS[mode]
    targets = ["dense"] if args.dense_only else TARGETS[mode]
    budget = BUDGET_S[mode]
    pairs = available(args.backends)
    backends = [b for b, _ in pairs]
    t_start = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", file=sys.stderr, flush=True)

    bandwidth: dict[str, dict[str, Any]] = {}
    for device in dict.fromkeys(d for _, d in pairs):
        bw, how = read_bandwidth(device, backends)
        bandwidth[device] = {"gb_per_s": bw / 1e9, "how": how, "cache_bytes": cache_bytes(device)}
        progress(f"read bandwidth of {device}: {bw / 1e9:.1f} GB/s ({how})")

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    overheads: dict[str, float | None] = {}
    total = len(pairs) * len(sizes) * len(targets)
    step = 0
    for backend, device in pairs:
        impls = peers_for(backend, compile_peers=not args.no_compile)
        sync = synchronizer(backend, device)
        bw = bandwidth[device]["gb_per_s"] * 1e9
        cache = bandwidth[device]["cache_bytes"]
        for shape in sizes:
            for target in targets:
                step += 1
                where = f"[{step}/{total}] {backend}/{device} {shape[0]}x{shape[1]} {target}"
                if skip_reason(backend, shape):
                    if backend not in overheads:
                        overheads[backend] = dask_overhead_ms() if backend == "dask" else None
                    reason = skip_reason(backend, shape, overheads[backend])
                    said = any(s["reason"] == reason for s in skipped)
                    skipped.append(
                        {
                            "backend": backend,
                            "device": device,
                            "shape": list(shape),
                            "reason": reason,
                        }
                    )
                    progress(f"{where}: not measured: {'as above' if said else reason}")
                    continue
                try:
                    x, y = make_inputs(backend, device, shape, zeros=target != "dense")
                except Exception as exc:  # out of memory at the largest sizes
                    reason = f"cannot allocate the inputs ({type(exc).__name__}: {exc})"
                    skipped.append(
                        {
                            "backend": backend,
                            "device": device,
                            "shape": list(shape),
                            "reason": reason,
                        }
                    )
                    progress(f"{where}: {reason}")
                    continue
                for reduction in reductions:
                    key = {
                        "backend": backend,
                        "device": device,
                        "shape": list(shape),
                        "dtype": DTYPE,
                        "target": target,
                        "reduction": reduction,
                    }
                    rows += _one_cell(
                        key, impls, x, y, sync, (bw, cache, budget), progress, skipped
                    )
                progress(f"{where} done")
                del x, y
    report.add_peer_ratios(rows)
    return {"rows": rows, "skipped": skipped, "bandwidth": bandwidth}


def _one_cell(
    key: dict[str, Any],
    impls: dict[str, Any],
    x: Any,
    y: Any,
    sync: Callable[[Any], None],
    limits: tuple[float, int, float],
    progress: Callable[[str], None],
    skipped: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every implementation on one cell, timed together; the noisy ones again.

    `limits` is (bandwidth in B/s, cache bytes, time budget in s). An implementation that
    raises is left out of the cell and recorded in `skipped` (the summary's notes say so).
    """
    bandwidth, cache, budget = limits
    fns = {}
    for name, make in impls.items():
        try:
            fn = make(x, y, key["reduction"])
            sync(fn())  # the first call: compilation, and whether it runs at all
        except Exception as exc:
            reason = f"{name} '{key['reduction']}' failed: {type(exc).__name__}: {exc}"
            progress(f"  {reason}")
            where = {k: key[k] for k in ("backend", "device", "shape")}
            skipped.append({**where, "reason": reason, "impl": name})
            continue
        fns[name] = fn
    if not fns:
        return []

    def measure(names: list[str]) -> dict[str, Any]:
        return interleaved(
            {n: fns[n] for n in names}, sync, budget_s=budget, min_sample_s=1e-3, warmup=1
        )

    settled = report.settle(measure, list(fns))
    rows = []
    for name, (timing, count) in settled.items():
        try:
            mem = extra_peak_bytes(fns[name], sync, key["backend"], key["device"])
        except Exception as exc:  # timed, but its memory could not be measured
            progress(f"  {name}: extra peak memory not measured: {type(exc).__name__}: {exc}")
            mem = None
        rows.append(
            report.cell_row(
                key,
                name,
                timing,
                count,
                itemsize=ITEMSIZE,
                bandwidth=bandwidth,
                cache_bytes=cache,
                extra_peak=mem,
            )
        )
    return rows


# ------------------------------------------------------------------------------ output


def machine() -> str:
    """The CPU's model name and core count (and the GPU's name where one is used)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def header(result: dict[str, Any], args: argparse.Namespace, when: str) -> list[str]:
    """The lines above the summary: what was run, on what, and the bound."""
    mode = mode_of(args)
    rows = result["rows"]
    reductions = list(dict.fromkeys(r["reduction"] for r in rows)) or REDUCTIONS[mode]
    targets = list(dict.fromkeys(r["target"] for r in rows)) or TARGETS[mode]
    bws = ", ".join(
        f"{dev} {b['gb_per_s']:.1f} GB/s ({b['how']})" for dev, b in result["bandwidth"].items()
    )
    caches = ", ".join(
        f"{dev} {b['cache_bytes'] / 2**20:.0f} MiB"
        for dev, b in result["bandwidth"].items()
        if b["cache_bytes"]
    )
    more = "" if mode == "full" else " (--full: every reduction, larger sizes)"
    return [
        f"klx {klx.__version__} benchmark, {mode} mode{more}",
        f"{machine()}; {DTYPE}; {when}. Times per call: lower is better.",
        f"Cells per size: reductions {', '.join(repr(r) for r in reductions)} x targets "
        f"{', '.join(targets)}.",
        "klx / best peer: klx's time over the fastest other implementation's, median "
        "(range) over the cells.",
        "klx / bound: klx's time over the bound = the bytes a call must move (both inputs "
        "read; 'none' also writes its output) / the read bandwidth measured in this run: "
        f"{bws}. Where those bytes fit in the largest cache ({caches or 'size unknown'}) they "
        f"are read from it: '{report.IN_CACHE}', no bound.",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run: 2 sizes, 'sum', dense")
    size.add_argument(
        "--full", action="store_true", help="every reduction, sizes up to 65536 x 4096"
    )
    ap.add_argument(
        "--backends",
        nargs="*",
        metavar="NAME",
        help="any of numpy torch jax cupy dask (without it: every installed one)",
    )
    ap.add_argument(
        "--reductions",
        nargs="*",
        choices=["none", "sum", "mean", "batchmean"],
        help="without it: 'sum' and 'none' (--quick: 'sum'; --full: all four)",
    )
    ap.add_argument("--dense-only", action="store_true", help="leave out the targets with zeros")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile peers")
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    ap.add_argument(
        "--out", default=str(benchmarks.OUT), help="folder for results.md, .json and .png"
    )
    args = ap.parse_args(argv)
    error = unknown_backend_error(args.backends or [])
    if error:
        ap.error(error)

    t0 = time.perf_counter()
    with busy(args.load):
        result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = {
        "klx": klx.__version__,
        "klx_path": klx.__file__,
        "python": platform.python_version(),
        "machine": machine(),
        "mode": mode_of(args),
        "argv": sys.argv,
        "busy_processes": args.load,
        "load_at_end": load_average(),
        "when": when,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    rows = result["rows"]
    title = (
        "klx against other KL-divergence implementations: time per call, lower is better\n"
        f"{machine()}, {DTYPE}, {when}; grey dotted line: the memory-bandwidth bound "
        + ", ".join(f"({d}: {b['gb_per_s']:.1f} GB/s)" for d, b in result["bandwidth"].items())
    )
    caches = {d: b["cache_bytes"] for d, b in result["bandwidth"].items()}
    plotted = (
        report.plot(rows, out / "results.png", title, caches, ITEMSIZE, result["skipped"])
        if rows
        else False
    )
    footer = [
        f"Full table ({len(rows)} rows: every implementation, dtype, GB/s, memory, spread): "
        f"{out / 'results.md'}",
        f"All figures: {out / 'results.json'}"
        + (f"; plot: {out / 'results.png'}" if plotted else "")
        + f". Took {meta['seconds']:.0f} s.",
    ]
    lines = header(result, args, when)
    summary = report.render_summary(rows, result["skipped"], lines, footer)
    (out / "results.md").write_text(
        f"# klx benchmark\n\n```text\n{summary}\n```\n\n## Every cell\n\n{report.table(rows)}\n"
    )
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
