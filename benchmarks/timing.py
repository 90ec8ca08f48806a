"""Timing and memory measurement that is honest on every device.

* Warm-up first (compilation, caches, allocator), then the median of many runs.
* Device work is asynchronous: each run ends with a synchronisation (CUDA for torch
  and CuPy, ``block_until_ready`` for JAX) before the clock is read.
* Extra peak memory: CUDA allocators' peak counters on GPUs; on the CPU the peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above what was
  resident before the call.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def synchronizer(backend: str, device: str) -> Callable[[Any], None]:
    """A function that waits until a result is computed."""
    if backend == "torch" and device.startswith("cuda"):
        import torch

        return lambda _: torch.cuda.synchronize()
    if backend == "cupy":
        import cupy

        return lambda _: cupy.cuda.get_current_stream().synchronize()
    if backend == "jax":
        return lambda out: out.block_until_ready()
    if backend == "dask":
        return lambda out: out.compute()
    return lambda _: None


def median_time(
    fn: Callable[[], Any],
    sync: Callable[[Any], None],
    *,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.0,
    warmup: int = 2,
) -> tuple[float, float]:
    """Median and interquartile spread (seconds) of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), q[2] - q[0]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def extra_peak_bytes(
    fn: Callable[[], Any], sync: Callable[[Any], None], backend: str, device: str
) -> float | None:
    """Peak memory one call allocates beyond what was in use before it (bytes)."""
    gc.collect()
    if backend == "torch" and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(out)
        peak = torch.cuda.max_memory_allocated()
        del out
        return float(peak - before)
    if backend == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        before = pool.used_bytes()
        out = fn()
        sync(out)
        peak = pool.total_bytes()  # CuPy has no peak counter; pool growth bounds it
        del out
        return float(max(peak - before, 0))
    if backend == "jax" and device != "cpu":
        return None
    try:
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        out = fn()
        sync(out)
        peak = _status_kb("VmHWM")
        del out
        return float(max(peak - before, 0) * 1024)
    except (OSError, KeyError):
        return None
