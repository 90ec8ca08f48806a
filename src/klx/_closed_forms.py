"""Derivatives in closed form of the divergences between two sets of logits, written once
against the array API; :mod:`klx._accel.traced` registers them with JAX (a
``jax.custom_jvp``) and torch (a ``torch.autograd.Function``).

For one distribution with teacher logits ``t`` (P = softmax(t / T)) and student logits
``s`` (Q = softmax(s / T)), every divergence D here has

    dD = sum( c_t dt + c_s ds ) / T,    c = w (g - sum(w g)),

where ``g`` is D's derivative in the probabilities of that side (``w = p`` or ``q``), and
``w (g - sum(w g))`` is its transport through the softmax. With ``d = log p - log q``,
``m`` the mixture and ``u = log(p / m)``, ``v = log(q / m)``:

* KL(P || Q): ``c_t = p (d - KL)``, ``c_s = q - p``;
* JS with weight beta: ``c_t = beta p (u - sum(p u))``, ``c_s = (1 - beta) q (v - sum(q v))``;
* skew KL(P || alpha P + (1 - alpha) Q): with ``r = p / m``, ``c_t = p (u + 1 - alpha r) -
  p sum(...)``, ``c_s = -(1 - alpha) (q r - q sum(q r))``.

``p log p`` is read as 0 where ``p = 0`` (so is every term of a side whose weight is 0),
and the logs of the mixture are ``logaddexp`` forms, finite wherever ``m > 0``. Autodiff
of the definition differentiates every guard instead (the ``where`` pairs, ``expm1`` and
``log1p`` forms): traced, its backward kept each guard's mask, and reading them back cost
2x the plain formula's gradient (JAX) to 9x (torch.compile on a CPU, whose bool tensors
are stored at about 1/30 of a float's speed).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

from klx._agnostic import plain_logs
from klx._typing import Array

if TYPE_CHECKING:
    from klx._typing import DivergenceCall

__all__ = [
    "cross_entropy_derivatives",
    "js_derivatives",
    "kl_derivatives",
    "mix_derivatives",
    "skew_kl_derivatives",
]


class _Sides(NamedTuple):
    """What every closed form starts from: the plain log-softmaxes (as the value's terms
    take them, :func:`klx._agnostic.plain_logs`) and the probabilities."""

    p: Array
    q: Array
    lp: Array
    lq: Array
    p_zero: Array
    q_zero: Array
    #: ``log q`` and ``log p`` as they are (``-inf`` where a side is 0; `lq`, `lp` are 0).
    log_q: Array
    log_p: Array


def _sides(xp: ModuleType, call: DivergenceCall, t: Array, s: Array) -> _Sides:
    log_p, log_q, p_zero, q_zero, lp, lq = plain_logs(xp, t, s, call.axis, call.temperature)
    return _Sides(xp.exp(log_p), xp.exp(log_q), lp, lq, p_zero, q_zero, log_q, log_p)


def _transport(xp: ModuleType, axis: int, w: Array, g: Array) -> Array:
    """``w (g - sum(w g))``, with ``w g`` read as 0 where ``w`` is.

    In this form (the sum subtracted before the product) a torch DTensor sharded along
    `axis` all-reduces the sum; as ``w g - w sum(w g)`` it took an all-gather and a
    reduce-scatter."""
    g = xp.where(w == 0, 0.0, g)
    return w * (g - xp.sum(w * g, axis=axis, keepdims=True))


def kl_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of KL(P || Q) (see the module's docstring; not yet divided by
    ``T``) at logits `t`, `s`; None where not needed.

    The KL in ``c_t = p (d - KL)`` is ``sum(p d)`` of the same ``d``, not the value `rows`
    (whose terms ``p d + q - p`` leave out the rounding of the log-normalisers'
    difference, the same in every ``d`` of a row): so that rounding cancels, where with
    `rows` it stayed in every entry, about 1e-3 of the gradient of a float32 student
    within 1e-3 of its teacher. ``d`` reads ``log q`` as it is: a row with ``q = 0``
    under ``p > 0`` has an infinite KL, and ``c_t = -inf`` where ``p > 0``, as before.
    """
    w = _sides(xp, call, t, s)
    c_t = None
    if need_t:
        d = w.lp - w.lq
        kl = xp.sum(xp.where(w.p_zero, 0.0, w.p * (w.lp - w.log_q)), axis=call.axis, keepdims=True)
        c_t = xp.where(w.p_zero, 0.0, w.p * (d - kl))
    return c_t, (w.q - w.p) if need_s else None


def _mixture(xp: ModuleType, w: _Sides, weight: float) -> Array:
    """``log m`` of ``m = weight p + (1 - weight) q``, finite wherever ``m > 0``."""
    a = math.log(weight) + w.lp
    b = math.log1p(-weight) + w.lq
    hi = xp.where(a > b, a, b)
    mixed = hi + xp.log1p(xp.exp(-xp.abs(a - b)))  # logaddexp(a, b)
    return xp.where(w.p_zero, b, xp.where(w.q_zero, a, mixed))


def _zeros(xp: ModuleType, w: _Sides, need_t: bool, need_s: bool) -> tuple[Array | None, ...]:
    zero = xp.zeros_like(w.p)
    return (zero if need_t else None), (zero if need_s else None)


def js_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of JS with weight ``beta`` (as :func:`kl_derivatives`)."""
    weight = dict(call.options)["beta"]
    w = _sides(xp, call, t, s)
    if weight in (0.0, 1.0):  # JS of one side against itself: 0
        return _zeros(xp, w, need_t, need_s)  # type: ignore[return-value]
    log_m = _mixture(xp, w, weight)
    c_t = weight * _transport(xp, call.axis, w.p, w.lp - log_m) if need_t else None
    c_s = (1.0 - weight) * _transport(xp, call.axis, w.q, w.lq - log_m) if need_s else None
    return c_t, c_s


def skew_kl_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of skew KL(P || alpha P + (1 - alpha) Q) (as :func:`kl_derivatives`)."""
    weight = dict(call.options)["alpha"]
    w = _sides(xp, call, t, s)
    if weight == 0.0:  # the mixture is Q: KL's own
        c_t = _transport(xp, call.axis, w.p, w.lp - w.lq) if need_t else None
        return c_t, (w.q - w.p) if need_s else None
    if weight == 1.0:  # KL(P || P): 0
        return _zeros(xp, w, need_t, need_s)  # type: ignore[return-value]
    u = w.lp - _mixture(xp, w, weight)  # log(p / m), where p > 0
    r = xp.where(w.p_zero, 0.0, xp.exp(xp.where(w.p_zero, 0.0, u)))  # p / m
    c_t = _transport(xp, call.axis, w.p, u + 1.0 - weight * r) if need_t else None
    c_s = -(1.0 - weight) * _transport(xp, call.axis, w.q, r) if need_s else None
    return c_t, c_s


def mix_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of ``lam KL(P || Q) + (1 - lam) KL(Q || P)`` (as
    :func:`kl_derivatives`): each direction's, weighted. KL(Q || P)'s are KL's with the
    sides swapped: ``c_t = p - q``, ``c_s = q (-d - KL(Q || P))``."""
    lam = dict(call.options)["lam"]
    w = _sides(xp, call, t, s)
    d = w.lp - w.lq
    c_t = c_s = None
    if lam > 0.0:
        if need_t:
            kl = xp.sum(
                xp.where(w.p_zero, 0.0, w.p * (w.lp - w.log_q)), axis=call.axis, keepdims=True
            )
            c_t = lam * xp.where(w.p_zero, 0.0, w.p * (d - kl))
        if need_s:
            c_s = lam * (w.q - w.p)
    if lam < 1.0:
        if need_t:
            back = (1.0 - lam) * (w.p - w.q)
            c_t = back if c_t is None else c_t + back
        if need_s:
            kl = xp.sum(
                xp.where(w.q_zero, 0.0, w.q * (w.lq - w.log_p)), axis=call.axis, keepdims=True
            )
            back = (1.0 - lam) * xp.where(w.q_zero, 0.0, w.q * (-d - kl))
            c_s = back if c_s is None else c_s + back
    return c_t, c_s


def cross_entropy_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of the cross-entropy ``-sum p log q`` (as :func:`kl_derivatives`):
    ``c_t = p (-log q + sum(p log q))`` (the softmax transport of ``-log q``), and
    ``c_s = q - p``, KL's, which differs from it by H(P) alone."""
    w = _sides(xp, call, t, s)
    c_t = _transport(xp, call.axis, w.p, -w.lq) if need_t else None
    return c_t, (w.q - w.p) if need_s else None
