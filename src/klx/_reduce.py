"""Reducing per-token values: 'none', 'sum', 'batchmean', with a `normalizer=`.

:func:`klx.sparse_kl_divergence` and :func:`klx.kl_estimate` reduce with these.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

from klx._agnostic import reduce_rows, shape_size

__all__ = ["check_normalizer", "reduce_tokens"]

Array = Any


def check_normalizer(normalizer: object, reduction: str) -> float | None:
    """`normalizer` for 'batchmean': None, or a finite number >= 0."""
    if normalizer is None:
        return None
    if reduction != "batchmean":
        msg = (
            f"`normalizer` replaces the count that reduction='batchmean' divides by, but "
            f"reduction={reduction!r}; pass reduction='batchmean' with the normalizer, or "
            "leave normalizer=None."
        )
        raise ValueError(msg)
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        msg = f"`normalizer` must be a number >= 0, got {normalizer!r}."
        raise TypeError(msg)
    n = float(normalizer)
    if not (n >= 0 and math.isfinite(n)):
        msg = (
            "`normalizer` must be a finite number >= 0 (the number of tokens to divide the "
            f"sum by, e.g. over all micro-batches of a step), got {normalizer!r}."
        )
        raise ValueError(msg)
    return n


def reduce_tokens(
    xp: ModuleType,
    rows: Array,
    reduction: str,
    keep: Array | None,
    normalizer: float | None,
) -> Array:
    """Reduce per-token `rows` (dropped ones count as 0); 'batchmean' divides the sum by
    `normalizer` if given (0 gives 0: a step without tokens), else by the kept count."""
    if normalizer is None:
        return reduce_rows(xp, rows, reduction, keep, shape_size(tuple(rows.shape)))
    total = reduce_rows(xp, rows, "sum", keep, 1.0)
    return total / normalizer if normalizer > 0 else total * 0.0
