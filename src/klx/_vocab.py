r"""Teacher and student with different vocabulary sizes: ``vocab='intersect'`` / ``'truncate'``.

Two models that share one tokenizer often pad their embedding tables to different sizes
(151,936 and 152,064 rows: TRL #2215, #4562; ms-swift #7950; NeMo-RL #2797). The two sides
then share the ids ``0 .. V-1``, ``V = min(V_p, V_q)``, and :func:`align_vocab` turns both
into distributions over the same bins before any divergence is taken:

* ``'intersect'``: each side is normalised over its *own* whole vocabulary (logits through
  the log-softmax of all their entries at the temperature), the shared ids are kept as
  they are, and the mass on the ids ``>= V`` becomes one tail bin (0 on the smaller
  side). The divergence is between the two coarsened distributions of ``V + 1`` bins:

  .. math::

      \mathrm{KL}(P \,\|\, Q) = \sum_{i < V} p_i \log \frac{p_i}{q_i}
          + p_T \log \frac{p_T}{q_T}, \qquad p_T = \sum_{i \ge V} p_i,
          \quad q_T = \sum_{i \ge V} q_i,

  exact for the coarsening, so a larger teacher with ``p_T > 0`` against a smaller
  student (``q_T = 0``) gives ``+inf``, which is the truth.
* ``'truncate'``: the ``V`` shared ids only, each side renormalised over them
  (``p_i / \sum_{j < V} p_j``): the divergence between the conditionals given a shared
  token, as TRL's slicing of the logits to the shorter vocabulary.

A side is returned in the form it was given: probabilities stay probabilities (the tail
is their sum), log-probabilities stay log-probabilities (the tail is their
log-sum-exp), logits stay logits (the tail is the logit ``T log sum exp(z_i / T)``, whose
softmax at temperature ``T`` is exactly the tail's mass), so every divergence reads them
as usual, with its own accuracy rules. The smaller side gets an empty tail bin (0, or
``-inf`` in log space), whose terms are 0 by the conventions of
:func:`scipy.special.rel_entr`. Where the sizes are equal (or one is 1, broadcast) nothing
is done. Every ``where`` that guards ``-inf`` feeds its untaken branch a safe value, so
gradients stay finite, also at ``-inf`` logits among the extra ids.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from klx._backend_ops import sum_along
from klx._checks import broadcast_shapes, normalize_axis, shape_of
from klx._dtypes import numpy_quiet
from klx._typing import Array

__all__ = ["VOCAB_MODES", "align_vocab", "check_vocab", "shared_size"]

#: The values of ``vocab=``.
VOCAB_MODES = ("same", "intersect", "truncate")


def check_vocab(vocab: object) -> str:
    """``vocab`` as one of :data:`VOCAB_MODES`, or a ValueError naming them."""
    if not isinstance(vocab, str) or vocab not in VOCAB_MODES:
        valid = ", ".join(repr(m) for m in VOCAB_MODES)
        msg = (
            f"`vocab` must be one of {valid}, got {vocab!r}; 'intersect' and 'truncate' "
            "compare a teacher and a student whose vocabularies differ in size."
        )
        raise ValueError(msg)
    return vocab


def mismatch_message(what: str, size_p: int, size_q: int) -> str:
    """The error for sizes that differ without ``vocab='intersect'`` or ``'truncate'``:
    `what` says which sizes (``"`p` has 108 entries and `q` has 100 along axis -1"``)."""
    return (
        f"{what}: the two vocabularies differ in size. If they share their first "
        f"{min(size_p, size_q)} ids (one tokenizer, embedding tables padded to different "
        "sizes), pass vocab='intersect' (the extra ids as one tail bin: the exact "
        "divergence of the coarsened distributions) or vocab='truncate' (both renormalised "
        "over the shared ids, as slicing the logits to the shorter vocabulary); otherwise "
        "give the same vocabulary size on both sides."
    )


def shared_size(mode: str, size_p: int, size_q: int, where: str) -> int | None:
    """``V = min(size_p, size_q)`` where the sizes differ (neither 1, which broadcasts)
    and `mode` asks for a transform; None where nothing is to be done; a ValueError with
    mode 'same' (`where` says along what, for the message)."""
    if size_p == size_q or 1 in (size_p, size_q):
        return None
    if mode == "same":
        what = f"`p` has {size_p} entries and `q` has {size_q} {where}"
        raise ValueError(mismatch_message(what, size_p, size_q))
    return min(size_p, size_q)


def align_vocab(
    xp: ModuleType,
    p: Array,
    q: Array,
    *,
    axis: object,
    p_form: str,
    q_form: str,
    temperature: Any,
    mode: str,
    measures: bool = False,
    dtype: Any = None,
) -> tuple[Array, Array]:
    """`p` and `q` over the same bins along `axis` (see the module): unchanged where the
    sizes match or `mode` is 'same' (a ValueError naming both sizes if they differ, unless
    the shapes fail to broadcast elsewhere too: that error is the broadcast's).

    `axis` is the caller's, for arrays broadcast together (a side of lower rank is
    left-padded); `dtype`, if given, is what the transformed sides are computed in (the
    accumulation dtype). Forms are kept: see the module. `measures`: the divergence takes
    unnormalised measures (``normalized=False``), which no transform serves.
    """
    shape_p, shape_q = shape_of(p), shape_of(q)
    nd = max(len(shape_p), len(shape_q))
    if nd == 0:
        return p, q  # normalize_axis says what is wrong
    ax = normalize_axis(axis, nd)
    size_p, size_q = _size(shape_p, ax, nd), _size(shape_q, ax, nd)
    if size_p is None or size_q is None:
        return p, q  # a Dask size not known yet: the caller's checks say so
    if size_p != size_q and 1 not in (size_p, size_q) and mode == "same":
        others = [
            ("p", _without(shape_p, ax, nd)),
            ("q", _without(shape_q, ax, nd)),
        ]
        broadcast_shapes(others)  # a mismatch elsewhere too: the shapes' own error
    v = shared_size(mode, size_p, size_q, f"along axis {axis}")
    if v is None:
        return p, q
    if measures:
        msg = (
            f"vocab={mode!r} compares distributions over different vocabularies, but this "
            "divergence takes unnormalised measures (normalized=False); give both measures "
            "over the same ids, or use the normalised divergence."
        )
        raise ValueError(msg)
    with numpy_quiet(p):  # inf and NaN on purpose (an empty tail, a +inf logit)
        p = _side(xp, p, p_form, ax - (nd - len(shape_p)), v, mode, temperature, dtype)
        q = _side(xp, q, q_form, ax - (nd - len(shape_q)), v, mode, temperature, dtype)
    return p, q


def _size(shape: tuple[int | None, ...], ax: int, nd: int) -> int | None:
    """The size along the broadcast axis `ax` of an array of `shape` (1 where it lacks it)."""
    own = ax - (nd - len(shape))
    return 1 if own < 0 else shape[own]


def _without(shape: tuple[int | None, ...], ax: int, nd: int) -> tuple[int | None, ...]:
    own = ax - (nd - len(shape))
    return shape if own < 0 else shape[:own] + shape[own + 1 :]


def _part(x: Array, axis: int, start: int, stop: int | None) -> Array:
    """Entries ``start:stop`` of `x` along `axis` (a view where the library makes one)."""
    return x[(slice(None),) * axis + (slice(start, stop), ...)]


def _side(
    xp: ModuleType,
    x: Array,
    form: str,
    axis: int,
    v: int,
    mode: str,
    temperature: Any,
    dtype: Any,
) -> Array:
    """One side over the shared bins: ``V + 1`` ('intersect') or ``V`` ('truncate')."""
    if dtype is not None:
        x = xp.astype(x, dtype, copy=False)
    larger = x.shape[axis] > v
    if mode == "truncate":
        if not larger or form == "logits":  # logits: the log-softmax renormalises them
            return _part(x, axis, 0, v) if larger else x
        head = _part(x, axis, 0, v)
        if form == "probs":
            return head / sum_along(xp, head, axis, keepdims=True)
        return head - _log_sum_exp(xp, head, axis, 1.0)
    if not larger:  # the smaller side: an empty tail bin
        empty = 0.0 if form == "probs" else -math.inf
        return xp.concat([x, xp.full_like(_part(x, axis, 0, 1), empty)], axis=axis)
    head, rest = _part(x, axis, 0, v), _part(x, axis, v, None)
    if form == "probs":
        tail = sum_along(xp, rest, axis, keepdims=True)
        # A negative probability among the extra ids stays negative (its term is +inf,
        # as rel_entr's), rather than hidden in the sum.
        low = xp.min(rest, axis=axis, keepdims=True)
        tail = xp.where(low < 0, low, tail)
    else:
        tail = _log_sum_exp(xp, rest, axis, temperature if form == "logits" else 1.0)
    return xp.concat([head, tail], axis=axis)


def _log_sum_exp(xp: ModuleType, x: Array, axis: int, temperature: Any) -> Array:
    """``T log sum exp(x / T)`` along `axis` (kept, size 1): the logit whose softmax at
    temperature ``T`` is the mass of `x`'s entries; ``-inf`` for entries all ``-inf``
    (with a finite gradient: the untaken branch is fed 0 and 1); NaN and ``+inf``
    propagate."""
    m = xp.max(x, axis=axis, keepdims=True)
    empty = m == -math.inf
    m_safe = xp.where(xp.isfinite(m), m, 0.0)  # (+inf - +inf would be NaN, and warn)
    shifted = x - m_safe
    unit = isinstance(temperature, float) and temperature == 1.0
    if not unit:
        shifted = shifted / temperature
    s = sum_along(xp, xp.exp(shifted), axis, keepdims=True)
    log_s = xp.log(xp.where(empty, 1.0, s))
    return xp.where(empty, -math.inf, m_safe + (log_s if unit else temperature * log_s))
