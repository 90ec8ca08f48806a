"""Validation mode: read the values and catch the classic mistakes loudly.

Off by default, since it reads array values (a GPU synchronisation). It works on
concrete arrays and on Dask arrays (the checks are computed), and raises a clear
error under ``jax.jit`` or ``torch.compile``, where values cannot be read.

Tolerances scale with the dtype and the number of entries ``n`` in a
distribution: ``tol = 2 eps(dtype) + 16 sqrt(n) eps(accumulation dtype)``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from klx._dtypes import accumulation_dtype
from klx._namespace import is_concrete, library_name
from klx._typing import Array

__all__ = ["check_distribution", "check_normalizer_value", "tolerance"]


def tolerance(xp: ModuleType, dtype: Any, n: int) -> float:
    """The allowed deviation of a sum of `n` probabilities from 1."""
    eps = float(xp.finfo(dtype).eps)
    eps_acc = float(xp.finfo(accumulation_dtype(xp, dtype)).eps)
    return 2 * eps + 16 * math.sqrt(max(n, 1)) * eps_acc


def _require_concrete(name: str, x: Array) -> None:
    if str(getattr(getattr(x, "device", None), "type", "")) == "meta":
        msg = (
            f"validation reads the values of `{name}`, but it is a tensor on the 'meta' "
            "device, which has none; call with validate=False (or validate real tensors)."
        )
        raise ValueError(msg)
    if not is_concrete(x):
        msg = (
            f"validation reads the values of `{name}`, but it is a traced {library_name(x)} "
            "array (inside jax.jit, jax.grad or torch.compile), whose values are not known "
            "yet; call with validate=False inside the compiled function and validate "
            "concrete arrays outside it (e.g. `klx.kl_divergence(p, q, validate=True)` "
            "once before jitting)."
        )
        raise ValueError(msg)


def _count(xp: ModuleType, flags: Array) -> int:
    return int(xp.sum(xp.astype(flags, xp.int64 if hasattr(xp, "int64") else xp.int32)))


def _no_empty_rows(xp: ModuleType, name: str, empty: Array, axis: int, what: str) -> None:
    """A distribution all of whose entries are -inf has no mass: not a distribution."""
    if empty.shape[axis] == 0:
        return
    bad = _count(xp, xp.all(empty, axis=axis))
    if bad:
        msg = (
            f"`{name}` has {bad} distribution(s) in which every {what} (no mass at all), "
            "which gives NaN; drop them with `where=` (padding rows) or fix them."
        )
        raise ValueError(msg)


def check_distribution(
    xp: ModuleType,
    name: str,
    x: Array,
    form: str,
    *,
    axis: int | None,
    keep_full: Array | None = None,
    hint_log: str = "",
    hint_probs: str = "",
    hint_logits: str = "if they are logits, say so (p_form/q_form='logits')",
) -> None:
    """Raise ValueError if `x` is not a valid distribution of the given form along `axis`.

    `hint_log` names the way to declare log-probabilities (e.g. "pass log_target=True");
    `hint_probs` the way to declare probabilities, `hint_logits` what to do with logits
    (empty: nothing to suggest). With ``axis=None`` only the
    element-wise checks run.
    """
    _require_concrete(name, x)
    dtype = x.dtype
    x = xp.astype(x, accumulation_dtype(xp, dtype))
    n = 1 if axis is None else (x.shape[axis] or 1)
    if keep_full is not None:
        # Dropped distributions are never read: put a uniform distribution in their place.
        x = xp.where(keep_full, x, 1.0 / n if form == "probs" else -math.log(n))
    tol = tolerance(xp, dtype, n)
    where_msg = "" if axis is None else f" along axis {axis}"

    nans = _count(xp, xp.isnan(x))
    if nans:
        msg = f"`{name}` contains {nans} NaN value(s); remove or mask them (`where=`)."
        raise ValueError(msg)
    if form == "logits":
        big = _count(xp, x == math.inf)
        if big:
            msg = (
                f"`{name}` holds {big} logit(s) equal to +inf, whose softmax is undefined "
                "(inf - inf); clip them to a large finite value."
            )
            raise ValueError(msg)
        if axis is not None:
            _no_empty_rows(xp, name, x == -math.inf, axis, "logit is -inf")
        return

    if form == "probs":
        negative = _count(xp, x < 0)
        if negative:
            low = float(xp.min(x))
            looks_log = bool(xp.all(x <= 0))
            extra = (
                f" These look like log-probabilities: {hint_log}."
                if looks_log and hint_log
                else " Probabilities must be >= 0."
            )
            msg = (
                f"`{name}` must hold probabilities, but {negative} value(s) are negative "
                f"(the lowest is {low:.6g}).{extra}"
            )
            raise ValueError(msg)
        if axis is not None:
            sums = xp.sum(x, axis=axis)
            off = ~(xp.abs(sums - 1.0) <= tol)
            bad = _count(xp, off)
            if bad:
                worst = float(xp.max(xp.abs(sums - 1.0)))
                msg = (
                    f"`{name}` must hold probabilities that sum to 1{where_msg}, but {bad} "
                    f"distribution(s) do not (the worst is off by {worst:.3g}; tolerance "
                    f"{tol:.3g}); normalise them (p / p.sum(axis, keepdims=True))"
                    f"{', or, ' + hint_logits if hint_logits else ''}."
                )
                raise ValueError(msg)
        return

    # form == "log_probs"
    above = _count(xp, x > tol)
    if above:
        high = float(xp.max(x))
        msg = (
            f"`{name}` must hold log-probabilities (values <= 0), but {above} value(s) are "
            f"positive (the highest is {high:.6g}). If these are probabilities, pass their "
            f"log (e.g. log_softmax of the logits){'; or ' + hint_probs if hint_probs else ''}."
        )
        raise ValueError(msg)
    if axis is not None:
        _no_empty_rows(xp, name, x == -math.inf, axis, "log-probability is -inf")
        m = xp.max(x, axis=axis, keepdims=True)
        lse = xp.log(xp.sum(xp.exp(x - m), axis=axis)) + xp.squeeze(m, axis=axis)
        off = ~(xp.abs(lse) <= tol)  # NaN (a row of -inf) is off too
        bad = _count(xp, off)
        if bad:
            worst = float(xp.max(xp.abs(lse)))
            msg = (
                f"`{name}` must hold log-probabilities whose exp sums to 1{where_msg}, but "
                f"{bad} distribution(s) do not (log of the sum off by up to {worst:.3g}; "
                f"tolerance {tol:.3g}); {hint_logits or 'take log_softmax of logits'}, and "
                "pass the log of probabilities, not the probabilities themselves."
            )
            raise ValueError(msg)


def check_normalizer_value(xp: ModuleType, normalizer: Array) -> None:
    """Raise ValueError unless the 0-d array `normalizer` is finite and >= 0."""
    _require_concrete("normalizer", normalizer)
    value = float(xp.astype(normalizer, xp.float64 if hasattr(xp, "float64") else xp.float32))
    if not (value >= 0 and math.isfinite(value)):
        msg = (
            f"`normalizer` must be a finite number >= 0 (the number of tokens to divide the "
            f"sum by), got {value!r}; count the kept tokens of the whole step, e.g. "
            "`mask.sum()`."
        )
        raise ValueError(msg)
