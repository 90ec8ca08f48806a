"""A Triton row kernel for :func:`klx.token_stats` on torch CUDA tensors: the values from
one read of each row (two for 'kl'), the gradient by the closed form of
:mod:`klx._accel.token_stats_torch`.

One program per token reads the policy's logits row ``z`` (and, for 'kl', the
reference's ``r``) in vocabulary blocks of at most :data:`BLOCK_V`, in float32 (float64
for float64 input; :func:`klx.token_stats` has already cast float16 / bfloat16 to
float32). With ``s = (z - M) / T`` against the running maximum ``M``, the first pass keeps
online, rescaled whenever ``M`` grows:

* ``c``, the count of entries at the maximum (``s == 0``), and ``R``, the mass beside
  them, so the log-sum-exp of ``s`` is ``L = log1p(R + (c - 1))`` (exact for nearly
  one-hot rows, as :func:`klx._token_stats_math.log_normaliser`);
* ``A = sum e s`` (terms ``<= 0``: rescaling adds ``-delta S``, of the same sign), so the
  entropy is ``L - A / S``, ``S = R + c``;
* the reference's ``M_q`` and ``L_q`` the same way.

The label's logit is one load. The second pass ('kl' only) takes the terms of
:func:`klx._token_stats_math.kl_terms_from_logs` with ``d = (s - s_q) - (L - L_q)``:
``p (d + expm1(-d))`` (>= 0, by a series near 0) where ``d > -1``, ``p d + q - p``
beyond, ``q`` where P is 0, ``+inf`` where P underflowed against Q = 0: the
definition's value in the kernel, so no row is taken again and nothing syncs. Equal rows
give d = 0 and a KL of exactly 0. A row of ``-inf`` logits (either side) is NaN, as the
definition's ``-inf - -inf``; NaN propagates. Dropped tokens (``where``, ``ignore_index``)
are 0 and labels out of range NaN (by ``torch.where`` on the host).

Per row it writes the statistics and the :class:`klx._token_stats_math.RowParts` (``M``,
``L``, ``M_q``, ``L_q``) that the closed-form backward
(:class:`klx._accel.token_stats_torch.StatsRows`) reads: it recomputes p from the logits
with torch operations. The dispatcher (:func:`klx._token_stats.stats_rows`, gated by
:func:`klx._accel.gates.token_stats_refusal`) sends here eager CUDA tensors with a
Python float temperature and a reference given as logits; ``torch.compile``,
``torch.func`` and forward AD keep the array-API definition.

What ran on a GPU: nothing. The kernel is tested under ``TRITON_INTERPRET=1`` on CPU
tensors (with the GPU's approximate float32 ``exp`` emulated), against float64 SciPy.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import triton
import triton.language as tl

from klx._accel.token_stats_torch import StatsRows
from klx._accel.token_stats_torch import rows as torch_rows
from klx._accel.triton_common import LAUNCH, device_guard, scalars
from klx._accel.triton_distill import _expm1, _log1p, _zero
from klx._namespace import in_torch_func
from klx._token_stats_math import RowParts, StatsSpec
from klx._typing import Array

__all__ = ["BLOCK_V", "rows", "values"]

#: The largest vocabulary block a program reads at once (a smaller power of two for
#: smaller vocabularies).
BLOCK_V = 2048
#: The kernel's outputs per row, in this order.
_SLOTS = ("lse", "logprob", "entropy", "kl", "m", "shift_lse", "ref_m", "ref_lse")


@triton.jit
def _load_row(ptr, off, start, vocab, dead, like, BLOCK: tl.constexpr):
    """Columns start .. start + BLOCK of a row at `off`, -inf past the row; a dropped
    row (`dead` not 0) is not read and holds 0 (its NaN reaches nothing)."""
    lanes = tl.arange(0, BLOCK)
    cols = start + lanes  # start is an i64 loop counter: 64-bit addressing, lanes added last
    x = tl.load(ptr + (off + start) + lanes, mask=(cols < vocab) & (dead == 0), other=float("-inf"))
    return tl.where((cols < vocab) & (dead != 0), 0.0, x.to(like.dtype))


@triton.jit
def _online(x, m, rest, count, t):
    """One block of the online log-sum-exp beside the maximum: the new maximum, the mass
    beside it, the count at it, ``s`` and ``exp(s)`` of the block, and the factors that
    rescale sums kept against the old maximum (``alpha``, ``delta``; ``grew``)."""
    NEG_INF: tl.constexpr = float("-inf")
    new_m = tl.maximum(m, tl.max(x, axis=0))
    grew = new_m > m
    shift = tl.where(new_m == NEG_INF, 0.0, new_m)  # never -inf - -inf
    delta = (tl.where(grew, new_m, 0.0) - tl.where(grew, m, 0.0)) / t  # (+inf from -inf)
    alpha = tl.exp(-delta)  # 0 where m was -inf (delta +inf)
    s = (x - shift) / t
    e = tl.exp(s)
    at_max = s == 0.0
    rest = tl.where(grew, (rest + count) * alpha, rest) + tl.sum(tl.where(at_max, 0.0, e), axis=0)
    count = tl.where(grew, 0.0, count) + tl.sum(at_max.to(e.dtype), axis=0)
    return new_m, rest, count, s, e, alpha, delta, grew


@triton.jit
def _kl_terms(s, sq, lse, lse_q):
    """:func:`klx._token_stats_math.kl_terms_from_logs` of shifted logits ``s``, ``sq``."""
    NEG_INF: tl.constexpr = float("-inf")
    p = tl.exp(s - lse)
    q = tl.exp(sq - lse_q)
    nil = (p == 0) | (s == NEG_INF)
    d = tl.where(nil, 0.0, (s - tl.where(nil, 0.0, sq)) - (lse - lse_q))
    small = d > -1.0
    ds = tl.where(small, d, 0.0)
    term = tl.where(small, p * (ds + _expm1(-ds)), p * d + (q - p))
    term = tl.where(nil, q, term)
    # P underflowed (its logit is finite) where Q is exactly 0: +inf, not 0
    return tl.where((sq == NEG_INF) & (s > NEG_INF) & (p == 0), float("inf"), term)


@triton.jit(do_not_specialize=["n", "vocab", "sz", "sr"])
def _stats_kernel(
    z_ptr,
    r_ptr,
    label_ptr,
    drop_ptr,
    out_ptr,
    scal_ptr,
    n,
    vocab,
    sz,
    sr,
    BLOCK: tl.constexpr,
    LABELS: tl.constexpr,
    DROP: tl.constexpr,
    KL: tl.constexpr,
    F64: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    zero = _zero(F64)
    t = tl.load(scal_ptr).to(zero.dtype)
    oz = row * sz
    dead = tl.zeros([1], dtype=tl.int32).sum(axis=0)
    if DROP:
        dead = tl.load(drop_ptr + row).to(tl.int32)
    orr = row * sr
    m = zero + NEG_INF
    rest = zero
    count = zero
    mass = zero  # sum e s against the running maximum (<= 0)
    m_q = zero + NEG_INF
    rest_q = zero
    count_q = zero
    for start in range(row * 0, vocab, BLOCK):  # i64
        z = _load_row(z_ptr, oz, start, vocab, dead, zero, BLOCK)
        total = rest + count
        m, rest, count, s, e, alpha, delta, grew = _online(z, m, rest, count, t)
        gone = alpha == 0  # sums against a maximum of -inf (0), or underflowed
        kept = tl.where(gone, 0.0, mass - tl.where(gone, 0.0, delta) * total) * alpha
        mass = tl.where(grew, kept, mass) + tl.sum(e * tl.where(e > 0, s, 0.0), axis=0)
        if KL:
            r = _load_row(r_ptr, orr, start, vocab, dead, zero, BLOCK)
            m_q, rest_q, count_q, _, _, _, _, _ = _online(r, m_q, rest_q, count_q, t)
    none = m == NEG_INF  # no finite logit: NaN, as the definition's -inf - -inf
    lse = tl.where(none, float("nan"), _log1p(tl.where(none, 0.0, rest + (count - 1.0))))
    top = tl.where(none, 0.0, m)
    tl.store(out_ptr + row, tl.where(none, float("nan"), top / t + lse))
    if LABELS:
        y = tl.load(label_ptr + row)
        picked = tl.load(z_ptr + oz + y, mask=dead == 0, other=0.0).to(zero.dtype)
        tl.store(out_ptr + (row + n), tl.where(none, float("nan"), (picked - top) / t - lse))
    entropy = lse - mass / tl.where(none, 1.0, rest + count)
    tl.store(out_ptr + (row + 2 * n), tl.where(none, float("nan"), entropy))
    tl.store(out_ptr + (row + 4 * n), m)
    tl.store(out_ptr + (row + 5 * n), lse)
    if KL:
        none_q = m_q == NEG_INF
        lse_q = _log1p(tl.where(none_q, 0.0, rest_q + (count_q - 1.0)))
        lse_q = tl.where(none_q, float("nan"), lse_q)
        shift = tl.where(none, 0.0, m)
        shift_q = tl.where(none_q, 0.0, m_q)
        kl = zero
        for start in range(row * 0, vocab, BLOCK):  # i64
            z = _load_row(z_ptr, oz, start, vocab, dead, zero, BLOCK)
            r = _load_row(r_ptr, orr, start, vocab, dead, zero, BLOCK)
            kl += tl.sum(_kl_terms((z - shift) / t, (r - shift_q) / t, lse, lse_q), axis=0)
        tl.store(out_ptr + (row + 3 * n), tl.where(none | none_q, float("nan"), kl))
        tl.store(out_ptr + (row + 6 * n), m_q)
        tl.store(out_ptr + (row + 7 * n), lse_q)


def values(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[tuple[Array, ...], RowParts]:
    """:func:`klx._token_stats_math.stats_values` of torch tensors (float32 or float64, a
    Python float temperature, a reference as logits) by the kernel: the statistics of
    `spec` and the row parts of the closed-form gradient. No value is read on the host."""
    names = spec.names
    batch, vocab = tuple(z.shape[:-1]), int(z.shape[-1])
    n = math.prod(batch)
    kl = "kl" in names
    z2 = z.reshape(n, vocab)
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    r2 = z2
    if kl:
        assert reference is not None  # ('kl' needs one)
        r2 = reference.reshape(n, vocab)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    drop = None if keep is None else ~keep.reshape(n)
    safe = bad = None
    if labels is not None:
        flat = labels.reshape(n).to(torch.int64)
        ignored = flat == spec.ignore_index
        drop = ignored if drop is None else drop | ignored
        bad = ((flat < 0) | (flat >= vocab)) & ~ignored
        safe = torch.where(bad | ignored, 0, flat)
    out = torch.empty((len(_SLOTS), n), dtype=z2.dtype, device=z2.device)
    scal = scalars([float(spec.temperature)], z2.dtype, z2.device)
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    with device_guard(z2):
        _stats_kernel[(n,)](
            z2,
            r2,
            z2 if safe is None else safe,
            z2 if drop is None else drop.to(torch.uint8),
            out,
            scal,
            n,
            vocab,
            z2.stride(0) if n > 1 else vocab,
            r2.stride(0) if n > 1 else vocab,
            BLOCK=block,
            LABELS=safe is not None and "logprob" in names,
            DROP=drop is not None,
            KL=kl,
            F64=z2.dtype == torch.float64,
            **LAUNCH,
        )
    slot = dict(zip(_SLOTS, out, strict=True))
    result = []
    for name in names:
        value = slot[name]
        if name == "logprob":
            value = torch.where(bad, math.nan, value)  # type: ignore[arg-type, unused-ignore]
        if drop is not None:
            value = torch.where(drop, 0.0, value)
        result.append(value.reshape(batch))
    col = (*batch, 1)
    parts = RowParts(
        slot["m"].reshape(col),
        slot["shift_lse"].reshape(col),
        slot["ref_m"].reshape(col) if kl else None,
        slot["ref_lse"].reshape(col) if kl else None,
    )
    return tuple(result), parts


class _KernelRows(StatsRows):
    """:class:`StatsRows` with the kernel's forward; its closed-form backward."""

    @staticmethod
    def forward(
        ctx: Any,
        z: Array,
        reference: Array | None,
        labels: Array | None,
        keep: Array | None,
        xp: ModuleType,
        spec: StatsSpec,
    ) -> Array:
        vals, parts = values(xp, spec, z, labels, reference, keep)
        ctx.xp, ctx.spec = xp, spec
        ctx.save_for_backward(z, reference, labels, keep, *parts, *vals)
        return torch.stack(vals)


def rows(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[Array, ...]:
    """The statistics of CUDA torch logits (:func:`klx._token_stats.stats_rows`) by the
    kernel; a gradient by the closed form. A second derivative and ``torch.func`` take
    :mod:`klx._accel.token_stats_torch`'s ways."""
    ref_grad = reference is not None and reference.requires_grad
    if not (torch.is_grad_enabled() and (z.requires_grad or ref_grad)):
        return values(xp, spec, z, labels, reference, keep)[0]
    if in_torch_func():
        return torch_rows(xp, spec, z, labels, reference, keep)
    fn: Any = _KernelRows.apply
    stacked = fn(z, reference, labels, keep, xp, spec)
    return tuple(stacked.unbind(0))
