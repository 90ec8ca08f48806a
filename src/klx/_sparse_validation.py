"""Validation of the sparse divergences' values (``validate=True``): indices in range and
distinct, a top-k side's mass at most 1, full sides that are distributions."""

from __future__ import annotations

import math

from klx._sparse_call import TOP_K, Side, SparseCall
from klx._sparse_math import logsumexp, used
from klx._typing import Array
from klx._validation import (
    _count,
    _require_concrete,
    check_distribution,
    check_normalizer_value,
    tolerance,
)

__all__ = ["validate_sparse"]


def validate_sparse(call: SparseCall) -> None:
    """Raise ValueError for out-of-range or repeated indices, or invalid P or Q values."""
    xp, ax = call.xp, call.axis
    for normalizer in (call.normalizer, getattr(call.aggregation, "normalizer", None)):
        if normalizer is not None and not isinstance(normalizer, float):
            check_normalizer_value(xp, normalizer)
    sides = (call.q, call.p)  # Q first, then P, then the index sets
    for side in sides:
        if side.form != TOP_K:
            keep = None if call.keep is None else used(xp, call.keep, side.x.shape)
            check_distribution(xp, side.name, side.x, side.form, axis=ax, keep_full=keep)
    for side in sides:
        if side.form == TOP_K:
            check_distribution(xp, side.name, side.x, "log_probs", axis=None, keep_full=call.keep)
    for side in (call.p, call.q):
        if side.indices is not None:
            _validate_indices(call, side.indices, side.indices_name)
    for side in sides:
        if side.form == TOP_K:
            _validate_top_k_mass(call, side)


def _validate_indices(call: SparseCall, indices: Array, name: str) -> None:
    """Given indices: in range, and distinct within each distribution."""
    xp, ax = call.xp, call.axis
    _require_concrete(name, indices)
    keep = None if call.keep is None else xp.broadcast_to(call.keep, indices.shape)
    idx = indices if keep is None else xp.where(keep, indices, 0)
    vocab = call.vocab
    if vocab is not None:
        outside = _count(xp, (idx < 0) | (idx >= vocab))
        if outside:
            msg = (
                f"`{name}` holds {outside} index(es) outside [0, {vocab}) (the vocabulary "
                f"size of `{call.vocab_name}` along axis {ax}); give indices into "
                f"`{call.vocab_name}`'s vocabulary axis."
            )
            raise ValueError(msg)
    s = xp.moveaxis(xp.sort(idx, axis=ax), ax, -1)
    repeated = xp.any(s[..., 1:] == s[..., :-1], axis=-1)
    if call.keep is not None:
        repeated = repeated & xp.squeeze(call.keep, axis=ax)
    repeats = _count(xp, repeated)
    if repeats:
        msg = (
            f"`{name}` repeats an index within {repeats} distribution(s); the k indices "
            "of a distribution must be distinct (each vocabulary entry once)."
        )
        raise ValueError(msg)


def _validate_top_k_mass(call: SparseCall, side: Side) -> None:
    """A 'top_k' side's probabilities sum to at most 1 (to the dtype's tolerance)."""
    xp, ax = call.xp, call.axis
    lp = xp.astype(side.x, call.acc)
    if call.keep is not None:
        lp = xp.where(xp.broadcast_to(call.keep, lp.shape), lp, -math.inf)
    mass = logsumexp(xp, xp.moveaxis(lp, ax, -1))
    tol = tolerance(xp, side.x.dtype, side.x.shape[ax] or 1)
    above = _count(xp, mass > tol)
    if above:
        msg = (
            f"`{side.name}` of {above} distribution(s) hold more than probability 1 (the "
            f"largest log of the sum is {float(xp.max(mass)):.3g}, tolerance {tol:.3g}); "
            "give log-probabilities over the whole vocabulary (log_softmax of the "
            "logits, taken before the top k)."
        )
        raise ValueError(msg)
