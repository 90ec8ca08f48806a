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

from klx._backend_ops import at_least, bare_log_serves, expm1, stop_gradient, sum_along
from klx._typing import Array

if TYPE_CHECKING:
    from klx._typing import DivergenceCall, KLDivCall


__all__ = [
    "Normaliser",
    "Normalisers",
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
    "log1p_rest",
    "log_softmax",
    "log_weight",
    "mask_rows",
    "max_log_ratio_terms",
    "mix_terms",
    "plain_logs",
    "plain_normaliser",
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
    shifted, log_sum = _plain_normaliser(xp, x, axis, temperature)
    return shifted - log_sum


def _plain_normaliser(
    xp: ModuleType, x: Array, axis: int, temperature: Any, given: Normaliser | None = None
) -> tuple[Array, Array]:
    """``(x - max x) / T`` and the log of its exponentials' sum, as
    :func:`_plain_log_softmax` takes them; from the `given` maximum and log-sum of the same
    `x` (:func:`plain_normaliser`) where there are some."""
    if given is not None:
        return _shifted(xp, x, given.top, temperature), given.log_sum
    shifted = _shifted(xp, x, xp.max(x, axis=axis, keepdims=True), temperature)
    return shifted, _log_sum(xp, shifted, axis)


def _shifted(xp: ModuleType, x: Array, top: Array, temperature: Any) -> Array:
    shifted = x - top
    if not (isinstance(temperature, float) and temperature == 1.0):
        shifted = shifted / temperature
    return shifted


def _log_sum(xp: ModuleType, shifted: Array, axis: int) -> Array:
    return xp.log(sum_along(xp, xp.exp(shifted), axis, keepdims=True))


class Normaliser(NamedTuple):
    """A logits input's maximum along the axis and the log of its shifted exponentials'
    sum (:func:`plain_normaliser`), each of size 1 there."""

    top: Array
    log_sum: Array


class Normalisers(NamedTuple):
    """Both sides' :class:`Normaliser` (``DivergenceCall.logits_normalisers``)."""

    p: Normaliser
    q: Normaliser


def plain_normaliser(xp: ModuleType, x: Array, axis: int, temperature: Any) -> Normaliser:
    """The :class:`Normaliser` of logits `x`: what :func:`plain_logs` computes when it is
    given none."""
    top = xp.max(x, axis=axis, keepdims=True)
    return Normaliser(top, _log_sum(xp, _shifted(xp, x, top, temperature), axis))


def log_softmax(xp: ModuleType, x: Array, axis: int, temperature: Any = 1.0) -> Array:
    """``(x - max x) / T - log(sum(exp(...)))`` along `axis`.

    The maximum is subtracted *before* dividing by the temperature, so the largest entry
    is exactly 0 and no entry can overflow, however small `T` is and however a compiler
    rewrites the division. The log-sum-exp is ``log1p`` of the mass besides one maximal
    entry (counted exactly): for a nearly one-hot distribution that mass is far below the
    rounding of 1, and ``log(1 + mass)`` would lose it.

    The maximum is a constant for autodiff (:func:`klx._backend_ops.stop_gradient`): the
    log-softmax does not depend on the shift (its derivative in it is ``sum(softmax) - 1
    = 0``). Through it, autodiff added that sum's float32 rounding times a row's
    cotangents at its maximum (2e-6 of the gradient's largest entry, 64 x 8192) and, in
    ``jax.jit``, wrote an array marking the maxima (a registered divergence's gradient
    from 512 x 32000 logits: 208 -> 162 ms).
    """
    shifted = x - stop_gradient(xp.max(x, axis=axis, keepdims=True))
    if not (isinstance(temperature, float) and temperature == 1.0):
        shifted = shifted / temperature
    return shifted - log1p_rest(xp, shifted, axis)


def log1p_rest(xp: ModuleType, shifted: Array, axis: int, keepdims: bool = True) -> Array:
    """``log(sum(exp(shifted)))`` along `axis` for `shifted` whose maximum is exactly 0:
    ``log1p`` of the mass besides one maximal entry, whose ties are counted exactly (the
    log-sum-exp of :func:`log_softmax` and of the sparse forms' full sides).
    """
    # exp(s) - 1 (exactly 0, as s is exactly 0) at the maxima, exp(s) elsewhere: the derivative in
    # `shifted` is exp(s) at every entry, ties included (the indicator's is 0), so the log-sum-exp's
    # is the softmax; every caller shifts by a maximum held constant for autodiff. (exp(s) - 1 has
    # every derivative of expm1(s), and at s = 0 its exact value: one exponential pass, not two.)
    # The maxima are found by arithmetic, ``floor(max(s, -1/2)) + 1``: 1 there, 0 elsewhere (s < 0,
    # -inf included), derivative 0; not by ``s == 0`` and a `where`: XLA's CPU code fuses a
    # reduction with the arithmetic that feeds it, but writes a comparison's or a `where`'s array
    # out first (and its `sign` runs slower than `exp`). The tie count is ``n - 1 + sum(floor(max(s,
    # -1/4)))`` (the same maxima; exact in float32 up to n = 2^24): no array, not even a constant
    # one, is shared between the two sums or with the caller's (XLA writes a shared one out).
    e = xp.exp(shifted)
    top = xp.floor(at_least(xp, shifted, -0.5)) + 1.0
    rest = sum_along(xp, e - top, axis, keepdims=keepdims)
    n = shifted.shape[axis]
    if isinstance(n, int) and n <= 1 << 24:
        low = xp.floor(at_least(xp, shifted, -0.25))  # 0 at the maxima, -1 elsewhere
        ties = xp.sum(low, axis=axis, keepdims=keepdims) + (n - 1.0)
    else:  # (a size Dask does not know yet, or too large to count from n exactly)
        top = xp.floor(at_least(xp, shifted, -0.25)) + 1.0
        ties = xp.sum(top, axis=axis, keepdims=keepdims) - 1.0
    return xp.log1p(rest + ties)


#: A floor for log-probabilities below the log of every positive float (float64's
#: smallest is e^-745.1): ``max(log p, floor)`` changes only entries whose p is 0, where
#: ``p * max(log p, floor)`` is then 0, not ``0 * -inf``: by arithmetic, not a `where`.
LOG_FLOOR = -1024.0


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
    if p_form == q_form == "probs" and bare_log_serves(p) and bare_log_serves(q):
        return _kl_probs_terms_bare(xp, p, q)
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


def _kl_probs_terms_bare(xp: ModuleType, p: Array, q: Array) -> Array:
    """:func:`kl_terms` of two probability arrays, the same values, where no derivative is
    taken (:func:`klx._backend_ops.bare_log_serves`): the logs and the ``log1p`` read
    `p` and `q` as they are, not safe stand-ins chosen by a select before them (inductor's
    ``log`` is a function call, and a select feeding it costs as much as the rest of the
    loop), and the special values are selected after them: 0 where P is 0, ``+inf``
    where only Q is and where either is negative, NaN where either is."""
    close = (p > 0.5 * q) & (p < 2.0 * q)  # (False wherever either is 0 or NaN)
    d = xp.where(close, xp.log1p((p - q) / q), xp.log(p) - xp.log(q))
    terms = xp.where(p == 0, 0.0, p * d)
    terms = xp.where((q == 0) & (p != 0), math.inf, terms)
    terms = xp.where((p < 0) | (q < 0), math.inf, terms)
    return xp.where((p != p) | (q != q), math.nan, terms)


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
    undefined = log_q != log_q
    constant = xp.zeros_like(log_q)  # (no derivative: the values below are constants)
    if wp.outside is not None:
        return _kl_probs_log_q_terms(xp, wp.given, log_q, undefined, constant)
    terms = wp.w * (wp.log_w - log_q)  # safe p: 1 where P is 0
    # P is 0, or positive with a weight that underflowed (log p = -150 in float32): the
    # term is 0, or +inf against q = 0 (not 0 * inf), NaN where log q is.
    vanished = wp.zero | (wp.w == 0)
    infinite = (log_q == -math.inf) & ~wp.zero
    fixed = xp.where(infinite, math.inf, constant)
    return xp.where(vanished, xp.where(undefined, math.nan, fixed), terms)


def _kl_probs_log_q_terms(
    xp: ModuleType, p: Array, log_q: Array, undefined: Array, constant: Array
) -> Array:
    """:func:`_kl_log_q_terms` of probabilities `p` as given: ``p (log p - log q)`` where
    ``p > 0`` (``+inf`` against ``log q = -inf`` by itself, NaN where either is); where
    ``p <= 0`` a constant, 0 (``p = 0``) or ``+inf`` (``p < 0``, as rel_entr), NaN where
    ``log q`` is. ``p <= 0`` is False for a NaN ``p``, which then goes through the log.

    Three comparisons and three selects per element (``torch.nn.functional.kl_div``'s
    ``xlogy`` takes two and two), none before the ``log`` inside torch.compile on a CPU
    where P carries no derivative (:func:`klx._backend_ops.bare_log_serves`): the
    weight of a probability never underflows, so none of the log forms' masks is needed
    (inside torch.compile on a CPU, where the loop runs at the speed of its arithmetic,
    they and the select before the log took kl_div to 1.8x the formula's time, 0.9x now).
    """
    if bare_log_serves(p):  # NaN or -inf where p <= 0: the where below replaces it
        terms = p * (xp.log(p) - log_q)
    else:
        safe = xp.where(p <= 0.0, 1.0, p)
        terms = safe * (xp.log(safe) - log_q)
    fixed = xp.where(undefined, math.nan, xp.where(p < 0.0, constant + math.inf, constant))
    return xp.where(p <= 0.0, fixed, terms)


class PlainLogs(NamedTuple):
    """Both sides' log-probabilities from logits (the plain log-sum-exp), where each
    weight is 0, and safe logs (0 there)."""

    log_p: Array
    log_q: Array
    p_zero: Array
    q_zero: Array
    lp: Array
    lq: Array


def plain_logs(
    xp: ModuleType,
    p: Array,
    q: Array,
    axis: int,
    temperature: Any,
    given: Normalisers | None = None,
) -> PlainLogs:
    """:class:`PlainLogs` of two logits inputs: what KL's terms between logits and their
    closed-form derivatives (``klx._closed_forms``) start from; each side's maximum and
    log-sum from `given` where it is not None (:func:`plain_normaliser` of the same
    inputs)."""
    return _logs_of(
        xp,
        _plain_normaliser(xp, p, axis, temperature, None if given is None else given.p),
        _plain_normaliser(xp, q, axis, temperature, None if given is None else given.q),
    )


def _plain_logs_and_rows(
    xp: ModuleType, p: Array, q: Array, axis: int, temperature: Any
) -> tuple[PlainLogs, tuple[Array, Array, Array, Array]]:
    """:func:`plain_logs`, and each side's shifted logits ``(x - max x) / T`` and the log
    of their exponentials' sum (:func:`_plain_normaliser`): for a caller that needs them
    too (torch.compile does not merge a second computation of the same reductions)."""
    p_sides = _plain_normaliser(xp, p, axis, temperature)
    q_sides = _plain_normaliser(xp, q, axis, temperature)
    return _logs_of(xp, p_sides, q_sides), (*p_sides, *q_sides)


def _logs_of(
    xp: ModuleType, p_sides: tuple[Array, Array], q_sides: tuple[Array, Array]
) -> PlainLogs:
    """:class:`PlainLogs` from each side's shifted logits and log-sum."""
    log_p = p_sides[0] - p_sides[1]
    log_q = q_sides[0] - q_sides[1]
    p_zero = log_p == -math.inf
    q_zero = log_q == -math.inf
    lp = xp.where(p_zero, 0.0, log_p)  # safe values where a weight is 0
    lq = xp.where(q_zero, 0.0, log_q)
    return PlainLogs(log_p, log_q, p_zero, q_zero, lp, lq)


def _kl_logits_terms(xp: ModuleType, p: Array, q: Array, axis: int, temperature: Any) -> Array:
    """KL terms between two sets of logits: ``p d + q - p``, ``d = log p - log q``.

    That is ``p g(-d)`` with ``g(x) = e^x - 1 - x``, ``>= 0`` term by term, with no
    cancellation (a series near ``d = 0``, :func:`_gap`). Both sides are
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
    if p_form == q_form == "logits" and _MIDDLE <= beta <= 1.0 - _MIDDLE:
        return _js_logits_terms(xp, plain_logs(xp, p, q, axis, temperature), beta)
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
    if p_form == q_form == "logits" and _MIDDLE <= alpha <= 1.0 - _MIDDLE:
        return _mix_w_skew_terms(xp, plain_logs(xp, p, q, axis, temperature), alpha)
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


#: The logits-logits JS and skew KL (weights in [_MIDDLE, 1 - _MIDDLE]) take their Taylor
#: series in r = log(q / p) for |r| <= _MIX_W_NEAR; the direct forms beyond.
_MIX_W_NEAR = 0.5
#: Where the smaller side's weight ``t = e^-|r|`` is above this, ``log(m / small)`` is the
#: log taken directly for a smaller side of weight above 1/2 (see :func:`_mix_w_logs`).
_MIX_W_SIDE = 0.125
#: ``-|r|`` is read at least this (``t`` times it: 0, not ``0 * -inf``, where a weight is 0).
_MIX_W_CLIP = 1000.0


def _mix_w_series(kind: str, w: float, wide: bool) -> tuple[float, ...]:
    """Taylor coefficients (from ``r^2``) in ``r = log(q / p)`` of a logits-logits term over
    ``p``, for the mixture ``M = w P + (1 - w) Q`` with ``s = m / p = w + (1 - w) e^r``:

    * ``kind='js'``: ``beta KL(P || M) + (1 - beta) KL(Q || M)``'s ``F(r) = (1 - w) e^r r -
      s log s`` (``w = beta``);
    * ``kind='skew'``: skew KL's (with ``m - p`` added) ``G(r) = s - 1 - log s`` (``w =
      alpha``).

    Both are 0 with a zero derivative at ``r = 0``, so their series start at ``r^2`` (``w (1
    - w) / 2`` and ``(1 - w)^2 / 2``): nothing cancels near ``P = Q``. Computed in Python
    floats at each call or trace (60 us; not cached: Dynamo warns of ``lru_cache``), ``log
    s`` by the recurrence ``k g_k = k s_k - sum(j g_j s_(k-j))`` (for a weight in [1/16,
    15/16] what cancels in ``F`` is within a factor 100 of the coefficient, far below what
    reaches the sum), cut where the rest, at ``|r| =``
    :data:`_MIX_W_NEAR`, is below a quarter of the dtype's rounding of the smaller of
    ``F(+-R)`` (`wide`: float64; singularities at ``|r| >= pi``, so the coefficients fall
    by 3 or more a degree: 8 to 11 terms in float32, 16 to 19 in float64).
    """
    n, radius, b = 22, _MIX_W_NEAR, 1.0 - w
    e = [b / math.factorial(k) for k in range(n + 1)]  # (1 - w) e^r; s = w + (1 - w) e^r
    g = [0.0] * (n + 1)  # log s
    for k in range(1, n + 1):
        acc = k * e[k]
        for j in range(1, k):
            acc -= j * g[j] * e[k - j]
        g[k] = acc / k  # k g_k = k s_k - sum(j g_j s_(k-j)), s = 1 + ...
    c = [0.0] * (n + 1)
    for k in range(2, n + 1):
        if kind == "skew":
            c[k] = e[k] - g[k]
        else:  # F' = (1 - w) e^r (r - log s): F_k = sum(e_j (r - g)_(k-1-j)) / k
            acc = e[k - 2] - sum(e[j] * g[k - 1 - j] for j in range(k - 1))
            c[k] = acc / k
    edge = min(abs(sum(ck * (sign * radius) ** k for k, ck in enumerate(c))) for sign in (1, -1))
    tol, tail = edge * (2.0**-55 if wide else 2.0**-26), 0.0
    for last in range(n, 1, -1):
        tail += abs(c[last]) * radius**last
        if tail >= tol:  # c[2 .. last] are needed
            return tuple(c[2 : last + 1])
    raise AssertionError("series too short")  # pragma: no cover (weights in the middle)


class _MixWLogs(NamedTuple):
    """The pieces of a logits-logits mixture term (:func:`_mix_w_logs`), each side scaled
    by the larger weight ``hi = max(p, q)``."""

    hi: Array  # max(p, q)
    r: Array  # log(q / p): 0 where both weights are 0
    big_p: Array  # P is the larger side (r <= 0)
    t: Array  # e^-|r| = min(p, q) / hi: 0 exactly where the smaller weight is 0
    ws: Array | float  # the mixture's weight of the smaller side (w or 1 - w)
    lb: Array  # log(m / hi)
    ls: Array  # log(m / min(p, q))


def _mix_w_logs(xp: ModuleType, logs: PlainLogs, w: float, both: bool = True) -> _MixWLogs:
    """:class:`_MixWLogs` of ``M = w P + (1 - w) Q`` (``0 < w < 1``) from two plain
    log-softmaxes: two ``exp`` and one ``log`` per element.

    With ``t = e^-|r|`` and ``ws`` the smaller side's weight, ``m / hi = 1 + ws (t - 1)``
    and ``m / min(p, q) = 1 + (1 - ws) (1 / t - 1)``: one log is taken, the other is it
    ``-+ |r|``. That is ``log(1 + ws (t - 1))`` (``m / hi`` is in ``[1 - ws, 1]``: its
    rounding is an absolute error of eps / 2 in the log, as the inputs' own; ``log1p``
    costs more in the vectorised CPU code), but where ``ws > 1/2`` and ``t >``
    :data:`_MIX_W_SIDE`: there ``m`` is close to ``min(p, q)``, and ``log(m / min(p, q))``
    is taken directly (as the difference it lost up to 50 ulps at ``|r| = 1/2``). Beyond
    ``|r| = 1/2`` either way is within a few ulps of the logs' inputs. Not `both`: only
    where P is the smaller side is ``log(m / min(p, q))`` read (skew KL's), and only
    there is it taken directly (where ``w > 1/2``). Where a log is taken directly it is
    ``log1p``.
    """
    log_p, log_q, p_zero, q_zero = logs.log_p, logs.log_q, logs.p_zero, logs.q_zero
    r = xp.where(p_zero & q_zero, 0.0, log_q - log_p)  # (NaN stays NaN)
    big_p = r <= 0.0
    hi = xp.exp(xp.where(big_p, log_p, log_q))
    a = -xp.abs(r)
    t = xp.exp(a)
    ac = xp.where(a < -_MIX_W_CLIP, -_MIX_W_CLIP, a)  # finite where t is 0
    if w == 0.5:
        lb = xp.log(0.5 * t + 0.5)
        return _MixWLogs(hi, r, big_p, t, 0.5, lb, lb - ac)
    w_big_p = 1.0 - w  # the smaller side's weight where P is the larger (Q's)
    # (0-d arrays of t's dtype: torch's where makes Python floats float32 tensors)
    ws = xp.where(big_p, xp.asarray(w_big_p, dtype=t.dtype), xp.asarray(w, dtype=t.dtype))
    x = ws * (t - 1.0)
    if not (both or w > 0.5):
        lb = xp.log(1.0 + x)
        return _MixWLogs(hi, r, big_p, t, ws, lb, lb - ac)
    side = (t > _MIX_W_SIDE) & (big_p if w_big_p > 0.5 else ~big_p)
    ts = xp.where(side, t, 1.0)  # (no division by a t that underflowed)
    wb = w if w_big_p > 0.5 else w_big_p  # 1 - ws where `side` holds
    log = xp.log1p(xp.where(side, wb * ((1.0 - ts) / ts), x))
    lb = xp.where(side, log + ac, log)
    ls = xp.where(side, log, log - ac)
    return _MixWLogs(hi, r, big_p, t, ws, lb, ls)


def _mix_w_near(xp: ModuleType, m: _MixWLogs, kind: str, w: float) -> tuple[Array, Array]:
    """Where ``|r| <=`` :data:`_MIX_W_NEAR`, and ``p / hi`` times the Taylor series there
    (:func:`_mix_w_series`; 0 elsewhere, from a safe ``r``)."""
    coefficients = _mix_w_series(kind, w, m.r.dtype == xp.float64)
    near = xp.abs(m.r) <= _MIX_W_NEAR
    rn = xp.where(near, m.r, 0.0)
    series = xp.zeros_like(rn) + coefficients[-1]
    for c in reversed(coefficients[:-1]):
        series = series * rn + c
    return near, xp.where(m.big_p, 1.0, m.t) * (series * (rn * rn))


def _js_logits_terms(xp: ModuleType, logs: PlainLogs, beta: float) -> Array:
    """JS terms between two sets of logits (their :class:`PlainLogs`), ``beta`` in
    ``[1/16, 15/16]``.

    Each is ``p F(r)``, ``r = log(q / p)``, ``F(r) = (1 - beta) e^r r - s log s``, ``s = m /
    p``: a Jensen gap, ``>= 0``, 0 with a zero derivative at ``r = 0``. Near it (``|r| <=
    1/2``) a Taylor polynomial in ``r`` (Python-float coefficients, :func:`_mix_w_series`);
    beyond, ``-(beta p u + (1 - beta) q v)`` with ``u, v = log(m / p), log(m / q)`` of
    :func:`_mix_w_logs` (within 20 ulps of mpmath from ``r`` in float32 and float64): two
    ``exp`` and one ``log`` per element, where the ``expm1`` / ``log1p`` pairs took four
    (five with inductor's ``exp(x) - 1``). Where a weight is 0 the other side's term is
    ``-(1 - ws) log(1 - ws)`` by itself (``t = 0``); where both are, 0 (``hi = 0``). NaN
    propagates through ``r``.

    The plain log-sum-exp suffices, as for KL (:func:`_kl_logits_terms`): an error ``c``
    in ``r`` changes the sum by ``c (1 - beta) KL(Q || M)`` at first order, ``c`` of the
    JS.
    """
    m = _mix_w_logs(xp, logs, beta)
    near, series = _mix_w_near(xp, m, "js", beta)
    direct = -(m.ws * m.t * m.ls + (1.0 - m.ws) * m.lb)
    # (the select last: as hi * where(...), XLA's CPU code wrote both factors out for the
    # sum's fusion; with the select last it writes one array; benchmarks/RESULTS.md, fifth
    # round)
    return xp.where(near, m.hi * series, m.hi * direct)


def _mix_w_skew_terms(xp: ModuleType, logs: PlainLogs, alpha: float) -> Array:
    """Skew KL terms ``p (s - 1 - log s)`` (``s = m / p``, ``m - p`` added, see
    :func:`skew_kl_terms`) between two sets of logits, ``alpha`` in ``[1/16, 15/16]``:
    the Taylor polynomial in ``r`` for ``|r| <= 1/2`` (:func:`_mix_w_series`), beyond
    ``m - p - p log(m / p)`` from :func:`_mix_w_logs`. Where P is the smaller side that is
    ``hi ((1 - alpha) (1 - t) - t log(m / p))``: ``(1 - alpha) q`` where P is 0 or
    underflows; where P is the larger, ``hi (ws (t - 1) - log(m / p))``: ``p (alpha - 1 -
    log alpha)`` where Q is 0.
    """
    m = _mix_w_logs(xp, logs, alpha, both=False)
    near, series = _mix_w_near(xp, m, "skew", alpha)
    c = (1.0 - alpha) * (1.0 - m.t)  # m - p over hi where P is the smaller, p - m where not
    direct = xp.where(m.big_p, -c - m.lb, c - m.t * m.ls)
    from klx._backends import library

    lib = library(m.hi)
    if lib is not None and lib.name == "torch":
        # `hi` once, outside the select: with `hi` in both branches inductor wrote `hi`
        # and one more array out (a torch.compile of the value 1.3x -> 2.3x the formula's,
        # one thread)
        return m.hi * xp.where(near, series, direct)
    # the select last, as :func:`_js_logits_terms` (benchmarks/RESULTS.md, fifth round)
    return xp.where(near, m.hi * series, m.hi * direct)


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

    Logits are normalised by the plain log-sum-exp (:func:`_plain_log_softmax`, one pass
    fewer than the exact :func:`log_softmax`): the terms read probabilities, each within a
    few ulps of its value either way (the mass a plain log-sum-exp rounds away beside a
    nearly one-hot maximum shifts every probability by less than an ulp), and ``p - q``
    is rounded as it is from any log-softmax. Where ``p = q`` the derivative of ``|x|`` is
    a subgradient (0 in the closed form, :func:`klx._closed_forms.tv_derivatives`, and
    torch; 1 in JAX's autodiff): finite, never NaN.
    """
    wp, wq = (
        xp.exp(_plain_log_softmax(xp, x, axis, temperature))
        if form == "logits"
        else probabilities(xp, x, form, axis, temperature)
        for x, form in ((p, p_form), (q, q_form))
    )
    return 0.5 * xp.abs(wp - wq)


def _gap(xp: ModuleType, w: Array, d: Array, other: Array) -> Array:
    """``w d + other - w`` (``w = p``, ``other = q``, ``d = log p - log q``), as ``w g(-d)``
    with ``g(x) = e^x - 1 - x``: ``>= 0`` term by term.

    Near ``d = 0`` (``|d| <= 1/2``) ``g`` is its Taylor series, summed by Horner from
    ``x^2 / 2`` (``_G_SERIES``, 8 terms in float32 and below, 14 in float64): exact to the
    dtype's rounding, with nothing that cancels, and no transcendental function, so a
    traced call pays a few multiply-adds where ``d + expm1(-d)`` cost an ``expm1`` (on a
    CPU inside torch.compile, klx's own polynomial and an ``exp``: inductor takes
    ``expm1(x)`` as ``exp(x) - 1``, wrong near 0). Beyond, ``w d + (other - w)`` as
    written: ``g(-d)`` is about 0.1 of the larger of ``w`` and ``other`` or more there, so
    the subtraction loses a few bits at most (about 20 ulps at ``|d| = 1/2``), against the
    ``d`` whose own rounding (``|log p|`` ulps) every form inherits.
    """
    near = xp.abs(d) <= _G_RADIUS
    x = -xp.where(near, d, 0.0)  # the untaken branch at a safe value
    coefficients = _G_SERIES_64 if d.dtype == xp.float64 else _G_SERIES
    series = xp.zeros_like(x) + coefficients[-1]
    for c in reversed(coefficients[:-1]):
        series = series * x + c
    return xp.where(near, w * (series * (x * x)), w * d + (other - w))


#: ``1 / (k + 2)!`` for k = 0 .. 7: ``g(x) = e^x - 1 - x = x^2 sum(x^k / (k + 2)!)``, whose
#: sum truncated after ``x^7`` is within 3e-9 of itself for ``|x| <= 1/2`` (below float32's
#: rounding); in float64, to ``x^13`` (left out: below 1e-17).
_G_SERIES = tuple(1.0 / math.factorial(k + 2) for k in range(8))
_G_SERIES_64 = tuple(1.0 / math.factorial(k + 2) for k in range(14))
_G_RADIUS = 0.5


def _g_parts(xp: ModuleType, x: Array) -> tuple[Array, Array]:
    """The even and odd parts of ``g(x) = e^x - 1 - x`` for ``|x| <= 1/2`` (``g(x)`` is
    their sum, ``g(-x)`` their difference), each a Horner series in ``x^2``: both
    directions of a pair for the multiply-adds of one."""
    x2 = x * x
    coefficients = _G_SERIES_64 if x.dtype == xp.float64 else _G_SERIES
    parts = []
    for terms in (coefficients[0::2], coefficients[1::2]):
        series = xp.zeros_like(x2) + terms[-1]
        for c in reversed(terms[:-1]):
            series = series * x2 + c
        parts.append(series * x2)
    return parts[0], parts[1] * x


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
    (:func:`scipy.special.kl_div`'s), as ``p g(-d)`` (:func:`_gap`): ``>= 0``,
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
    log q``: ``(2 lam - 1) (q - p) + d (lam p - (1 - lam) q)`` (KL's term ``p d + q - p``
    weighted by ``lam`` plus the reverse one), at ``lam = 1/2`` ``d (p - q) / 2``. Near
    P = Q (``|d| <= 1/2``) it is ``lam p g(-d) + (1 - lam) q g(d)`` with ``g(x) = e^x - 1 -
    x``, both from one series (:func:`_g_parts`): every part ``>= 0``, nothing cancels, no
    ``expm1`` (an ``exp`` and a polynomial inside torch.compile on a CPU). Both sides are
    normalised by the plain log-sum-exp, as KL's terms between logits
    (:func:`_kl_logits_terms`): its error enters only squared.

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
        # d and p - q have one sign, but where P and Q differ by a rounding p - q may take
        # the wrong one: the term is >= 0 (a max, not a `where`, NaN stays NaN)
        both = at_least(xp, 0.5 * (d * (pw - qw)), 0.0)
    else:
        # near P = Q, lam p g(-d) + (1 - lam) q g(d), g's even and odd parts by one series
        # in d^2 (no expm1, nothing cancels); beyond |d| = 1/2 the expression as written
        near = xp.abs(d) <= _G_RADIUS
        even, odd = _g_parts(xp, -xp.where(near, d, 0.0))
        close = lam * (pw * (even + odd)) + (1.0 - lam) * (qw * (even - odd))
        far = (2.0 * lam - 1.0) * (qw - pw) + d * (lam * pw - (1.0 - lam) * qw)
        # each part of `close` is >= 0, and beyond |d| = 1/2 the term is at least 0.09
        # max(p, q), above the rounding of `far`'s parts, but not where p and q are
        # subnormal (a few bits, which no longer match d): clamped at 0 by a maximum, not
        # by `where(both < 0, 0, both)`, whose two reads of `both` (an array with an exp)
        # made inductor write three arrays out, 3.4x the formula's time inside
        # torch.compile
        both = at_least(xp, xp.where(near, close, far), 0.0)  # (NaN stays NaN)
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


def _alpha_series(a: float, wide: bool) -> tuple[float, tuple[float, ...], bool]:
    """The radius and Taylor coefficients of ``H(d) = [a e^(b d) + b e^(-a d) - 1] / (a b)``,
    ``b = 1 - a``, ``a >= 1/2``: the alpha term of a pair over its ``p^a q^b`` (``d = log p
    - log q``). ``H(d) = sum_k h_k d^k``, ``h_k = (b^(k-1) - (-a)^(k-1)) / k!`` from ``k =
    2`` (``h_2 = 1/2``: nothing of first order, so nothing cancels near ``d = 0``).

    Computed once per order in Python (float64), cut where the rest is below the dtype's
    rounding (`wide`: float64) at the radius ``min(1, 1 / a)``; at ``a = 1/2`` the odd
    coefficients are 0 and those returned are of ``d^2, d^4, ...`` (`even`).
    """
    b = 1.0 - a
    radius = min(1.0, 1.0 / a)
    tol = (2.0**-56 if wide else 2.0**-27) * 0.5 * radius**2
    coeffs = []
    for k in range(2, 80):
        coeffs.append((b ** (k - 1) - (-a) ** (k - 1)) / math.factorial(k))
        # the rest is below 3/2 of its first term's bound (each term's bound shrinks by
        # radius * max(a, |b|) / (j + 1) <= 1/3 from the next)
        nxt = (abs(b) ** k + a**k) * radius ** (k + 1) / math.factorial(k + 1)
        if 1.5 * nxt < tol:
            break
    even = a == 0.5
    return radius, tuple(coeffs[::2] if even else coeffs), even


def _alpha_poly(xp: ModuleType, d: Array, series: tuple[float, tuple[float, ...], bool]) -> Array:
    """``H(d)`` of :func:`_alpha_series` by Horner's rule (in ``d^2`` where it is even)."""
    _, coeffs, even = series
    d2 = d * d
    x = d2 if even else d
    acc = coeffs[-1] * x + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        acc = acc * x + c
    return acc * d2


def _alpha_logits_terms(xp: ModuleType, logs: PlainLogs, alpha: float) -> Array:
    """The alpha-divergence's terms between two sets of logits (their :class:`PlainLogs`).

    Near ``p = q`` (``|d| <= R``, ``d = log p - log q``) each pair's term is ``p^a q^b
    H(d)``, a polynomial with Python-float coefficients (:func:`_alpha_series`) whose
    first term is ``d^2 / 2``: no cancellation, and one ``exp`` per element where an
    ``expm1`` pair took two or four (inductor computes ``expm1`` as ``exp(x) - 1``).
    Beyond, the term as written, ``[a p + b q - p^a q^b] / (a b)``, whose parts do not
    cancel there. At order 1/2 (the Hellinger distance's) the written form is ``2 (sqrt p
    - sqrt q)^2`` and ``p^a q^b = exp((log p + log q) / 2)``: three exponentials per
    element (each read once: inductor writes out an array with an ``exp`` that two
    operations read, as ``sqrt p sqrt q`` and ``sqrt p - sqrt q`` did, and a torch.compile
    of Rényi's value took 2.1x the formula's time, 1.4x now), and the zero weights need no
    mask (``2 q`` where P is 0, ``2 p`` where Q is 0).

    Orders within 1/4 of 1 (or of 0) keep :func:`_alpha_pair`'s ``expm1`` forms, whose
    division by ``a b`` cancels nothing. Both sides are normalised by the plain
    log-sum-exp, as KL's terms between logits (:func:`_kl_logits_terms`): its error enters
    only squared. Zero weights, signs and NaN as :func:`alpha_terms`.
    """
    log_p, log_q, p_zero, q_zero, lp, lq = logs
    wide = log_p.dtype == xp.float64
    if alpha == 0.5:
        series = _alpha_series(0.5, wide)
        r, s = xp.exp(0.5 * log_p), xp.exp(0.5 * log_q)  # 0 where a weight is 0
        d = log_p - log_q  # NaN or infinite where a weight is 0: not near
        near = xp.abs(d) <= series[0]
        dn = xp.where(near, d, 0.0)
        gap = r - s
        both = xp.exp(0.5 * (log_p + log_q))
        return xp.where(near, both * _alpha_poly(xp, dn, series), 2.0 * (gap * gap))
    a, w_l, o_l = (alpha, lp, lq) if alpha >= 0.5 else (1.0 - alpha, lq, lp)
    b = 1.0 - a
    d = w_l - o_l  # finite: from safe logs
    w, o = xp.exp(w_l), xp.exp(o_l)
    if abs(b) >= 0.25:
        series = _alpha_series(a, wide)
        near = xp.abs(d) <= series[0]
        dn = xp.where(near, d, 0.0)
        e = xp.exp(a * w_l + b * o_l)
        both = xp.where(near, e * _alpha_poly(xp, dn, series), (a * w + b * o - e) / (a * b))
    else:
        both = _alpha_pair(xp, w, o, d, a)
    both = at_least(xp, both, 0.0)  # a rounding below 0 (NaN stays NaN): one read of `both`
    pw, qw = (w, o) if alpha >= 0.5 else (o, w)
    only_q = qw / alpha if alpha > 0.0 else xp.full_like(qw, math.inf)
    only_p = pw / (1.0 - alpha) if alpha < 1.0 else xp.full_like(pw, math.inf)
    terms = xp.where(p_zero, xp.where(q_zero, 0.0, only_q), xp.where(q_zero, only_p, both))
    return xp.where((lp != lp) | (lq != lq), math.nan, terms)


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
    where both are. A negative probability is ``+inf``; NaN propagates. Between two sets
    of logits: :func:`_alpha_logits_terms`.
    """
    if p_form == q_form == "logits":
        return _alpha_logits_terms(xp, plain_logs(xp, p, q, axis, temperature), alpha)
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    d = _log_ratio(xp, wp, wq, p_form == q_form == "probs")  # finite: from safe values
    if alpha >= 0.5:
        both = _alpha_pair(xp, wp.w, wq.w, d, alpha)
    else:
        both = _alpha_pair(xp, wq.w, wp.w, -d, 1.0 - alpha)
    both = at_least(xp, both, 0.0)  # a rounding below 0 (NaN stays NaN): one read of `both`
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
    3. ``M``, of size 1 along the axis (the record's maximum along the axis returns it
       unchanged; broadcast, XLA's CPU code wrote it out in full before that maximum).

    ``p^a`` is 0 where P is 0 (``a > 0``); ``q^(1-a)`` is 0 where Q is 0 for ``a < 1`` and
    ``+inf`` for ``a > 1``. At ``alpha = 1`` only the first is used.

    Between two sets of logits (``alpha > 0``) all three start from the plain
    log-softmaxes (:func:`_renyi_logits_terms`).
    """
    if p_form == q_form == "logits" and alpha > 0.0:
        from klx._backends import library

        logs, rows = _plain_logs_and_rows(xp, p, q, axis, temperature)
        top = None
        lib = library(p)
        if alpha < 1.0 and lib is not None and lib.name == "torch":
            # inductor writes ``e`` out for its maximum and reads it back twice (a torch.compile
            # call 1.6x slower); XLA fuses that maximum and runs the logits' one slower
            top = _renyi_logits_top(xp, rows, axis, alpha)
        return _renyi_logits_terms(xp, logs, axis, alpha, top)
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
    return gaps, shifted, top


def _renyi_logits_top(
    xp: ModuleType, rows: tuple[Array, Array, Array, Array], axis: int, alpha: float
) -> Array:
    """The shift ``M`` of :func:`renyi_terms` between logits of order ``a`` in (0, 1),
    without a pass over ``e = a log p + b log q`` (``b = 1 - a``): with ``log p = s_p -
    L_p``, ``s_p = (p - max p) / T`` (`rows`, :func:`_plain_logs_and_rows`), ``max e =
    max(a s_p + b s_q) - a L_p - b L_q``, whose row maximum needs no log-sum-exp, so a
    tracer takes it in the pass that sums ``exp(s_p)`` and ``exp(s_q)`` (and ``e`` is
    then read once). The shifted logits are exact differences, so ``M`` is ``max e`` to
    the rounding of ``e`` itself (from the raw logits it lost ulp(logit) / T: 0 or
    ``+inf`` for logits near 1e10). 0 where it is not finite (every ``e`` is ``-inf``): as
    ``e <= 0`` at these orders, nothing overflows then; a NaN row stays NaN through
    ``e``."""
    p_shifted, p_log_sum, q_shifted, q_log_sum = rows
    b = 1.0 - alpha
    top = xp.max(alpha * p_shifted + b * q_shifted, axis=axis, keepdims=True)
    top = top - (alpha * p_log_sum + b * q_log_sum)
    return xp.where(xp.abs(top) < math.inf, top, 0.0)  # (NaN too: not below inf)


def _renyi_logits_terms(
    xp: ModuleType, logs: PlainLogs, axis: int, alpha: float, top: Array | None = None
) -> tuple[Array, Array, Array]:
    """:func:`renyi_terms` between two sets of logits (their :class:`PlainLogs`, ``alpha >
    0``): the alpha terms of :func:`_alpha_logits_terms`, and ``e = a log p + (1 - a) log
    q`` from the same logs (``-inf`` where a weight is 0 for ``a < 1``, read off the logs
    themselves; ``+inf`` where Q is 0 for ``a > 1``), shifted by `top`
    (:func:`_renyi_logits_top`) or, where that is None, by the maximum of ``e``. NaN
    propagates through ``e`` (and its maximum)."""
    log_p, log_q, p_zero, q_zero, lp, lq = logs
    if alpha < 1.0:
        e = alpha * log_p + (1.0 - alpha) * log_q  # -inf where either weight is 0
    else:
        e = alpha * lp + (1.0 - alpha) * lq  # finite: safe logs
        q_zero_e = math.inf if alpha > 1.0 else -math.inf
        e = xp.where(p_zero, -math.inf, xp.where(q_zero, q_zero_e, e))
    if top is None:
        top = xp.max(e, axis=axis, keepdims=True)
        top = xp.where((top == math.inf) | (top == -math.inf), 0.0, top)
    gaps = _alpha_logits_terms(xp, logs, alpha)
    shifted = xp.exp(e - top)
    if alpha >= 1.0:  # (below 1 a NaN log is a NaN e)
        shifted = xp.where((lp != lp) | (lq != lq), math.nan, shifted)
    return gaps, shifted, top


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
    :func:`log_softmax`, and P the plain log-sum-exp's (:func:`_plain_log_softmax`, one
    pass fewer): each ``p`` within a few ulps either way (the mass a plain log-sum-exp
    rounds away beside a nearly one-hot maximum shifts every ``p`` by less than an ulp),
    and no term is a difference.
    """
    if p_form != "probs" and q_form != "probs":
        return _cross_entropy_log_terms(xp, p, q, p_form, q_form, axis, temperature)
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    # 0 - p log q: +0, not -0, where q is 1 (a one-hot P against itself)
    terms = xp.where(wp.zero, 0.0, 0.0 - wp.w * wq.log_w)
    terms = xp.where(wq.zero & ~wp.zero, math.inf, terms)
    return _outside_and_nan(xp, terms, wp, wq)


def _cross_entropy_log_terms(
    xp: ModuleType, p: Array, q: Array, p_form: str, q_form: str, axis: int, temperature: Any
) -> Array:
    """:func:`cross_entropy_terms` of two sides in log space, in one fused expression:
    ``0 - p log q`` on a safe ``log q`` (0 where Q is 0), then 0 where both are 0 and
    ``+inf`` where only Q is (also where ``p`` underflows: ``log p`` finite); NaN from
    either side (``log q``'s through the product, also where P is 0)."""
    log_p = _plain_log_softmax(xp, p, axis, temperature) if p_form == "logits" else p
    log_q = as_log(xp, q, q_form, axis, temperature)
    q_zero = log_q == -math.inf
    terms = 0.0 - xp.exp(log_p) * xp.where(q_zero, 0.0, log_q)  # +0 where q is 1
    only_q = xp.where(log_p == -math.inf, xp.zeros_like(log_p), math.inf)  # Q is 0: 0 or +inf
    terms = xp.where(q_zero, only_q, terms)
    return xp.where(log_p != log_p, math.nan, terms)


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
    if p_form != "probs":
        log_p = as_log(xp, p, p_form, axis, temperature)
        # log p floored (LOG_FLOOR), so that p = 0 (log p = -inf) gives 0 * floor = 0: the
        # same values as a `where` on log p = -inf (NaN stays NaN), and finite
        # derivatives, by arithmetic alone, which XLA's CPU code fuses into the sum (a
        # `where` it writes out first: another pass over the distribution).
        return 0.0 - xp.exp(log_p) * at_least(xp, log_p, LOG_FLOOR)  # +0 where p is 0 or 1
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
