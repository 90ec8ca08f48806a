"""Divergences over many distributions on the CPU, a block of rows at a time, on klx's threads.

For [tokens, vocab] inputs (distillation: vocabularies of 32k to 256k) the array-API
definition makes several temporaries of the input's size (log-softmax, exp, products).
Here the distributions are taken a block at a time, so each temporary holds about
:data:`ROW_BLOCK_ELEMENTS` elements and the extra memory is that per thread, plus one value
per distribution. Each block is evaluated by the definition itself
(:func:`klx._agnostic.divergence_rows`), in NumPy, except KL between two logits inputs
(distillation's common case), which has its own kernel of the same quantities in about
half the passes (:func:`_kl_from_logits`), and the forward/reverse KL mixture, from the
same quantities (:func:`_mix_from_logits`); rows they cannot trust go to the definition.

* Any layout and any axis: the distribution axis is moved last (a view); rows are views
  where the batch axes merge (C order, a broadcast ``q`` of shape ``(1, V)``), else each
  block of rows is gathered (a copy of one block). float16 is computed in float32 per block.
* Threads: the blocks are cut into a few fixed pieces per thread (NumPy releases the GIL),
  each writing its own rows, so the result does not depend on scheduling.
* Torch CPU tensors are read through zero-copy NumPy views: no torch op per block, so nothing
  waits at torch's intra-op thread barriers when another process holds a core.
* Dask: each chunk (the distribution axis in one chunk) by the same code (:func:`dask_rows`).

Eager only (NumPy; torch on the CPU without autograd, not under ``torch.compile``).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from klx._accel import threads as _threads
from klx._accel.blocked import numpy_accumulation_dtype
from klx._accel.threads import share_pieces
from klx._agnostic import divergence_rows

if TYPE_CHECKING:
    from klx._typing import DivergenceCall

__all__ = ["ROW_BLOCK_ELEMENTS", "blocked_rows", "dask_rows"]

#: Elements per block and temporary: 256 KiB of float32, so the definition's ten or so
#: temporaries of a block stay in the L2 and L3 caches.
ROW_BLOCK_ELEMENTS = 1 << 16
#: Bytes per cache line: strided rows are gathered in tiles at least this many bytes wide.
_LINE = 64


def blocked_rows(call: DivergenceCall) -> Any:
    """Per-distribution values (shape ``call.batch_shape``) of a NumPy or torch CPU call."""
    torch_in = type(call.p).__module__.startswith("torch")
    p, q = (call.p.numpy(), call.q.numpy()) if torch_in else (call.p, call.q)
    keep = call.keep
    if keep is not None and torch_in:
        keep = keep.numpy()
    out = rows_numpy(call, p, q, keep, threads=True)
    if torch_in:
        import torch

        return torch.from_numpy(out)
    return out


def rows_numpy(call: DivergenceCall, p: Any, q: Any, keep: Any, *, threads: bool) -> Any:
    """Per-distribution values of NumPy arrays `p`, `q` (and mask `keep`) of `call`."""
    import numpy as np

    axis = call.axis
    p, q = np.moveaxis(p, axis, -1), np.moveaxis(q, axis, -1)
    batch, vocab = p.shape[:-1], p.shape[-1]
    n_rows = math.prod(batch)
    keep2 = None
    if keep is not None:
        keep = np.broadcast_to(np.moveaxis(keep, axis, -1), (*batch, 1))
        keep2 = keep.reshape(n_rows, 1)  # one bool per row: a copy is small
    acc = numpy_accumulation_dtype(p.dtype)
    out = np.empty(n_rows, dtype=acc)
    step = max(1, ROW_BLOCK_ELEMENTS // max(vocab, 1))
    p2, q2 = _rows(p, n_rows, vocab), _rows(q, n_rows, vocab)
    # Rows that are not contiguous (distributions along a leading axis) are copied a tile
    # of whole cache lines at a time (a 64-byte line holds 16 float32 rows' entries): a
    # block of 2 rows would read every line 8 times over, each time from main memory.
    tile = step
    if any(x2 is None or x2.strides[1] != x2.itemsize for x2 in (p2, q2)):
        tile = step * max(1, -(-_LINE // (step * p.itemsize)))
    starts = list(range(0, n_rows, tile))
    workers = _threads.workers() if threads else 1
    pieces = min(len(starts), 4 * workers if workers > 1 else 1)
    block_call = call._replace(axis=1)
    logits = (call.p_form, call.q_form) == ("logits", "logits")
    fast = _FROM_LOGITS.get(call.kind) if logits else None

    def share(i: int) -> None:
        import array_api_compat.numpy as xp

        with np.errstate(all="ignore"):  # per thread: NumPy's error state is thread-local
            for t0 in starts[len(starts) * i // pieces : len(starts) * (i + 1) // pieces]:
                t1 = min(t0 + tile, n_rows)
                pt, qt = _block(p, p2, batch, t0, t1), _block(q, q2, batch, t0, t1)
                for r0 in range(t0, t1, step):
                    r1 = min(r0 + step, t1)
                    pb = _contiguous(pt[r0 - t0 : r1 - t0]).astype(acc, copy=False)
                    qb = _contiguous(qt[r0 - t0 : r1 - t0]).astype(acc, copy=False)
                    kb = None if keep2 is None else keep2[r0:r1]
                    if fast is not None:
                        out[r0:r1] = fast(xp, block_call, pb, qb, kb)
                    else:
                        out[r0:r1] = divergence_rows(xp, block_call, pb, qb, kb)

    if pieces <= 1:
        share(0) if starts else None
    else:  # the caller and the pool's threads take the pieces in turn
        share_pieces(pieces, workers, lambda i, _: share(i))
    return out.reshape(batch)


def _shifted_pair(call: DivergenceCall, p: Any, q: Any, keep: Any) -> tuple[Any, ...]:
    """``(p, q, shifted p, shifted q, guarded)`` of two logits blocks: the inputs with the
    rows that `keep` drops set to 0, :func:`_shifted_exp` of each, and the rows where a
    weight of P is 0 or subnormal (the definition's to take)."""
    import numpy as np

    if keep is not None:
        p = np.where(keep, p, 0.0)
        q = np.where(keep, q, 0.0)
    shifted_p = _shifted_exp(p, call.temperature)
    shifted_q = _shifted_exp(q, call.temperature)
    s_p, _, lse_p = shifted_p
    guarded = np.min(s_p, axis=1) - lse_p < _LOG_TINY[s_p.dtype.itemsize]
    return p, q, shifted_p, shifted_q, guarded


def _kl_from_logits(xp: Any, call: DivergenceCall, p: Any, q: Any, keep: Any) -> Any:
    """KL(P || Q) of each row of two logits blocks, in about half the definition's passes.

    The same quantities as :func:`klx._agnostic.kl_terms` (logits form): for each side the
    shifted logits ``s = (x - max x) / T``, ``lse = log1p(sum of exp(s) but one maximum)``
    (the same accurate log-sum-exp), then ``d = log p - log q = (s_p - s_q) - (lse_p -
    lse_q)`` and the terms ``p (d + expm1(-d))``, each ``>= 0``.

    Rows where some P is 0 (a ``-inf`` logit: a masked vocabulary) or subnormal (its few
    bits would make ``p expm1(-d)`` a poor ``q``) take the definition's guarded terms
    instead (:func:`_guarded_rows`). Rows whose value is still not finite (an infinite or
    NaN logit, or ``expm1`` overflowing where ``q / p > e^88``), and guarded rows where Q
    has a ``-inf`` logit (an underflowed P there is still positive: +inf), are evaluated
    again by the definition itself.
    """
    import numpy as np

    p, q, (sp, ep, lse_p), (sq, eq, lse_q), guarded = _shifted_pair(call, p, q, keep)
    # A weight of P too small for the dtype (a finite logit far below the others) against
    # a -inf logit of Q: +inf by the definition (p > 0 = q), which reads the logits; the
    # probabilities here cannot tell it from p = 0. Such rows take the definition. Where
    # P's logit is -inf too (a vocabulary masked on both sides) P is exactly 0: term 0.
    exact = guarded
    if guarded.any():
        exact = guarded & np.any((sq == -np.inf) & (sp != -np.inf), axis=1)
    d = np.subtract(sp, sq, out=sp)
    d -= (lse_p - lse_q)[:, None]
    w = np.multiply(ep, np.exp(-lse_p)[:, None], out=ep)  # p
    g = np.negative(d, out=sq)
    np.expm1(g, out=g)
    g += d
    g *= w
    values = g.sum(axis=1)
    if guarded.all():  # e.g. a masked vocabulary: every row, in place
        values = _guarded_rows(w, np.multiply(eq, np.exp(-lse_q)[:, None], out=eq), d, g)
    elif guarded.any():
        rows = np.nonzero(guarded)[0]
        qr = eq[rows] * np.exp(-lse_q[rows])[:, None]
        values[rows] = _guarded_rows(w[rows], qr, d[rows], np.empty_like(qr))
    bad = ~np.isfinite(values) | exact
    if bad.any():
        values[bad] = divergence_rows(xp, call, p[bad], q[bad], None if keep is None else keep[bad])
    return values


def _mix_from_logits(xp: Any, call: DivergenceCall, p: Any, q: Any, keep: Any) -> Any:
    """``lam KL(P || Q) + (1 - lam) KL(Q || P)`` of each row of two logits blocks, from the
    quantities of :func:`_kl_from_logits` (``python -m benchmarks.mix`` times it).

    With ``d = log p - log q`` and ``e = expm1(-d)``, KL's term is ``p (d + e)`` and the
    reverse one ``q (expm1(d) - d) = -p e - q d``; weighted, ``(2 lam - 1) p e + d (lam p
    - (1 - lam) q)``, or at ``lam = 1/2`` (the symmetric KL) ``d (p - q) / 2``, with no
    ``expm1`` at all: ``>= 0`` term by term (``d`` and ``p - q`` share their sign). Near
    ``d = 0`` the first-order parts cancel to the same absolute error (``d`` times the
    rounding of ``p``) as KL's ``p (d + e)``, and the rounding of the log-normalisers'
    difference enters only squared, as there; beyond, no part cancels.

    Rows where a weight of P is 0 or subnormal take the definition (a masked vocabulary, a
    ``-inf`` logit: +inf unless ``lam`` is 1 or Q is 0 there too), as do rows whose value
    is not finite (a NaN or infinite logit, ``q = 0 < p``, ``expm1`` overflowing where ``q /
    p > e^88``).
    """
    import numpy as np

    lam = dict(call.options)["lam"]
    if lam == 1.0:  # one direction: KL's own kernel
        return _kl_from_logits(xp, call, p, q, keep)
    if lam == 0.0:  # KL(Q || P), the mixture of the swapped pair at lam = 1 where it falls back
        return _kl_from_logits(xp, call._replace(options=(("lam", 1.0),)), q, p, keep)
    p, q, (sp, ep, lse_p), (sq, eq, lse_q), guarded = _shifted_pair(call, p, q, keep)
    # -d = log q - log p (its negation is exact: no pass negates d for expm1)
    nd = np.subtract(sq, sp, out=sq)
    nd += (lse_p - lse_q)[:, None]
    k_p, k_q = np.exp(-lse_p), np.exp(-lse_q)  # p = ep k_p, q = eq k_q
    if lam == 0.5:
        eq *= (k_q / k_p)[:, None]
        terms = np.subtract(eq, ep, out=ep)  # (q - p) / k_p
        terms *= nd
        values = terms.sum(axis=1) * (0.5 * k_p)
    else:
        # a = (2 lam - 1) k_p; the row sum is a * sum(e ep - nd v / a), v = lam p - (1 - lam) q
        a = (2.0 * lam - 1.0) * k_p
        e = np.expm1(nd, out=sp)
        e *= ep
        eq *= ((1.0 - lam) * k_q / a)[:, None]
        v = np.multiply(ep, (lam * k_p / a)[:, None], out=ep)
        v -= eq
        v *= nd
        e -= v
        values = e.sum(axis=1) * a
    np.maximum(values, 0.0, out=values)  # >= 0, as each term (a rounding below is not)
    bad = ~np.isfinite(values) | guarded
    if bad.any():
        values[bad] = divergence_rows(xp, call, p[bad], q[bad], None if keep is None else keep[bad])
    return values


def _guarded_rows(p: Any, q: Any, d: Any, buf: Any) -> Any:
    """Row sums of the definition's KL-from-logits terms (:func:`klx._agnostic.kl_terms`)
    from the probabilities and ``d = log p - log q``: ``p (d + c)`` with ``c = expm1(-d)``
    where ``d > -1`` and ``c = q / p - 1`` (exact: ``p c = q - p``) where ``d <= -1``, so no
    ``expm1`` of a large number and no subnormal ``p`` rebuilds ``q``; ``q`` where P is 0.
    `q` and `buf` (same shape) are overwritten."""
    import numpy as np

    zero = p == 0
    far = d <= -1.0
    np.maximum(d, -1.0, out=buf)
    np.negative(buf, out=buf)
    np.expm1(buf, out=buf)  # c where d > -1
    np.multiply(buf, p, out=buf)  # p c
    np.subtract(q, p, out=q)  # q - p: p c where d <= -1, and q where P is 0
    np.copyto(buf, q, where=far | zero)
    np.multiply(p, d, out=q)  # p d: 0 * -inf where P is 0
    np.copyto(q, 0.0, where=zero)
    buf += q
    return buf.sum(axis=1)


#: log of the smallest normal float32 / float64, by item size: a probability below it is
#: subnormal (fewer significant bits).
_LOG_TINY = {4: -87.33654475055310898657, 8: -708.39641853226410622}


def _shifted_exp(x: Any, temperature: float) -> tuple[Any, Any, Any]:
    """``s = (x - max x) / T`` of each row, ``exp(s)``, and ``log1p`` of the row's mass
    besides one maximum (whose ``exp(s)`` is exactly 1), as the definition's log-softmax."""
    import numpy as np

    rows = np.arange(x.shape[0])
    top = np.argmax(x, axis=1)
    s = np.subtract(x, x[rows, top][:, None])
    if temperature != 1.0:
        np.divide(s, temperature, out=s)
    e = np.exp(s)
    e[rows, top] = 0.0
    rest = e.sum(axis=1)
    e[rows, top] = 1.0
    return s, e, np.log1p(rest)


#: The row kernels of their own, by divergence (between two logits inputs); the other
#: divergences take the definition per block.
_FROM_LOGITS = {"kl": _kl_from_logits, "mix": _mix_from_logits}


def _rows(x: Any, n_rows: int, vocab: int) -> Any:
    """`x` as a (rows, vocab) view, or None where that needs a copy."""
    try:
        return x.reshape((n_rows, vocab), copy=False)
    except ValueError:
        return None


def _block(x: Any, x2: Any, batch: tuple[int, ...], r0: int, r1: int) -> Any:
    """Rows r0:r1 of `x` as a 2-D array: a view of `x2`, else gathered (one block's copy).

    Rows that are not contiguous (distributions along a leading axis) are gathered by
    reading the source in its own order, into a (vocab, rows) array whose transpose is
    returned: its rows are strided but compact (the tile stays in cache), and each
    block is made contiguous by :func:`_contiguous` before it is summed.
    """
    import numpy as np

    if x2 is None:
        return x[np.unravel_index(np.arange(r0, r1), batch)]
    block = x2[r0:r1]
    if block.shape[1] > 1 and block.strides[1] != block.itemsize:
        tile = np.empty((block.shape[1], block.shape[0]), dtype=block.dtype)
        tile[...] = block.T  # the source's inner axis is the rows: read it in order
        return tile.T
    return block


def _contiguous(block: Any) -> Any:
    """`block` in C order where its rows are strided: NumPy adds up a contiguous row
    pairwise, a strided one in sequence (whose float32 error grows with the vocabulary:
    1e-5 of the terms at 32000 along axis 0)."""
    import numpy as np

    if block.ndim == 2 and block.shape[1] > 1 and block.strides[1] != block.itemsize:
        return np.ascontiguousarray(block)
    return block


def dask_rows(call: DivergenceCall) -> Any:
    """Per-distribution values of a Dask call: each chunk by :func:`rows_numpy`.

    The distribution axis is rechunked to one chunk (a distribution must be whole); the
    other axes keep their chunks. Unknown chunk sizes take the definition.
    """

    da: Any = sys.modules["dask.array"]  # Dask is untyped

    p, q, keep, axis = call.p, call.q, call.keep, call.axis
    if any(math.isnan(s) for s in p.shape):  # unknown chunk sizes: the definition
        acc = call.acc
        xp = call.xp
        return divergence_rows(xp, call, xp.astype(p, acc), xp.astype(q, acc), keep)
    p = p.rechunk({axis: -1})
    q = q.rechunk(p.chunks)
    acc = numpy_accumulation_dtype(p.dtype)
    arrays = [p, q]
    if keep is not None:
        shape = tuple(1 if i == axis else s for i, s in enumerate(p.shape))
        keep = da.broadcast_to(keep, shape).rechunk(
            tuple((1,) if i == axis else c for i, c in enumerate(p.chunks))
        )
        arrays.append(keep)
    # Only the call's Python values travel with the tasks, not its Dask arrays nor its
    # namespace (a module does not pickle; rows_numpy reads neither).
    light = call._replace(xp=None, p=None, q=None, keep=None)  # type: ignore[arg-type]

    def chunk(a: Any, b: Any, k: Any = None) -> Any:
        return rows_numpy(light, a, b, k, threads=False)

    return da.map_blocks(chunk, *arrays, drop_axis=axis, dtype=acc)
