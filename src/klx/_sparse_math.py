"""The sparse divergences' definition, against the array API: each side's log-probabilities
on the support S (P's, Q's or both top k) and its tail bin in log space, the terms on the
bins, the reduction and the coverage masses (:func:`sparse_values`)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from klx._aggregation import aggregate_rows
from klx._agnostic import js_terms, kl_terms, log1p_rest, mask_rows, reduce_rows, shape_size
from klx._backend_ops import expm1, stop_gradient, take_along_axis, top_k_indices
from klx._backends import library
from klx._namespace import is_concrete
from klx._sparse_call import TOP_K, Masses, Side, SparseCall
from klx._typing import Array, Shape

__all__ = ["log1mexp", "logsumexp", "sparse_values", "used"]


class _Prepared(NamedTuple):
    """A side at the last axis: its values (dropped rows made safe), its index set (or
    None) and where an index is dead (traced, out of range; or None)."""

    x: Array
    indices: Array | None
    dead: Array | None


def sparse_values(xp: ModuleType, call: SparseCall) -> tuple[Array, Masses | None]:
    """The reduced divergence of `call` in the result dtype, and the masses (or None)."""
    last = len(call.batch_shape)

    def to_last(a: Array) -> Array:
        return a if call.axis == last else xp.moveaxis(a, call.axis, -1)

    keep = None if call.keep is None else to_last(call.keep)
    p = _prepare(xp, call.p, call, keep, to_last)
    q = _prepare(xp, call.q, call, keep, to_last)
    idx, dead = _support(xp, call, p, q)
    totals = call.tail or call.return_mass
    log_p, total_p = _on_support(xp, call.p, p.x, idx, call.temperature, keep, totals)
    log_q, total_q = _on_support(xp, call.q, q.x, idx, call.temperature, keep, totals)
    if dead is not None:
        log_p = xp.where(dead, -math.inf, log_p)
        log_q = xp.where(dead, -math.inf, log_q)
    # S is the whole vocabulary (every index known): no tail bin, exactly. (Traced, an
    # index out of range is not seen: k = V indices with one of them dead have no tail
    # either.)
    # With vocab='intersect' an index beyond the full side's vocabulary is dead: k = V
    # indices then need not cover it (the `covered` test below decides, per row).
    counts = (call.p.size, call.q.size)
    whole = call.vocab is not None and call.vocab in counts and call.vocab_mode == "same"
    mass_p = mass_q = None
    if totals and not whole:
        mass_p = logsumexp(xp, log_p) - total_p  # the log of P's mass on S
        mass_q = logsumexp(xp, log_q) - total_q
    p_bins, q_bins = log_p, log_q
    if call.tail and mass_p is not None and mass_q is not None:
        tail_p = total_p + log1mexp(xp, mass_p)
        tail_q = total_q + log1mexp(xp, mass_q)
        if dead is not None and call.vocab is not None:
            # A union (or, traced, a set with dead entries) that holds every index: no
            # tail, exactly (its computed tails would be rounding noise, and one of them
            # 0 beside the other's noise is an infinite term).
            live = xp.sum(xp.astype(~dead, call.acc), axis=-1)
            covered = live >= float(call.vocab)
            tail_p = xp.where(covered, -math.inf, tail_p)
            tail_q = xp.where(covered, -math.inf, tail_q)
        p_bins = xp.concat([log_p, xp.expand_dims(tail_p, axis=-1)], axis=-1)
        q_bins = xp.concat([log_q, xp.expand_dims(tail_q, axis=-1)], axis=-1)
    if keep is not None:  # dropped distributions: equal stand-ins (no inf, no NaN gradient)
        p_bins = xp.where(keep, p_bins, 0.0)
        q_bins = xp.where(keep, q_bins, 0.0)
    # Each side is normalised over its bins again (to rounding, it is already), and the
    # terms are w (d + expm1(-d)): >= 0 one by one.
    if call.direction == "forward":
        terms = kl_terms(xp, p_bins, q_bins, p_form="logits", q_form="logits", axis=-1)
    elif call.direction == "reverse":
        terms = kl_terms(xp, q_bins, p_bins, p_form="logits", q_form="logits", axis=-1)
    else:
        terms = js_terms(xp, p_bins, q_bins, p_form="logits", q_form="logits", axis=-1)
    rows = xp.sum(terms, axis=-1)
    keep_rows = None if call.keep is None else xp.squeeze(call.keep, axis=call.axis)
    count = shape_size(call.batch_shape)
    out = reduce_rows(xp, rows, call.reduction, keep_rows, count, call.normalizer)
    if call.aggregation is not None:
        out = aggregate_rows(xp, out, keep_rows, call.aggregation)
    out = xp.astype(out, call.dtype, copy=False)
    if not call.return_mass:
        return out, None
    masses = {}
    for name, log_mass in (("p_mass", mass_p), ("q_mass", mass_q)):
        m = xp.ones_like(rows) if log_mass is None else stop_gradient(xp.exp(log_mass))
        if keep_rows is not None:
            m = xp.where(keep_rows, m, 0.0)
        masses[name] = xp.astype(m, call.dtype, copy=False)
    return out, masses


def _prepare(
    xp: ModuleType, side: Side, call: SparseCall, keep: Array | None, to_last: Any
) -> _Prepared:
    """A side's values and index set at the last axis, dropped rows made safe."""
    x = to_last(xp.astype(side.x, call.acc, copy=False))  # a shared row is not expanded
    if side.form == TOP_K:
        if keep is not None:
            x = xp.where(keep, x, 0.0)
    elif keep is not None:
        # A row that no kept distribution uses is replaced (its log-sum-exp and its
        # gradient stay finite); the values gathered for dropped ones are masked later.
        x = mask_rows(xp, x, used(xp, keep, x.shape), side.form)
    if side.size is None:
        return _Prepared(x, None, None)
    if side.indices is None:  # klx takes the top k: the largest entries, no gradient
        idx = top_k_indices(xp, x, side.size)
        shape = (*call.batch_shape, side.size)
        if tuple(idx.shape) != shape and None not in shape:
            idx = xp.broadcast_to(idx, shape)
        return _Prepared(x, idx, None)
    idx = side.indices
    if call.keep is not None:  # dropped distributions: safe, in-range stand-ins
        idx = xp.where(call.keep, idx, 0)
    idx, dead = _indices_in_range(
        xp, idx, call.vocab, side.indices_name, call.vocab_name, beyond=call.vocab_mode != "same"
    )
    return _Prepared(x, to_last(idx), None if dead is None else to_last(dead))


def _support(
    xp: ModuleType, call: SparseCall, p: _Prepared, q: _Prepared
) -> tuple[Array, Array | None]:
    """The support's indices, and where an entry is dead (carries no mass: a repeat in a
    union, or an index out of range under tracing), or None."""
    if call.support == "p":
        return p.indices, p.dead
    if call.support == "q":
        return q.indices, q.dead
    ip: Array = p.indices  # both sides' sets: a union
    iq: Array = q.indices
    # Q's indices that P's hold already: a (k_q, k_p) comparison per distribution.
    same = xp.expand_dims(iq, axis=-1) == xp.expand_dims(ip, axis=-2)
    if p.dead is not None:
        same = same & ~xp.expand_dims(p.dead, axis=-2)
    repeat = xp.any(same, axis=-1)
    if ip.dtype != iq.dtype:
        wide = xp.int64 if call.vocab is None or call.vocab >= 2**31 else xp.int32
        ip, iq = xp.astype(ip, wide), xp.astype(iq, wide)
    idx = xp.concat([ip, iq], axis=-1)
    dead_p = xp.zeros_like(ip, dtype=xp.bool) if p.dead is None else p.dead
    dead_q = repeat if q.dead is None else repeat | q.dead
    dead = xp.concat([dead_p, dead_q], axis=-1)
    return idx, dead


def _on_support(
    xp: ModuleType,
    side: Side,
    x: Array,
    idx: Array,
    temperature: Any,
    keep: Array | None,
    total: bool,
) -> tuple[Array, Array | float]:
    """A side's log-probabilities on S, and the log of its total mass (0 where they are
    normalised already): a 'top_k' side's as given (S is its own index set)."""
    if side.form == TOP_K:
        return x, 0.0
    return _on_indices(xp, idx, x, side.form, temperature, keep, total)


def _indices_in_range(
    xp: ModuleType,
    idx: Array,
    vocab: int | None,
    name: str = "p_indices",
    vocab_name: str = "q",
    beyond: bool = False,
) -> tuple[Array, Array | None]:
    """`idx`, and where an index lies outside [0, vocab) (None when none can).

    With `beyond` (``vocab='intersect'`` or ``'truncate'``), an index >= vocab is an id of
    the other model's larger vocabulary: dead (it carries no mass on S: with the tail bin,
    P's mass there is in P's tail, which is 1 minus its mass on S), never an error.

    Read now where the values can be read: an index outside is a ValueError (torch took
    index V as 0 and -1 as the last entry; JAX gave NaN). Under tracing (``jax.jit``,
    ``torch.compile``) such an entry is dead: index 0 stands in, and it carries no mass
    of P nor of Q (a -100 padding id with any log-probability adds nothing).
    """
    if vocab is None:  # a Dask vocabulary of unknown size: the gather itself decides
        return idx, None
    wide = idx if xp.iinfo(idx.dtype).bits >= 32 else xp.astype(idx, xp.int32)
    outside = (wide < 0) | (wide >= vocab)
    if beyond:  # ids of the other model's larger vocabulary: dead, never an error
        extra = wide >= vocab
        safe, dead = _indices_in_range(
            xp, xp.where(extra, xp.zeros_like(idx), idx), vocab, name, vocab_name
        )
        return safe, extra if dead is None else (extra | dead)
    lib = library(idx)
    readable = lib is None or lib.values_readable(idx)
    if readable and is_concrete(outside):  # a lazy Dask graph or a meta tensor is not read
        if bool(xp.any(outside)):  # one read of a value, as the gather's own bounds check
            n = int(xp.sum(xp.astype(outside, xp.int32)))
            flat = xp.reshape(outside, (-1,))
            first = int(xp.reshape(wide, (-1,))[int(xp.argmax(xp.astype(flat, xp.int8)))])
            msg = (
                f"`{name}` holds {n} index(es) outside [0, {vocab}) (the vocabulary size "
                f"of `{vocab_name}`), the first {first}; give indices into `{vocab_name}`'s "
                "vocabulary axis (a padding entry: an index in range with log-probability "
                "-inf), or, for a teacher whose vocabulary is larger than the student's, "
                "pass vocab='intersect'."
            )
            raise ValueError(msg)
        return idx, None
    return xp.where(outside, xp.zeros_like(idx), idx), outside


def _on_indices(
    xp: ModuleType,
    idx: Array,
    x: Array,
    form: str,
    temperature: Any,
    keep: Array | None,
    total: bool = True,
) -> tuple[Array, Array | float]:
    """``log x`` at the indices, and the log of the side's total mass (0 for logits).

    The totals are taken over `x` as given (one per row, however many distributions share
    it). Values gathered for distributions that `keep` drops are replaced by a safe one,
    so a shared row's gradient gets nothing from them. With ``total=False`` (for
    renormalising over the indices) logits are not normalised over the vocabulary and the
    total is not computed: one pass over `x` less.
    """
    x_s = take_along_axis(xp, x, idx, -1)
    if keep is not None:
        x_s = xp.where(keep, x_s, 1.0 if form == "probs" else 0.0)
    if form == "logits":
        if not total:  # only the k logits are needed
            return (x_s / temperature if temperature != 1.0 else x_s), 0.0
        # On the scale of the largest logit, whose own log-probability is then -log1p(rest)
        # exactly: a tail 1 - e^lse is kept to the rounding of the mass beside it, not to
        # that of the largest logit (20 ulps of a logit of 20 are 2e-6 in float32).
        m = _finite_max(xp, x)
        shifted = x - m if temperature == 1.0 else (x - m) / temperature
        shifted_s = x_s - m if temperature == 1.0 else (x_s - m) / temperature
        return shifted_s - log1p_rest(xp, shifted, -1), 0.0
    if form == "log_probs":
        return x_s, logsumexp(xp, x) if total else 0.0
    zero = x_s == 0  # log 0 = -inf, with a gradient of 0 (not 0 / 0) through the log
    log_x_s = xp.where(zero, -math.inf, xp.log(xp.where(zero, 1.0, x_s)))
    return log_x_s, xp.log(xp.sum(x, axis=-1)) if total else 0.0


def logsumexp(xp: ModuleType, x: Array) -> Array:
    """``log(sum(exp(x)))`` over the last axis; ``-inf`` for a row of ``-inf``.

    As the largest entry ``m`` plus ``log1p`` of the others' ``exp(x - m)``: where one
    entry holds nearly all the mass, the mass left beside it is kept to its own rounding,
    not to that of 1 (what a tail ``1 - e^lse`` near 0 needs).
    """
    m = _finite_max(xp, x)
    return log1p_rest(xp, x - m, -1, keepdims=False) + xp.squeeze(m, axis=-1)


def _finite_max(xp: ModuleType, x: Array) -> Array:
    """The maximum over the last axis (kept), 0 where it is not finite; a constant for
    autodiff.

    A shift of the logits, of which the log-softmax is free (the derivative through it
    is ``sum(softmax) - 1 = 0``): autodiff through the maximum wrote an array marking
    the maxima (jax.jit's gradient of a top-64 sparse KL, 512 x 32000: 90 -> 60 ms;
    benchmarks/RESULTS.md, issue 24's sixth round).
    """
    m = stop_gradient(xp.max(x, axis=-1, keepdims=True))
    return xp.where(xp.isfinite(m), m, 0.0)


def used(xp: ModuleType, keep: Array, shape: Shape) -> Array:
    """`keep` (full rank) reduced by ``any`` over the axes where `shape` has size 1 and
    `keep` does not: which rows of a broadcast array some kept distribution uses."""
    axes = tuple(i for i, (k, s) in enumerate(zip(keep.shape, shape, strict=True)) if s == 1 != k)
    return xp.any(keep, axis=axes, keepdims=True) if axes else keep


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
