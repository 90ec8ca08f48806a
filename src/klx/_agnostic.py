"""The math, written once against the array API standard.

Every function takes the namespace ``xp`` first and uses only what the standard
defines, so the same code runs on NumPy, PyTorch, JAX, CuPy, Dask and
array-api-strict arrays, eagerly, under ``jax.jit`` / ``torch.compile`` and on
lazy arrays. There is no branch on array values.

Conventions (those of :func:`scipy.special.rel_entr`):

* a term whose weight ``p`` is 0 is 0, whatever ``q`` is (``-inf`` log-probability
  included), unless ``q`` is NaN;
* ``p > 0`` with ``q = 0`` gives ``+inf``;
* NaN propagates.

Every ``where`` that guards a singular value is doubled: the untaken branch is fed
a safe value (1 for probabilities, 0 for logarithms), so its derivative stays finite
and the gradient of the guarded entries is exactly 0, never NaN.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

Array = Any

__all__ = [
    "Weighted",
    "divergence_rows",
    "divide",
    "js_terms",
    "kl_terms",
    "log_softmax",
    "mask_rows",
    "reduce_rows",
    "weighted",
]


class Weighted(NamedTuple):
    """A distribution as weights ``w``, their logs (0 where ``w`` is 0) and the zero mask."""

    w: Array
    log_w: Array
    zero: Array


def log_softmax(xp: ModuleType, x: Array, axis: int) -> Array:
    """``x - logsumexp(x)`` along `axis`, shifted by the maximum for stability."""
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def as_log(xp: ModuleType, x: Array, form: str, axis: int, temperature: float) -> Array:
    """Log-probabilities of `x` given as 'log_probs' or 'logits' (divided by `temperature`)."""
    if form == "log_probs":
        return x
    if temperature != 1.0:
        x = x / temperature
    return log_softmax(xp, x, axis)


def weighted(xp: ModuleType, x: Array, form: str, axis: int, temperature: float) -> Weighted:
    """The first argument of a divergence: weights, safe logs and where the weight is 0."""
    if form == "probs":
        zero = x == 0
        return Weighted(x, xp.log(xp.where(zero, 1.0, x)), zero)
    log_x = as_log(xp, x, form, axis, temperature)
    w = xp.exp(log_x)
    zero = w == 0
    return Weighted(w, xp.where(zero, 0.0, log_x), zero)


def _log_q(
    xp: ModuleType, q: Array, form: str, axis: int, temperature: float, zero: Array
) -> tuple[Array, Array]:
    """``log q`` (``-inf`` where q is 0), made safe where the weight `zero` is set.

    Also returns the array whose NaNs must reach the result where the weight is 0.
    """
    if form == "probs":
        return xp.log(xp.where(zero, 1.0, q)), q
    log_q = as_log(xp, q, form, axis, temperature)
    return xp.where(zero, 0.0, log_q), log_q


def _terms(xp: ModuleType, p: Weighted, log_q: Array, nan_source: Array) -> Array:
    """``w * (log w - log q)``, and 0 (or NaN, if `nan_source` is NaN) where ``w`` is 0."""
    nan_or_zero = xp.where(xp.isnan(nan_source), nan_source, 0.0)
    return xp.where(p.zero, nan_or_zero, p.w * (p.log_w - log_q))


def kl_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: float = 1.0,
) -> Array:
    """Pointwise terms ``p * (log p - log q)`` of KL(P || Q); their sum over `axis` is the KL.

    With ``p_form='probs'`` (or 'log_probs') and ``q_form='log_probs'`` these are the terms
    of :func:`torch.nn.functional.kl_div` with ``target=p`` and ``input=q``.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    log_q, nan_source = _log_q(xp, q, q_form, axis, temperature, wp.zero)
    return _terms(xp, wp, log_q, nan_source)


def js_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Array:
    """Pointwise terms of ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1-beta) Q``.

    ``log M`` is a ``logaddexp`` of the log-space inputs, so nothing underflows.
    """
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    # Where the weights beta p and (1 - beta) q are 0 (everywhere, for beta = 0 or 1).
    zp = _zero_weight(wp.zero, beta)
    zq = _zero_weight(wq.zero, 1.0 - beta)
    # log(beta p) and log((1 - beta) q), -inf where the weight is 0.
    log_bp = xp.where(zp, -math.inf, wp.log_w + _log_weight(beta))
    log_bq = xp.where(zq, -math.inf, wq.log_w + _log_weight(1.0 - beta))
    # Where both vanish, M is 0 but neither term needs it: feed logaddexp a safe value.
    both = zp & zq
    log_m = xp.logaddexp(xp.where(both, 0.0, log_bp), xp.where(both, 0.0, log_bq))
    bp = Weighted(wp.w * beta, wp.log_w, zp)
    bq = Weighted(wq.w * (1.0 - beta), wq.log_w, zq)
    return _terms(xp, bp, log_m, log_m) + _terms(xp, bq, log_m, log_m)


def _log_weight(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf


def _zero_weight(zero: Array, b: float) -> Array:
    """Where the weight ``b * w`` is 0: everywhere if the Python float `b` is 0."""
    return zero | ~zero if b == 0 else zero


def divergence_rows(
    xp: ModuleType,
    kind: str,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: float,
    beta: float,
    keep_full: Array | None,
) -> Array:
    """One value per distribution: KL(P || Q) (`kind` 'kl') or JS_beta (`kind` 'js').

    Distributions that `keep_full` drops are replaced by a safe one first, so their
    (later discarded) values and gradients stay finite.
    """
    p = mask_rows(xp, p, keep_full, p_form)
    q = mask_rows(xp, q, keep_full, q_form)
    if kind == "kl":
        terms = kl_terms(xp, p, q, p_form=p_form, q_form=q_form, axis=axis, temperature=temperature)
    else:
        terms = js_terms(
            xp, p, q, p_form=p_form, q_form=q_form, axis=axis, temperature=temperature, beta=beta
        )
    return xp.sum(terms, axis=axis)


def mask_rows(xp: ModuleType, x: Array, keep_full: Array | None, form: str) -> Array:
    """Replace the distributions that `keep_full` drops by a safe, finite one."""
    if keep_full is None:
        return x
    return xp.where(keep_full, x, 1.0 if form == "probs" else 0.0)


def reduce_rows(
    xp: ModuleType, rows: Array, reduction: str, keep: Array | None, count: float
) -> Array:
    """Reduce per-distribution values: 'none', 'sum', or 'batchmean' over the kept ones."""
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    total = xp.sum(rows)
    if reduction == "sum":
        return total
    if keep is None:
        return divide(total, count)
    kept = xp.sum(xp.astype(xp.broadcast_to(keep, rows.shape), rows.dtype))
    # Nothing kept gives NaN, without a 0/0 (which warns on lazy NumPy-backed arrays).
    some = kept > 0
    return xp.where(some, total / xp.where(some, kept, 1.0), math.nan)


def divide(total: Array, count: float) -> Array:
    """`total` / `count` for a count known in Python: NaN (never a 0/0 warning) if it is 0."""
    return total * math.nan if count == 0 else total / count
