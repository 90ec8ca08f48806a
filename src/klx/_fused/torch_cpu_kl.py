"""torch CPU's fast path for KL chunks of :func:`klx.fused_linear_divergence`.

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

__all__ = ["kl_chunk", "kl_rows", "plain_cpu_tensors", "serves"]


def plain_cpu_tensors(*arrays: Array | None) -> bool:
    """Whether every array given is a plain torch CPU tensor (not a DTensor or another
    subclass, whose vocabulary may be sharded; not CUDA)."""
    return all(
        a is None
        or (type(a).__module__ == "torch" and type(a).__name__ == "Tensor" and bool(a.is_cpu))
        for a in arrays
    )


def serves(spec: FusedSpec, f: Flat, cuda: bool) -> bool:
    """Whether this fast path takes the call's chunks: KL without softcap or hard term, on
    plain CPU tensors (not DTensors, whose vocabulary may be sharded; not CUDA, where its
    one check of the values per chunk would sync)."""
    return closed_form_kl(spec) and plain_cpu_tensors(*f.arrays()) and not cuda


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
    t = spec.temperature
    if keep is not None:
        drop = ~keep[:, None]
        zp = zp.masked_fill_(drop, 0.0) if own[0] else zp.masked_fill(drop, 0.0)
        zq = zq.masked_fill_(drop, 0.0) if own[1] else zq.masked_fill(drop, 0.0)
        own = (True, True)
    sp, p, lse_p = _shifted_exp(zp, t, own[0])
    sq, e_q, lse_q = _shifted_exp(zq, t, own[1])
    del zp, zq
    p.mul_(torch.exp(-lse_p)[:, None])
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
            kl_d = torch.einsum("ij,ij->i", p, d)
            dzp = p * (d - kl_d[:, None])
            dzp *= scale
        del d
        if want_q:
            dzq = e_q.mul_(torch.exp(-lse_q)[:, None]).sub_(p)
            dzq *= scale
    return ChunkGrads(kl, s, dzp, dzq)
