"""Independent float64 references, written with NumPy and SciPy (never with klx).

Each returns the reference value and a *scale*: the magnitude of the terms that make
it up (sum of |p log p| + |p log q| per term). The forward error of a floating-point
evaluation is bounded by a few ulps of the scale, so tests compare
``|klx - ref| / scale`` with a per-dtype tolerance.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
from scipy import special

TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
#: kl_divergence's tolerances: it also takes logits with a temperature, and its inputs are
#: rounded to the dtype before the softmax (docs/conformance.md states both tables).
TOL_KL_DIVERGENCE = {"float64": 1e-12, "float32": 1e-5}
#: Absolute rounding of results below the normal range: float16's subnormals are spaced
#: 2**-24 apart, so a float16 result is off by up to 2**-25 whatever its scale.
ATOL = {"float16": 2.0**-25}


def kl_div_terms(x: np.ndarray, y: np.ndarray, log_target: bool) -> tuple[np.ndarray, np.ndarray]:
    """torch's kl_div terms y (log y - x), or exp(y) (y - x); 0 where the target is 0, and
    +inf where it is negative (outside the domain: scipy.special.rel_entr's rule; torch: NaN).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(all="ignore"):
        if log_target:
            p = np.exp(y)
            terms = p * y - p * x
            scale = np.abs(p * y) + np.abs(p * x)
        else:
            p = y
            terms = special.xlogy(y, y) - y * x
            scale = np.abs(special.xlogy(y, y)) + np.abs(y * x)
        zero = p == 0
        terms = np.where(zero, np.where(np.isnan(x), np.nan, 0.0), terms)
        scale = np.where(zero, 0.0, scale)
        if not log_target:
            outside = (y < 0) & ~np.isnan(x)
            terms = np.where(outside, np.inf, terms)
            scale = np.where(outside, 0.0, scale)
    return terms, scale


def kl_div(x: np.ndarray, y: np.ndarray, reduction: str, log_target: bool) -> tuple[float, float]:
    terms, scale = kl_div_terms(x, y, log_target)
    if reduction == "none":
        return terms, scale
    with np.errstate(all="ignore"):
        if reduction == "sum":
            div = 1.0
        elif reduction == "mean":
            div = terms.size
        else:
            div = np.shape(x)[0] if np.ndim(x) else 1
        return np.sum(terms) / div, np.sum(scale) / div


def log_softmax(x: np.ndarray, axis: int, temperature: float = 1.0) -> np.ndarray:
    with np.errstate(all="ignore"):  # rows of NaN or -inf (padding) give NaN
        return special.log_softmax(np.asarray(x, dtype=np.float64) / temperature, axis=axis)


def to_probs(x: np.ndarray, form: str, axis: int, temperature: float = 1.0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if form == "probs":
        return x
    if form == "log_probs":
        return np.exp(x)
    return np.exp(log_softmax(x, axis, temperature))


def kl_rows(p: np.ndarray, q: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per distribution with scipy.special.rel_entr, and its scale."""
    with np.errstate(all="ignore"):
        terms = special.rel_entr(p, q)
        scale = np.abs(special.xlogy(p, p)) + np.abs(special.xlogy(p, q))
    return np.sum(terms, axis=axis), np.sum(scale, axis=axis)


def kl_rows_log(p: np.ndarray, log_q: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per distribution from log Q (exact where Q is near 1, unlike rel_entr)."""
    with np.errstate(all="ignore"):
        plogp = special.xlogy(p, p)
        terms = np.where(p == 0, 0.0, plogp - p * log_q)
        scale = np.where(p == 0, 0.0, np.abs(plogp) + np.abs(p * log_q))
    return np.sum(terms, axis=axis), np.sum(scale, axis=axis)


def js_rows(p: np.ndarray, q: np.ndarray, axis: int, beta: float) -> np.ndarray:
    """Generalized Jensen-Shannon per distribution, from rel_entr."""
    m = beta * p + (1 - beta) * q
    with np.errstate(all="ignore"):
        a = np.sum(special.rel_entr(p, m), axis=axis)
        b = np.sum(special.rel_entr(q, m), axis=axis)
    return (beta * a if beta > 0 else 0.0) + ((1 - beta) * b if beta < 1 else 0.0)


def skew_kl_rows(
    p: np.ndarray, q: np.ndarray, axis: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || alpha P + (1 - alpha) Q) per distribution with rel_entr, and its scale."""
    return kl_rows(p, alpha * p + (1 - alpha) * q, axis)


def tv_rows(p: np.ndarray, q: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Total variation 0.5 sum |p - q| per distribution, and its scale (0.5 sum (p + q))."""
    with np.errstate(all="ignore"):
        return 0.5 * np.sum(np.abs(p - q), axis=axis), 0.5 * np.sum(p + q, axis=axis)


def reduce(
    rows: np.ndarray,
    reduction: str,
    keep: np.ndarray | None = None,
    normalizer: float | None = None,
) -> np.ndarray:
    """'none', 'sum', or 'batchmean': the kept rows' sum over `normalizer` or their count,
    a count of 0 counting as 1 (the sum is then 0) and a normalizer of 0 giving 0 whatever
    the rows hold (klx's documented token semantics: the batch holds no tokens)."""
    rows = np.asarray(rows, dtype=np.float64)
    if keep is not None:
        keep = np.broadcast_to(keep, rows.shape)
        rows = np.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    total = np.sum(rows)
    if reduction == "sum":
        return total
    n = rows.size if keep is None else np.sum(keep)
    if normalizer is not None:
        if normalizer == 0:
            return np.float64(0.0)
        n = normalizer
    with np.errstate(all="ignore"):
        return total / (n if n != 0 else 1)


def rel_error(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, atol: float = 0.0) -> float:
    """Worst (|got - ref| - atol) / scale over finite entries; inf if NaN/inf positions differ."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), ref.shape)
    if got.shape != ref.shape:
        return np.inf
    if not np.array_equal(np.isnan(got), np.isnan(ref)):
        return np.inf
    finite = np.isfinite(ref)
    if not np.array_equal(got[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)]):
        return np.inf
    if not np.all(np.isfinite(got[finite])):
        return np.inf
    if not finite.any():
        return 0.0
    tiny = np.finfo(np.float64).tiny
    diff = np.maximum(np.abs(got[finite] - ref[finite]) - atol, 0.0)
    err = diff / np.maximum(scale[finite], tiny)
    return float(np.max(err)) if err.size else 0.0


def sparse_bins(idx, lp, q, tail):
    """P and Q over the bins (k + tail, or k renormalised), the last axis; float64."""
    p_s = np.exp(lp)
    q_s = np.take_along_axis(q, idx, axis=-1)
    if not tail:
        return p_s / p_s.sum(-1, keepdims=True), q_s / q_s.sum(-1, keepdims=True)
    if idx.shape[-1] == q.shape[-1]:  # every index: no tail bin
        return p_s, q_s
    outside = np.ones(q.shape, dtype=bool)
    np.put_along_axis(outside, idx, False, axis=-1)
    q_t = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    p_t = np.maximum(1.0 - p_s.sum(-1, keepdims=True), 0.0)
    return np.concatenate([p_s, p_t], -1), np.concatenate([q_s, q_t], -1)


def sparse_rows(idx, lp, q, tail):
    """Reference sparse KL per distribution, and its scale."""
    p, qq = sparse_bins(idx, lp, q, tail)
    with np.errstate(all="ignore"):
        rows = special.rel_entr(p, qq).sum(-1)
        scale = (np.abs(special.xlogy(p, p)) + np.abs(special.xlogy(p, qq))).sum(-1)
    return rows, scale


def k_values(log_p, log_q):
    """k1, k2, k3 per token in float64 (k3 with mpmath, 40 digits beyond the cancellation)."""
    r = log_q - log_p

    def k3(x):
        if not np.isfinite(x):
            return np.nan if np.isnan(x) else np.inf
        digits = 40 + max(0, -math.floor(math.log10(abs(x)))) if x else 40
        with mpmath.workdps(digits):
            return float(mpmath.expm1(mpmath.mpf(x)) - mpmath.mpf(x))

    k3s = np.array([k3(float(x)) for x in np.ravel(r)]).reshape(np.shape(r))
    return {"k1": -r, "k2": r * r / 2, "k3": k3s}


# --------------------------------------------------------------------------- alpha, Rényi
#: mpmath's working precision for the alpha and Rényi references (50 digits).
MP_DIGITS = 50


def _mp_pairs(p: np.ndarray, q: np.ndarray) -> list[list[tuple[mpmath.mpf, mpmath.mpf]]]:
    """Rows of exact (p, q) pairs: float64 values are exact in mpmath."""
    p2 = np.asarray(p, dtype=np.float64).reshape(-1, np.shape(p)[-1])
    q2 = np.asarray(q, dtype=np.float64).reshape(-1, np.shape(q)[-1])
    return [
        [(mpmath.mpf(float(a)), mpmath.mpf(float(b))) for a, b in zip(r, s, strict=True)]
        for r, s in zip(p2, q2, strict=True)
    ]


def _mp_pow(x: mpmath.mpf, e: mpmath.mpf) -> mpmath.mpf:
    """``x ** e`` with ``0 ** e`` = 0 for e > 0, +inf for e < 0, 1 for e = 0."""
    if x == 0:
        return mpmath.mpf(0) if e > 0 else (mpmath.inf if e < 0 else mpmath.mpf(1))
    return x**e


def _mp_kl_gap(a: mpmath.mpf, b: mpmath.mpf) -> mpmath.mpf:
    """``a log(a / b) - a + b``: the generalized KL term (0 log 0 = 0; +inf for a > 0 = b)."""
    if a == 0:
        return b
    if b == 0:
        return mpmath.inf
    return a * mpmath.log(a / b) - a + b


def alpha_rows(p: np.ndarray, q: np.ndarray, alpha: float) -> np.ndarray:
    """Amari's alpha-divergence per row (last axis), by mpmath at :data:`MP_DIGITS`
    digits: ``sum[a p + (1 - a) q - p^a q^(1-a)] / (a (1 - a))``; at ``a = 1`` the
    generalized KL(P || Q), at ``a = 0`` KL(Q || P)."""
    out = []
    with mpmath.workdps(MP_DIGITS):
        a = mpmath.mpf(alpha)
        b = 1 - a
        for row in _mp_pairs(p, q):
            if a == 1:
                total = mpmath.fsum(_mp_kl_gap(x, y) for x, y in row)
            elif a == 0:
                total = mpmath.fsum(_mp_kl_gap(y, x) for x, y in row)
            else:
                terms = []
                for x, y in row:
                    power = _mp_pow(x, a) * _mp_pow(y, b) if x != 0 or y != 0 else 0
                    terms.append((a * x + b * y - power) / (a * b))
                total = mpmath.fsum(terms)
            out.append(float(total))
    return np.asarray(out).reshape(np.shape(p)[:-1])


def renyi_rows(p: np.ndarray, q: np.ndarray, alpha: float) -> np.ndarray:
    """Rényi's divergence per row (last axis), by mpmath at :data:`MP_DIGITS` digits:
    ``log(sum p^a q^(1-a)) / (a - 1)``; KL(P || Q) at ``a = 1``, ``-log Q(supp P)`` at 0,
    ``log max p / q`` at ``math.inf``."""
    out = []
    with mpmath.workdps(MP_DIGITS):
        for row in _mp_pairs(p, q):
            if alpha == math.inf:
                ratios = [mpmath.inf if y == 0 else x / y for x, y in row if x != 0]
                total = mpmath.log(max(ratios)) if ratios else -mpmath.inf
            elif alpha == 1:
                total = mpmath.fsum(_mp_kl_gap(x, y) - y + x for x, y in row)
            elif alpha == 0:
                total = -mpmath.log(mpmath.fsum(y for x, y in row if x != 0))
            else:
                a = mpmath.mpf(alpha)
                s = mpmath.fsum(
                    _mp_pow(x, a) * _mp_pow(y, 1 - a) for x, y in row if x != 0 and y != 0
                ) + (mpmath.inf if a > 1 and any(x != 0 and y == 0 for x, y in row) else 0)
                total = mpmath.log(s) / (a - 1) if s != 0 else mpmath.inf
            out.append(float(total))
    return np.asarray(out).reshape(np.shape(p)[:-1])


def mix_rows(p: np.ndarray, q: np.ndarray, lam: float) -> np.ndarray:
    """``lam KL(P || Q) + (1 - lam) KL(Q || P)`` per row (last axis), by mpmath at
    :data:`MP_DIGITS` digits; a direction of weight 0 adds nothing, even where infinite."""
    out = []
    with mpmath.workdps(MP_DIGITS):
        for row in _mp_pairs(p, q):
            fwd = mpmath.fsum(_mp_kl_gap(x, y) - y + x for x, y in row) if lam > 0 else 0
            rev = mpmath.fsum(_mp_kl_gap(y, x) - x + y for x, y in row) if lam < 1 else 0
            out.append(float(lam * fwd + (1 - lam) * rev))
    return np.asarray(out).reshape(np.shape(p)[:-1])


def generalized_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``sum p log(p / q) - p + q`` per row (last axis): SciPy's ``special.kl_div`` summed
    (0 where p = 0 = q, q where only p is 0, +inf where only q is; +inf for a negative
    entry)."""
    with np.errstate(all="ignore"):
        return np.sum(special.kl_div(np.asarray(p, np.float64), np.asarray(q, np.float64)), -1)


def entropy_rows(p: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """H(P) per distribution with scipy.special.entr, and its scale (the same: entr >= 0)."""
    with np.errstate(all="ignore"):
        rows = np.sum(special.entr(p), axis=axis)
    return rows, np.abs(rows)


def cross_entropy_rows(p: np.ndarray, q: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """-sum p log q per distribution (0 where p is 0), and its scale (the same: terms >= 0)."""
    with np.errstate(all="ignore"):
        rows = -np.sum(special.xlogy(p, q), axis=axis)
    return rows, np.abs(rows)


#: Digits of the mpmath references.
MP_DIGITS = 50


def _mp_weights_and_logs(row: np.ndarray, form: str, temperature: float) -> tuple[list, list]:
    """One distribution given in `form` (its float values taken exactly), as mpmath
    weights and their logs (``-inf`` where a weight is 0)."""
    v = [mpmath.mpf(float(a)) for a in row]
    if form == "probs":
        return v, [mpmath.log(a) if a > 0 else mpmath.ninf for a in v]
    if form == "logits":
        s = [a / mpmath.mpf(float(temperature)) for a in v]
        if any(mpmath.isnan(a) or a == mpmath.inf for a in s) or all(a == mpmath.ninf for a in s):
            return [mpmath.nan] * len(s), [mpmath.nan] * len(s)  # no distribution
        # log1p of the mass beside one maximum: log(sum exp) would need more than 50 digits
        # to keep a mass of e^-133 next to 1
        top = max(range(len(s)), key=s.__getitem__)
        shifted = [a - s[top] for a in s]
        lse = mpmath.log1p(mpmath.fsum(mpmath.exp(a) for i, a in enumerate(shifted) if i != top))
        v = [a - lse for a in shifted]
    return [mpmath.exp(a) for a in v], v


def _mp_rows(fn, *arrays: np.ndarray) -> np.ndarray:
    """``fn(row, ...)`` for each distribution (the last axis) of `arrays`, as float64."""
    arrays = tuple(np.asarray(a, dtype=np.float64) for a in arrays)
    out = np.empty(arrays[0].shape[:-1])
    with mpmath.workdps(MP_DIGITS):
        for idx in np.ndindex(out.shape):
            out[idx] = float(fn(*(a[idx] for a in arrays)))
    return out


def mp_entropy_rows(p: np.ndarray, form: str, temperature: float = 1.0) -> np.ndarray:
    """H(P) per distribution (the last axis) to 50 digits, rounded to float64: 0 log 0 = 0,
    ``-inf`` for a negative probability (scipy.special.entr's rule), NaN propagates."""

    def row(x):
        w, logs = _mp_weights_and_logs(x, form, temperature)
        if any(mpmath.isnan(a) for a in (*w, *logs)):
            return mpmath.nan
        if form == "probs" and any(a < 0 for a in w):
            return mpmath.ninf
        return -mpmath.fsum(a * b for a, b in zip(w, logs, strict=True) if a != 0)

    return _mp_rows(row, p)


def mp_cross_entropy_rows(
    p: np.ndarray, q: np.ndarray, p_form: str, q_form: str, temperature: float = 1.0
) -> np.ndarray:
    """-sum p log q per distribution (the last axis) to 50 digits, rounded to float64: 0
    where p is 0, ``+inf`` where p > 0 = q or for a negative probability (rel_entr's
    rules), NaN propagates (also from a side whose weight is 0)."""

    def row(x, y):
        wp, lp = _mp_weights_and_logs(x, p_form, temperature)
        wq, lq = _mp_weights_and_logs(y, q_form, temperature)
        if any(mpmath.isnan(a) for a in (*wp, *lp, *wq, *lq)):
            return mpmath.nan
        if (p_form == "probs" and any(a < 0 for a in wp)) or (
            q_form == "probs" and any(a < 0 for a in wq)
        ):
            return mpmath.inf
        terms = [-a * b for a, b in zip(wp, lq, strict=True) if a != 0]
        return mpmath.inf if mpmath.inf in terms else mpmath.fsum(terms)

    return _mp_rows(row, p, q)


def mp_mix_rows(
    p: np.ndarray, q: np.ndarray, lam: float, form: str, temperature: float = 1.0
) -> np.ndarray:
    """``lam KL(P || Q) + (1 - lam) KL(Q || P)`` per distribution (the last axis) to 50
    digits from two inputs in `form` (logits normalised at 50 digits: the result is that of
    the given values, not of float64 probabilities rounded from them), rounded to float64.
    A direction of weight 0 adds nothing, even where infinite; NaN propagates."""

    def row(x, y):
        wp, lp = _mp_weights_and_logs(x, form, temperature)
        wq, lq = _mp_weights_and_logs(y, form, temperature)
        if any(mpmath.isnan(a) for a in (*wp, *lp, *wq, *lq)):
            return mpmath.nan

        def kl(w, lw, lv):
            terms = [a * (b - c) for a, b, c in zip(w, lw, lv, strict=True) if a != 0]
            return mpmath.inf if mpmath.inf in terms else mpmath.fsum(terms)

        fwd = kl(wp, lp, lq) if lam > 0 else 0
        rev = kl(wq, lq, lp) if lam < 1 else 0
        return lam * fwd + (1 - lam) * rev

    return _mp_rows(row, p, q)
