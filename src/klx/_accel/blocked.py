"""Cache-blocked CPU evaluation of `kl_div` for NumPy, eager PyTorch and Dask chunks.

The generic definition (:mod:`klx._agnostic`) spends several passes over memory on
guards (``where``) that almost never fire. Here the inputs are walked in blocks that stay
in cache (:data:`BLOCK_BYTES` per array), and each block gets the bare formula,
written in place into one cache-resident buffer:

    y * (log y - x)         or, with log_target,     exp(y) * (y - x)

and summed as a dot product of ``log w - x`` with the weights ``w``. That equals the
definition bit for bit wherever the weight is positive. A zero weight makes the block's
sum NaN. For 'none' no sum is needed, and the block is checked by the floating-point
flags its three passes raise instead (:func:`_errors`: ``log 0`` raises
divide-by-zero, ``0 * inf`` and ``inf - inf`` raise invalid; a NaN input raises nothing and
gives NaN in the definition too), which saves the dot's pass. Either way, the block is
then evaluated once more with a *safe log*, in the same few passes:
``log w`` clamped to the lowest finite float (so ``0 * (log 0 - x)`` is 0, not NaN), and
the rest of that piece uses the safe log from the start (one cheap pass more), so
targets full of exact zeros do not pay twice. Each piece decides for itself, from its own
terms only, so which blocks take the safe log (and the sign of a zero term in 'none') is
the same on every run, whatever the threads' timing. Only a block whose safe sum is still NaN
(a NaN input, a negative target, a zero weight against a ``-inf`` input) is evaluated by
the definition itself. So the result is the definition's, at the cost of about one pass.

Threads: NumPy's ufuncs release the GIL, so the inputs are cut into a few fixed pieces per
thread (by position, never by scheduling) that the calling thread and the pool's threads
take in turn (:func:`klx._accel.threads.share_pieces`: a thread the OS holds back delays
only its own piece), and the pieces' sums are added in order: the result is the same bit
for bit on every run.

Torch CPU tensors take the same NumPy code through zero-copy views (``Tensor.numpy()``):
no torch op runs per block, so nothing waits at torch's intra-op thread barriers when
another process holds a core. Small inputs (any layout) are one block of a few NumPy calls
(:func:`_small_sum`), each cheaper than one torch op. Dask arrays are evaluated chunk by chunk by
the same NumPy code (:func:`kl_div_dask`), the sums added by Dask's reduction tree.

It reads the block sums (a Python branch on values), so it runs only on eager CPU
arrays: not under autograd, ``torch.compile`` or ``jax.jit`` (those use the generic
path, which their compilers fuse).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from klx._accel import threads as _threads
from klx._accel.threads import share_pieces
from klx._agnostic import kl_terms, reduction_divisor

if TYPE_CHECKING:
    from klx._typing import KLDivCall

__all__ = [
    "kl_div_dask",
    "kl_div_numpy",
    "kl_div_torch",
    "kl_sum_numpy",
    "numpy_accumulation_dtype",
]

#: Bytes per array and block: 2^18 float32 elements, so a 2^22-element call is 16 NumPy
#: calls per pass. Smaller blocks (fitting the 1 MiB L2 cache) measured slower on the
#: project's machine: the Python calls per block cost more than the L3 cache's latency.
BLOCK_BYTES = 1 << 20
#: Below this many elements one thread is faster than two.
PARALLEL_MIN = 1 << 17
#: At or below this many elements an input is one block (see :func:`_small_sum`).
SMALL = 1 << 14


def _reduced(call: KLDivCall, total: float) -> float:
    div = reduction_divisor(call.reduction, call.shape, call.first)
    return total / div if div else math.nan


# --------------------------------------------------------------------------- NumPy core


def kl_div_numpy(call: KLDivCall) -> Any:
    """`kl_div` of two float16/32/64 NumPy arrays of one shape, any layout."""
    return _kl_div_arrays(call, call.input, call.target)


def _kl_div_arrays(call: KLDivCall, x: Any, y: Any) -> Any:
    """`kl_div` of NumPy arrays `x`, `y` (perhaps views of tensors) as a NumPy array."""
    import numpy as np

    dtype = np.dtype(x.dtype)
    out = None
    own = False
    if call.reduction == "none":
        # the terms in the inputs' order in memory where they share a layout with
        # positive strides (a transposed or sliced input, as torch does), else in C order
        own = x.strides == y.strides and all(s > 0 for s in x.strides)
        out = np.empty_like(x, dtype=dtype) if own else np.empty(x.shape, dtype=dtype)
    total = kl_sum_numpy(x, y, out, call.log_target, out_like_x=own)
    if out is not None:
        return out
    # a float16 sum beyond float16's range is inf, as torch gives
    with np.errstate(over="ignore") if dtype.itemsize < 4 else contextlib.nullcontext():
        return np.asarray(_reduced(call, total), dtype=dtype)


def kl_sum_numpy(
    x: Any, y: Any, out: Any, log_target: bool, threads: bool = True, out_like_x: bool = False
) -> float:
    """The sum of the `kl_div` terms of NumPy arrays `x`, `y` (one shape, any layout).

    The terms are written into `out` (same shape) when it is given; `out_like_x` says
    that `out` was made by ``np.empty_like(x)`` and `y` has `x`'s strides, so the three
    share one order in memory. Accumulated in float32 for float16 input, else in the
    input's dtype (per block; blocks in float64).
    """
    n = x.size
    if n == 0:
        return 0.0
    if n <= SMALL:
        return _small_sum(x, y, out, log_target, out_like_x)
    workers = _threads.workers() if threads and n >= PARALLEL_MIN else 1
    pieces = _pieces(x, y, out, pieces_for(n, workers))
    if len(pieces) == 1:
        return _piece_sum(pieces[0], log_target)
    sums = [0.0] * len(pieces)

    def piece(i: int, bufs: Any) -> None:
        sums[i] = _piece_sum(pieces[i], log_target, bufs)

    acc = numpy_accumulation_dtype(x.dtype)
    share_pieces(len(pieces), workers, piece, lambda: _buffers(acc, log_target))
    return float(sum(sums))  # in the pieces' order: the same bits whoever ran which


def numpy_accumulation_dtype(dtype: Any) -> Any:
    """The NumPy dtype a block is evaluated in: float32 for float16 input, else the input's
    (:func:`klx._dtypes.accumulation_dtype` for any namespace)."""
    import numpy as np

    return np.dtype(np.float32) if np.dtype(dtype).itemsize < 4 else np.dtype(dtype)


def _buffers(acc: Any, log_target: bool) -> tuple[Any, Any]:
    """A block's buffers (in `acc`) for the terms and, for a log target, the weights."""
    import numpy as np

    block = max(1, BLOCK_BYTES // acc.itemsize)
    return np.empty(block, dtype=acc), np.empty(block, dtype=acc) if log_target else None


#: Terms of a piece's first block tried by the bare formula first: a target with exact
#: zeros shows one there, and the block starts with the safe log instead of twice.
PROBE = 1 << 12

#: Elements per piece of work handed to a thread, at least (a few blocks each).
PIECE_MIN = 1 << 19


def pieces_for(n: int, workers: int) -> int:
    """How many pieces `n` elements are cut into: a few per thread, so that a thread the
    OS holds back (a busy machine) leaves its remaining pieces to the others."""
    return 1 if workers == 1 else min(4 * workers, max(workers, n // PIECE_MIN))


def _pieces(x: Any, y: Any, out: Any, count: int) -> list[tuple[Any, Any, Any]]:
    """Cut the arrays into `count` fixed pieces (flat if contiguous, else along axis 0).

    The pieces depend on the sizes only; the pool runs them in any order, and their sums
    are added in order, so the result does not depend on scheduling.
    """
    flat = x.flags.c_contiguous and y.flags.c_contiguous
    if flat or x.ndim == 0:
        x, y = x.reshape(-1), y.reshape(-1)
        out = None if out is None else out.reshape(-1)
    count = max(1, min(count, x.shape[0]))
    bounds = [x.shape[0] * i // count for i in range(count + 1)]
    return [
        (x[a:b], y[a:b], None if out is None else out[a:b]) for a, b in itertools.pairwise(bounds)
    ]


def _chunks(x: Any, y: Any, out: Any, acc: Any) -> Iterator[tuple[Any, Any, Any]]:
    """1-D blocks of (x, y, out) in `acc`: views where possible, else NumPy's buffers."""
    import numpy as np

    block = max(1, BLOCK_BYTES // acc.itemsize)
    if x.ndim == 1 and x.dtype == acc and x.flags.c_contiguous and y.flags.c_contiguous:
        for s in range(0, x.shape[0], block):
            e = s + block
            yield x[s:e], y[s:e], None if out is None else out[s:e]
        return
    ops = [x, y] if out is None else [x, y, out]
    flags: Any = [["readonly"], ["readonly"], ["writeonly"]][: len(ops)]
    with np.nditer(
        ops,
        flags=["external_loop", "buffered", "zerosize_ok"],
        op_flags=flags,
        op_dtypes=[acc] * len(ops),
        casting="same_kind",
        order="K",
        buffersize=block,
    ) as it:
        for chunk in it:
            yield chunk[0], chunk[1], chunk[2] if out is not None else None


def _piece_sum(piece: tuple[Any, Any, Any], log_target: bool, bufs: Any = None) -> float:
    """Sum of the terms of one piece (x, y, out), block by block (terms into out if given).

    Once the piece has met a zero weight, its blocks start with the safe log. That is
    decided from this piece's terms alone, never from another thread's: which blocks take
    the safe log decides the sign of a 'none' term that underflows to zero
    (``exp(y) * (y - x)``), and it must not depend on the threads' timing.
    """

    x, y, out = piece
    acc = numpy_accumulation_dtype(x.dtype)
    buf, wbuf = _buffers(acc, log_target) if bufs is None else bufs

    def floor(m: int) -> Any:
        return _lowest(acc, m)

    total = 0.0
    probe = True
    safe = False
    with _errors(terms=out is not None):  # per thread: NumPy's error state is thread-local
        for xb, yb, ob in _chunks(x, y, out, acc):
            m = xb.shape[0]
            t = buf[:m]
            w = None if wbuf is None else wbuf[:m]
            if probe and m > PROBE:
                # The piece's first few thousand terms by the bare formula: targets with
                # zeros show it there, and the whole block need not be evaluated twice.
                k = PROBE
                wk = None if w is None else w[:k]
                ok = None if ob is None else ob[:k]
                head = _block(xb[:k], yb[:k], t[:k], wk, ok, None, False)
                safe = head != head
            probe = False
            # after a NaN, perhaps a zero weight: the safe log for the rest of the piece
            s, safe = _evaluate(xb, yb, t, w, ob, floor, safe, log_target)
            total += s
    return total


def _small_sum(x: Any, y: Any, out: Any, log_target: bool, out_like_x: bool = False) -> float:
    """:func:`kl_sum_numpy` of a small input: one block, with none of the pieces,
    iterators or kept buffers that large inputs amortise (a 32 x 100 call is a handful of
    NumPy calls).

    The arrays are flattened in memory order ('K') when they share one layout: a view
    where it is dense, else a copy read in memory order, and `out` (made like `x`, see
    :func:`_kl_div_arrays`) a view in the same order. Otherwise in C order.
    """
    import numpy as np

    acc = numpy_accumulation_dtype(x.dtype)
    same = x.strides == y.strides and (out is None or out_like_x)
    order = "K" if same else "C"
    xb = x.ravel(order).astype(acc, copy=False)
    yb = y.ravel(order).astype(acc, copy=False)
    m = xb.shape[0]
    w = np.empty(m, dtype=acc) if log_target else None
    flat = ob = None
    if out is not None:  # C-contiguous, or made like x: `flat` is a view
        flat = out.ravel(order)
        ob = flat if out.dtype == acc else np.empty(m, dtype=acc)
    t = ob if ob is not None else np.empty(m, dtype=acc)  # 'none': the terms go to `ob`

    def floor(k: int) -> Any:
        return _lowest(acc, k)

    with _errors(terms=out is not None):
        s, _ = _evaluate(xb, yb, t, w, ob, floor, False, log_target)
    if flat is not None and ob is not flat:
        with np.errstate(over="ignore"):  # a float32 term beyond float16's range is inf
            flat[...] = ob  # float16 terms, accumulated in float32
    return s


#: The lowest finite float of each dtype as a read-only array of a block's length, made
#: once per process (a fresh one per piece cost 1 MiB of writes each): NumPy's maximum
#: against an array of the same length runs about 2.5 times faster than against a scalar.
_LOWEST: dict[Any, Any] = {}


def _lowest(acc: Any, m: int) -> Any:
    """The first `m` entries of the array of `acc`'s lowest finite float."""
    import numpy as np

    a = _LOWEST.get(acc)
    if a is None or a.shape[0] < m:
        a = np.full(max(m, BLOCK_BYTES // acc.itemsize), np.finfo(acc).min, dtype=acc)
        a.flags.writeable = False
        _LOWEST[acc] = a  # another thread may make its own meanwhile: equal values
    return a[:m]


def _errors(terms: bool) -> Any:
    """NumPy's error state for a block: all ignored for a sum (its NaN check is the dot),
    and while the terms are written ('none') the flags that mark a term the bare formula
    may get wrong raise (a zero weight's ``log 0``; ``0 * inf``, ``inf - inf``), so the
    block needs no check of its own. Overflow (``exp`` of a large log target) and
    underflow are values, not errors."""
    import numpy as np

    if terms:
        return np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore")
    return np.errstate(all="ignore")


def _evaluate(
    xb: Any,
    yb: Any,
    t: Any,
    w: Any,
    ob: Any,
    floor: Callable[[int], Any],
    safe: bool,
    log_target: bool,
) -> tuple[float, bool]:
    """One block's sum (terms into `ob` if given): the bare formula, then with the safe
    log if its sum is NaN (a zero weight, perhaps), then by the definition if still NaN
    (NaN, or a zero weight against ``-inf``); and whether the safe log was used.
    `floor(m)` gives the array of the lowest finite float for the safe log."""
    import numpy as np

    m = xb.shape[0]
    s = _block(xb, yb, t, w, ob, floor(m) if safe else None, safe)
    if s != s and not safe:
        safe = True
        s = _block(xb, yb, t, w, ob, floor(m), True)
    if s != s:
        with np.errstate(all="ignore"):  # the definition's inf and NaN are values here
            terms = _exact(xb, yb, log_target)
            s = float(np.sum(terms))
        if ob is not None:
            ob[...] = terms
    return s, safe


def _block(xb: Any, yb: Any, t: Any, w: Any, ob: Any, lowest: Any, safe: bool) -> float:
    """The bare formula on one block; its sum (NaN where it cannot be trusted).

    `w` is the weights' buffer for log targets (None: `yb` holds the weights). With
    `safe`, ``log w`` is clamped to `lowest` (an array of the lowest finite float), so a
    zero weight gives a zero term. With `ob` (the terms' output block, 'none') the result
    is 0.0, or NaN if a pass raised one of :func:`_errors` (the caller's error state).
    """
    import numpy as np

    if ob is None:
        _log_ratio(xb, yb, t, w, lowest, safe)
        return float(np.dot(t, yb if w is None else w))  # NaN wherever a term is NaN
    # with the safe log, log 0 is what the clamp is for: not an error
    quiet = np.errstate(divide="ignore") if safe else contextlib.nullcontext()
    try:
        with quiet:
            _log_ratio(xb, yb, ob, w, lowest, safe)
        np.multiply(ob, yb if w is None else w, out=ob)
    except FloatingPointError:
        return math.nan
    if safe:
        np.add(ob, 0.0, out=ob)  # 0 * (lowest - x) is -0.0; the definition has +0.0
    return 0.0


def _log_ratio(xb: Any, yb: Any, t: Any, w: Any, lowest: Any, safe: bool) -> None:
    """``log w - x`` into `t` (the safe log with `safe`); for a log target, `w` = exp(y)."""
    import numpy as np

    if w is not None:  # log target: weights exp(y), logs y
        np.exp(yb, out=w)
        if safe:
            np.maximum(yb, lowest, out=t)
            np.subtract(t, xb, out=t)
        else:
            np.subtract(yb, xb, out=t)
        return
    np.log(yb, out=t)
    if safe:
        np.maximum(t, lowest, out=t)
    np.subtract(t, xb, out=t)


def _exact(xb: Any, yb: Any, log_target: bool) -> Any:
    """The definition's terms of one NumPy block."""
    import array_api_compat.numpy as xp

    return kl_terms(
        xp, yb, xb, p_form="log_probs" if log_target else "probs", q_form="log_probs", axis=-1
    )


# --------------------------------------------------------------------------- torch


def kl_div_torch(call: KLDivCall) -> Any:
    """`kl_div` of two float16/32/64 CPU tensors of one shape, any layout.

    The NumPy blocks on klx's threads, through zero-copy views, so no torch intra-op
    barrier is crossed per block; a small input is a handful of NumPy calls, each
    cheaper than one torch op (a 32 x 100 call: about 6 us against 16 us for
    ``torch.kl_div``).
    """
    import torch

    return torch.from_numpy(_kl_div_arrays(call, call.input.numpy(), call.target.numpy()))


# --------------------------------------------------------------------------- Dask


def kl_div_dask(call: KLDivCall) -> Any:
    """`kl_div` of two Dask arrays of one shape: each chunk by the NumPy blocks.

    'none' maps the terms over the chunks; the reductions map each chunk to its sum
    (float64) and add those with Dask's reduction tree. Chunks run on Dask's workers, one
    thread each (Dask supplies the parallelism).
    """
    import numpy as np

    da: Any = sys.modules["dask.array"]  # untyped
    x, y, log_target = call.input, call.target, call.log_target
    if any(math.isnan(c) for c in (*x.shape, *y.shape)) or x.ndim == 0:
        from klx._agnostic import kl_div

        return kl_div(call.xp, call)  # unknown chunk sizes: the definition decides
    dtype = np.dtype(x.dtype)
    x, y = da.core.unify_chunks(x, _index(x.ndim), y, _index(y.ndim))[1]  # one grid
    if call.reduction == "none":
        return da.map_blocks(_terms_chunk, x, y, log_target, dtype=dtype)
    sums = da.map_blocks(
        _sum_chunk,
        x,
        y,
        log_target,
        chunks=tuple((1,) * len(c) for c in x.chunks),
        dtype=np.float64,
    )
    # the chunks' sums added by Dask's tree, quietly: -inf + inf is the definition's NaN
    total = da.reduction(sums, _quiet_sum, _quiet_sum, dtype=np.float64)
    div = reduction_divisor(call.reduction, call.shape, call.first)
    return total.map_blocks(_quiet_finish, div, dtype.str, dtype=dtype)


def _index(ndim: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[:ndim]


def _terms_chunk(x: Any, y: Any, log_target: bool) -> Any:
    import numpy as np

    out = np.empty(x.shape, dtype=x.dtype)
    kl_sum_numpy(x, y, out, log_target, threads=False)
    return out


def _sum_chunk(x: Any, y: Any, log_target: bool) -> Any:
    import numpy as np

    total = kl_sum_numpy(x, y, None, log_target, threads=False)
    return np.full((1,) * x.ndim, total, dtype=np.float64)


def _quiet_sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """``np.sum`` of Dask's reduction tree with NumPy's warnings off (``-inf + inf``)."""
    import numpy as np

    with np.errstate(all="ignore"):
        return np.sum(x, axis=axis, keepdims=keepdims)


def _quiet_finish(total: Any, div: float, dtype: str) -> Any:
    """The reduced value of a Dask call's total in its dtype (a sum beyond float16's range
    is inf, as torch gives, without NumPy's overflow warning)."""
    import numpy as np

    with np.errstate(all="ignore"):
        out = total / div if div else total * math.nan
        return out.astype(dtype)
