"""Cache-blocked CPU evaluation of `kl_div` for NumPy and eager PyTorch.

The generic definition (:mod:`klx._agnostic`) spends several passes over memory on
guards (``where``) that almost never fire. Here the flattened inputs are walked in
blocks that fit in cache, and each block first gets the bare formula, written in place
into one cache-resident buffer:

    y * (log y - x)         or, with log_target,     exp(y) * (y - x)

That formula equals the definition bit for bit wherever the target is positive; every
other case (a zero target, -inf, NaN, a negative target) makes the block's sum NaN, and
only then is the block evaluated again with the definition itself. So the result is
the definition's, at the cost of about one pass over the inputs.

It reads the block sums (a Python branch on values), so it runs only on eager CPU
arrays: not under autograd, ``torch.compile`` or ``jax.jit`` (those use the generic
path, which their compilers fuse).
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

from klx._agnostic import divide, kl_terms, reduction_divisor

__all__ = ["kl_div_numpy", "kl_div_torch"]

#: Elements per block: three float32 blocks of this size stay in a 256 KiB L2 cache.
NUMPY_BLOCK = 1 << 14
#: torch ops cost microseconds each and split work over threads: larger blocks.
TORCH_BLOCK = 1 << 16


def _reduced(call: Any, total: float) -> float:
    div = reduction_divisor(call.reduction, call.shape, call.first)
    return total / div if div else math.nan


def kl_div_numpy(call: Any) -> Any:
    """`kl_div` of two C-contiguous float32/float64 NumPy arrays of one shape and dtype."""
    import numpy as np

    xp, x, y, log_target = call.xp, call.input, call.target, call.log_target
    n = x.size
    xf, yf = x.reshape(-1), y.reshape(-1)
    out = np.empty(n, dtype=x.dtype) if call.reduction == "none" else None
    # NumPy runs on one core; its ufuncs release the GIL, so threads can share the blocks.
    # Each thread takes a fixed contiguous share, and the shares' sums are added in
    # order: the result does not depend on scheduling.
    workers = _workers() if n >= PARALLEL_MIN else 1
    bounds = [n * i // workers for i in range(workers + 1)]
    shares = [(bounds[i], bounds[i + 1]) for i in range(workers)]

    def share(lo_hi: tuple[int, int]) -> float:
        return _numpy_share(xp, xf, yf, out, lo_hi[0], lo_hi[1], log_target)

    total = share(shares[0]) if workers == 1 else sum(_pool().map(share, shares))
    if out is not None:
        return out.reshape(x.shape)
    return np.asarray(_reduced(call, total), dtype=x.dtype)


def _numpy_share(
    xp: ModuleType, xf: Any, yf: Any, out: Any, lo: int, hi: int, log_target: bool
) -> float:
    """Sum of the terms of xf[lo:hi], yf[lo:hi], block by block (terms into `out` if given)."""
    import numpy as np

    block = min(NUMPY_BLOCK, max(hi - lo, 1))
    buf = np.empty(block, dtype=xf.dtype)
    tmp = np.empty(block, dtype=xf.dtype) if log_target else None
    total = 0.0
    with np.errstate(all="ignore"):
        for start in range(lo, hi, block):
            stop = min(start + block, hi)
            xb, yb = xf[start:stop], yf[start:stop]
            tb = out[start:stop] if out is not None else buf[: stop - start]
            # weight * (log weight - x), the sum as a dot product (one pass fewer)
            if log_target:
                w = tmp[: stop - start]  # type: ignore[index]
                np.exp(yb, out=w)
                np.subtract(yb, xb, out=tb)
            else:
                w = yb
                np.log(yb, out=tb)
                np.subtract(tb, xb, out=tb)
            if out is not None:
                np.multiply(tb, w, out=tb)
                s = float(np.sum(tb))
            else:
                s = float(np.dot(tb, w))
            if s != s:  # a zero target, or NaN somewhere: the definition decides
                tb[...] = _exact(xp, xb, yb, log_target)
                s = float(np.sum(tb))
            total += s
    return total


#: Below this many elements one thread is faster than two.
PARALLEL_MIN = 1 << 18
_POOL: list[Any] = []


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, int(os.environ.get("KLX_NUM_THREADS", cores))))


def _pool() -> Any:
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="klx"))
    return _POOL[0]


def kl_div_torch(call: Any) -> Any:
    """`kl_div` of two contiguous float32/float64 CPU tensors of one shape and dtype."""
    import torch

    xp, x, y, log_target = call.xp, call.input, call.target, call.log_target
    n = x.numel()
    if n <= TORCH_BLOCK:
        return _kl_div_torch_small(call)
    xf, yf = x.reshape(-1), y.reshape(-1)
    out = torch.empty(n, dtype=x.dtype) if call.reduction == "none" else None
    buf = torch.empty(TORCH_BLOCK, dtype=x.dtype)
    tmp = torch.empty(TORCH_BLOCK, dtype=x.dtype) if log_target else None
    total = 0.0
    for start in range(0, n, TORCH_BLOCK):
        stop = min(start + TORCH_BLOCK, n)
        xb, yb = xf[start:stop], yf[start:stop]
        tb = out[start:stop] if out is not None else buf[: stop - start]
        s = _torch_formula(xb, yb, tb, None if tmp is None else tmp[: stop - start], out is None)
        if s != s:  # a zero target, or NaN somewhere: the definition decides
            tb.copy_(_exact(xp, xb, yb, log_target))
            s = float(tb.sum())
        total += s
    if out is not None:
        return out.reshape(x.shape)
    return torch.tensor(_reduced(call, total), dtype=x.dtype)


def _torch_formula(x: Any, y: Any, out: Any, tmp: Any, dot: bool) -> float:
    """The bare formula into `out` (`tmp` given for log targets); returns its sum.

    With `dot`, `out` holds only ``log w - x`` and the sum is a dot product with the
    weights ``w``: one pass fewer than multiplying, then summing.
    """
    import torch

    if tmp is not None:
        w = torch.exp(y, out=tmp)
        torch.sub(y, x, out=out)
    else:
        w = y
        torch.log(y, out=out)
        out.sub_(x)
    if dot:
        return float(torch.dot(out, w))
    out.mul_(w)
    return float(out.sum())


def _kl_div_torch_small(call: Any) -> Any:
    """One block: a single call of torch's own kernel, whose dispatch is cheapest.

    ``torch.kl_div`` computes ``xlogy(y, y) - y x`` (or ``e^y (y - x)``): the definition
    up to rounding wherever it is not NaN, and NaN wherever the two could differ (a
    zero target, -inf, NaN), which then sends the call to the definition itself.
    """
    import torch

    x, y, reduction = call.input, call.target, call.reduction
    enum = _TORCH_REDUCTION[reduction]
    out = torch.kl_div(x, y, enum, log_target=call.log_target)
    v = (out if enum else out.sum()).item()  # one number read on the CPU: no sync
    if v != v:
        out = _exact(call.xp, x, y, call.log_target)
        if enum:
            out = out.sum()
            if reduction == "mean":
                out = divide(out, x.numel())
    if reduction == "batchmean" and call.first is not None:
        out = divide(out, call.first)
    return out


#: torch's reduction enum; 'batchmean' is a 'sum' divided afterwards, as in torch.
_TORCH_REDUCTION = {"none": 0, "mean": 1, "sum": 2, "batchmean": 2}


def _exact(xp: ModuleType, xb: Any, yb: Any, log_target: bool) -> Any:
    return kl_terms(
        xp, yb, xb, p_form="log_probs" if log_target else "probs", q_form="log_probs", axis=-1
    )
