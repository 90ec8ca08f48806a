"""The math of :func:`klx.token_stats`, against the array API: the values of every statistic
from one normalisation of each row (:func:`stats_values`), and their closed-form
derivatives, reverse (:func:`stats_cotangents`) and forward (:func:`stats_tangents`), which
the fast paths in :mod:`klx._accel` (``token_stats_*``, ``triton_token_stats``) register
with each library's autodiff."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import kl_terms, mask_rows
from klx._backend_ops import expm1, stop_gradient, sum_along, take_along_axis
from klx._backends import library
from klx._typing import Array

__all__ = [
    "Prepared",
    "RowParts",
    "StatsSpec",
    "kl_terms_from_logs",
    "log_normaliser",
    "prepare",
    "reference_parts",
    "stats_cotangents",
    "stats_tangents",
    "stats_values",
]


class StatsSpec(NamedTuple):
    """The static (Python-valued) part of a call: the same for every row or chunk."""

    #: The statistics asked for, in :data:`STATS` order.
    names: tuple[str, ...]
    temperature: Any
    reference_form: str
    ignore_index: int


class RowParts(NamedTuple):
    """Per-token quantities [..., 1] of :func:`stats_values` that the closed-form
    gradient (:func:`stats_cotangents`) reuses: the policy's row maximum and log-sum-exp
    of the shifted logits, and the reference's (logits form only; else None)."""

    m: Array
    shift_lse: Array
    ref_m: Array | None
    ref_lse: Array | None


class Prepared(NamedTuple):
    """Logits with dropped rows set to 0, the dropped tokens (or None), the labels made
    safe for a gather, and the labels out of range (or None)."""

    z: Array
    reference: Array | None
    drop: Array | None
    safe_labels: Array | None
    bad: Array | None


def prepare(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    mask: bool = True,
) -> Prepared:
    """Dropped rows (by `keep`, or an ignored label) replaced by zeros (with `mask`), so
    that NaN there reaches no value nor autodiff's gradient; labels out of range (NaN
    log-probability) and safe. Without `mask` the caller selects 0 for dropped rows in
    its results (a closed-form gradient selects 0 for their gradient too)."""
    vocab = z.shape[-1]
    drop = None if keep is None else ~keep
    safe_labels = bad = None
    if labels is not None:
        ignored = labels == spec.ignore_index
        drop = ignored if drop is None else drop | ignored
        if "logprob" in spec.names:
            wide = labels if xp.iinfo(labels.dtype).bits >= 32 else xp.astype(labels, xp.int64)
            bad = ((wide < 0) | (wide >= vocab)) & ~ignored
            safe_labels = xp.where(bad | ignored, xp.zeros_like(wide), wide)
    if drop is not None and mask:
        kept = xp.expand_dims(~drop, axis=-1)
        z = mask_rows(xp, z, kept, "logits")
        if reference is not None:
            reference = mask_rows(xp, reference, kept, spec.reference_form)
    return Prepared(z, reference, drop, safe_labels, bad)


def stats_values(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    mask: bool = True,
) -> tuple[tuple[Array, ...], RowParts]:
    """The statistics of `spec` per token (as :func:`stats_rows`), and the row parts the
    closed-form gradient reuses: the array-API definition, every fast path's reference.
    Without `mask` dropped rows are not replaced by zeros first (their results are still
    0): for a forward whose gradient is :func:`stats_cotangents`, not autodiff.

    One maximum ``m`` per row (held fixed for autodiff, which the results do not depend
    on), the shifted logits ``s = (z - m) / T`` (``-inf`` raised to the dtype's lowest
    finite value, whose ``exp`` is 0 too: no ``0 * inf`` below), one exponential
    ``e = exp(s)`` and one sum: the log-sum-exp of ``s`` is ``log1p`` of the mass beside
    one maximal entry (as :func:`klx._agnostic.log_softmax`: exact for nearly one-hot
    rows), ``p = e / sum e``; the label's log-probability is gathered from the logits,
    the entropy is ``lse(s) - sum p s`` (terms ``>= 0``), and the KL has the terms of
    :func:`kl_divergence` between logits, ``p (d + expm1(-d))`` with ``d = log p - log q``
    and the reference's log-softmax taken once.
    """
    names, t = spec.names, spec.temperature
    z, reference, drop, safe_labels, bad = prepare(xp, spec, z, labels, reference, keep, mask)
    plain_t = isinstance(t, float) and t == 1.0
    m, s, e, shift_lse, total = log_normaliser(xp, z, t)
    inv = xp.exp(-shift_lse)
    ref_m = ref_lse = None
    out: list[Array] = []
    for name in names:
        if name == "lse":
            top_z = m if plain_t else m / t
            value = xp.squeeze(top_z + shift_lse, axis=-1)
        elif name == "logprob":
            picked = take_along_axis(xp, z, xp.expand_dims(safe_labels, axis=-1), -1)
            picked = picked - m if plain_t else (picked - m) / t
            value = xp.squeeze(picked - shift_lse, axis=-1)
            value = xp.where(bad, math.nan, value)
        elif name == "entropy":
            # terms -p s >= 0; where exp(s) is 0 (s may be -inf) they are 0
            es = e * xp.where(e > 0.0, s, 0.0)
            value = xp.squeeze(shift_lse - sum_along(xp, es, -1, keepdims=True) * inv, axis=-1)
        else:
            if spec.reference_form == "logits":
                # both sides' plain log-sum-exps in d: its rounding enters the KL
                # squared only (:func:`klx._agnostic.kl_terms`), and equal rows give d = 0
                plain_lse = xp.log(total)
                ref_m, sr, er, ref_lse = reference_parts(xp, reference, t)
                terms = kl_terms_from_logs(
                    xp, s, e * inv, sr, er * xp.exp(-ref_lse), plain_lse - ref_lse
                )
            else:  # the definition's terms, with its guards for probabilities
                terms = kl_terms(
                    xp,
                    z,
                    reference,
                    p_form="logits",
                    q_form=spec.reference_form,
                    axis=-1,
                    temperature=t,
                )
            value = sum_along(xp, terms, -1)
        if drop is not None:
            value = xp.where(drop, 0.0, value)
        out.append(value)
    return tuple(out), RowParts(m, shift_lse, ref_m, ref_lse)


def log_normaliser(xp: ModuleType, x: Array, t: Any) -> tuple[Array, Array, Array, Array, Array]:
    """Per row of `x` [..., vocab]: its maximum ``m`` (held fixed for autodiff), ``s = (x -
    m) / t``, ``exp(s)`` and ``log(sum(exp(s)))`` [..., 1] as ``log1p`` of the mass beside
    one maximal entry (:func:`klx._agnostic.log_softmax`): ``s`` (exactly 0, with exp's
    derivative there) at the maxima, so a nearly one-hot row keeps the mass beside its
    maximum; a row with tied maxima has a sum >= 2, which rounds harmlessly. Last, the
    plain ``sum(exp(s))``."""
    m = stop_gradient(xp.max(x, axis=-1, keepdims=True))
    s = x - m
    if not (isinstance(t, float) and t == 1.0):
        s = s / t
    e = xp.exp(s)
    rest = sum_along(xp, xp.where(s == 0, s, e), -1, keepdims=True)
    total = sum_along(xp, e, -1, keepdims=True)
    return m, s, e, xp.log1p(xp.where(total >= 2.0, total - 1.0, rest)), total


def reference_parts(xp: ModuleType, x: Array, t: Any) -> tuple[Array, Array, Array, Array]:
    """Reference logits' row maximum ``m`` (held fixed), ``sr = (x - m) / t``, ``exp(sr)``
    and the plain log-sum-exp ``log(sum(exp(sr)))`` [..., 1]."""
    m = stop_gradient(xp.max(x, axis=-1, keepdims=True))
    sr = x - m
    if not (isinstance(t, float) and t == 1.0):
        sr = sr / t
    er = xp.exp(sr)
    return m, sr, er, xp.log(sum_along(xp, er, -1, keepdims=True))


def kl_terms_from_logs(
    xp: ModuleType, s: Array, p: Array, sr: Array, q: Array, gap: Array
) -> Array:
    """KL's terms ``p d + q - p`` from both sides' shifted logits `s`, `sr` (``-inf``
    allowed), softmaxes `p`, `q` and the difference of their log-sum-exps `gap` [..., 1]:
    ``d = log p - log q = (s - sr) - gap``.

    ``p (d + expm1(-d))`` where ``d > -1`` (``>= 0``, no cancellation near P = Q; exactly
    0 where the rows are equal); as written beyond, with ``d`` taken as 0 where P is 0
    (the term is then q: 0 where Q is 0 too). P positive against Q = 0 is ``+inf`` (also
    where P underflowed to 0); NaN propagates. Every untaken branch holds finite values:
    autodiff stays finite where the value is."""
    d = (s - sr) - gap
    small = d > -1.0
    ds = xp.where(small, d, 0.0)
    df = xp.where(small | (p == 0.0), 0.0, d)
    terms = xp.where(small, p * (ds + expm1(xp, -ds)), p * df + (q - p))
    # P underflowed (its logit is finite) where Q is exactly 0: +inf, not 0 * inf
    return xp.where((sr == -math.inf) & (s > -math.inf) & (p == 0.0), math.inf, terms)


def stats_cotangents(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    parts: RowParts,
    rows: tuple[Array, ...],
    grads: tuple[Array, ...],
    need_reference: bool,
) -> tuple[Array, Array | None]:
    r"""The gradients of ``sum_k grads[k] * rows[k]`` with respect to the logits and (with
    `need_reference`, reference logits only) the reference's, in closed form.

    With :math:`g_\ell, g_y, g_H, g_{KL}` the upstream gradients of the log-sum-exp, the
    label's log-probability, the entropy and the KL of a token (0 for those not asked
    for), :math:`p` its softmax, :math:`d = \log p - \log q`:

    .. math::

        T \frac{\partial}{\partial z} = p \, (g_\ell - g_y - g_H (\log p + H)
            + g_{KL} (d - \mathrm{KL})) + g_y \, \mathrm{onehot}(y), \qquad
        T \frac{\partial}{\partial z_r} = g_{KL} (q - p).

    A reference given as log-probabilities gets :math:`-g_{KL} \, p`, as probabilities
    :math:`-g_{KL} \, p / q`. :math:`p` is recomputed from the logits and the saved row
    parts (a subtraction and an exponential), not saved. Where P is 0 the logs are taken
    as 0 (the entries' gradient is 0); dropped tokens get exactly 0.
    """
    t = spec.temperature
    plain_t = isinstance(t, float) and t == 1.0
    z, reference, drop, safe_labels, _ = prepare(xp, spec, z, labels, reference, keep, False)
    s = z - parts.m
    if not plain_t:
        s = s / t
    log_p = s - parts.shift_lse
    p = xp.exp(log_p)
    lp = xp.where(p == 0, 0.0, log_p)
    by = dict(zip(spec.names, zip(rows, grads, strict=True), strict=True))

    def col(x: Array) -> Array:
        return xp.expand_dims(x, axis=-1)

    coef = xp.zeros_like(parts.shift_lse)  # the row's constant, [..., 1]
    slope = None  # the multiple of log p
    if "lse" in by:
        coef = coef + col(by["lse"][1])
    if "logprob" in by:
        coef = coef - col(by["logprob"][1])
    if "entropy" in by:
        h, g_h = by["entropy"]
        coef = coef - col(g_h * h)
        slope = -col(g_h)
    c = coef if slope is None else coef + slope * lp
    dref = None
    if "kl" in by:
        kl, g_kl = by["kl"]
        assert reference is not None  # ('kl' needs one)
        log_q = _reference_log_q(xp, spec, reference, parts, t, plain_t)
        lq = xp.where(p == 0, 0.0, log_q)
        g_kl = col(g_kl)
        c = c + g_kl * (lp - lq - col(kl))
        if need_reference and spec.reference_form == "logits":
            dref = g_kl * (xp.exp(log_q) - p)
            dref = dref if plain_t else dref / t
        elif need_reference and spec.reference_form == "log_probs":
            dref = -g_kl * p
        elif need_reference:
            dref = -g_kl * xp.where(p == 0, 0.0, p / reference)
    dz = p * c
    if "logprob" in by:
        assert safe_labels is not None  # ('logprob' needs labels)
        vocab = z.shape[-1]
        lib = library(z)
        where_z = {} if lib is None else lib.creation_kwargs(z)
        hit = xp.arange(vocab, dtype=safe_labels.dtype, **where_z) == col(safe_labels)
        dz = dz + xp.where(hit, col(by["logprob"][1]), 0.0)
    if not plain_t:
        dz = dz / t
    if drop is not None:
        kept = col(~drop)
        dz = xp.where(kept, dz, 0.0)
        dref = None if dref is None else xp.where(kept, dref, 0.0)
    return dz, dref


def stats_tangents(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    parts: RowParts,
    rows: tuple[Array, ...],
    dz: Array,
    dref: Array | None,
) -> tuple[Array, ...]:
    r"""The forward-mode derivatives of the statistics along tangents `dz` of the logits
    and `dref` of the reference (or None): the transpose of :func:`stats_cotangents`,
    linear in the tangents, so that a library transposes it for reverse mode.

    .. math::

        T \, \delta\mathrm{lse} = \sum p \, \delta z, \quad
        T \, \delta\mathrm{logprob} = \delta z_y - \sum p \, \delta z, \quad
        T \, \delta H = -\sum p (\log p + H) \, \delta z, \quad
        T \, \delta\mathrm{KL} = \sum p (d - \mathrm{KL}) \, \delta z + \sum (q - p) \,
            \delta z_r

    (a reference in log-probabilities: :math:`-\sum p \, \delta \log q` without the T;
    in probabilities :math:`-\sum p / q \, \delta q`). Dropped rows are set to 0 first
    (their softmax is finite), and their derivatives are 0.
    """
    t = spec.temperature
    plain_t = isinstance(t, float) and t == 1.0
    z, reference, drop, safe_labels, _ = prepare(xp, spec, z, labels, reference, keep)
    s = z - parts.m
    if not plain_t:
        s = s / t
    log_p = s - parts.shift_lse
    p = xp.exp(log_p)
    lp = xp.where(p == 0, 0.0, log_p)
    scaled = dz if plain_t else dz / t
    by = dict(zip(spec.names, rows, strict=True))
    mean = sum_along(xp, p * scaled, -1)
    out: list[Array] = []
    for name in spec.names:
        if name == "lse":
            value = mean
        elif name == "logprob":
            assert safe_labels is not None  # ('logprob' needs labels)
            picked = take_along_axis(xp, scaled, xp.expand_dims(safe_labels, axis=-1), -1)
            value = xp.squeeze(picked, axis=-1) - mean
        elif name == "entropy":
            h = xp.expand_dims(by["entropy"], axis=-1)
            value = -sum_along(xp, p * (lp + h) * scaled, -1)
        else:
            assert reference is not None  # ('kl' needs one)
            kl = xp.expand_dims(by["kl"], axis=-1)
            log_q = _reference_log_q(xp, spec, reference, parts, t, plain_t)
            lq = xp.where(p == 0, 0.0, log_q)
            value = sum_along(xp, p * (lp - lq - kl) * scaled, -1)
            if dref is not None and spec.reference_form == "logits":
                dr = dref if plain_t else dref / t
                value = value + sum_along(xp, (xp.exp(log_q) - p) * dr, -1)
            elif dref is not None and spec.reference_form == "log_probs":
                value = value - sum_along(xp, p * dref, -1)
            elif dref is not None:
                value = value - sum_along(xp, xp.where(p == 0, 0.0, p / reference) * dref, -1)
        if drop is not None:
            value = xp.where(drop, 0.0, value)
        out.append(value)
    return tuple(out)


def _reference_log_q(
    xp: ModuleType,
    spec: StatsSpec,
    reference: Array,
    parts: RowParts,
    t: Any,
    plain_t: bool,
) -> Array:
    """The reference's log-probabilities from the saved row parts, for both derivatives."""
    if spec.reference_form == "logits":
        sr = reference - parts.ref_m
        log_q = (sr if plain_t else sr / t) - parts.ref_lse
    elif spec.reference_form == "log_probs":
        log_q = reference
    else:
        log_q = xp.log(reference)
    return log_q
