"""The math, written once against the array API standard.

Every function takes the namespace ``xp`` first and uses only what the standard
defines, so the same code runs on NumPy, PyTorch, JAX, CuPy, Dask and
array-api-strict arrays, eagerly, under ``jax.jit`` / ``torch.compile`` and on
lazy arrays. There is no branch on array values.

Conventions (those of :func:`scipy.special.rel_entr`):

* a term whose weight ``p`` is exactly 0 (``p == 0``, ``log p == -inf``) is 0, whatever
  ``q`` is (``-inf`` log-probability included), unless ``q`` is NaN;
* ``p > 0`` with ``q = 0`` gives ``+inf`` (also a finite ``log p`` whose exp underflows);
* a negative probability gives ``+inf``;
* NaN propagates, also from a side whose weight is 0.

The accuracy rules (exact zeros, signs, near-equal inputs) are in ``docs/numerics.md``.

Every ``where`` that guards a singular value is doubled: the untaken branch is fed
a safe value (1 for probabilities, 0 for logarithms), so its derivative stays finite
and the gradient of the guarded entries is exactly 0, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from klx._backend_ops import expm1, sum_along
from klx._typing import Array

if TYPE_CHECKING:
    from klx._typing import DivergenceCall, KLDivCall


__all__ = [
    "Weighted",
    "alpha_terms",
    "cross_entropy_terms",
    "divergence",
    "divergence_rows",
    "divide",
    "entropy_terms",
    "finish_rows",
    "generalized_kl_terms",
    "js_terms",
    "kl_div",
    "kl_terms",
    "log_softmax",
    "log_weight",
    "mask_rows",
    "max_log_ratio_terms",
    "mix_terms",
    "plain_logs",
    "probabilities",
    "record_rows",
    "reduce_rows",
    "reduction_divisor",
    "renyi_finish",
    "renyi_terms",
    "shape_size",
    "skew_kl_terms",
    "tv_terms",
    "weighted",
]


class Weighted(NamedTuple):
    """A distribution as weights ``w``, their logs, and where the weight is exactly 0.

    ``w`` and ``log_w`` hold safe values (1 and 0) where `zero` or `outside` is set, so
    that no untaken branch of a ``where`` sees a singular value. `outside` marks negative
    probabilities (None for log-space forms, which cannot be negative); `given` is the
    array as the caller gave it, whose NaNs reach the result.
    """

    w: Array
    log_w: Array
    zero: Array
    outside: Array | None = None
    given: Array = None


def _plain_log_softmax(xp: ModuleType, x: Array, axis: int, temperature: Any) -> Array:
    """``log_softmax`` with the plain log-sum-exp ``log(sum(exp(s)))``: it rounds away a
    mass below float's epsilon next to the maximum (which the exact :func:`log_softmax`
    keeps), so it serves only where that error is harmless (see :func:`kl_terms`)."""
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    if not (isinstance(temperature, float) and temperature == 1.0):
        shifted = shifted / temperature
    return shifted - xp.log(sum_along(xp, xp.exp(shifted), axis, keepdims=True))


def log_softmax(xp: ModuleType, x: Array, axis: int, temperature: Any = 1.0) -> Array:
    """``(x - max x) / T - log(sum(exp(...)))`` along `axis`.

    The maximum is subtracted *before* dividing by the temperature, so the largest entry
    is exactly 0 and no entry can overflow, however small `T` is and however a compiler
    rewrites the division. The log-sum-exp is ``log1p`` of the mass besides one maximal
    entry (counted exactly): for a nearly one-hot distribution that mass is far below the
    rounding of 1, and ``log(1 + mass)`` would lose it.
    """
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    if not (isinstance(temperature, float) and temperature == 1.0):
        shifted = shifted / temperature
    top = shifted == 0
    # exp(s) - 1 (exactly 0, as s is exactly 0) at the maxima, exp(s) elsewhere: the
    # gradient of the maximum then cancels whichever way a library splits it between ties.
    # (exp(s) - 1 has every derivative of expm1(s), and at s = 0 its exact value: one
    # exponential pass, not two.)
    e = xp.exp(shifted)
    rest = sum_along(xp, xp.where(top, e - 1.0, e), axis, keepdims=True)
    ties = xp.sum(xp.astype(top, shifted.dtype), axis=axis, keepdims=True) - 1.0
    return shifted - xp.log1p(rest + ties)


def as_log(xp: ModuleType, x: Array, form: str, axis: int, temperature: Any) -> Array:
    """Log-probabilities of `x` given as 'log_probs' or 'logits' (divided by `temperature`)."""
    if form == "log_probs":
        return x
    return log_softmax(xp, x, axis, temperature)


def probabilities(xp: ModuleType, x: Array, form: str, axis: int, temperature: Any) -> Array:
    """The probabilities of `x` given in any form (no logarithm taken for 'probs')."""
    if form == "probs":
        return x
    return xp.exp(as_log(xp, x, form, axis, temperature))


def weighted(xp: ModuleType, x: Array, form: str, axis: int, temperature: Any) -> Weighted:
    """A distribution's weights, safe logs, and where its weight is exactly 0.

    For probabilities, the weight is 0 where ``p == 0``, and a negative ``p`` is
    `outside` the domain. In log space the weight is 0 only where ``log p = -inf``: a
    finite ``log p`` whose exp underflows is a positive weight too small to represent.
    """
    if form == "probs":
        zero = x == 0
        outside = x < 0
        safe = xp.where(zero | outside, 1.0, x)
        return Weighted(safe, xp.log(safe), zero, outside, x)
    log_x = as_log(xp, x, form, axis, temperature)
    zero = log_x == -math.inf
    safe_log = xp.where(zero, 0.0, log_x)
    return Weighted(xp.exp(safe_log), safe_log, zero, None, x)


def _either(a: Array | None, b: Array | None) -> Array | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _log_ratio(xp: ModuleType, p: Weighted, q: Weighted, both_probs: bool) -> Array:
    """``log p - log q`` on the safe values; for two probabilities within a factor 2 of
    each other ``log1p((p - q) / q)``, whose ``p - q`` is exact (the accuracy of
    :func:`scipy.special.rel_entr`, gh-20710)."""
    if not both_probs:
        return p.log_w - q.log_w
    close = (p.w > 0.5 * q.w) & (p.w < 2.0 * q.w)  # no division: nothing overflows
    pc = xp.where(close, p.w, 1.0)
    qc = xp.where(close, q.w, 1.0)
    return xp.where(close, xp.log1p((pc - qc) / qc), p.log_w - q.log_w)


def _outside_and_nan(xp: ModuleType, terms: Array, p: Weighted, q: Weighted) -> Array:
    """+inf where a probability is negative (as rel_entr); NaN where an input is NaN or a
    row of logits has none (a ``+inf`` logit), also on a side whose weight is 0."""
    outside = _either(p.outside, q.outside)
    if outside is not None:
        terms = xp.where(outside, math.inf, terms)
    return xp.where(_nan(xp, p) | _nan(xp, q), math.nan, terms)


def _nan(xp: ModuleType, w: Weighted) -> Array:
    """Where a distribution is NaN: a NaN given; in log space also a row that log_softmax
    made NaN (a ``+inf`` logit). Probabilities are read as given, not through their log,
    which would tie the check to the log's pass (jax.jit of kl_div: 2.2 -> 3.6 ms).

    ``a != a`` rather than ``isnan``: the same values, but inductor's CPU code vectorises
    the comparison and runs ``isnan`` element by element (torch.compile of kl_div at
    1024 x 4096: 3.8 -> see benchmarks/RESULTS.md)."""
    x = w.given if w.outside is not None else w.log_w
    return x != x


def kl_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """Pointwise terms ``p * (log p - log q)`` of KL(P || Q); their sum over `axis` is the KL.

    With ``p_form='probs'`` (or 'log_probs') and ``q_form='log_probs'`` these are the terms
    of :func:`torch.nn.functional.kl_div` with ``target=p`` and ``input=q``. When both are
    logits (normalised here, so that both sum to 1 exactly in exact arithmetic) each term
    gets ``q - p`` added: ``p (d + expm1(-d))`` with ``d = log p - log q``, which is
    ``>= 0`` term by term, so the KL is ``>= 0`` and loses nothing to cancellation.
    """
    if p_form == q_form == "logits":
        return _kl_logits_terms(xp, p, q, axis, temperature)
    wp = weighted(xp, p, p_form, axis, temperature)
    if q_form != "probs":
        return _kl_log_q_terms(xp, wp, as_log(xp, q, q_form, axis, temperature))
    wq = weighted(xp, q, q_form, axis, temperature)
    # p > 0 (however small) with q = 0 is +inf.
    infinite = wq.zero & ~wp.zero
    d = _log_ratio(xp, wp, wq, p_form == "probs")  # finite: from safe values
    terms = xp.where(wp.zero, 0.0, wp.w * d)
    terms = xp.where(infinite, math.inf, terms)
    return _outside_and_nan(xp, terms, wp, wq)


def _kl_log_q_terms(xp: ModuleType, wp: Weighted, log_q: Array) -> Array:
    """``p (log p - log q)`` with ``log q`` as given (or from logits): the terms of
    :func:`torch.nn.functional.kl_div`.

    ``log q = -inf`` under ``p > 0`` makes the term ``+inf`` by itself, and its
    derivatives torch's: ``-p`` in ``log q``, ``+inf`` in ``p``. A NaN in ``log q``
    propagates by itself too, except where P is 0 (the term is 0), its weight underflows
    to 0 (0, or ``+inf`` against ``q = 0``) or P is negative (``+inf``): there the value
    is a constant, NaN where ``log q`` is, selected by masks that no derivative needs. So
    the derivative in ``log q`` reads P alone: traced, the backward of ``kl_div`` reads
    the target, as torch's does, and keeps no mask of the input (inductor stores a bool
    tensor on the CPU at 1/30 of a float's speed).
    """
    terms = wp.w * (wp.log_w - log_q)  # safe p: 1 where P is 0 or negative
    undefined = log_q != log_q
    constant = xp.zeros_like(log_q)  # (no derivative: the values below are constants)
    # P is 0, or positive with a weight that underflowed (log p = -150 in float32): the
    # term is 0, or +inf against q = 0 (not 0 * inf), NaN where log q is.
    vanished = wp.zero | (wp.w == 0)
    infinite = (log_q == -math.inf) & ~wp.zero
    fixed = xp.where(infinite, math.inf, constant)
    terms = xp.where(vanished, xp.where(undefined, math.nan, fixed), terms)
    if wp.outside is not None:  # a negative probability: +inf, as rel_entr
        terms = xp.where(wp.outside, xp.where(undefined, math.nan, constant + math.inf), terms)
    return terms


class PlainLogs(NamedTuple):
    """Both sides' log-probabilities from logits (the plain log-sum-exp), where each
    weight is 0, and safe logs (0 there)."""

    log_p: Array
    log_q: Array
    p_zero: Array
    q_zero: Array
    lp: Array
    lq: Array


def plain_logs(xp: ModuleType, p: Array, q: Array, axis: int, temperature: Any) -> PlainLogs:
    """:class:`PlainLogs` of two logits inputs: what KL's terms between logits and their
    closed-form derivatives (``klx._closed_forms``) start from."""
    log_p = _plain_log_softmax(xp, p, axis, temperature)
    log_q = _plain_log_softmax(xp, q, axis, temperature)
    p_zero = log_p == -math.inf
    q_zero = log_q == -math.inf
    lp = xp.where(p_zero, 0.0, log_p)  # safe values where a weight is 0
    lq = xp.where(q_zero, 0.0, log_q)
    return PlainLogs(log_p, log_q, p_zero, q_zero, lp, lq)


def _kl_logits_terms(xp: ModuleType, p: Array, q: Array, axis: int, temperature: Any) -> Array:
    """KL terms between two sets of logits: ``p (d + expm1(-d))``, ``d = log p - log q``.

    That is ``p d + q - p``, ``>= 0`` term by term, with no cancellation; where ``d <=
    -1`` (where ``expm1(-d)`` could overflow) it is taken in that form. Both sides are
    normalised by the plain log-sum-exp: its error c in ``log p - log q`` enters the sum
    as ``c^2 / 2`` only (its first-order part sums to ``sum p - sum q = 0``), so it serves
    where a one-sided KL would need the exact :func:`log_softmax` (float32 ``[20, 0, 0,
    0]`` against ``[19, 0, 0, 0]`` is still 4.4415e-9, as mpmath).

    ``d`` takes ``log q`` as given: ``q = 0`` under ``p > 0`` makes the term ``+inf`` by
    itself, with the closed form's derivative ``-p`` in ``log q`` (the torch and JAX rows'
    ``(q - p) / T``).
    """
    _, log_q, p_zero, q_zero, lp, lq = plain_logs(xp, p, q, axis, temperature)
    pw, qw = xp.exp(lp), xp.exp(lq)
    d = lp - log_q
    terms = _gap(xp, pw, d, qw)
    # P positive but too small for the dtype (a logit 150 below the others in float32):
    # the term p d + q - p is q (it was 0 here, which left the row short of the q of every
    # such entry: 26% of a float32 KL whose teacher's tail underflows), or +inf against
    # q = 0 (not 0 * inf)
    vanished = (pw == 0) & ~p_zero
    terms = xp.where(vanished, xp.where(q_zero, math.inf, qw), terms)
    terms = xp.where(p_zero, xp.where(q_zero, 0.0, qw), terms)
    # a NaN logit (or a +inf one: NaN logs) is NaN, also on a side whose weight is 0
    return xp.where((lp != lp) | (lq != lq), math.nan, terms)


def js_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
    beta: float = 0.5,
) -> Array:
    """Pointwise terms of ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1-beta) Q``.

    Each term is ``-(a u + b v)`` with the weights ``a = beta p``, ``b = (1 - beta) q``
    and ``u = log(m / p) = log1p((1 - beta) expm1(r))``, ``v = log(m / q) =
    log1p(beta expm1(-r))``, ``r = log(q / p)``: exactly 0 where ``p = q`` (``r = 0``), with
    no ``log(beta)`` rounding to bias every term. A term is a Jensen gap, ``>= 0`` in exact
    arithmetic, so a negative rounding error is set to 0: the JS is never negative.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    zp, zq, u, v = _mixture_logs(xp, wp, wq, beta, p_form == q_form == "probs")
    a = wp.w * beta
    b = wq.w * (1.0 - beta)
    gap = -(a * u + b * v)
    gap = xp.where(gap < 0, 0.0, gap)
    # One weight 0: M is the other one, and the term is -b log(1 - beta) or -a log(beta).
    # (Where beta is 0 or 1 the weight itself is 0 and the term is selected away: a finite
    # stand-in keeps 0 * -inf out of the untaken branch.)
    only_q = -b * (_log1m(beta) if beta < 1 else 0.0)
    only_p = -a * (log_weight(beta) if beta > 0 else 0.0)
    terms = xp.where(zp, xp.where(zq, 0.0, only_q), xp.where(zq, only_p, gap))
    return _outside_and_nan(xp, terms, wp, wq)


def _mixture_logs(
    xp: ModuleType, wp: Weighted, wq: Weighted, w: float, both_probs: bool
) -> tuple[Array, Array, Array, Array]:
    """For ``M = w P + (1 - w) Q``: where ``w p`` and ``(1 - w) q`` are 0, and
    ``u = log(m / p) = log(w + (1 - w) e^r)``, ``v = log(m / q) = log(w e^-r + 1 - w)``
    with ``r = log(q / p)`` (0 where either weight is 0: safe values there).

    Near ``p = q`` ``u = log1p((1 - w) expm1(r))`` and ``v = log1p(w expm1(-r))``: exactly
    0 at ``r = 0``, with no rounded ``log(w)`` to bias them. Their ``1 + (1 - w) expm1(r)``
    is ``w + (1 - w) e^r >= w``, so their error is at most about eps / w (and
    eps / (1 - w) for v): for a weight in [1/16, 15/16] (JS's 0.5, skew KL's 0.1) they
    serve every r. For a weight outside, ``(1 - w) expm1(r)`` rounds to -1 in float32
    (``u = -inf`` at ``w = 1e-9``, ``r = -46``): beyond ``|r| = 1`` u and v are then
    ``logaddexp`` forms of ``log w`` and ``log(1 - w)`` (Python's float64) shifted by r.
    """
    zp = _zero_weight(wp.zero, w)
    zq = _zero_weight(wq.zero, 1.0 - w)
    r = xp.where(zp | zq, 0.0, _log_ratio(xp, wq, wp, both_probs))
    if _MIDDLE <= w <= 1.0 - _MIDDLE:
        # u directly where expm1(r) cannot overflow, else r + v; v likewise.
        u_direct = xp.log1p((1.0 - w) * expm1(xp, xp.where(r > _DIRECT, _DIRECT, r)))
        v_direct = xp.log1p(w * expm1(xp, -xp.where(r < -_DIRECT, -_DIRECT, r)))
        u = xp.where(r > _DIRECT, r + v_direct, u_direct)
        v = xp.where(r < -_DIRECT, u_direct - r, v_direct)
        return zp, zq, u, v
    near = xp.abs(r) <= 1.0
    rn = xp.where(near, r, 0.0)  # the untaken branch at a safe value: finite gradients
    e = expm1(xp, rn)
    u_near = xp.log1p((1.0 - w) * e)
    v_near = xp.log1p(-w * e / (1.0 + e))  # expm1(-r) = -e / (1 + e): one expm1 for both
    # u = logaddexp(log w, log(1 - w) + r) and v = logaddexp(log w - r, log(1 - w)) share
    # their log1p(exp(-|log(w / (1 - w)) - r|)): one exp and one log1p for both.
    log_w, log_1w = log_weight(w), _log1m(w)
    shared = xp.log1p(xp.exp(-xp.abs((log_w - log_1w) - r)))  # 0 where w is 0 or 1
    r_u = log_1w + r
    u_far = xp.where(r_u > log_w, r_u, log_w) + shared
    r_v = log_w - r
    v_far = xp.where(r_v > log_1w, r_v, log_1w) + shared
    return zp, zq, xp.where(near, u_near, u_far), xp.where(near, v_near, v_far)


#: Weights in [_MIDDLE, 1 - _MIDDLE] take the direct forms everywhere (error <= ~16 eps).
_MIDDLE = 1.0 / 16.0
#: |log(q / p)| up to which expm1 of it cannot overflow float32 (exp(88) does).
_DIRECT = 30.0


def log_weight(b: float) -> float:
    """``log b`` of a (Python float) weight in [0, 1], ``-inf`` at 0."""
    return math.log(b) if b > 0 else -math.inf


def _log1m(b: float) -> float:
    """``log(1 - b)`` of a weight in [0, 1], exact for a small `b`; ``-inf`` at 1."""
    return math.log1p(-b) if b < 1 else -math.inf


def skew_kl_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
    alpha: float = 0.1,
) -> Array:
    """Pointwise terms of the skew KL(P || alpha P + (1 - alpha) Q).

    Each term is ``-p u`` with ``u = log(m / p)`` as in :func:`js_terms` (exactly 0 where
    ``p = q``). Where P is positive and ``alpha > 0``, M >= alpha P > 0: every term is
    finite, whatever Q is (``-p log(alpha)`` where Q is 0). At ``alpha = 0`` the mixture is
    Q and these are the terms of :func:`kl_terms` exactly.

    When both are logits (normalised here, so ``sum p = sum m = 1`` in exact arithmetic)
    each term gets ``m - p = p expm1(u)`` added, as KL's get ``q - p``: ``p (expm1(u) -
    u) >= 0`` (``(1 - alpha) q`` where P is 0), which loses nothing to cancellation. The
    plain ``-p u`` are first order in ``log(q / p)`` and cancel in the sum: float32 logits
    1e-3 apart gave a skew KL 72% off.
    """
    if alpha == 0.0:
        # M is Q: KL's own terms (+inf for p > 0 = q).
        return kl_terms(xp, p, q, p_form=p_form, q_form=q_form, axis=axis, temperature=temperature)
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    zp, zq, u, _ = _mixture_logs(xp, wp, wq, alpha, p_form == q_form == "probs")
    if p_form == q_form == "logits":  # alpha > 0 below
        # where m > e^64 p the term is m - p - p u with m - p = (1 - alpha)(q - p), nothing
        # cancelling: no expm1 of a u that overflows it (0 * inf where p's weight
        # underflowed: a NaN row)
        far = u > _FAR
        uf = xp.where(far, 0.0, u)
        gap = xp.where(far, (1.0 - alpha) * (wq.w - wp.w) - wp.w * u, wp.w * (expm1(xp, uf) - uf))
        only_p = wp.w * (alpha - 1.0 - log_weight(alpha))  # Q is 0: m - p = (alpha - 1) p
        only_q = xp.where(zq, 0.0, (1.0 - alpha) * wq.w)
        terms = xp.where(zp, only_q, xp.where(zq, only_p, gap))
    else:
        terms = xp.where(zp, 0.0, xp.where(zq, -wp.w * log_weight(alpha), -wp.w * u))
    return _outside_and_nan(xp, terms, wp, wq)


def tv_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """Pointwise terms ``|p - q| / 2`` of the total variation distance; NaN propagates.

    Where ``p = q`` the derivative of ``|x|`` is the library's own choice of subgradient
    (0 in torch, 1 in JAX): finite, never NaN.
    """
    wp = probabilities(xp, p, p_form, axis, temperature)
    wq = probabilities(xp, q, q_form, axis, temperature)
    return 0.5 * xp.abs(wp - wq)


def _gap(xp: ModuleType, w: Array, d: Array, other: Array) -> Array:
    """``w d + other - w`` (``w = p``, ``other = q``, ``d = log p - log q``), as
    ``w (d + expm1(-d))`` where ``d > -1``: ``>= 0``, and free of cancellation near ``d =
    0``; beyond, where ``expm1(-d)`` could overflow, as written."""
    small = d > -1.0
    ds = xp.where(small, d, 0.0)
    return xp.where(small, w * (ds + expm1(xp, -ds)), w * d + (other - w))


def generalized_kl_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """Pointwise terms ``p log(p / q) - p + q`` of the KL between non-negative measures
    (:func:`scipy.special.kl_div`'s), as ``p (d + expm1(-d))`` (:func:`_gap`): ``>= 0``,
    exact near ``p = q``. ``q`` where P is 0; ``+inf`` where only Q is; a negative entry is
    ``+inf``; NaN propagates. Probabilities only (the record's ``measures``)."""
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    d = _log_ratio(xp, wp, wq, True)
    gap = _gap(xp, wp.w, d, wq.w)
    terms = xp.where(wp.zero, xp.where(wq.zero, 0.0, wq.w), xp.where(wq.zero, math.inf, gap))
    return _outside_and_nan(xp, terms, wp, wq)


def mix_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
    lam: float = 0.5,
) -> Array:
    """Pointwise terms of ``lam KL(P || Q) + (1 - lam) KL(Q || P)``, both from one
    ``d = log p - log q``.

    Each direction's term is taken with the other side's ``q - p`` added (``p d + q - p``
    and ``-q d + p - q``, :func:`_gap`), as KL's terms between logits are: ``>= 0`` term by
    term, exactly 0 where ``p = q``, with no cancellation near P = Q; for two
    distributions the added parts sum to 0. Where P is 0: ``lam q`` plus ``+inf`` unless
    ``lam = 1``; where Q is 0: ``(1 - lam) p`` plus ``+inf`` unless ``lam = 0``; 0 where
    both are. A negative probability is ``+inf``; NaN propagates.
    """
    if p_form == q_form == "logits":
        return _mix_logits_terms(xp, p, q, axis, temperature, lam)
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    d = _log_ratio(xp, wp, wq, p_form == q_form == "probs")
    both = 0.0
    if lam > 0.0:
        both = lam * _gap(xp, wp.w, d, wq.w)
    if lam < 1.0:
        both = both + (1.0 - lam) * _gap(xp, wq.w, -d, wp.w)
    only_q = lam * wq.w if lam == 1.0 else xp.full_like(wq.w, math.inf)  # P is 0
    only_p = (1.0 - lam) * wp.w if lam == 0.0 else xp.full_like(wp.w, math.inf)  # Q is 0
    terms = xp.where(wp.zero, xp.where(wq.zero, 0.0, only_q), xp.where(wq.zero, only_p, both))
    return _outside_and_nan(xp, terms, wp, wq)


def _mix_logits_terms(
    xp: ModuleType, p: Array, q: Array, axis: int, temperature: Any, lam: float
) -> Array:
    """The mixture's terms between two sets of logits, in one expression of ``d = log p -
    log q``: with ``p e = p expm1(-d) = q - p``, ``(2 lam - 1) p e + d (lam p - (1 - lam)
    q)`` (KL's term ``p (d + e)`` weighted by ``lam`` plus the reverse one ``-(p e + q d)``),
    at ``lam = 1/2`` ``d (p - q) / 2``: one ``expm1`` or none, where the general form takes
    two (the NumPy row blocks' kernel computes the same). Near P = Q the first-order parts
    cancel to the absolute error of KL's ``p (d + e)``; where ``d <= -1`` (``expm1(-d)``
    could overflow) ``p e`` is ``q - p`` as written. Both sides are normalised by the
    plain log-sum-exp, as KL's terms between logits (:func:`_kl_logits_terms`): its error
    enters only squared.

    Where P is 0: ``lam q`` plus ``+inf`` unless ``lam = 1``; where Q is 0: ``(1 - lam) p``
    plus ``+inf`` unless ``lam = 0``; 0 where both are (a weight that underflows is
    positive: the formula takes it). NaN propagates, also from a side whose weight is 0.
    Each term is ``>= 0`` (a rounding below is set to 0).
    """
    if lam in (0.0, 1.0):  # one direction: KL's own terms
        return _kl_logits_terms(xp, *((p, q) if lam == 1.0 else (q, p)), axis, temperature)
    _, _, p_zero, q_zero, lp, lq = plain_logs(xp, p, q, axis, temperature)
    pw, qw = xp.exp(lp), xp.exp(lq)
    d = lp - lq
    if lam == 0.5:
        both = 0.5 * (d * (pw - qw))
    else:
        near = d > -1.0
        pe = xp.where(near, pw * expm1(xp, -xp.where(near, d, 0.0)), qw - pw)
        both = (2.0 * lam - 1.0) * pe + d * (lam * pw - (1.0 - lam) * qw)
    # each term is >= 0; where P and Q differ by a rounding, p - q may take the wrong sign
    both = xp.where(both < 0.0, 0.0, both)  # (NaN stays NaN)
    only_q = lam * qw if lam == 1.0 else xp.full_like(qw, math.inf)  # P is 0
    only_p = (1.0 - lam) * pw if lam == 0.0 else xp.full_like(pw, math.inf)  # Q is 0
    terms = xp.where(p_zero, xp.where(q_zero, 0.0, only_q), xp.where(q_zero, only_p, both))
    return xp.where((lp != lp) | (lq != lq), math.nan, terms)


def _expm1_minus(xp: ModuleType, x: Array) -> Array:
    """``g(x) = exp(x) - 1 - x >= 0``, finite wherever ``exp(x)`` is."""
    return expm1(xp, x) - x


def _alpha_gap(xp: ModuleType, d: Array, a: float) -> Array:
    """``[a + (1 - a) e^-d - e^-(1-a)d] / (a (1 - a))`` for ``a >= 1/2``: the alpha term
    of a pair over its ``p`` (``d = log p - log q``), as ``[b g(-d) - g(-b d)] / (a b)``
    with ``b = 1 - a`` and ``g(x) = e^x - 1 - x``; ``g(-d) / a`` at ``b = 0`` (KL's term
    ``d + expm1(-d)``). Each ``g`` is O(x^2) near 0, so nothing first-order cancels, and
    the quotient stays finite as ``b -> 0`` (no cliff at ``alpha = 1``)."""
    b = 1.0 - a
    if b == 0.0:
        return _expm1_minus(xp, -d) / a
    return (b * _expm1_minus(xp, -d) - _expm1_minus(xp, -b * d)) / (a * b)


def _alpha_pair(xp: ModuleType, w: Array, other: Array, d: Array, a: float) -> Array:
    """The alpha term of a pair, ``[a w + (1 - a) o - w^a o^(1-a)] / (a (1 - a))`` with
    ``d = log w - log o`` and ``a >= 1/2``: ``w`` times :func:`_alpha_gap`; where ``d <
    -64`` (``e^-d`` near overflow in float32) as written with ``w^a o^(1-a) = o e^(a d)``
    (KL's ``w d + o - w`` at ``a = 1``), where ``e^(a d)`` is below 1e-14 and nothing
    cancels: no ``e^-d`` overflows against a tiny ``w`` (0 * inf where ``w`` underflowed:
    a NaN row)."""
    near = d >= -_FAR
    dn = xp.where(near, d, 0.0)
    if a == 1.0:
        far = w * d + (other - w)
    else:
        df = xp.where(near, -_FAR, d)
        far = (a * w + (1.0 - a) * other - other * xp.exp(a * df)) / (a * (1.0 - a))
    return xp.where(near, w * _alpha_gap(xp, dn, a), far)


#: |log-ratio| beyond which the alpha and skew KL terms leave their expm1 forms for the
#: direct ones (e^64 is far from float32's overflow, e^-32 far below its precision).
_FAR = 64.0


def alpha_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
    alpha: float = 0.5,
) -> Array:
    """Pointwise terms of Amari's alpha-divergence,
    ``[alpha p + (1 - alpha) q - p^alpha q^(1 - alpha)] / (alpha (1 - alpha))``.

    Written per pair through ``d = log p - log q`` (:func:`_alpha_gap`): ``p`` times the
    gap at ``alpha`` for ``alpha >= 1/2``, ``q`` times the gap at ``1 - alpha`` (with ``-d``)
    below, so each side's limit is reached without dividing 0 by 0: KL(P || Q)'s terms
    ``p (d + expm1(-d))`` at ``alpha = 1``, KL(Q || P)'s at ``alpha = 0``. Every term is
    ``>= 0`` (a negative rounding is set to 0), and 0 where ``p = q``.

    Where P is 0: ``q / alpha`` for ``alpha > 0``, ``+inf`` for ``alpha <= 0`` (``0^alpha``
    is infinite); where Q is 0: ``p / (1 - alpha)`` for ``alpha < 1``, ``+inf`` above; 0
    where both are. A negative probability is ``+inf``; NaN propagates.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    d = _log_ratio(xp, wp, wq, p_form == q_form == "probs")  # finite: from safe values
    if alpha >= 0.5:
        both = _alpha_pair(xp, wp.w, wq.w, d, alpha)
    else:
        both = _alpha_pair(xp, wq.w, wp.w, -d, 1.0 - alpha)
    both = xp.where(both < 0.0, 0.0, both)  # (NaN stays NaN)
    only_q = wq.w / alpha if alpha > 0.0 else xp.full_like(wq.w, math.inf)
    only_p = wp.w / (1.0 - alpha) if alpha < 1.0 else xp.full_like(wp.w, math.inf)
    terms = xp.where(wp.zero, xp.where(wq.zero, 0.0, only_q), xp.where(wq.zero, only_p, both))
    return _outside_and_nan(xp, terms, wp, wq)


def renyi_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
    alpha: float = 0.5,
) -> tuple[Array, Array, Array]:
    """What :func:`renyi_finish` takes, pointwise; the record sums the first two and
    takes the maximum of the third.

    1. The alpha-divergence's terms (:func:`alpha_terms`), whose sum ``A`` gives ``1 - S =
       a (1 - a) A`` for ``S = sum p^a q^(1-a)``, with full accuracy near ``alpha = 1`` and
       near ``P = Q`` (at ``alpha = 0``: Q where P is 0, whose sum is ``1 - S``).
    2. ``exp(e - M)`` with ``e = a log p + (1 - a) log q`` and ``M`` its maximum over the
       distribution (0 where that is not finite): ``S = e^M sum exp(e - M)``, which serves
       where ``S`` is far from 1 (``1 - a (1 - a) A`` would cancel, or ``A`` overflow where
       ``S`` itself does not fit the dtype: ``q / p`` beyond ``e^(709 / (a - 1))``).
    3. ``M``, broadcast along the distribution.

    ``p^a`` is 0 where P is 0 (``a > 0``); ``q^(1-a)`` is 0 where Q is 0 for ``a < 1`` and
    ``+inf`` for ``a > 1``. At ``alpha = 1`` only the first is used.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    if alpha == 0.0:
        gaps = _outside_and_nan(xp, xp.where(wp.zero, wq.w, 0.0), wp, wq)
        e = xp.where(wp.zero | wq.zero, -math.inf, wq.log_w)  # q^1 on the support of P
    else:
        gaps = alpha_terms(
            xp, p, q, p_form=p_form, q_form=q_form, axis=axis, temperature=temperature, alpha=alpha
        )
        e = alpha * wp.log_w + (1.0 - alpha) * wq.log_w  # finite: safe logs
        q_zero = -math.inf if alpha < 1.0 else math.inf
        e = xp.where(wp.zero, -math.inf, xp.where(wq.zero, q_zero, e))
    top = xp.max(e, axis=axis, keepdims=True)
    top = xp.where((top == math.inf) | (top == -math.inf), 0.0, top)
    shifted = _outside_and_nan(xp, xp.exp(e - top), wp, wq)
    return gaps, shifted, xp.broadcast_to(top, shifted.shape)


def renyi_finish(
    xp: ModuleType, gaps: Array, shifted: Array, top: Array, *, alpha: float = 0.5
) -> Array:
    """Rényi's divergence of order `alpha` from :func:`renyi_terms`' row sums (``A``,
    ``sum exp(e - M)``) and ``M``: ``log(S) / (alpha - 1)``.

    Where ``|1 - S| = |a (1 - a) A| < 1/2``, ``log S = log1p(-a (1 - a) A)``, accurate however
    small ``1 - S`` and ``alpha - 1`` are: at ``alpha -> 1`` it tends to KL(P || Q) without a
    cliff. Elsewhere ``log S = M + log(sum exp(e - M))``, well conditioned there (``|log S|``
    is at least ``log(3/2)``) and free of overflow. At ``alpha = 1``: ``A``, the KL.
    """
    if alpha == 1.0:
        return gaps
    c = gaps if alpha == 0.0 else (alpha * (1.0 - alpha)) * gaps
    near = (c < 0.5) & (c > -0.5)
    log_s = xp.where(
        near,
        xp.log1p(-xp.where(near, c, 0.0)),
        top + xp.log(xp.where(near, 1.0, shifted)),
    )
    # >= 0 for every order; a rounding of S above 1 is not (JAX, whose CPU code flushes a
    # subnormal order to 0, gave -9.9e-17 at alpha = 2.2e-309, P = Q up to 3e-39)
    out = log_s / (alpha - 1.0)
    return xp.where(out < 0.0, 0.0, out)  # (NaN stays NaN)


def max_log_ratio_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """``log(p / q)`` pointwise, whose maximum over the distribution is Rényi's
    divergence of order infinity: ``-inf`` where P is 0, ``+inf`` where only Q is;
    a negative probability is ``+inf``; NaN propagates."""
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    d = _log_ratio(xp, wp, wq, p_form == q_form == "probs")
    terms = xp.where(wp.zero, -math.inf, xp.where(wq.zero, math.inf, d))
    return _outside_and_nan(xp, terms, wp, wq)


def cross_entropy_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """Pointwise terms ``-p log q`` of the cross-entropy H(P) + KL(P || Q).

    The conventions of :func:`kl_terms`: 0 where P is 0 (whatever Q is), ``+inf`` where
    ``p > 0 = q``, ``+inf`` for a negative probability, NaN propagates (also from a side
    whose weight is 0). Each term of a distribution is ``>= 0`` (``log q <= 0``), so their
    sum loses nothing to cancellation; from logits, ``log q`` is the exact
    :func:`log_softmax`.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    # 0 - p log q: +0, not -0, where q is 1 (a one-hot P against itself)
    terms = xp.where(wp.zero, 0.0, 0.0 - wp.w * wq.log_w)
    terms = xp.where(wq.zero & ~wp.zero, math.inf, terms)
    return _outside_and_nan(xp, terms, wp, wq)


def entropy_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any = 1.0,
) -> Array:
    """Pointwise terms ``-p log p`` of the entropy H(P) (:func:`scipy.special.entr`).

    `q` is not read (:func:`klx.entropy` passes P as both sides of a divergence call, so
    that masks, reductions and dispatch are the divergences'). 0 where P is 0 (``0 log 0
    = 0``), ``-inf`` for a negative probability (as ``entr``), NaN propagates. From logits
    ``log p`` is the exact :func:`log_softmax`, which keeps the mass beside the maximum of
    a nearly one-hot distribution: its small entropy is that mass's terms.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    terms = xp.where(wp.zero, 0.0, 0.0 - wp.w * wp.log_w)  # +0 where p is 1
    if wp.outside is not None:
        terms = xp.where(wp.outside, -math.inf, terms)
    return terms


def _zero_weight(zero: Array, b: float) -> Array:
    """Where the weight ``b * w`` is 0: everywhere if the Python float `b` is 0."""
    return zero | ~zero if b == 0 else zero


def record_rows(
    xp: ModuleType,
    record: Any,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: Any,
    options: Sequence[tuple[str, float]] = (),
) -> Array:
    """One value per distribution of the divergence `record` (a
    :class:`klx._divergence_table.Divergence`), by its definition: its terms (on the
    inputs as its ``reads`` asks), summed over `axis` (each array of them, where they are
    several; their maximum where the record's ``combine`` says 'max'), then its
    ``finish``."""
    opts = dict(options)
    if record.reads == "forms":
        terms = record.terms(
            xp,
            p,
            q,
            p_form=p_form,
            q_form=q_form,
            axis=axis,
            temperature=temperature,
            **opts,
        )
    else:
        convert = probabilities if record.reads == "probs" else as_log
        p = convert(xp, p, p_form, axis, temperature)
        q = convert(xp, q, q_form, axis, temperature)
        terms = record.terms(xp, p, q, **opts)
    arrays = _as_tuple(terms)
    combine = record.combine
    kinds = combine if isinstance(combine, tuple) else (combine,) * len(arrays)
    sums = tuple(
        xp.max(t, axis=axis) if kind == "max" else sum_along(xp, t, axis)
        for t, kind in zip(arrays, kinds, strict=True)
    )
    return sums[0] if record.finish is None else record.finish(xp, *sums, **opts)


def _as_tuple(terms: Array | tuple[Array, ...]) -> tuple[Array, ...]:
    """A record's terms as a tuple of arrays (one per sum its ``finish`` takes)."""
    return terms if isinstance(terms, tuple) else (terms,)


def divergence_rows(
    xp: ModuleType, call: DivergenceCall, p: Array, q: Array, keep: Array | None
) -> Array:
    """One value per distribution of the divergence of `call`, by the definition.

    `p` and `q` are in the accumulation dtype; they may be row blocks of the call's
    inputs, with `keep` the matching block of ``call.keep`` (full rank, size 1 on the
    axis). Distributions that `keep` drops are replaced by a safe one first, so their
    (later discarded) values and gradients stay finite.
    """
    p = mask_rows(xp, p, keep, call.p_form)
    q = mask_rows(xp, q, keep, call.q_form)
    return record_rows(
        xp,
        call.divergence,
        p,
        q,
        p_form=call.p_form,
        q_form=call.q_form,
        axis=call.axis,
        temperature=call.temperature,
        options=call.options,
    )


def divergence(xp: ModuleType, call: DivergenceCall) -> Array:
    """The reduced divergence of `call`, entirely by the definition, in the result dtype."""
    p = xp.astype(call.p, call.acc, copy=False)
    q = xp.astype(call.q, call.acc, copy=False)
    rows = divergence_rows(xp, call, p, q, call.keep)
    return finish_rows(xp, call, rows)


def finish_rows(xp: ModuleType, call: DivergenceCall, rows: Array) -> Array:
    """Reduce per-distribution values (from the definition or an accelerator) as asked."""
    keep = None if call.keep is None else xp.squeeze(call.keep, axis=call.axis)
    count = shape_size(call.batch_shape)
    out = reduce_rows(xp, rows, call.reduction, keep, count, call.normalizer)
    return xp.astype(out, call.dtype, copy=False)


def mask_rows(xp: ModuleType, x: Array, keep_full: Array | None, form: str) -> Array:
    """Replace the distributions that `keep_full` drops by a safe, finite one."""
    if keep_full is None:
        return x
    return xp.where(keep_full, x, 1.0 if form == "probs" else 0.0)


def kl_div(xp: ModuleType, call: KLDivCall) -> Array:
    """:func:`klx.kl_div` by the array-API definition: what every accelerator must agree with."""
    terms = kl_terms(
        xp,
        xp.astype(call.target, call.acc, copy=False),
        xp.astype(call.input, call.acc, copy=False),
        p_form="log_probs" if call.log_target else "probs",
        q_form="log_probs",
        axis=-1,
    )
    if call.reduction == "none":
        out = terms
    else:
        out = xp.sum(terms)
        div = reduction_divisor(call.reduction, call.shape, call.first)
        if div != div:  # a size Dask knows only when it computes: count lazily
            x = call.input
            counted = terms if call.reduction == "mean" else x[(slice(None),) + (0,) * (x.ndim - 1)]
            out = out / xp.astype(_lazy_count(xp, counted), out.dtype)
        elif div != 1.0:
            out = divide(out, div)
    return xp.astype(out, call.dtype, copy=False)


def reduction_divisor(reduction: str, shape: Sequence[int | None], first: int | None) -> float:
    """What `kl_div`'s total is divided by: the element count for 'mean', `first` (the size
    of `input`'s axis 0; None for 0-d input) for 'batchmean', else 1.

    The one place this rule is written; every accelerator uses it.
    """
    if reduction == "mean":
        return shape_size(shape)
    if reduction == "batchmean" and first is not None:
        return float(first)
    return 1.0


def shape_size(shape: Sequence[int | None]) -> float:
    """The number of elements of `shape` (NaN where a size is unknown, as in Dask)."""
    size = 1.0
    for s in shape:  # a plain loop: torch.compile cannot trace a generator here
        size *= math.nan if s is None else s
    return size


def reduce_rows(
    xp: ModuleType,
    rows: Array,
    reduction: str,
    keep: Array | None,
    count: float,
    normalizer: float | Array | None = None,
) -> Array:
    """Reduce per-distribution values: 'none', 'sum', or 'batchmean' over the kept ones.

    The token semantics of every reducing divergence, written once:

    * 'batchmean' divides the sum over the kept distributions by `normalizer` if given
      (a Python float or a 0-d array of `xp`, e.g. the token count of a whole batch of
      micro-batches), else by the number kept;
    * a divisor of 0 (nothing kept: every distribution dropped by `keep`, or none at all)
      is taken as 1: the sum is then 0, and so are the mean and its gradient, never NaN;
    * a `normalizer` of 0 says the whole batch holds no tokens: the result is 0 with
      gradient 0 whatever this call holds (the sum is not divided by 0, nor returned).

    `count` is the number of distributions, used when `keep` is None (NaN where a size
    is unknown, as in Dask: the count is then taken lazily, when Dask computes).
    """
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    total = xp.sum(rows)
    if reduction == "sum":
        return total
    if isinstance(normalizer, float):
        if normalizer == 0.0:  # 0, and gradient 0 through the untaken branch (not total * 0)
            return xp.where(xp.zeros_like(total, dtype=xp.bool), total, xp.zeros_like(total))
        count, normalizer = normalizer, None
    elif keep is not None and normalizer is None:
        # (broadcast by `where`, not `broadcast_to`: a Dask size may be unknown until computed)
        normalizer = xp.sum(xp.where(keep, xp.ones_like(rows), xp.zeros_like(rows)))
    if normalizer is None:
        if count != count:  # a size Dask knows only when it computes
            return total / xp.astype(_lazy_count(xp, rows), total.dtype)
        return divide(total, count if count != 0 else 1.0)
    n = xp.astype(normalizer, total.dtype)
    # A divisor of 0 gives 0 (gradient 0): never a 0/0 (NaN, and a warning on lazy arrays),
    # nor the undivided sum of a call whose normalizer says the batch holds no tokens.
    zero = n == 0
    return xp.where(zero, xp.zeros_like(total), total / xp.where(zero, 1.0, n))


def _lazy_count(xp: ModuleType, x: Array) -> Array:
    """The number of elements of `x`, as a (lazy) float64 array."""
    return xp.sum(xp.ones_like(x, dtype=xp.float64))


def divide(total: Array, count: float) -> Array:
    """`total` / `count` for a count known in Python: NaN (never a 0/0 warning) if it is 0."""
    return total * math.nan if count == 0 else total / count
