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

Each takes the values ``rows`` where its caller has them at no cost (torch's autograd
saves them) and None where it does not: JAX's rule passes None (to these, not to a
registered record's), so that ``jax.grad`` computes no more of the value than a
derivative reads (Rényi's ``S``, the alpha-divergence's infinite rows outside (0, 1)), and
``jax.value_and_grad``'s compiler merges that part with the value's own.

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

from klx._agnostic import _MIDDLE, _mix_w_logs, _MixWLogs, plain_logs
from klx._backend_ops import expm1
from klx._typing import Array

if TYPE_CHECKING:
    from klx._typing import DivergenceCall

__all__ = [
    "alpha_derivatives",
    "cross_entropy_derivatives",
    "entropy_derivatives",
    "js_derivatives",
    "kl_derivatives",
    "kl_probs_derivatives",
    "mix_derivatives",
    "renyi_derivatives",
    "skew_kl_derivatives",
    "tv_derivatives",
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
    log_p, log_q, p_zero, q_zero, lp, lq = plain_logs(
        xp, t, s, call.axis, call.temperature, call.logits_normalisers
    )
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
    rows: Array | None,
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


def kl_probs_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    p: Array,
    q: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """The derivatives of KL(P || Q) between two probability arrays in the probabilities
    themselves: ``log(p / q) + 1`` in ``p``, ``-p / q`` in ``q`` (None where not needed).

    0 wherever the definition's term is a constant, as autodiff of the definition gives:
    where ``p = 0`` (the term is 0), ``q = 0`` under ``p > 0`` (``+inf``) or either is
    negative (``+inf``); NaN where either is NaN (as autodiff of the definition, whose
    safe values keep the NaN). Autodiff of the definition read every guard's mask (its
    ``log1p`` form near ``p = q`` and the ``where``s of the special values), which
    inductor stored as bool arrays: a compiled gradient 12x the formula's time.
    """
    ok = (p > 0.0) & (q > 0.0)  # (False for NaN)
    undefined = (p != p) | (q != q)
    ps = xp.where(ok, p, 1.0)
    qs = xp.where(ok, q, 1.0)
    c_p = c_q = None
    if need_t:
        c_p = xp.where(undefined, math.nan, xp.where(ok, xp.log(ps) - xp.log(qs) + 1.0, 0.0))
    if need_s:
        c_q = xp.where(undefined, math.nan, xp.where(ok, -ps / qs, 0.0))
    return c_p, c_q


def _mixture(xp: ModuleType, w: _Sides, weight: float) -> Array:
    """``log m`` of ``m = weight p + (1 - weight) q``, finite wherever ``m > 0``."""
    a = math.log(weight) + w.lp
    b = math.log1p(-weight) + w.lq
    hi = xp.where(a > b, a, b)
    mixed = hi + xp.log1p(xp.exp(-xp.abs(a - b)))  # logaddexp(a, b)
    return xp.where(w.p_zero, b, xp.where(w.q_zero, a, mixed))


def _mix_w_sides(
    xp: ModuleType, call: DivergenceCall, t: Array, s: Array, weight: float, both: bool
) -> tuple[_MixWLogs, Array, Array, Array]:
    """For a weight in [1/16, 15/16]: the value's :func:`klx._agnostic._mix_w_logs`, ``p``,
    ``q`` and ``u = log(m / p)`` (note the sign: ``log(p / m)`` is ``-u``): two ``exp`` and
    one ``log`` per element besides the log-softmaxes, where :func:`_mixture` took four
    (``p``, ``q`` and ``logaddexp``'s ``exp`` and ``log1p``). Finite wherever the logits
    are: ``p = 0`` exactly where P is 0 (``t = 0``), and the logs are finite there."""
    m = _mix_w_logs(
        xp, plain_logs(xp, t, s, call.axis, call.temperature, call.logits_normalisers), weight, both
    )
    small = m.hi * m.t
    p = xp.where(m.big_p, m.hi, small)
    q = xp.where(m.big_p, small, m.hi)
    return m, p, q, xp.where(m.big_p, m.lb, m.ls)


def _mix_w_transport(xp: ModuleType, axis: int, w: Array, g: Array) -> Array:
    """:func:`_transport` of a finite `g` (no ``where``): ``w (g - sum(w g))``."""
    return w * (g - xp.sum(w * g, axis=axis, keepdims=True))


def _zeros(xp: ModuleType, w: _Sides, need_t: bool, need_s: bool) -> tuple[Array | None, ...]:
    zero = xp.zeros_like(w.p)
    return (zero if need_t else None), (zero if need_s else None)


def js_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of JS with weight ``beta`` (as :func:`kl_derivatives`)."""
    weight = dict(call.options)["beta"]
    if _MIDDLE <= weight <= 1.0 - _MIDDLE:  # c_t = -beta p (u - sum(p u)), v likewise
        m, p, q, u = _mix_w_sides(xp, call, t, s, weight, True)
        v = xp.where(m.big_p, m.ls, m.lb)  # log(m / q)
        c_t = -weight * _mix_w_transport(xp, call.axis, p, u) if need_t else None
        c_s = (weight - 1.0) * _mix_w_transport(xp, call.axis, q, v) if need_s else None
        return c_t, c_s
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
    rows: Array | None,
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
    if _MIDDLE <= weight <= 1.0 - _MIDDLE:
        m, p, q, u = _mix_w_sides(xp, call, t, s, weight, False)
        # p / m = (p / hi) / (m / hi), m / hi = 1 + ws (t - 1) >= 1/16, with each side's
        # weight a constant in its own branch (as a select of constants, and with the
        # constant 1, XLA's CPU code wrote them out in full and read them back;
        # benchmarks/RESULTS.md, fifth round)
        tm = m.t - 1.0
        rho = xp.where(m.big_p, 1.0 / ((1.0 - weight) * tm + 1.0), m.t / (weight * tm + 1.0))
        c_t = _mix_w_transport(xp, call.axis, p, 1.0 - u - weight * rho) if need_t else None
        c_s = (weight - 1.0) * _mix_w_transport(xp, call.axis, q, rho) if need_s else None
        return c_t, c_s
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
    rows: Array | None,
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
            back = (1.0 - lam) * _reverse_kl_transport(xp, call.axis, w, d)
            c_s = back if c_s is None else c_s + back
    return c_t, c_s


def _reverse_kl_transport(xp: ModuleType, axis: int, w: _Sides, d: Array) -> Array:
    """KL(Q || P)'s ``c_s = q (-d - KL(Q || P))``, 0 where Q is 0; ``-inf`` where Q is
    positive on a row where P is 0 under Q (its KL is ``+inf``).

    Two forms of it, each its tracer's best: torch's reads the safe logs (inductor
    computes it beside the value, in its loops); the others' one ``g = log q - log p``
    (``+inf`` where P is 0 under Q), which the sum and the product both read, capped at
    the dtype's largest float in the product: reading the safe logs, XLA's CPU code wrote
    each out in full (seven arrays of the 512 x 32000 gradient, now five; jax.grad
    1.74x -> 1.42x the formula's, benchmarks/RESULTS.md, fifth round), and torch.compile
    took 1.2x -> 1.3x (in the backward) to 2x (in the forward) with this form.
    """
    from klx._backends import library

    lib = library(w.q)
    if lib is not None and lib.name == "torch":
        kl = xp.sum(xp.where(w.q_zero, 0.0, w.q * (w.lq - w.log_p)), axis=axis, keepdims=True)
        return xp.where(w.q_zero, 0.0, w.q * (-d - kl))
    g = xp.where(w.q_zero, 0.0, w.log_q - w.log_p)
    kl = xp.sum(w.q * g, axis=axis, keepdims=True)
    big = float(xp.finfo(g.dtype).max)
    return xp.where(w.q_zero, 0.0, w.q * (xp.clip(g, max=big) - kl))


def cross_entropy_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
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


def tv_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of the total variation ``sum |p - q| / 2`` (as
    :func:`kl_derivatives`): with ``g = sign(p - q) / 2``, ``c_t = p (g - sum(p g))``
    and ``c_s = -q (g - sum(q g))``. Where ``p = q`` (two zeros included) ``g`` is 0, the
    subgradient torch's ``abs`` takes: finite, also at ``P = Q``.

    The sign is read from the logs, floored (:data:`klx._agnostic.LOG_FLOOR`: two zeros
    give 0) and scaled by 2^100 into ``[-1, 1]``, not from ``p - q``: no exponential of
    a side whose derivative is not needed (and XLA's CPU code runs `sign` slower than
    `exp`). A log difference below 2^-100 is a tie of the rounded probabilities too,
    where any ``g`` in ``[-1/2, 1/2]`` is a subgradient.
    """
    from klx._agnostic import LOG_FLOOR

    w = plain_logs(xp, t, s, call.axis, call.temperature, call.logits_normalisers)
    d = xp.clip(w.log_p, min=LOG_FLOOR) - xp.clip(w.log_q, min=LOG_FLOOR)
    g = 0.5 * xp.clip(xp.clip(d * 2.0**100, min=-1.0), max=1.0)
    axis = call.axis
    c_t = c_s = None
    if need_t:
        p = xp.exp(w.log_p)
        c_t = p * (g - xp.sum(p * g, axis=axis, keepdims=True))
    if need_s:
        q = xp.exp(w.log_q)
        c_s = q * (xp.sum(q * g, axis=axis, keepdims=True) - g)
    return c_t, c_s


def entropy_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of the entropy ``-sum p log p`` (as :func:`kl_derivatives`), whose
    call passes P as both sides: ``c = p (sum(p log p) - log p)`` on the second, none on
    the first (zeros for JAX, whose rule multiplies both; None for torch's autograd).

    With ``s`` the shifted logits, ``e = exp(s)`` and ``Z = sum(e)``, that is ``c = (e /
    Z) (A - s)``, ``A = sum(e s) / Z``: the log-normaliser cancels, and ``e`` serves both
    sums (one exponential fewer than through ``log p``). ``s`` is floored
    (:data:`klx._agnostic.LOG_FLOOR`), so that ``e s`` is 0 where P is (``s = -inf``), by
    arithmetic, not a `where`.
    """
    from klx._agnostic import LOG_FLOOR
    from klx._backends import library

    axis = call.axis
    shifted = s - xp.max(s, axis=axis, keepdims=True)
    temperature = call.temperature
    if not (isinstance(temperature, float) and temperature == 1.0):
        shifted = shifted / temperature
    e = xp.exp(shifted)
    z = xp.sum(e, axis=axis, keepdims=True)
    mean = xp.sum(e * xp.clip(shifted, min=LOG_FLOOR), axis=axis, keepdims=True) / z
    # The floor again, at twice the depth (every e > 0 has s above both): the same
    # values, but not the same array, which XLA's CPU code wrote out to share it
    c = (e / z) * (mean - xp.clip(shifted, min=2.0 * LOG_FLOOR))
    lib = library(c)
    first = None if (lib is not None and lib.name == "torch") or not need_t else xp.zeros_like(c)
    return first, (c if need_s else None)


def _alpha_psi(xp: ModuleType, x: Array, c: float) -> Array:
    """``(1 - e^(-c x)) / c``, ``x`` itself at ``c = 0`` (its limit): accurate for any
    small `c` (``1 / c`` at ``x = +inf`` for ``c > 0``)."""
    if c == 0.0:
        return x
    return expm1(xp, -c * x) / -c


def _psi_weights(xp: ModuleType, w: Array, zero: Array, lw: Array, lo: Array, c: float) -> Array:
    """``v = w psi(d, c)`` with ``psi(d, c) = (1 - e^(-c d)) / c`` (``d = log w - log o``,
    ``d`` itself at ``c = 0``), 0 where `zero` (whose ``w`` is 0): ``-w expm1(-c d) /
    c``, accurate near ``d = 0``; where ``-c d > 60``, whose ``e^(-c d)`` may overflow,
    ``(w - w^(1 - c) o^c) / c`` from the logs (`lw`, `lo`: safe, 0 where a weight is 0;
    nothing cancels there)."""
    d = lw - lo
    if c == 0.0:
        return xp.where(zero, 0.0, w * d)
    x = -c * d
    big = x > 60.0
    near = -w * (expm1(xp, xp.where(big, 0.0, x)) / c)
    far = (w - xp.exp((1.0 - c) * lw + c * lo)) / c
    return xp.where(zero, 0.0, xp.where(big, far, near))


def _transported(xp: ModuleType, axis: int, w: Array, v: Array) -> Array:
    """``v - w sum(v)``: the softmax transport ``w (g - sum(w g))`` of ``g = v / w``.

    In this form, as KL's ``p (d - sum(p d))``, the rounding of the log-normalisers'
    difference (the same in every ``d`` of a row) cancels to first order; as ``(p S -
    p^a q^b) / b`` with the value's ``S`` it stayed, about 1e-3 of a float32 gradient
    entry of a peaked row (p = q = 0.99 at its top)."""
    return v - w * xp.sum(v, axis=axis, keepdims=True)


def _sides_and_zeros(
    xp: ModuleType, call: DivergenceCall, t: Array, s: Array
) -> tuple[_Sides, Array, Array]:
    """The sides, and where each weight is 0 or the other is (``p^a q^b`` is 0 there for
    orders in (0, 1))."""
    w = _sides(xp, call, t, s)
    return w, w.p_zero, w.q_zero


def alpha_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of the alpha-divergence of order ``a`` (``b = 1 - a``; as
    :func:`kl_derivatives`).

    With ``d = log p - log q``, ``dA/dp = -(q / p)^b / b``: its transport through the
    softmax is ``c_t = p (g - sum(p g))`` with ``g = psi(d, b) = (1 - e^(-b d)) / b``
    (the constant ``-1/b`` drops out; ``d`` itself at ``b = 0``, KL's ``p (d - KL)``),
    and ``c_s`` the same of ``q`` with ``psi(-d, a)`` (:func:`_psi_weights`,
    :func:`_transported`). Where Q is 0 under P (orders in (0, 1)) ``p psi = p / b``, the
    derivative of ``p^a 0^b = 0``; an infinite value (orders outside (0, 1), a weight 0
    against the other's power below 0) has derivatives 0: finite, so that a ``where``
    may drop its row.
    """
    a = dict(call.options)["alpha"]
    b = 1.0 - a
    w = _sides(xp, call, t, s)
    c_t = c_s = None
    if need_t:
        v = _psi_weights(xp, w.p, w.p_zero, w.lp, _other_log(xp, w.lq, w.q_zero, b), b)
        c_t = _transported(xp, call.axis, w.p, v)
    if need_s:
        v = _psi_weights(xp, w.q, w.q_zero, w.lq, _other_log(xp, w.lp, w.p_zero, a), a)
        c_s = _transported(xp, call.axis, w.q, v)
    if 0.0 < a < 1.0:  # finite: 0 <= A <= 1 / (a b) (no pass over the value for jax.grad)
        return c_t, c_s
    infinite = xp.expand_dims(_rows(xp, call, t, s, rows), axis=call.axis) == math.inf
    return _finite(xp, infinite, c_t), _finite(xp, infinite, c_s)


def _other_log(xp: ModuleType, lo: Array, zero: Array, c: float) -> Array:
    """The other side's safe log, ``-inf``-like where its weight is 0 for ``c > 0``
    (``o^c = 0``: ``psi = 1 / c``), by a large negative stand-in (finite: no NaN in
    untaken branches); as given for ``c <= 0`` (the value is then infinite there)."""
    if c <= 0.0:
        return lo
    return xp.where(zero, -1e30 / c, lo)


def _finite(xp: ModuleType, infinite: Array, c: Array | None) -> Array | None:
    """`c` with 0 on the rows whose value is infinite: finite derivatives, which a
    ``where`` that drops the row keeps finite (``0 * inf`` is NaN)."""
    return None if c is None else xp.where(infinite, 0.0, c)


def renyi_derivatives(
    xp: ModuleType,
    call: DivergenceCall,
    t: Array,
    s: Array,
    rows: Array | None,
    *,
    need_t: bool = True,
    need_s: bool = True,
) -> tuple[Array | None, Array | None]:
    """``(c_t, c_s)`` of Rényi's divergence ``R = log(S) / (a - 1)`` of order ``a``,
    ``S = sum p^a q^b`` (``b = 1 - a``; as :func:`kl_derivatives`).

    ``dR = dS / (S (a - 1))``: the alpha-divergence's transports (:func:`alpha_derivatives`)
    times ``a / S``, ``S = e^(-b R)`` from the value (`rows`; a relative error, which no
    difference amplifies) or, where `rows` is None, from the value's own power sum
    (:func:`_renyi_log_s`: without the alpha terms the value needs near ``S = 1``; at
    order 1, the value itself). Where ``|b R| > 30`` (``1 / S`` could overflow, and ``P``
    and the tilted ``p^a q^b / S`` are far apart: nothing cancels) the same as ``c_t = a
    (p - w) / b`` and ``c_s = q - w`` with ``w = exp(a log p + b log q + b R)``. At ``a =
    1`` KL's ``p (d - KL)``; at ``a = 0``, 0 (``-log Q(P > 0)`` has no derivative). An
    infinite ``R`` (no common support, or Q 0 under P for orders ``>= 1``) has
    derivatives 0.
    """
    a = dict(call.options)["alpha"]
    b = 1.0 - a
    w = _sides(xp, call, t, s)
    if a == 0.0:
        return _zeros(xp, w, need_t, need_s)  # type: ignore[return-value]
    if rows is None and b != 0.0:  # b R = -log S, from the value's own terms
        log_s = _renyi_log_s(xp, call, t, s, a)
        infinite = (log_s == math.inf) | (log_s == -math.inf)
        br = -xp.where(infinite, 0.0, log_s)
    else:
        big_r = xp.expand_dims(_rows(xp, call, t, s, rows), axis=call.axis)
        infinite = (big_r == math.inf) | (big_r == -math.inf)
        br = b * xp.where(infinite, 0.0, big_r)
    far = xp.abs(br) > 30.0
    scale = a * xp.exp(xp.where(far, 0.0, br))  # a / S
    tilted = xp.exp(a * w.lp + b * w.lq + br)
    # 0 where a weight of 0 has a positive power (elsewhere its row is infinite)
    zero = _either(w.p_zero if a > 0.0 else None, w.q_zero if b > 0.0 else None)
    if zero is not None:
        tilted = xp.where(zero, 0.0, tilted)
    c_t = c_s = None
    if need_t:
        v = _psi_weights(xp, w.p, w.p_zero, w.lp, _other_log(xp, w.lq, w.q_zero, b), b)
        direct = (a / b) * (w.p - tilted) if b != 0.0 else v
        c_t = xp.where(far, direct, scale * _transported(xp, call.axis, w.p, v))
    if need_s:
        v = _psi_weights(xp, w.q, w.q_zero, w.lq, _other_log(xp, w.lp, w.p_zero, a), a)
        c_s = xp.where(far, w.q - tilted, scale * _transported(xp, call.axis, w.q, v))
    return _finite(xp, infinite, c_t), _finite(xp, infinite, c_s)


def _renyi_log_s(xp: ModuleType, call: DivergenceCall, t: Array, s: Array, a: float) -> Array:
    """``log S = M + log(sum exp(e - M))`` (size 1 along the axis) of Rényi's order `a`
    between logits `t`, `s`, from :func:`klx._agnostic.renyi_terms`' second and third
    terms, summed as the value sums them: where the value is computed too (a
    ``jax.value_and_grad``), the compiler computes them once; where it is not (``jax.grad``),
    the value's alpha terms are not computed at all. A relative error of a few ulps in
    ``S``, as ``e^(-b R)`` has. ``-inf`` where every ``e`` is ``-inf`` (orders below 1
    without common support; with no ``log(0)`` for autodiff to meet), ``+inf`` where one
    is ``+inf`` (orders above 1, Q 0 under P)."""
    from klx._agnostic import renyi_terms
    from klx._backend_ops import sum_along

    axis = call.axis
    _, shifted, top = renyi_terms(
        xp,
        t,
        s,
        p_form=call.p_form,
        q_form=call.q_form,
        axis=axis,
        temperature=call.temperature,
        alpha=a,
    )
    total = sum_along(xp, shifted, axis, keepdims=True)
    none = total == 0.0  # no common support: -inf, with no log(0) for autodiff to meet
    return xp.where(none, -math.inf, top + xp.log(xp.where(none, 1.0, total)))


def _rows(xp: ModuleType, call: DivergenceCall, t: Array, s: Array, rows: Array | None) -> Array:
    """`rows`, or where the caller passed None the values of the definition at `t`, `s`
    (which a JAX caller's compiler merges with the value's own, where it computes that)."""
    if rows is not None:
        return rows
    from klx._agnostic import divergence_rows

    return divergence_rows(xp, call, t, s, None)


def _either(a: Array | None, b: Array | None) -> Array | None:
    if a is None:
        return b
    return a if b is None else a | b
