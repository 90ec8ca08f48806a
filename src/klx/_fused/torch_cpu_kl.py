"""torch CPU's fast path for KL chunks of :func:`klx.fused_linear_divergence`, and for
the forward/reverse KL mixture ('mix': :func:`mix_chunk`, from the same quantities).

KL without softcap or hard term, on plain CPU tensors, is the common distillation call;
this takes its chunks in about half the passes of :mod:`klx._fused.gradients` (which
serves every other chunk with a closed form): each side's logits are shifted in place
(the matrix product's fresh output is the chunk's own), one ``exp`` per side, the
log-sum-exp by ``log1p`` of the mass besides one maximum, and the terms ``p (d +
expm1(-d))`` summed by one ``einsum``. Its math is :func:`klx._closed_forms.kl_derivatives`'s;
``tests/api/test_fused_linear.py`` checks both against float64 references, and
``benchmarks/fused_linear.py`` measures it (4 [chunk, vocab] arrays at its peak:
:data:`klx._fused.chunks.LEAN_TEMPORARIES`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from klx._fused.chunks import Flat, FusedSpec, closed_form_kl
from klx._fused.gradients import ChunkGrads
from klx._typing import Array

__all__ = [
    "kl_chunk",
    "kl_rows",
    "mix_chunk",
    "mix_rows",
    "plain_cpu_tensors",
    "serves",
    "takes_mix",
]


def plain_cpu_tensors(*arrays: Array | None) -> bool:
    """Whether every array given is a plain torch CPU tensor (not a DTensor or another
    subclass, whose vocabulary may be sharded; not CUDA)."""
    return all(
        a is None
        or (type(a).__module__ == "torch" and type(a).__name__ == "Tensor" and bool(a.is_cpu))
        for a in arrays
    )


def serves(spec: FusedSpec, f: Flat, cuda: bool) -> bool:
    """Whether this fast path takes the call's chunks: KL or the forward/reverse mixture
    without softcap or hard term, on plain CPU tensors (not DTensors, whose vocabulary may
    be sharded; not CUDA, where its one check of the values per chunk would sync)."""
    lean = closed_form_kl(spec) or takes_mix(spec)
    return lean and plain_cpu_tensors(*f.arrays()) and not cuda


def owned(f: Flat) -> tuple[bool, bool]:
    """Per side, whether a chunk's logits are the chunk's own (a matrix product's or a
    bias sum's fresh output), so :func:`kl_rows` may overwrite them."""
    p, q = f.sides
    return (p.weight is not None or p.bias is not None, q.weight is not None or q.bias is not None)


def _shifted_exp(z: Array, t: float, own: bool) -> tuple[Array, Array, Array]:
    """``s = (z - max z) / t`` per row (in place in `z` if `own`), ``exp(s)``, and
    ``log1p`` of the row's mass besides one maximum (whose ``exp(s)`` is exactly 1): the
    definition's accurate log-sum-exp (:func:`klx._agnostic.log_softmax`) in fewer passes."""
    top, at = torch.max(z, dim=-1, keepdim=True)
    s = z.sub_(top) if own else z - top
    if t != 1.0:
        s.div_(t)
    e = torch.exp(s)
    e.scatter_(-1, at, 0.0)
    rest = torch.sum(e, dim=-1)
    e.scatter_(-1, at, 1.0)
    return s, e, torch.log1p(rest)


def _shifted_pair(
    spec: FusedSpec, zp: Array, zq: Array, own: tuple[bool, bool], keep: Array | None
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """Both sides of a chunk by :func:`_shifted_exp` (dropped tokens' logits set to 0
    first): ``(s_p, p, lse_p, s_q, exp(s_q), lse_q)``, P normalised, Q not yet."""
    t = spec.temperature
    if keep is not None:
        drop = ~keep[:, None]
        zp = zp.masked_fill_(drop, 0.0) if own[0] else zp.masked_fill(drop, 0.0)
        zq = zq.masked_fill_(drop, 0.0) if own[1] else zq.masked_fill(drop, 0.0)
        own = (True, True)
    sp, p, lse_p = _shifted_exp(zp, t, own[0])
    sq, e_q, lse_q = _shifted_exp(zq, t, own[1])
    p.mul_(torch.exp(-lse_p)[:, None])
    return sp, p, lse_p, sq, e_q, lse_q


def kl_rows(
    spec: FusedSpec, zp: Array, zq: Array, own: tuple[bool, bool], keep: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """KL(P || Q) per token of one chunk of CPU logits, in about half the definition's
    passes: ``(kl, p, e_q, lse_q, d)`` with ``d = log P - log Q = (s_p - s_q) - (lse_p -
    lse_q)`` and ``e_q = exp(s_q)`` (``Q = e_q exp(-lse_q)``), for the gradients.

    `zp` / `zq` are overwritten where the chunk owns them (`own`: a matrix product's fresh
    output). ``P d`` is NaN where P is 0 against ``log P = -inf`` (or for a NaN logit): in
    those rows only, ``d`` is set to 0 where P is 0, as the definition's guard does, and
    their KL taken again. Dropped tokens (`keep`) get logits 0, so NaN there reaches
    nothing; their KL is 0.
    """
    sp, p, lse_p, sq, e_q, lse_q = _shifted_pair(spec, zp, zq, own, keep)
    del zp, zq
    d = sp.sub_(sq).sub_((lse_p - lse_q)[:, None])
    del sp, sq
    # Each term p (d + expm1(-d)) = p d + q - p is >= 0 (the definition's form for logits):
    # the KL is never negative, and the rounding of lse_p - lse_q (about 1e-6 in float32,
    # the whole KL of a student within 1e-3 of its teacher) enters only squared. Where
    # expm1(-d) could overflow (-d within 8 of log(max): rare, so the extra temporaries
    # of that branch are too) the term is p d + (q - p), with q = e_q e^-lse_q.
    far = d <= 8.0 - math.log(torch.finfo(d.dtype).max)
    phi = torch.where(far, 0.0, d).neg_().expm1_().add_(d)  # d itself where far
    kl = torch.einsum("ij,ij->i", p, phi)
    if bool(far.any()):  # one flag read per chunk (a CPU tensor: no device sync)
        q = e_q * torch.exp(-lse_q)[:, None]
        kl += torch.sum(torch.where(far, q - p, 0.0), dim=-1)
    bad = torch.isnan(kl)
    if bool(bad.any()):  # one flag read per chunk (a CPU tensor: no device sync)
        rows = torch.nonzero(bad)[:, 0]
        guarded = torch.where(p[rows] == 0, 0.0, d[rows])
        d[rows] = guarded
        kl[rows] = _kl_terms_guarded(p[rows], guarded, e_q[rows], lse_q[rows]).sum(-1)
    if keep is not None:
        kl = torch.where(keep, kl, 0.0)
    return kl, p, e_q, lse_q, d


def _row_sum(a: Array, b: Array) -> Array:
    """``sum(a b)`` per row, summed pairwise (``torch.sum``), not by ``einsum``: for a
    near one-hot ``a`` the dominant product and thousands of small ones meet in one float32
    accumulator there (5.6e-4 off at 5000 entries), and ``d - sum(p d)`` in the gradient
    cancels down to that error (``test_lean_cpu_chunks_with_a_sharp_teacher``)."""
    return torch.sum(a * b, dim=-1)


def _kl_terms_guarded(p: Array, d: Array, e_q: Array, lse_q: Array) -> Array:
    """The terms ``p d + q - p`` of rows holding P = 0 entries (whose d is set to 0 there):
    0 where P is 0 and Q too, q where only P is."""
    q = e_q * torch.exp(-lse_q)[:, None]
    small = d > -1.0
    ds = torch.where(small, d, 0.0)
    terms = torch.where(small, p * (ds + torch.expm1(-ds)), p * d + (q - p))
    return torch.where(p == 0, q, terms)


def kl_chunk(
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    own: tuple[bool, bool],
    keep: Array | None,
    c: Any,
    want_p: bool,
    want_q: bool,
) -> ChunkGrads:
    """:func:`klx._fused.gradients.chunk_value_and_grads` of KL on CPU tensors by
    :func:`kl_rows`: the same quantities, ``d/db = Q - P`` and ``d/da = P (d - KL)``
    (:func:`klx._closed_forms.kl_derivatives`), in about half the passes."""
    with torch.no_grad():
        kl, p, e_q, lse_q, d = kl_rows(spec, zp, zq, own, keep)
        w = torch.ones_like(kl) * c
        if keep is not None:
            w = torch.where(keep, w, 0.0)
        s = torch.sum(torch.where(w != 0, kl, 0.0) * w)
        scale = (w / spec.temperature)[:, None]
        dzp = dzq = None
        if want_p:
            # P (d - KL) with the KL as the sum of P d: d's rounding of lse_p - lse_q, the
            # same in every entry of a row, cancels (in the value's p d + q - p it does not).
            kl_d = _row_sum(p, d)
            dzp = p * (d - kl_d[:, None])
            dzp *= scale
        del d
        if want_q:
            dzq = e_q.mul_(torch.exp(-lse_q)[:, None]).sub_(p)
            dzq *= scale
    return ChunkGrads(kl, s, dzp, dzq)


# --------------------------------------------------------------------------- mix
#: log of the smallest normal float32 / float64 plus 8, by item size: a row whose P may
#: go below it takes the closed form of :mod:`klx._fused.gradients` (``p (1 + e)`` would
#: rebuild ``q`` from a few bits, and ``d e`` could overflow).
_LOG_SAFE = {4: -87.33654475055310898657 + 8.0, 8: -708.39641853226410622 + 8.0}


def takes_mix(spec: FusedSpec) -> bool:
    """The forward/reverse KL mixture without softcap or hard term, one vocabulary
    (:func:`mix_chunk`)."""
    return (
        spec.kind == "mix"
        and spec.softcap is None
        and spec.hard_weight == 0.0
        and spec.vocab == "same"
    )


def _guard(spec: FusedSpec, zp: Array, zq: Array) -> Array:
    """Per token: a logit of either side not finite, or a P that may be tiny (its logits
    spread wider than ``-log(tiny) - 8`` times T): the rows :func:`mix_rows` leaves to
    the closed form of :mod:`klx._fused.gradients`."""
    # (amin and amax: four passes take 2.4 ms at 256 x 32,000, aminmax's two 19 ms)
    lo_p, hi_p = torch.amin(zp, dim=-1), torch.amax(zp, dim=-1)
    lo_q, hi_q = torch.amin(zq, dim=-1), torch.amax(zq, dim=-1)
    spread = (lo_p - hi_p) / spec.temperature
    safe = spread >= _LOG_SAFE[zp.element_size()]  # False for NaN
    return ~(safe & torch.isfinite(lo_q) & torch.isfinite(hi_q))


def mix_rows(
    spec: FusedSpec, zp: Array, zq: Array, own: tuple[bool, bool], keep: Array | None
) -> tuple[Array, Array, Array, Array]:
    """``lam KL(P || Q) + (1 - lam) KL(Q || P)`` per token of one chunk of CPU logits,
    with ``(p, q, d)`` for the gradients (``d = log p - log q``), from the quantities of
    :func:`kl_rows` (the rows of :func:`_guard` are left to the caller).

    The terms are those of the NumPy row blocks (:func:`klx._accel.rows._mix_from_logits`):
    ``(2 lam - 1) p e + d (lam p - (1 - lam) q)`` with ``e = expm1(-d)``, or ``d (p - q) /
    2`` at ``lam = 1/2`` (no ``expm1``), summed pairwise.
    """
    lam = dict(spec.options)["lam"]
    sp, p, lse_p, sq, q, lse_q = _shifted_pair(spec, zp, zq, own, keep)
    del zp, zq
    q.mul_(torch.exp(-lse_q)[:, None])
    d = sp.sub_(sq).sub_((lse_p - lse_q)[:, None])
    if lam == 0.5:
        terms = torch.sub(p, q, out=sq).mul_(d)
        rows = torch.sum(terms, dim=-1).mul_(0.5)
    else:
        terms = torch.neg(d, out=sq).expm1_().mul_(p).mul_(2.0 * lam - 1.0)
        v = torch.mul(p, lam).sub_(q, alpha=1.0 - lam).mul_(d)
        rows = torch.sum(terms.add_(v), dim=-1)
        del v
    del sp, sq, terms
    return rows, p, q, d


def mix_chunk(
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    own: tuple[bool, bool],
    keep: Array | None,
    c: Any,
    want_p: bool,
    want_q: bool,
    xp: Any,
) -> ChunkGrads:
    """:func:`klx._fused.gradients.chunk_value_and_grads` of the mixture on CPU tensors
    by :func:`mix_rows`: ``d/da = lam p (d - sum p d) + (1 - lam)(p - q)`` and ``d/db =
    lam (q - p) - (1 - lam) q (d - sum q d)`` (:func:`klx._closed_forms.mix_derivatives`).
    Rows of :func:`_guard` take that closed form itself, on copies of their logits."""
    from klx._fused.gradients import chunk_value_and_grads

    lam = dict(spec.options)["lam"]
    with torch.no_grad():
        guard = _guard(spec, zp, zq)
        if keep is not None:
            guard &= keep
        odd = guard.nonzero().view(-1) if bool(guard.any()) else None
        if odd is not None:
            kept = None if keep is None else keep[odd]
            ci = c[odd] if isinstance(c, torch.Tensor) and c.ndim else c
            exact = chunk_value_and_grads(
                xp, spec, zp[odd], zq[odd], kept, None, ci, want_p, want_q
            )
        rows, p, q, d = mix_rows(spec, zp, zq, own, keep)
        w = torch.ones_like(rows) * c
        if keep is not None:
            w = torch.where(keep, w, 0.0)
            rows = torch.where(keep, rows, 0.0)
        scale = (w / spec.temperature)[:, None]
        dzp = dzq = None
        if want_p:
            kl_d = _row_sum(p, d)
            dzp = (d - kl_d[:, None]).mul_(p).mul_(lam)
            dzp.add_(p, alpha=1.0 - lam).sub_(q, alpha=1.0 - lam)
            dzp *= scale
        if want_q:
            # q [(lam - 1)(d - sum q d) + lam] - lam p, the row weights folded in: 3 passes
            rev_d = _row_sum(q, d)[:, None]
            dzq = torch.addcmul(((1.0 - lam) * rev_d + lam) * scale, d, (lam - 1.0) * scale)
            dzq.mul_(q).addcmul_(p, lam * scale, value=-1.0)
        if odd is not None:
            rows[odd] = exact.rows
            for grad, part in ((dzp, exact.dzp), (dzq, exact.dzq)):
                if grad is not None and part is not None:
                    grad[odd] = part
        total = torch.sum(torch.where(w != 0, rows, 0.0) * w)
    return ChunkGrads(rows, total, dzp, dzq)
