"""`sparse_kl_divergence`: KL(P || Q) where P is known on k indices per distribution."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import kl_terms, log_softmax, mask_rows, reduce_rows, shape_size
from klx._backend_ops import expm1, take_along_axis
from klx._backends import library
from klx._call import normalizer_array
from klx._checks import (
    REDUCTIONS,
    broadcast_shapes,
    check_flag,
    check_float,
    check_form,
    check_normalizer,
    check_reduction,
    check_temperature,
    check_temperature_range,
    check_where,
    normalize_axis,
)
from klx._config import resolve_validate
from klx._dtypes import accumulation_dtype, as_array, numpy_quiet
from klx._namespace import array_namespace, check_same_device, is_concrete
from klx._typing import Array, Shape
from klx._validation import (
    _count,
    _require_concrete,
    check_distribution,
    check_normalizer_value,
    tolerance,
)

__all__ = ["SparseCall", "log1mexp", "sparse_kl_divergence"]


class SparseCall(NamedTuple):
    """A checked call of :func:`klx.sparse_kl_divergence`.

    `indices` and `log_p` (batch shape with k at `axis`) are broadcast to the batch shape;
    `q` (the vocabulary at `axis`) is not: its other axes are the batch shape's or 1, and
    is gathered from without being expanded (a (1, V) student shared by N rows stays
    V entries). `keep` is full rank with size 1 at `axis`, or None.
    """

    xp: ModuleType
    indices: Array
    log_p: Array
    q: Array
    axis: int
    q_form: str
    tail: bool
    temperature: float
    keep: Array | None
    reduction: str
    normalizer: float | Array | None
    validate: bool
    batch_shape: Shape
    k: int | None
    vocab: int | None
    dtype: Any
    acc: Any


def sparse_kl_divergence(
    p_indices: Array,
    p_log_probs: Array,
    q: Array,
    *,
    q_form: str = "logits",
    tail: bool = True,
    axis: int = -1,
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    validate: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""KL(P || Q) where P is known only on k indices per distribution (a top-k teacher).

    P is given by the log-probabilities :math:`\log p_i` of its k indices :math:`i \in S`
    (as vLLM returns them, or as stored for offline distillation); Q is a full
    distribution over the vocabulary (the student). With ``tail=True`` (default) the
    rest of P's mass is one extra bin, compared with Q's mass outside S:

    .. math::

        \sum_{i \in S} p_i (\log p_i - \log q_i) + p_T (\log p_T - \log q_T),
        \qquad p_T = 1 - \sum_{i \in S} p_i, \quad q_T = 1 - \sum_{i \in S} q_i,

    the exact KL between P and Q coarsened to k + 1 bins (a lower bound on the full KL,
    equal to it when k is the vocabulary size). With ``tail=False`` both are renormalised
    over S, :math:`\tilde p_i = p_i / \sum_S p`, :math:`\tilde q_i = q_i / \sum_S q`, and
    the result is :math:`\mathrm{KL}(\tilde P \| \tilde Q)` over the k indices.

    The tail masses are computed in log space: :math:`\log p_T` =
    ``log1mexp(logsumexp(log p_S))`` and :math:`\log q_T` = the log-sum-exp of Q over S
    subtracted from Q's total (``log(1 - e^a)`` by ``log(-expm1(a))`` or
    ``log1p(-exp(a))``, whichever is exact), so nothing is formed as ``1 - sum``. Its
    accuracy is that of the log-sum-exps: :math:`q_T` has an absolute error of a few ulps
    of the accumulation dtype, so where Q puts nearly all its mass on S its relative error
    grows like eps / :math:`q_T` (summing Q outside S directly would need a scatter, which
    the array API lacks). A top-k mass that rounding puts at or above 1 gives
    :math:`p_T = 0`. Conventions as in
    :func:`kl_divergence` (0 log 0 = 0; :math:`p > 0` where :math:`q = 0` gives ``inf``;
    NaN propagates). Gradients with respect to `q` are finite wherever the value is.

    Parameters
    ----------
    p_indices : array of int
        The k indices of each distribution of P along `axis` (distinct, in
        ``[0, vocabulary size)``, in any order).
    p_log_probs : array
        P's log-probabilities at `p_indices`, the same shape. They are used as given
        (`temperature` does not apply to them).
    q : array
        Q over the whole vocabulary along `axis`, as logits (default), log-probabilities
        or probabilities; its other axes broadcast against those of `p_indices`. A
        student shared by many distributions (shape ``(1, V)``) is not expanded: its
        normaliser is taken once, and its entries are gathered where P has them.
    q_form : {'logits', 'log_probs', 'probs'}, optional
        How `q` is given. Default 'logits'.
    tail : bool, optional
        True: P's missing mass is one more bin (see above). False: renormalise both over
        the k indices. Default True.
    axis : int, optional
        The axis of the k indices in `p_indices` / `p_log_probs` and of the vocabulary in
        `q`. Default -1.
    temperature : float, optional
        Divides Q's logits (only with ``q_form='logits'``).
    where, reduction, normalizer, validate, xp : optional
        As in :func:`kl_divergence` ('batchmean' of nothing kept is 0; `normalizer`
        divides the sum instead of the count of kept distributions). Validation also
        checks that the indices are in range and distinct and that P's k probabilities
        sum to at most 1.

    Returns
    -------
    array
        One value per distribution (the batch shape) or their reduction, in the library,
        device and promoted dtype of `p_log_probs` and `q` (float16 and bfloat16 are
        computed in float32).

    Raises
    ------
    TypeError, ValueError
        For shapes and dtypes always (`p_indices` not integer, shapes that disagree, k
        larger than the vocabulary or 0); for indices out of range or repeated, or P's
        mass above 1, in validation mode (it reads values). Indices outside the
        vocabulary are a ValueError whenever their values can be read (a device sync on
        a GPU); under ``jax.jit`` or ``torch.compile`` such an entry carries no mass of
        P nor of Q.

    See Also
    --------
    kl_divergence : The dense KL; with all indices (k = vocabulary size, any order) this
        function equals ``kl_divergence(p, q, p_form='log_probs', q_form=...)``.

    Notes
    -----
    Which one to use: ``tail=True`` keeps the KL of the coarsened distributions, so the
    student is also taught how much mass to leave outside the teacher's top k (DistillKit's
    ``sparse_kl_div(missing=SYMMETRIC_UNIFORM)``, the "other bucket" truncation of the
    MaxText KD fork); ``tail=False`` matches the student's shape within the top k only and
    ignores how much mass it puts there (MaxText KD's ``truncation_strategy='renormalize'``).
    DistillKit's default ``missing=ZERO`` (sum over the top k, unrenormalised, no tail
    bin) is neither: it is not a divergence (it can be negative).
    Hinton's distillation loss multiplies by ``temperature ** 2``; do that yourself.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> student = np.array([[2.0, 1.0, 0.5, -1.0, 0.0]])  # logits over 5 tokens
    >>> idx = np.array([[0, 2]])  # the teacher's top 2
    >>> lp = np.log(np.array([[0.6, 0.3]]))  # their log-probabilities (tail mass 0.1)
    >>> klx.sparse_kl_divergence(idx, lp, student)
    array([0.1857...])
    >>> klx.sparse_kl_divergence(idx, lp, student, tail=False)
    array([0.0648...])
    """
    return evaluate_sparse(parse_sparse(**locals()))


def parse_sparse(
    p_indices: Array,
    p_log_probs: Array,
    q: Array,
    *,
    q_form: object,
    tail: object,
    axis: object,
    temperature: object,
    where: Array | None,
    reduction: object,
    normalizer: object,
    validate: object,
    xp: ModuleType | None,
) -> SparseCall:
    """Check the arguments of :func:`sparse_kl_divergence` (shapes, dtypes, options)."""
    named = [("p_indices", p_indices), ("p_log_probs", p_log_probs), ("q", q), ("where", where)]
    named += normalizer_array(normalizer)
    xp = array_namespace(named, xp)
    if not xp.isdtype(p_indices.dtype, "integral"):
        msg = (
            f"`p_indices` must have an integer dtype (the vocabulary indices of P's k "
            f"entries), got {p_indices.dtype}; convert it with `astype` to an integer dtype."
        )
        raise TypeError(msg)
    check_float(xp, "p_log_probs", p_log_probs)
    check_float(xp, "q", q)
    form = check_form("q_form", q_form)
    t = check_temperature(temperature, (form,))
    has_tail = check_flag("tail", tail)
    red = check_reduction(reduction, REDUCTIONS)
    norm = check_normalizer(xp, normalizer, red)
    check_same_device(named, xp)
    ip, lp, qs = tuple(p_indices.shape), tuple(p_log_probs.shape), tuple(q.shape)
    if ip != lp:
        msg = (
            f"`p_indices` has shape {ip} but `p_log_probs` has shape {lp}; give one "
            "log-probability per index (the same shape)."
        )
        raise ValueError(msg)
    if len(ip) != len(qs):
        msg = (
            f"`p_indices` has shape {ip} but `q` has shape {qs}; they must have the same "
            "number of dimensions (k indices along `axis` in `p_indices`, the vocabulary "
            "along `axis` in `q`)."
        )
        raise ValueError(msg)
    ax = normalize_axis(axis, len(qs))
    k, vocab = ip[ax], qs[ax]
    if k == 0:
        msg = "`p_indices` has no index along `axis` (k = 0); give P's top k with k >= 1."
        raise ValueError(msg)
    if k is not None and vocab is not None and k > vocab:
        msg = (
            f"`p_indices` has k = {k} indices along axis {ax}, more than the vocabulary size "
            f"{vocab} of `q`; k must be at most the vocabulary size (check that `axis` is "
            "the vocabulary axis of `q`)."
        )
        raise ValueError(msg)
    batch_shape = broadcast_shapes(
        [("p_indices", ip[:ax] + ip[ax + 1 :]), ("q", qs[:ax] + qs[ax + 1 :])]
    )
    keep = None
    if where is not None:
        check_where(xp, where, batch_shape)
        keep = xp.expand_dims(xp.broadcast_to(where, batch_shape), axis=ax)
    p_shape = (*batch_shape[:ax], k, *batch_shape[ax:])
    if ip != p_shape:
        p_indices = xp.broadcast_to(p_indices, p_shape)
        p_log_probs = xp.broadcast_to(p_log_probs, p_shape)
    dtype = xp.result_type(p_log_probs, q)
    check_temperature_range(t, xp.finfo(accumulation_dtype(xp, dtype)))
    return SparseCall(
        xp,
        p_indices,
        p_log_probs,
        q,
        ax,
        form,
        has_tail,
        t,
        keep,
        red,
        norm,
        resolve_validate(validate),
        batch_shape,
        k,
        vocab,
        dtype,
        accumulation_dtype(xp, dtype),
    )


def evaluate_sparse(call: SparseCall) -> Array:
    """Validate (if asked), then compute a checked call by the array-API definition."""
    with numpy_quiet(call.q):
        if call.validate:
            validate_sparse(call)
        return as_array(sparse_kl(call.xp, call))


def sparse_kl(xp: ModuleType, call: SparseCall) -> Array:
    """The reduced sparse KL of `call`, in the result dtype."""
    idx, lp = call.indices, xp.astype(call.log_p, call.acc)
    q = xp.astype(call.q, call.acc, copy=False)  # not broadcast: Q's statistics once per row
    keep = call.keep
    if keep is not None:  # dropped distributions: safe, in-range stand-ins
        idx = xp.where(keep, idx, 0)
        lp = xp.where(keep, lp, 0.0)
        # A row of Q that no kept distribution uses is replaced (its log-sum-exp and its
        # gradient stay finite); the values gathered for dropped ones are masked later.
        q = mask_rows(xp, q, _used(xp, keep, q.shape), call.q_form)
    idx, dead = _indices_in_range(xp, idx, call.vocab)
    last = len(call.batch_shape)
    if call.axis != last:
        idx, lp, q = (xp.moveaxis(a, call.axis, -1) for a in (idx, lp, q))
        dead = None if dead is None else xp.moveaxis(dead, call.axis, -1)
        keep = None if keep is None else xp.moveaxis(keep, call.axis, -1)
    rows = sparse_rows(xp, idx, lp, q, call, dead, keep)
    keep_rows = None if call.keep is None else xp.squeeze(call.keep, axis=call.axis)
    count = shape_size(call.batch_shape)
    out = reduce_rows(xp, rows, call.reduction, keep_rows, count, call.normalizer)
    return xp.astype(out, call.dtype, copy=False)


def _used(xp: ModuleType, keep: Array, shape: Shape) -> Array:
    """`keep` (full rank) reduced by ``any`` over the axes where `shape` has size 1 and
    `keep` does not: which rows of a broadcast array some kept distribution uses."""
    axes = tuple(i for i, (k, s) in enumerate(zip(keep.shape, shape, strict=True)) if s == 1 != k)
    return xp.any(keep, axis=axes, keepdims=True) if axes else keep


def _indices_in_range(xp: ModuleType, idx: Array, vocab: int | None) -> tuple[Array, Array | None]:
    """`idx`, and where an index lies outside [0, vocab) (None when none can).

    Read now where the values can be read: an index outside is a ValueError (torch took
    index V as 0 and -1 as the last entry; JAX gave NaN). Under tracing (``jax.jit``,
    ``torch.compile``) such an entry is dead: index 0 stands in, and it carries no mass
    of P nor of Q (a -100 padding id with any log-probability adds nothing).
    """
    if vocab is None:  # a Dask vocabulary of unknown size: the gather itself decides
        return idx, None
    wide = idx if xp.iinfo(idx.dtype).bits >= 32 else xp.astype(idx, xp.int32)
    outside = (wide < 0) | (wide >= vocab)
    lib = library(idx)
    readable = lib is None or lib.values_readable(idx)
    if readable and is_concrete(outside):  # a lazy Dask graph or a meta tensor is not read
        if bool(xp.any(outside)):  # one read of a value, as the gather's own bounds check
            n = int(xp.sum(xp.astype(outside, xp.int32)))
            flat = xp.reshape(outside, (-1,))
            first = int(xp.reshape(wide, (-1,))[int(xp.argmax(xp.astype(flat, xp.int8)))])
            msg = (
                f"`p_indices` holds {n} index(es) outside [0, {vocab}) (the vocabulary size "
                f"of `q`), the first {first}; give indices into `q`'s vocabulary axis (a "
                "padding entry: an index in range with log-probability -inf)."
            )
            raise ValueError(msg)
        return idx, None
    return xp.where(outside, xp.zeros_like(idx), idx), outside


def sparse_rows(
    xp: ModuleType,
    idx: Array,
    lp: Array,
    q: Array,
    call: SparseCall,
    dead: Array | None = None,
    keep: Array | None = None,
) -> Array:
    """One sparse KL per distribution; k indices and the vocabulary on the last axis.

    `q` may have size 1 on batch axes (shared by those distributions). `dead` marks
    entries that carry no mass of P nor of Q (traced out-of-range indices); `keep` (size
    1 on the last axis) the kept distributions, whose gathered Q values alone are read.
    """
    if dead is not None:
        lp = xp.where(dead, -math.inf, lp)
    if not call.tail:  # renormalised over the k indices: Q's total is not needed
        log_q_s = _q_on_indices(xp, idx, q, call, keep, total=False)[0]
        if dead is not None:
            log_q_s = xp.where(dead, -math.inf, log_q_s)
        p_bins, q_bins = log_softmax(xp, lp, -1), log_softmax(xp, log_q_s, -1)
    elif call.k is not None and call.k == call.vocab and dead is None:
        # Every index is known (distinct, so all of them): no tail bin, exactly.
        p_bins, q_bins = lp, _q_on_indices(xp, idx, q, call, keep)[0]
    else:
        log_q_s, log_q_total = _q_on_indices(xp, idx, q, call, keep)
        if dead is not None:
            log_q_s = xp.where(dead, -math.inf, log_q_s)
        log_p_tail = log1mexp(xp, logsumexp(xp, lp))
        log_q_tail = log_q_total + log1mexp(xp, logsumexp(xp, log_q_s) - log_q_total)
        p_bins = xp.concat([lp, xp.expand_dims(log_p_tail, axis=-1)], axis=-1)
        q_bins = xp.concat([log_q_s, xp.expand_dims(log_q_tail, axis=-1)], axis=-1)
    terms = kl_terms(xp, p_bins, q_bins, p_form="log_probs", q_form="log_probs", axis=-1)
    return xp.sum(terms, axis=-1)


def _q_on_indices(
    xp: ModuleType,
    idx: Array,
    q: Array,
    call: SparseCall,
    keep: Array | None,
    total: bool = True,
) -> tuple[Array, Array | float]:
    """``log q`` at the indices, and the log of Q's total mass (0 for logits).

    The totals are taken over `q` as given (one per row of Q, however many distributions
    share it). Values gathered for distributions that `keep` drops are replaced by a safe
    one, so a shared row's gradient gets nothing from them. With ``total=False`` (for
    renormalising over the indices) logits are not normalised over the vocabulary and the
    total is not computed: one pass over Q less.
    """
    form, temperature = call.q_form, call.temperature
    q_s = take_along_axis(xp, q, idx, -1)
    if keep is not None:
        q_s = xp.where(keep, q_s, 1.0 if form == "probs" else 0.0)
    if form == "logits":
        z_s = q_s / temperature if temperature != 1.0 else q_s
        if not total:  # only the k logits are needed
            return z_s, 0.0
        z = q / temperature if temperature != 1.0 else q
        return z_s - xp.expand_dims(logsumexp(xp, z), axis=-1), 0.0
    if form == "log_probs":
        return q_s, logsumexp(xp, q) if total else 0.0
    zero = q_s == 0  # log 0 = -inf, with a gradient of 0 (not 0 / 0) through the log
    log_q_s = xp.where(zero, -math.inf, xp.log(xp.where(zero, 1.0, q_s)))
    return log_q_s, xp.log(xp.sum(q, axis=-1)) if total else 0.0


def logsumexp(xp: ModuleType, x: Array) -> Array:
    """``log(sum(exp(x)))`` over the last axis; ``-inf`` for a row of ``-inf``."""
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return xp.log(xp.sum(xp.exp(x - m), axis=-1)) + xp.squeeze(m, axis=-1)


def log1mexp(xp: ModuleType, a: Array) -> Array:
    """``log(1 - e^a)`` for ``a < 0``, exact on both sides of ``a = -log 2`` (Maechler,
    "Accurately computing log(1 - exp(-|a|))", 2012); ``-inf`` for ``a >= 0``.

    Each branch gets a safe value where it is not taken, so gradients stay finite.
    """
    near = a > -math.log(2.0)
    inside = near & (a < 0.0)
    a_near = xp.where(inside, a, -1.0)
    a_far = xp.where(near, -1.0, a)
    out = xp.where(near, xp.log(-expm1(xp, a_near)), xp.log1p(-xp.exp(a_far)))
    return xp.where(near & ~inside & ~xp.isnan(a), -math.inf, out)


def validate_sparse(call: SparseCall) -> None:
    """Raise ValueError for out-of-range or repeated indices, or invalid P or Q values."""
    xp, ax = call.xp, call.axis
    if call.normalizer is not None and not isinstance(call.normalizer, float):
        check_normalizer_value(xp, call.normalizer)
    q_keep = None if call.keep is None else _used(xp, call.keep, call.q.shape)
    check_distribution(xp, "q", call.q, call.q_form, axis=ax, keep_full=q_keep)
    check_distribution(xp, "p_log_probs", call.log_p, "log_probs", axis=None, keep_full=call.keep)
    _require_concrete("p_indices", call.indices)
    keep = None if call.keep is None else xp.broadcast_to(call.keep, call.indices.shape)
    idx = call.indices if keep is None else xp.where(keep, call.indices, 0)
    vocab = call.q.shape[ax]
    outside = _count(xp, (idx < 0) | (idx >= vocab))
    if outside:
        msg = (
            f"`p_indices` holds {outside} index(es) outside [0, {vocab}) (the vocabulary "
            f"size of `q` along axis {ax}); give indices into `q`'s vocabulary axis."
        )
        raise ValueError(msg)
    s = xp.moveaxis(xp.sort(idx, axis=ax), ax, -1)
    repeated = xp.any(s[..., 1:] == s[..., :-1], axis=-1)
    if call.keep is not None:
        repeated = repeated & xp.squeeze(call.keep, axis=ax)
    repeats = _count(xp, repeated)
    if repeats:
        msg = (
            f"`p_indices` repeats an index within {repeats} distribution(s); the k indices "
            "of a distribution must be distinct (each vocabulary entry once)."
        )
        raise ValueError(msg)
    lp = xp.astype(call.log_p, call.acc)
    if keep is not None:
        lp = xp.where(keep, lp, -math.inf)
    mass = logsumexp(xp, xp.moveaxis(lp, ax, -1))
    tol = tolerance(xp, call.log_p.dtype, call.log_p.shape[ax] or 1)
    above = _count(xp, mass > tol)
    if above:
        msg = (
            f"`p_log_probs` of {above} distribution(s) hold more than probability 1 (the "
            f"largest log of the sum is {float(xp.max(mass)):.3g}, tolerance {tol:.3g}); "
            "give log-probabilities of P over the whole vocabulary (log_softmax of the "
            "teacher's logits, taken before the top k)."
        )
        raise ValueError(msg)
