"""`kl_estimate`: sampled estimators of KL(P || Q) for RL (Schulman's k1, k2, k3)."""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import reduce_rows, shape_size
from klx._backend_ops import expm1, stop_gradient, with_derivative
from klx._call import normalizer_array
from klx._checks import (
    REDUCTIONS,
    broadcast_shapes,
    check_float,
    check_normalizer,
    check_reduction,
    check_where,
)
from klx._dtypes import accumulation_dtype, as_array, numpy_quiet
from klx._namespace import array_namespace, check_same_device
from klx._typing import Array, Shape

__all__ = ["ESTIMATORS", "GRADIENTS", "k3_from_log_ratio", "kl_estimate"]


#: Schulman's estimators, by the names verl's `kl_penalty` and OpenRLHF's
#: `compute_approx_kl` give them.
ESTIMATORS = ("k1", "k2", "k3")
#: What the gradient of the estimate is.
GRADIENTS = ("estimator", "straight_through", "importance")

#: 1 / (j + 2)! for j = 0 .. 14: e^r - 1 - r = r^2 sum_j r^j / (j + 2)!, whose truncation
#: after r^16 is exact to float64 rounding (relative 6e-18) for |r| <= 1/2. Beyond 1/2,
#: expm1(r) - r loses at most a few ulps to cancellation.
_K3_SERIES = tuple(1.0 / math.factorial(j + 2) for j in range(15))
_K3_SERIES_RADIUS = 0.5


class EstimateCall(NamedTuple):
    """A checked call of :func:`klx.kl_estimate`."""

    xp: ModuleType
    log_p: Array
    log_q: Array
    log_p_old: Array | None
    estimator: str
    gradient: str
    clamp: float | None
    #: The `where` mask broadcast to `shape`, or None.
    keep: Array | None
    reduction: str
    normalizer: float | Array | None
    shape: Shape
    dtype: Any
    acc: Any


def kl_estimate(
    log_p: Array,
    log_q: Array,
    *,
    estimator: str = "k3",
    gradient: str = "estimator",
    log_p_old: Array | None = None,
    clamp: float | None = None,
    where: Array | None = None,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""A sampled estimate of KL(P || Q) from tokens drawn from P (the policy).

    With :math:`r = \log q(x) - \log p(x)` for a sampled token :math:`x \sim P`
    (Schulman, "Approximating KL divergence", 2020):

    .. math::

        k_1 = -r, \qquad k_2 = \tfrac12 r^2, \qquad k_3 = (e^r - 1) - r.

    :math:`E_P[k_1] = E_P[k_3] = \mathrm{KL}(P \,\|\, Q)` (unbiased); :math:`k_2` is biased
    (:math:`E_P[k_2] = \tfrac12 E_P[r^2]`, close to the KL only when P and Q are close);
    :math:`k_2, k_3 \ge 0`. :math:`k_3` is computed from :math:`r` in log space
    (``expm1(r) - r``, and a series for :math:`|r| \le 1/2`, which keeps full relative
    precision as :math:`k_3 \to 0`): it never forms :math:`q / p`, is exact where
    :math:`p \gg q` (:math:`e^r` underflows to 0, :math:`k_3 = -1 - r`), and overflows to
    ``inf`` only where the value itself exceeds the dtype's range. Nothing is clamped unless
    you pass `clamp`. An infinite log-ratio gives ``inf`` (Q = 0 where P sampled); NaN
    propagates.

    Parameters
    ----------
    log_p : array
        :math:`\log \pi_\theta(x)` of the sampled tokens under the policy P (any shape).
    log_q : array
        :math:`\log \pi_\mathrm{ref}(x)` of the same tokens under the reference model Q;
        broadcast against `log_p`.
    estimator : {'k1', 'k2', 'k3'}, optional
        Default 'k3' (verl's 'low_var_kl', OpenRLHF's 'k3').
    gradient : {'estimator', 'straight_through', 'importance'}, optional
        What the gradient of the estimate is, with respect to the policy's parameters
        :math:`\theta` and the samples held fixed (the usual loss; expectations over
        :math:`x \sim P_\theta`):

        * 'estimator' (default): the estimator's own gradient. :math:`E[\nabla k_1] = 0`;
          :math:`E[\nabla k_2] = \nabla_\theta \mathrm{KL}(P_\theta \| Q)`;
          :math:`E[\nabla k_3] = \nabla_\theta \mathrm{KL}(Q \| P_\theta)`, the gradient
          of the *other* direction of the KL, not of the KL that `k3` estimates.
        * 'straight_through': the value of the chosen estimator with the gradient of
          :math:`k_2`, so :math:`E[\nabla] = \nabla_\theta \mathrm{KL}(P_\theta \| Q)`
          whatever the estimator (verl's ``kl_loss_type`` 'k1+', 'k3+').
        * 'importance': :math:`\rho \, k_n` with the importance weight
          :math:`\rho = \pi_\theta(x) / \pi_\mathrm{old}(x)` (DeepSeek-V3.2, eq. 7), whose
          gradient :math:`\rho (k_n \nabla \log \pi_\theta + \nabla k_n)` has expectation
          :math:`\nabla_\theta E_{P_\theta}[k_n]`: exactly
          :math:`\nabla_\theta \mathrm{KL}(P_\theta \| Q)` for k1 and k3 (for k2, the
          gradient of its biased mean). On-policy (`log_p_old` None) :math:`\rho` is
          ``exp(log_p - stop_gradient(log_p))``: 1 in value, so the value is :math:`k_n`.
    log_p_old : array, optional
        With ``gradient='importance'`` only: the log-probabilities of the samples under
        the policy that drew them (:math:`\pi_\mathrm{old}`, e.g. before this step's
        updates in PPO/GRPO). The value :math:`\rho k_n` is then an unbiased estimate of
        KL(P || Q) (k1, k3) from samples of :math:`\pi_\mathrm{old}`.
    clamp : float, optional
        Clip each :math:`k_n` to ``[-clamp, clamp]`` (before the gradient option is
        applied; a clipped entry has no gradient of its own). Off by default; verl's
        'low_var_kl' clips k3 to [-10, 10] and its log-ratio to [-20, 20].
    where : bool array, optional
        Which tokens to keep, broadcastable to the samples' shape. Dropped tokens
        contribute 0 in value and gradient, even if they hold NaN or ``inf``.
    reduction : {'none', 'sum', 'batchmean'}, optional
        'none': one value per token; 'sum'; 'batchmean': the mean over the kept tokens
        (0, with gradient 0, if none is kept).
    normalizer : float or 0-d array, optional
        As in :func:`kl_divergence`: with 'batchmean', divide the sum by this number
        instead of the count of kept tokens (e.g. the tokens of all micro-batches of a
        step; 0 gives 0).
    xp : namespace, optional
        The array namespace; by default that of the arrays.

    Returns
    -------
    array
        Of the inputs' library, device and promoted dtype (float16 and bfloat16 are
        computed in float32).

    See Also
    --------
    kl_divergence : The exact KL when both full distributions are at hand.

    Notes
    -----
    Equivalents elsewhere: verl ``kl_penalty(logprob, ref_logprob, kl_penalty)`` with 'k1'
    ('kl'), 'k2' ('mse'), 'k3' ('low_var_kl', clamped), and 'k1+' / 'k3+' for the
    straight-through form; OpenRLHF ``compute_approx_kl(log_probs, log_probs_base,
    kl_estimator)`` with 'k1', 'k2', 'k3'; TRL's GRPOTrainer per-token KL is k3.

    References
    ----------
    J. Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html.
    DeepSeek-AI, "DeepSeek-V3.2", 2025, section 3.1 (unbiased KL estimate), eq. 7.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> log_p = np.log(np.array([0.5, 0.2, 0.9]))  # the policy's sampled tokens
    >>> log_q = np.log(np.array([0.4, 0.3, 0.9]))  # the reference model's
    >>> klx.kl_estimate(log_p, log_q)  # k3 per token
    array([0.0231..., 0.0945..., 0.        ])
    >>> klx.kl_estimate(log_p, log_q, estimator="k1", reduction="batchmean")
    array(-0.0607...)
    """
    return evaluate_estimate(parse_estimate(**locals()))


def parse_estimate(
    log_p: Array,
    log_q: Array,
    *,
    estimator: object,
    gradient: object,
    log_p_old: Array | None,
    clamp: object,
    where: Array | None,
    reduction: object,
    normalizer: object,
    xp: ModuleType | None,
) -> EstimateCall:
    """Check the arguments of :func:`kl_estimate` (raising TypeError / ValueError)."""
    named = [("log_p", log_p), ("log_q", log_q), ("where", where)]
    if log_p_old is not None:
        named.append(("log_p_old", log_p_old))
    named += normalizer_array(normalizer)
    xp = array_namespace(named, xp)
    check_float(xp, "log_p", log_p)
    check_float(xp, "log_q", log_q)
    est = _check_choice("estimator", estimator, ESTIMATORS)
    grad = _check_choice("gradient", gradient, GRADIENTS)
    red = check_reduction(reduction, REDUCTIONS)
    norm = check_normalizer(xp, normalizer, red)
    check_same_device(named, xp)
    shapes = [("log_p", tuple(log_p.shape)), ("log_q", tuple(log_q.shape))]
    if log_p_old is not None:
        if grad != "importance":
            msg = (
                "`log_p_old` (the log-probabilities of the policy that drew the samples) "
                f"is used only by gradient='importance', got gradient={grad!r}; pass "
                "gradient='importance', or leave log_p_old=None."
            )
            raise ValueError(msg)
        check_float(xp, "log_p_old", log_p_old)
        shapes.append(("log_p_old", tuple(log_p_old.shape)))
    shape = broadcast_shapes(shapes)
    keep = None
    if where is not None:
        check_where(xp, where, shape)
        keep = xp.broadcast_to(where, shape) if tuple(where.shape) != shape else where
    dtype = xp.result_type(log_p, log_q)
    return EstimateCall(
        xp,
        log_p,
        log_q,
        log_p_old,
        est,
        grad,
        _check_clamp(clamp),
        keep,
        red,
        norm,
        shape,
        dtype,
        accumulation_dtype(xp, dtype),
    )


def evaluate_estimate(call: EstimateCall) -> Array:
    """Compute a checked call of :func:`kl_estimate`."""
    with numpy_quiet(call.log_p):
        return as_array(_estimate(call.xp, call))


def _estimate(xp: ModuleType, call: EstimateCall) -> Array:
    lp = _prepare(xp, call.log_p, call)
    lq = _prepare(xp, call.log_q, call)
    r = lq - lp  # log q - log p
    if call.estimator == "k3" and call.gradient == "estimator":
        # d k3 / dr = e^r - 1, one expression of r (autodiff of the branches kept masks)
        k = with_derivative(xp, r, lambda a: k3_from_log_ratio(xp, a), lambda a: expm1(xp, a))
    else:
        k = estimator_values(xp, call.estimator, r)
    if call.clamp is not None:
        k = xp.clip(k, -call.clamp, call.clamp)
    if call.gradient == "straight_through":
        # The value of k, the gradient of k2 = r^2 / 2 (0 where r is infinite, so that
        # an infinite value does not turn the gradient into NaN).
        finite = xp.isfinite(r)
        r_safe = xp.where(finite, r, 0.0)
        k2 = 0.5 * (r_safe * r_safe)
        k = (k2 - stop_gradient(k2)) + stop_gradient(k)
    elif call.gradient == "importance":
        old = lp if call.log_p_old is None else _prepare(xp, call.log_p_old, call)
        if call.estimator == "k3" and call.clamp is None:
            k = importance_k3(xp, lp, lq, stop_gradient(old))
        else:
            k = xp.exp(lp - stop_gradient(old)) * k
    count = shape_size(call.shape)
    out = reduce_rows(xp, k, call.reduction, call.keep, count, call.normalizer)
    return xp.astype(out, call.dtype, copy=False)


def _prepare(xp: ModuleType, x: Array, call: EstimateCall) -> Array:
    """`x` in the accumulation dtype, broadcast, with dropped tokens replaced by 0."""
    x = xp.astype(x, call.acc, copy=False)
    if tuple(x.shape) != call.shape:
        x = xp.broadcast_to(x, call.shape)
    return x if call.keep is None else xp.where(call.keep, x, 0.0)


def estimator_values(xp: ModuleType, estimator: str, r: Array) -> Array:
    """Schulman's `estimator` of the log-ratio ``r = log q - log p``."""
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * (r * r)
    return k3_from_log_ratio(xp, r)


def k3_from_log_ratio(xp: ModuleType, r: Array) -> Array:
    """``e^r - 1 - r`` to full relative precision, without overflow before the result's.

    A series for ``|r| <= 1/2`` (where ``expm1(r) - r`` cancels), ``expm1(r) - r``
    elsewhere; ``+inf`` at ``r = +-inf``, NaN for NaN. Every branch is fed a safe value
    where it is not taken, so gradients stay finite.
    """
    small = xp.abs(r) <= _K3_SERIES_RADIUS
    rs = xp.where(small, r, 0.0)
    # float32 (and what accumulates in it) needs 8 terms: the first left out is 1e-9 of
    # the sum; float64 all 15 (traced, each term is an op of the fused loop)
    terms = _K3_SERIES if r.dtype == xp.float64 else _K3_SERIES[:8]
    series = xp.zeros_like(rs) + terms[-1]
    for c in reversed(terms[:-1]):  # Horner
        series = series * rs + c
    series = series * (rs * rs)
    # Above log(max) the value exceeds the dtype's range: +inf, without an overflow warning.
    log_max = math.log(float(xp.finfo(r.dtype).max))
    finite_big = ~small & (r <= log_max) & (r > -math.inf)  # False for NaN
    rb = xp.where(finite_big, r, 1.0)
    big = xp.expm1(rb) - rb
    # r = -inf: e^r - 1 - r = +inf; r > log(max): +inf; NaN stays NaN.
    edge = xp.where(r != r, r, math.inf)  # (not isnan: inductor's CPU code loops over it)
    return xp.where(small, series, xp.where(finite_big, big, edge))


def importance_k3(xp: ModuleType, lp: Array, lq: Array, old: Array) -> Array:
    """``rho k3`` with ``rho = exp(lp - old)`` (`old` held fixed), its value and gradient
    each without overflow or cancellation before the result's own.

    The value is ``exp(log rho + log k3(r))``, ``r = lq - lp``, with ``log k3`` in a form
    for each range of r: ``rho`` may underflow while ``k3`` overflows (float32,
    ``lp = -90``, ``old = -2``, ``lq = -1``: the product is e - 90 e^-88, not inf).
    Beyond ``|r| = 1/2`` the gradient is that of ``exp(lq - old) - rho (1 + r)``, whose
    derivatives are the exact ``rho (e^r - 1)`` (in lq) and ``-rho r`` (in lp); ``k3``'s
    own derivative added to ``k3`` cancels there instead (-32 for -20 at r = 20 in
    float32); within it, that of ``rho k3`` with k3's series. Every form is fed safe values
    where it does not apply, so gradients stay finite.
    """
    r = lq - lp
    d = lp - old  # log rho
    e = lq - old  # log(rho e^r), apart: lp must not reach it (its two paths, +1 and -1,
    # would add and cancel the large exp(e) in float32: -32 for -20 at r = 20)
    finite = xp.isfinite(r) & xp.isfinite(d) & xp.isfinite(e)
    rs = xp.where(finite, r, 0.0)
    ds = xp.where(finite, d, 0.0)
    es = xp.where(finite, e, 0.0)
    # log k3(r) by range: the series near 0, r + log1p(-(1 + r) e^-r) above, and
    # log(expm1(r) - r) below (no cancellation beyond |r| = 1/2).
    small = xp.abs(rs) <= _K3_SERIES_RADIUS
    series = k3_from_log_ratio(xp, xp.where(small, rs, 0.0))
    zero = series == 0.0
    log_small = xp.log(xp.where(zero, 1.0, series))
    up = rs > _K3_SERIES_RADIUS
    ru = xp.where(up, rs, 1.0)
    log_up = ru + xp.log1p(-(1.0 + ru) * xp.exp(-ru))
    rd = xp.where(~small & ~up, rs, -1.0)
    log_down = xp.log(xp.expm1(rd) - rd)
    log_k3 = xp.where(small, log_small, xp.where(up, log_up, log_down))
    value = xp.where(small & zero, 0.0, xp.exp(ds + log_k3))
    # Where neither rho nor k3 can leave the range, their product keeps k3's precision
    # (exp of a log costs |log k3| ulps: 42 at r = 1e-9).
    log_max = math.log(float(xp.finfo(lp.dtype).max))
    direct = (xp.abs(ds) <= 0.5 * log_max) & (xp.abs(rs) <= 0.5 * log_max)
    k3 = k3_from_log_ratio(xp, xp.where(direct, rs, 0.0))
    value = xp.where(direct, xp.exp(xp.where(direct, ds, 0.0)) * k3, value)
    # Outside the finite range: what the plain product gives (inf, NaN), no gradient.
    plain = stop_gradient(xp.exp(d) * k3_from_log_ratio(xp, r))
    value = xp.where(finite, value, plain)
    # The gradient's form, at safe values where its exponentials would overflow.
    # Every exponential of the gradient's form finite (rho (1 + r) and their difference
    # too: the margin of 1 keeps a - b below the dtype's max), else no gradient there.
    log_b = ds + xp.log(xp.abs(1.0 + rs) + 1.0)
    in_range = finite & (es <= log_max - 1.0) & (log_b <= log_max - 1.0)
    rho = xp.exp(xp.where(in_range, ds, 0.0))
    a = xp.exp(xp.where(in_range, es, 0.0))
    # Near r = 0 rho * k3 itself (a - rho (1 + r) would leave only eps-sized differences).
    g = xp.where(small, rho * series, a - rho * (1.0 + xp.where(small, 0.0, rs)))
    g = xp.where(in_range, g, 0.0)
    return stop_gradient(value) + (g - stop_gradient(g))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        valid = ", ".join(repr(a) for a in allowed)
        msg = f"`{name}` must be one of {valid}, got {value!r}."
        raise ValueError(msg)
    return value


def _check_clamp(clamp: object) -> float | None:
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real):
        msg = f"`clamp` must be a positive number or None, got {clamp!r}."
        raise TypeError(msg)
    c = float(clamp)
    if not c > 0:
        msg = f"`clamp` must be positive (estimates are clipped to [-clamp, clamp]), got {clamp!r}."
        raise ValueError(msg)
    return c
