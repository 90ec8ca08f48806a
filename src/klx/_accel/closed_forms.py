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
from typing import Any

from klx._agnostic import plain_logs

__all__ = ["KINDS", "logits_derivatives"]

Array = Any

#: The divergences with a closed form here (both sides logits).
KINDS = ("kl", "js", "skew_kl")


def logits_derivatives(
    xp: ModuleType,
    call: Any,
    t: Array,
    s: Array,
    rows: Array,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of `call` (see the module's docstring; not yet divided by ``T``)
    at logits `t`, `s`, whose per-distribution values are `rows`; None where not needed."""
    axis, temperature = call.axis, call.temperature
    # the plain log-softmax, as the value's terms take it (klx._agnostic)
    log_p, log_q, p_zero, q_zero, lp, lq = plain_logs(xp, t, s, axis, temperature)
    p = xp.exp(log_p)
    q = xp.exp(log_q)
    options = dict(call.options)

    def transport(w: Array, g: Array) -> Array:  # w (g - sum(w g)); w g is 0 where w is
        wg = xp.where(w == 0, 0.0, w * g)
        return wg - w * xp.sum(wg, axis=axis, keepdims=True)

    if call.kind == "kl":  # sum(p d) is the KL itself: `rows`, no further reduction
        kl = xp.expand_dims(rows, axis=axis)
        c_t = xp.where(p_zero, 0.0, p * ((lp - lq) - kl)) if need_t else None
        return c_t, (q - p) if need_s else None
    weight = options["beta"] if call.kind == "js" else options["alpha"]
    if weight == 0.0 and call.kind == "skew_kl":  # the mixture is Q: KL's own
        c_t = transport(p, lp - lq) if need_t else None
        return c_t, (q - p) if need_s else None
    if weight in (0.0, 1.0):  # JS of one side against itself: 0
        zero = xp.zeros_like(p)
        return (zero if need_t else None), (zero if need_s else None)
    a = math.log(weight) + lp
    b = math.log1p(-weight) + lq
    hi = xp.where(a > b, a, b)
    mixed = hi + xp.log1p(xp.exp(-xp.abs(a - b)))  # logaddexp(a, b)
    log_m = xp.where(p_zero, b, xp.where(q_zero, a, mixed))
    u = lp - log_m  # log(p / m), where p > 0
    if call.kind == "js":
        v = lq - log_m
        c_t = weight * transport(p, u) if need_t else None
        c_s = (1.0 - weight) * transport(q, v) if need_s else None
        return c_t, c_s
    r = xp.where(p_zero, 0.0, xp.exp(xp.where(p_zero, 0.0, u)))  # p / m
    c_t = transport(p, u + 1.0 - weight * r) if need_t else None
    c_s = -(1.0 - weight) * transport(q, r) if need_s else None
    return c_t, c_s
