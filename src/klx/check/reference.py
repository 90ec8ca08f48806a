"""The float64 NumPy reference of :mod:`klx.check`, and the error measured against it.

Independent of klx: the terms of torch's ``kl_div`` with klx's conventions, and KL and
JS per row from logits, all in float64, with the tolerance allowed in each dtype.
"""

from __future__ import annotations

import math
from typing import Any

#: Allowed error relative to the scale of the terms, by dtype (the conformance tolerances).
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}
#: float16 results below its smallest subnormal's half are off by up to this, at any scale.
ATOL = {"float16": 2.0**-25}


def _ref_kl_div(np: Any, x: Any, y: Any, reduction: str, log_target: bool) -> tuple[Any, float]:
    """float64 terms of torch's kl_div with klx's conventions; returns (value, scale)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    with np.errstate(all="ignore"):
        w = np.exp(y) if log_target else y
        log_w = y if log_target else np.log(np.where(w > 0, w, 1.0))
        nan = np.isnan(x) | np.isnan(y)
        terms = np.where(w > 0, w * (log_w - x), 0.0)
        terms = np.where(nan, np.nan, terms)
        # each term is rounded from w log w and w x: its error scales with both
        scale = np.where(w > 0, np.abs(w * log_w) + np.abs(w * x), 0.0)
        scale = np.where(np.isfinite(scale), scale, 0.0)
    if reduction == "none":
        return terms, scale
    div = {"sum": 1, "mean": terms.size, "batchmean": x.shape[0]}[reduction]
    return np.sum(terms) / div, np.sum(scale) / div


def _ref_log_softmax(np: Any, x: Any, temperature: float) -> Any:
    x = x.astype(np.float64) / temperature
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _ref_rows(np: Any, kind: str, t: Any, s: Any, temperature: float, beta: float) -> Any:
    """float64 KL or JS per row, from logits."""
    with np.errstate(all="ignore"):
        lp, lq = _ref_log_softmax(np, t, temperature), _ref_log_softmax(np, s, temperature)
        p, q = np.exp(lp), np.exp(lq)
        if kind == "kl":
            return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)
        m = beta * p + (1 - beta) * q
        lm = np.log(np.where(m > 0, m, 1.0))
        a = np.where(p > 0, p * (lp - lm), 0.0)
        b = np.where(q > 0, q * (lq - lm), 0.0)
        return np.sum(beta * a + (1 - beta) * b, axis=-1)


def _error(np: Any, got: Any, want: Any, scale: Any, atol: float = 0.0) -> float:
    """Worst (|got - want| - atol) / scale; inf where NaN or infinities disagree."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    same_nan = np.isnan(got) == np.isnan(want)
    same_inf = np.where(np.isinf(want), got == want, ~np.isinf(got))
    if not (np.all(same_nan) and np.all(same_inf)):
        return math.inf
    finite = np.isfinite(want)
    if not np.any(finite):
        return 0.0
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), want.shape)[finite]
    diff = np.maximum(np.abs(got[finite] - want[finite]) - atol, 0.0)
    return float(np.max(diff / np.maximum(scale, 1e-300)))
