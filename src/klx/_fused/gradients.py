"""One chunk's loss and its gradients with respect to the two logits blocks, in closed
form, written once against the array API: torch (:mod:`klx._fused.torch_autograd`) and
JAX (:mod:`klx._fused.jax_vjp`) both take them from :func:`chunk_value_and_grads`.

The loss of a token is ``(1 - w_h) D(P, Q) + w_h CE(Q_1, y)`` with ``P = softmax(a)``,
``Q = softmax(b)``, ``a = cap(z_p) / T`` and ``b = cap(z_q) / T``. Its derivatives:

* the divergence's, ``(c_p, c_q) / T`` in ``(z_p, z_q)``: its record's
  ``logits_derivatives`` (:mod:`klx._closed_forms`: KL, JS, skew KL);
* the hard term's, ``softmax(cap(z_q)) - onehot(y)`` in ``z_q`` (0 where ``y`` is
  `ignore_index`);
* the softcap's ``1 - tanh^2(z / cap)``, by which both are multiplied;
* each token's weight (the upstream gradient, 0 where `keep` drops the token).

Fewer passes than autodiff of the definition, whose backward keeps a dozen [chunk,
vocab] arrays and reads every guard's mask; and the closed forms are written with
max / exp / sum (not a library's ``log_softmax``), so on torch DTensors sharded along
the vocabulary the backward communicates by all-reduces only. Divergences without a
closed form take autodiff of :func:`klx._fused.chunks.chunk_rows` instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import log_softmax
from klx._fused.chunks import FusedSpec, capped, soft_rows
from klx._fused.dtensor import label_mask, rows_like
from klx._typing import Array

__all__ = ["ChunkGrads", "chunk_value_and_grads"]


class ChunkGrads(NamedTuple):
    """One chunk's loss per token (`rows`, 0 where a token is dropped), ``sum(rows * c)``
    and its gradients in the two logits blocks (None where not asked for)."""

    rows: Array
    total: Array
    dzp: Array | None
    dzq: Array | None


def chunk_value_and_grads(
    xp: ModuleType,
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    keep: Array | None,
    labels: Array | None,
    c: Any,
    want_p: bool,
    want_q: bool,
) -> ChunkGrads:
    """One chunk's loss per token, ``sum(rows * c)`` and its derivatives in the raw logits
    `zp`, `zq`.

    `c` is a scalar (a Python float or 0-d array) or one weight per token [n] (the
    upstream gradient of 'none'). The divergence's record must have
    ``logits_derivatives`` (:func:`klx._fused.chunks.closed_form`).
    """
    z = capped(xp, spec, zp, zq, keep)
    t, hw = spec.temperature, spec.hard_weight
    rows = dzp = dzq = None
    if hw < 1.0:
        rows = soft_rows(xp, spec, z.zp, z.zq)
        dzp, dzq = spec.record.logits_derivatives(
            xp, spec, z.zp, z.zq, rows, need_t=want_p, need_s=want_q
        )
        soft = (1.0 - hw) / t
        if hw > 0.0:
            rows = (1.0 - hw) * rows
        dzp = None if dzp is None else dzp * soft
        dzq = None if dzq is None else dzq * soft
    if hw > 0.0 and labels is not None:
        ce, d_ce = _hard_term(xp, spec, z.zq, labels, want_q)
        rows = ce if rows is None else rows + ce
        if d_ce is not None:
            dzq = d_ce if dzq is None else dzq + d_ce
    assert rows is not None  # a hard weight of 1 comes with labels (the checks say so)
    w = xp.zeros_like(rows) + c
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
        w = xp.where(keep, w, 0.0)
    total = xp.sum(xp.where(w != 0, rows, 0.0) * w)  # a +inf or NaN row of weight 0 adds 0
    dzp = None if dzp is None else _chain(xp, dzp, w, z.tp)
    dzq = None if dzq is None else _chain(xp, dzq, w, z.tq)
    return ChunkGrads(rows, total, dzp, dzq)


def _hard_term(
    xp: ModuleType, spec: FusedSpec, zq: Array, labels: Array, want: bool
) -> tuple[Array, Array | None]:
    """``w_h CE(softmax(zq), y)`` per token and, if `want`, its derivative in `zq`:
    ``w_h (softmax(zq) - onehot(y))``; both 0 where ``y`` is `ignore_index`.

    The label's entry is picked by a one-hot mask, not a gather: on a DTensor sharded
    along the vocabulary each rank compares its own slice (:func:`label_mask`).
    """
    hw = spec.hard_weight
    labels = rows_like(labels, zq)
    valid = labels != spec.ignore_index
    onehot = label_mask(xp, zq, xp.where(valid, labels, xp.zeros_like(labels)))
    log_q1 = log_softmax(xp, zq, -1)
    picked = xp.sum(xp.where(onehot, log_q1, 0.0), axis=-1)
    ce = hw * xp.where(valid, -picked, 0.0)
    if not want:
        return ce, None
    vw = xp.astype(valid, zq.dtype)[:, None] * hw  # hw in zq's dtype, not the default
    return ce, xp.exp(log_q1) * vw - xp.where(onehot, vw, 0.0)


def _chain(xp: ModuleType, dz: Array, w: Array, tanh: Array | None) -> Array:
    """`dz` times each token's weight `w` and, with a softcap, ``1 - tanh^2``."""
    dz = dz * w[:, None]
    return dz if tanh is None else dz * (1.0 - tanh * tanh)
