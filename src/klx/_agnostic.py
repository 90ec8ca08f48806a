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
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from klx._call import DivergenceCall, KLDivCall

Array = Any

__all__ = [
    "DIVERGENCES",
    "Weighted",
    "divergence",
    "divergence_rows",
    "divergence_terms",
    "divide",
    "finish_rows",
    "js_terms",
    "kl_div",
    "kl_terms",
    "log_softmax",
    "mask_rows",
    "probabilities",
    "reduce_rows",
    "reduction_divisor",
    "shape_size",
    "skew_kl_terms",
    "tv_terms",
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


def probabilities(xp: ModuleType, x: Array, form: str, axis: int, temperature: float) -> Array:
    """The probabilities of `x` given in any form (no logarithm taken for 'probs')."""
    if form == "probs":
        return x
    return xp.exp(as_log(xp, x, form, axis, temperature))


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
    zp, zq, log_m = _log_mixture(xp, wp, wq, beta)
    bp = Weighted(wp.w * beta, wp.log_w, zp)
    bq = Weighted(wq.w * (1.0 - beta), wq.log_w, zq)
    return _terms(xp, bp, log_m, log_m) + _terms(xp, bq, log_m, log_m)


def _log_mixture(
    xp: ModuleType, wp: Weighted, wq: Weighted, b: float
) -> tuple[Array, Array, Array]:
    """``log M`` of ``M = b P + (1 - b) Q`` by ``logaddexp``, and where ``b p``, ``(1 - b) q``
    are 0 (everywhere, for a weight of 0).

    Where both weights vanish, M is 0; ``log M`` is then a safe 0, for the terms there
    (weight 0) do not need it.
    """
    zp = _zero_weight(wp.zero, b)
    zq = _zero_weight(wq.zero, 1.0 - b)
    # log(b p) and log((1 - b) q), -inf where the weight is 0.
    log_bp = xp.where(zp, -math.inf, wp.log_w + _log_weight(b))
    log_bq = xp.where(zq, -math.inf, wq.log_w + _log_weight(1.0 - b))
    both = zp & zq
    return zp, zq, xp.logaddexp(xp.where(both, 0.0, log_bp), xp.where(both, 0.0, log_bq))


def skew_kl_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> Array:
    """Pointwise terms of the skew KL(P || alpha P + (1 - alpha) Q).

    ``log M`` is a ``logaddexp`` of the log-space inputs, as in :func:`js_terms`. Where P is
    positive and ``alpha > 0``, M >= alpha P > 0: every term is finite, whatever Q is. At
    ``alpha = 0`` the mixture is Q and these are the terms of :func:`kl_terms` exactly.
    """
    if alpha == 0.0:
        # M is Q; the mixture's safe log M (for p > 0 = q) would hide KL's +inf there.
        return kl_terms(xp, p, q, p_form=p_form, q_form=q_form, axis=axis, temperature=temperature)
    wp = weighted(xp, p, p_form, axis, temperature)
    wq = weighted(xp, q, q_form, axis, temperature)
    # alpha > 0: alpha p vanishes only where p does, and M > 0 wherever p > 0.
    _, _, log_m = _log_mixture(xp, wp, wq, alpha)
    return _terms(xp, wp, log_m, log_m)


def tv_terms(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    p_form: str,
    q_form: str,
    axis: int,
    temperature: float = 1.0,
) -> Array:
    """Pointwise terms ``|p - q| / 2`` of the total variation distance; NaN propagates.

    Where ``p = q`` the derivative of ``|x|`` is the library's own choice of subgradient
    (0 in torch, 1 in JAX): finite, never NaN.
    """
    wp = probabilities(xp, p, p_form, axis, temperature)
    wq = probabilities(xp, q, q_form, axis, temperature)
    return 0.5 * xp.abs(wp - wq)


def _log_weight(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf


def _zero_weight(zero: Array, b: float) -> Array:
    """Where the weight ``b * w`` is 0: everywhere if the Python float `b` is 0."""
    return zero | ~zero if b == 0 else zero


#: A divergence's pointwise terms: ``terms(xp, p, q, *, p_form, q_form, axis, temperature,
#: **options)``, whose sum over `axis` is the divergence of one distribution pair.
TermsFunction = Callable[..., Array]

#: Every divergence klx computes, by the name its call object carries. Adding one is a
#: terms function here, an entry in this table, and a public function that builds its call.
DIVERGENCES: dict[str, TermsFunction] = {
    "kl": kl_terms,
    "js": js_terms,
    "skew_kl": skew_kl_terms,
    "tv": tv_terms,
}


def divergence_terms(kind: str) -> TermsFunction:
    """The terms function of the divergence `kind` (a KeyError names the known ones)."""
    try:
        return DIVERGENCES[kind]
    except KeyError:
        msg = f"unknown divergence {kind!r}; known: {', '.join(sorted(DIVERGENCES))}"
        raise KeyError(msg) from None


def divergence_rows(
    xp: ModuleType, call: DivergenceCall, p: Array, q: Array, keep: Array | None
) -> Array:
    """One value per distribution of the divergence `call.kind`, by the definition.

    `p` and `q` are in the accumulation dtype; they may be row blocks of the call's
    inputs, with `keep` the matching block of ``call.keep`` (full rank, size 1 on the
    axis). Distributions that `keep` drops are replaced by a safe one first, so their
    (later discarded) values and gradients stay finite.
    """
    p = mask_rows(xp, p, keep, call.p_form)
    q = mask_rows(xp, q, keep, call.q_form)
    terms = divergence_terms(call.kind)(
        xp,
        p,
        q,
        p_form=call.p_form,
        q_form=call.q_form,
        axis=call.axis,
        temperature=call.temperature,
        **dict(call.options),
    )
    return xp.sum(terms, axis=call.axis)


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
        if div != 1.0:
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
    * a divisor of 0 (nothing kept: every distribution dropped by `keep`, none at all,
      or a normalizer of 0) is taken as 1: the sum is then 0, and so are the mean and
      its gradient, never NaN.

    `count` is the number of distributions, used when `keep` is None (NaN where a size
    is unknown, as in Dask: the mean is then NaN).
    """
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    total = xp.sum(rows)
    if reduction == "sum":
        return total
    if isinstance(normalizer, float):
        count, normalizer = normalizer, None
    elif keep is not None and normalizer is None:
        normalizer = xp.sum(xp.astype(xp.broadcast_to(keep, rows.shape), rows.dtype))
    if normalizer is None:
        return divide(total, count if count != 0 else 1.0)
    n = xp.astype(normalizer, total.dtype)
    # 0 / 1 where nothing is kept: never a 0/0 (NaN, and a warning on lazy arrays).
    return total / xp.where(n == 0, 1.0, n)


def divide(total: Array, count: float) -> Array:
    """`total` / `count` for a count known in Python: NaN (never a 0/0 warning) if it is 0."""
    return total * math.nan if count == 0 else total / count
