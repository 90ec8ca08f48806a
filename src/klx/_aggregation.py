r"""Aggregation modes: how RL trainers average per-token values into one loss.

The modes of verl's ``loss_agg_mode`` (and DAPO's mean over a group's tokens), written once
against the array API and used by every reducing function (``reduction='seq-mean-token-mean'``
and so on) and by :func:`aggregate` on per-token values a caller already holds (a policy
loss). With a mask :math:`m_{it}` over sequences :math:`i` and their tokens :math:`t`,
:math:`S_i = \sum_t m_{it} x_{it}` and :math:`n_i = \sum_t m_{it}`:

=========================== ====================================================== =================
mode                        value                                                  divisor (global)
=========================== ====================================================== =================
'token-mean'                :math:`\sum_i S_i / N`                                 N: tokens
'seq-mean-token-sum'        :math:`\sum_i S_i / K`                                 K: sequences
'seq-mean-token-mean'       :math:`\sum_{i: n_i > 0} (S_i / n_i) / K`              K: sequences
'seq-mean-token-sum-norm'   :math:`\sum_i S_i / (C K)`                             K: sequences
'group-mean-token-mean'     :math:`\sum_g (\sum_{i \in g} S_i / T_g) / G`          G: groups
=========================== ====================================================== =================

with :math:`T_g = \sum_{i \in g} n_i` and C a constant token budget (Dr. GRPO). Sequences
(and groups) without a kept token are left out of K (and G), never counted as a 0; a divisor
of 0 (nothing kept anywhere) gives 0 with gradient 0, as 'batchmean' does. Each divisor is
counted in the call unless given as `normalizer` (the count over every micro-batch and rank
of a step), so that the micro-batches' losses, summed, are the whole batch's loss.
"""

from __future__ import annotations

import math
import numbers
import operator
from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import reduce_rows
from klx._checks import (
    REDUCTIONS,
    broadcasts_to,
    check_float,
    check_normalizer,
    check_reduction,
    check_where,
    shape_of,
)
from klx._dtypes import accumulation_dtype, as_array
from klx._namespace import array_namespace, check_same_device
from klx._typing import Array, Shape

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "aggregate",
    "aggregate_rows",
    "parse_aggregation",
    "split_reduction",
]

#: The aggregation modes (verl's ``loss_agg_mode`` names, and DAPO's group mean).
AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "group-mean-token-mean",
)
#: What each mode's `normalizer` counts (its global divisor).
DIVISORS = {
    "token-mean": "kept tokens",
    "seq-mean-token-sum": "sequences with a kept token",
    "seq-mean-token-mean": "sequences with a kept token",
    "seq-mean-token-sum-norm": "sequences with a kept token",
    "group-mean-token-mean": "groups with a kept token",
}


class Aggregation(NamedTuple):
    """A checked aggregation mode, with what it needs besides the per-token values."""

    mode: str
    #: The axis of the per-token values (the batch shape) along which a sequence's tokens
    #: lie, non-negative.
    sequence_axis: int
    #: The global divisor (a float or a 0-d array), or None: counted in the call.
    normalizer: float | Array | None
    #: The constant C of 'seq-mean-token-sum-norm' (None: the size of the sequence axis).
    token_budget: float | None
    #: One group id per sequence ('group-mean-token-mean'), or None.
    group_ids: Array | None


def parse_aggregation(
    xp: ModuleType,
    reduction: str,
    batch_shape: Shape,
    *,
    sequence_axis: object,
    normalizer: object,
    token_budget: object,
    group_ids: object,
) -> Aggregation | None:
    """Check the aggregation arguments: an :class:`Aggregation` for an aggregation mode,
    None for another reduction (then `sequence_axis`, `token_budget` and `group_ids` must
    be None: they have no meaning there). `reduction` is already checked."""
    if reduction not in AGGREGATIONS:
        for name, value in (
            ("sequence_axis", sequence_axis),
            ("token_budget", token_budget),
            ("group_ids", group_ids),
        ):
            if value is not None:
                msg = (
                    f"`{name}` is used by the aggregation modes ({_names(AGGREGATIONS)}) only, "
                    f"but reduction={reduction!r}; pass one of them, or leave {name}=None."
                )
                raise ValueError(msg)
        return None
    ndim = len(batch_shape)
    if ndim == 0:
        msg = (
            f"reduction={reduction!r} averages per-token values over sequences, but there is "
            "one value only (the batch shape is ()); give the values of a batch of sequences "
            "(e.g. shape (sequences, tokens)), or use reduction='sum'."
        )
        raise ValueError(msg)
    ax = _sequence_axis(-1 if sequence_axis is None else sequence_axis, ndim)
    norm = check_normalizer(xp, normalizer, "batchmean")
    budget = None
    if token_budget is not None:
        if reduction != "seq-mean-token-sum-norm":
            msg = (
                "`token_budget` is the constant divisor of reduction='seq-mean-token-sum-norm' "
                f"only, but reduction={reduction!r}; leave token_budget=None."
            )
            raise ValueError(msg)
        budget = _positive("token_budget", token_budget)
    elif reduction == "seq-mean-token-sum-norm":
        size = batch_shape[ax]
        if size is None:
            msg = (
                "reduction='seq-mean-token-sum-norm' divides by the sequence length by "
                "default, which is unknown here (a Dask size known only when computed); pass "
                "token_budget= (e.g. the generation budget, max_new_tokens)."
            )
            raise ValueError(msg)
    ids = None
    if reduction == "group-mean-token-mean":
        if group_ids is None:
            msg = (
                "reduction='group-mean-token-mean' needs `group_ids`: one integer per "
                "sequence (e.g. the index of its prompt), of the batch shape without the "
                "sequence axis."
            )
            raise ValueError(msg)
        ids = _check_group_ids(xp, group_ids, batch_shape[:ax] + batch_shape[ax + 1 :])
    elif group_ids is not None:
        msg = (
            "`group_ids` is used by reduction='group-mean-token-mean' only, but "
            f"reduction={reduction!r}; leave group_ids=None."
        )
        raise ValueError(msg)
    return Aggregation(reduction, ax, norm, budget, ids)


def split_reduction(
    xp: ModuleType,
    reduction: str,
    batch_shape: Shape,
    *,
    sequence_axis: object,
    normalizer: object,
    token_budget: object,
    group_ids: object,
) -> tuple[str, float | Array | None, Aggregation | None]:
    """What a reducing function computes and how it reduces it: ``('none', None,
    aggregation)`` for an aggregation mode (per-distribution values, then
    :func:`aggregate_rows`), else ``(reduction, normalizer, None)``, each checked."""
    agg = parse_aggregation(
        xp,
        reduction,
        batch_shape,
        sequence_axis=sequence_axis,
        normalizer=normalizer,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    if agg is not None:
        return "none", None, agg
    return reduction, check_normalizer(xp, normalizer, reduction), None


def aggregate_rows(xp: ModuleType, rows: Array, keep: Array | None, agg: Aggregation) -> Array:
    """Aggregate per-token `rows` (the batch shape, dropped tokens already 0) by `agg`.

    `keep` is the boolean mask of the kept tokens, broadcastable to `rows` (None keeps
    every token). No value is read in Python: the divisors are arrays, so this traces under
    ``jax.jit`` and ``torch.compile`` and stays lazy on Dask.
    """
    ax = agg.sequence_axis
    dtype = rows.dtype  # counted and summed in float32 for float16 / bfloat16 (65504 tokens)
    rows = xp.astype(rows, accumulation_dtype(xp, dtype), copy=False)
    return xp.astype(_aggregate(xp, rows, keep, agg, ax), dtype, copy=False)


def _aggregate(xp: ModuleType, rows: Array, keep: Array | None, agg: Aggregation, ax: int) -> Array:
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
        ones = xp.where(keep, xp.ones_like(rows), xp.zeros_like(rows))
    else:
        ones = xp.ones_like(rows)
    if agg.mode == "token-mean":
        return _divide(xp, xp.sum(rows), xp.sum(ones), agg.normalizer)
    sums = xp.sum(rows, axis=ax)  # S_i, one per sequence
    counts = xp.sum(ones, axis=ax)  # n_i
    used = counts > 0
    if agg.mode == "seq-mean-token-mean":
        per = xp.where(used, sums / xp.where(used, counts, 1.0), 0.0)
    elif agg.mode == "seq-mean-token-sum-norm":
        budget = agg.token_budget if agg.token_budget is not None else rows.shape[ax]
        per = sums / float(budget)
    elif agg.mode == "group-mean-token-mean":
        return _group_mean(xp, sums, counts, agg)
    else:  # 'seq-mean-token-sum'
        per = sums
    count = xp.sum(xp.where(used, xp.ones_like(per), xp.zeros_like(per)))
    return _divide(xp, xp.sum(per), count, agg.normalizer)


def _group_mean(xp: ModuleType, sums: Array, counts: Array, agg: Aggregation) -> Array:
    """DAPO's mean over each group's tokens, averaged over the groups with a kept token.

    A group's token count is summed over its sequences by an (S, S) comparison of the
    group ids (S sequences: small), so no number of groups needs to be known in advance.
    """
    shape = tuple(sums.shape)
    ids = agg.group_ids
    assert ids is not None
    if tuple(ids.shape) != shape:
        ids = xp.broadcast_to(ids, shape)
    s, n, g = (xp.reshape(a, (-1,)) for a in (sums, counts, ids))
    same = g[:, None] == g[None, :]
    tokens = xp.sum(xp.where(same, n[None, :], xp.zeros_like(n)[None, :]), axis=1)  # T_g(i)
    used = tokens > 0
    total = xp.sum(xp.where(used, s / xp.where(used, tokens, 1.0), 0.0))
    # A group is counted at its first sequence with a kept token (exact, no 1/size sums).
    idx = xp.arange(s.shape[0])
    earlier = same & (idx[None, :] < idx[:, None]) & (n > 0)[None, :]
    first = (n > 0) & ~xp.any(earlier, axis=1)
    groups = xp.sum(xp.where(first, xp.ones_like(s), xp.zeros_like(s)))
    return _divide(xp, total, groups, agg.normalizer)


def _divide(xp: ModuleType, total: Array, count: Array, normalizer: float | Array | None) -> Array:
    """`total` / (`normalizer` or `count`); a divisor of 0 gives 0, with gradient 0."""
    if normalizer is None:
        n = count
    elif isinstance(normalizer, float):
        n = xp.full_like(total, normalizer)
    else:
        n = xp.astype(normalizer, total.dtype)
    zero = n == 0
    return xp.where(zero, xp.zeros_like(total), total / xp.where(zero, 1.0, n))


def aggregate(
    values: Array,
    reduction: str,
    *,
    where: Array | None = None,
    sequence_axis: int | None = None,
    normalizer: float | Array | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""Average per-token values into one loss, as RL trainers do (verl's ``loss_agg_mode``).

    For values :math:`x_{it}` of sequences :math:`i` and their tokens :math:`t`, a mask
    :math:`m_{it}` (`where`), :math:`S_i = \sum_t m_{it} x_{it}` and
    :math:`n_i = \sum_t m_{it}`:

    * 'token-mean': :math:`\sum_i S_i / N`, N the kept tokens (DAPO; verl's default);
    * 'seq-mean-token-sum': :math:`\sum_i S_i / K`, K the sequences with a kept token;
    * 'seq-mean-token-mean': :math:`\sum_{i: n_i > 0} (S_i / n_i) / K` (GRPO as published);
    * 'seq-mean-token-sum-norm': :math:`\sum_i S_i / (C K)` with a constant C,
      `token_budget` (Dr. GRPO; default: the length of the sequence axis);
    * 'group-mean-token-mean': :math:`\sum_g (\sum_{i \in g} S_i / T_g) / G` with
      :math:`T_g = \sum_{i \in g} n_i` and G the groups with a kept token (`group_ids`;
      the mean over each prompt's tokens);
    * and the plain reductions 'none', 'sum', 'batchmean' (the mean over kept tokens).

    A sequence (or group) whose tokens are all dropped is left out of the divisor, never
    counted as 0 (an aborted rollout must not pull the mean toward 0, verl #7970). When
    nothing is kept anywhere the result is 0, with gradient 0. Every reducing function in
    klx takes the same modes and arguments (``klx.kl_divergence(..., reduction=
    'seq-mean-token-mean', where=mask)``).

    Parameters
    ----------
    values : array
        Per-token values, e.g. of shape (sequences, tokens). Floating.
    reduction : str
        One of the modes above.
    where : bool array, optional
        The kept tokens (the response mask), broadcastable to `values`. Dropped tokens
        contribute 0 in value and gradient, even if they hold NaN or ``inf``.
    sequence_axis : int, optional
        The axis of `values` along which a sequence's tokens lie (the other axes index
        sequences). Default -1. Aggregation modes only.
    normalizer : float or 0-d array, optional
        The mode's divisor counted over the whole step (every micro-batch and rank),
        instead of in this call: kept tokens ('token-mean', 'batchmean'), sequences with a
        kept token (the 'seq-mean-...' modes), or groups with a kept token
        ('group-mean-token-mean').
        With it, the micro-batches' results add up to the whole batch's, in value and
        gradient. 0 gives 0.
    token_budget : float, optional
        C of 'seq-mean-token-sum-norm' (e.g. ``max_new_tokens``); > 0.
    group_ids : int array, optional
        'group-mean-token-mean' only: one id per sequence (the shape of `values` without
        `sequence_axis`). A group must lie whole in one call: its token count is taken here.
    xp : namespace, optional
        The array namespace; by default that of `values`.

    Returns
    -------
    array
        0-d (the shape of `values` for 'none'), of the library, device and dtype of
        `values`.

    See Also
    --------
    kl_estimate : Per-token KL estimates, which take the same modes.
    kl_divergence : Per-token KL between full distributions, the same modes.

    Notes
    -----
    Names elsewhere: verl ``agg_loss(loss_mat, loss_mask, loss_agg_mode)`` with the same
    mode names ('seq-mean-token-sum-norm' with ``loss_scale_factor`` as C); TRL's GRPOTrainer
    ``loss_type`` 'grpo' is 'seq-mean-token-mean', 'bnpo' / 'dapo' are 'token-mean' (per
    process / over the step's processes), 'dr_grpo' is 'seq-mean-token-sum-norm' with
    C = ``max_completion_length``; OpenRLHF ``masked_mean(loss, mask, dim=-1).mean()`` is
    'seq-mean-token-mean' and its token-level loss 'token-mean'. docs/rl-distillation.md
    has the table.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> loss = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    >>> mask = np.array([[True, True, True], [True, False, False]])
    >>> klx.aggregate(loss, "token-mean", where=mask)  # (1 + 2 + 3 + 4) / 4
    array(2.5)
    >>> klx.aggregate(loss, "seq-mean-token-mean", where=mask)  # (2 + 4) / 2
    array(3.)
    >>> klx.aggregate(loss, "seq-mean-token-sum-norm", where=mask)  # (6 / 3 + 4 / 3) / 2
    array(1.6666...)
    """
    named = [("values", values), ("where", where)]
    if group_ids is not None:
        named.append(("group_ids", group_ids))
    if normalizer is not None and not isinstance(normalizer, numbers.Real):
        named.append(("normalizer", normalizer))
    xp = array_namespace(named, xp)
    check_float(xp, "values", values)
    red = check_reduction(reduction, REDUCTIONS + AGGREGATIONS)
    check_same_device(named, xp)
    shape = shape_of(values)
    if where is not None:
        check_where(xp, where, shape)
    agg = parse_aggregation(
        xp,
        red,
        shape,
        sequence_axis=sequence_axis,
        normalizer=normalizer,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    if agg is not None:
        return as_array(aggregate_rows(xp, values, where, agg))
    norm = check_normalizer(xp, normalizer, red)
    count = math.nan if None in shape else float(math.prod(shape))  # type: ignore[arg-type]
    return as_array(reduce_rows(xp, values, red, where, count, norm))


def _sequence_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not hasattr(axis, "__index__"):
        msg = f"`sequence_axis` must be an int, got {axis!r}."
        raise TypeError(msg)
    a = operator.index(axis)
    if not -ndim <= a < ndim:
        msg = (
            f"`sequence_axis` {a} is out of range for per-token values of {ndim} dimension(s) "
            f"(one per token); use -{ndim} <= sequence_axis < {ndim}."
        )
        raise ValueError(msg)
    return a % ndim


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"`{name}` must be a number > 0, got {value!r}."
        raise TypeError(msg)
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        msg = f"`{name}` must be a finite number > 0, got {value!r}."
        raise ValueError(msg)
    return v


def _check_group_ids(xp: ModuleType, ids: Any, seq_shape: Shape) -> Array:
    dtype = getattr(ids, "dtype", None)
    if dtype is None or dtype == xp.bool or not xp.isdtype(dtype, "integral"):
        msg = (
            f"`group_ids` must be an integer array (one group id per sequence), got "
            f"{dtype if dtype is not None else type(ids).__name__}; pass e.g. the prompt index "
            "of each sequence."
        )
        raise TypeError(msg)
    shape = tuple(ids.shape)
    ok = broadcasts_to(shape, seq_shape)
    if not ok:
        msg = (
            f"`group_ids` has shape {shape}, which does not broadcast to the sequences' shape "
            f"{tuple(seq_shape)} (the batch shape without the sequence axis); give one id per "
            "sequence."
        )
        raise ValueError(msg)
    return ids


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(repr(n) for n in names)
