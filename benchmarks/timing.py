"""Timing and memory measurement that is honest on every device.

* Warm-up first (compilation, caches, allocator), then the median of many runs.
* Device work is asynchronous: each run ends with a synchronisation (CUDA for torch
  and CuPy, ``block_until_ready`` for JAX) before the clock is read.
* Noise is measured, not hidden: :func:`interleaved` alternates the calls it compares and
  repeats until the interquartile range of each is small, flags those whose spread stays
  large, and records the load average; :func:`busy` adds busy processes on purpose.
* Extra peak memory: CUDA allocators' peak counters on GPUs; on the CPU the peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) above what was
  resident before the call.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
        return _compute_quietly
    return lambda _: None


def _compute_quietly(out: Any) -> None:
    """Compute a Dask result; NumPy's warnings about log(0) in the peers' formulas are noise."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out.compute()


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


# --------------------------------------------------------------------------- noise


#: A figure whose interquartile range is more than this fraction of its median is noisy.
MAX_SPREAD = 0.10


@dataclass
class Timing:
    """A median time with its noise: what a benchmark table prints."""

    median_s: float
    #: Interquartile range over the median (0.05: the middle half of the runs within 5%).
    spread: float
    runs: int
    #: The machine's 1-minute load average before and after the measurement.
    load: tuple[float, float]

    @property
    def noisy(self) -> bool:
        return self.spread > MAX_SPREAD

    def flag(self) -> str:
        """'' or a warning sign for tables: the spread stayed above MAX_SPREAD."""
        return f" (noisy: spread {self.spread:.0%})" if self.noisy else ""


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return math.nan


def _spread(times: list[float]) -> float:
    if len(times) < 4:
        return math.inf
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    sync: Callable[[Any], None],
    *,
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 100_000,
    warmup: int = 2,
    max_spread: float = MAX_SPREAD / 2,
    min_sample_s: float = 0.0,
) -> dict[str, Timing]:
    """Time several calls in alternation (one of each per round, the order rotating), so
    that each sees the same machine: the ratios of their medians hold under load.

    Rounds go on until every call's spread is at most `max_spread` (after `min_rounds`),
    or the budget is spent; a call whose spread is then still above :data:`MAX_SPREAD` is
    flagged (:attr:`Timing.noisy`).

    With `min_sample_s`, a call faster than that is repeated within one sample (as many
    times as its last warm-up call says fill `min_sample_s`), and the sample is the mean
    of those calls: microsecond calls are then not at the mercy of the clock's and the
    scheduler's jitter.
    """
    names = list(fns)
    if not names:
        return {}
    last: dict[str, float] = {}
    for _ in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            sync(fns[name]())
            last[name] = time.perf_counter() - t0
    number = {
        name: 1 if not min_sample_s else max(1, min(10_000, int(min_sample_s / max(t, 1e-9))))
        for name, t in last.items()
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    load0 = load_average()
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds:
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for name in order:
            fn, k = fns[name], number.get(name, 1)
            t0 = time.perf_counter()
            for _ in range(k):
                sync(fn())
            times[name].append((time.perf_counter() - t0) / k)
        rounds += 1
        if rounds < min_rounds:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            break
        if rounds % 5 == 0 and all(_spread(t) <= max_spread for t in times.values()):
            break
    load = (load0, load_average())
    return {
        name: Timing(statistics.median(t), _spread(t), len(t), load) for name, t in times.items()
    }


def measure(fn: Callable[[], Any], sync: Callable[[Any], None], **kwargs: Any) -> Timing:
    """One call's :class:`Timing` (see :func:`interleaved` for the stopping rule)."""
    return interleaved({"fn": fn}, sync, **kwargs)["fn"]


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """Run `n` busy processes (a Python loop each) for the duration of the block."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]
    try:
        if procs:
            time.sleep(1.0)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
