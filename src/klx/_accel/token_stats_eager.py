"""Eager NumPy arrays and torch CPU tensors: :func:`klx.token_stats`'s values in about
half the passes of the array-API definition (:func:`klx._token_stats_math.stats_values`).

The same math, on temporaries this module owns, overwritten in place (``out=`` and
augmented assignment, which NumPy and torch share): the shifted logits ``s = (z - m) /
T``, ``e = exp(s)``, the log-sum-exp by ``log1p`` of the mass beside one maximum (its
``e`` set to 0 for the sum at its index, then back to 1: no mask pass), the entropy as
``lse(s) - sum(e s) / sum(e)``, and the KL's terms ``p (d + expm1(-d))`` with the
reference's log-sum-exp taken once, the same way. No guard runs on
the way: where a row's KL is not finite (a ``-inf`` logit against a ``-inf`` reference
logit gives ``0 * inf``; ``expm1(-d)`` may overflow where P is far below Q; NaN), that
row alone is taken again by the definition (one flag read per call: no device sync on
a CPU). Nothing here reads a value otherwise, so it serves concrete arrays only.
"""

from __future__ import annotations

import math
from types import ModuleType

from klx._backend_ops import take_along_axis
from klx._token_stats_math import RowParts, StatsSpec, stats_values
from klx._typing import Array

__all__ = ["rows", "values"]


def rows(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[Array, ...]:
    """The statistics of NumPy logits (:func:`klx._token_stats.stats_rows`)."""
    if not isinstance(spec.temperature, float) or 0 in z.shape:
        return stats_values(xp, spec, z, labels, reference, keep)[0]
    import numpy as np

    return values(np, xp, spec, z, labels, reference, keep)[0]


class _Native:
    """The few operations whose spelling differs between NumPy and torch."""

    def __init__(self, nx: ModuleType) -> None:
        self.nx = nx
        self.torch = nx.__name__ == "torch"

    def max_at(self, z: Array) -> tuple[Array, Array]:
        """Each row's maximum [n, 1] and the index of one maximal entry (NaN's if any)."""
        if self.torch:
            m, at = self.nx.max(z, dim=-1, keepdim=True)
            return m, at
        at = self.nx.argmax(z, axis=-1, keepdims=True)
        return self.nx.take_along_axis(z, at, axis=-1), at

    def put(self, x: Array, at: Array, value: float) -> None:
        """``x[i, at[i]] = value`` for each row i."""
        if self.torch:
            x.scatter_(-1, at, value)
        else:
            self.nx.put_along_axis(x, at, value, axis=-1)

    def floor(self, x: Array, lo: float) -> None:
        """``x = max(x, lo)`` in place (NaN stays)."""
        if self.torch:
            x.clamp_(min=lo)
        else:
            self.nx.maximum(x, lo, out=x)


def _normaliser(
    ops: _Native, xp: ModuleType, x: Array, t: float, drop: Array | None
) -> tuple[Array, Array, Array, Array]:
    """:func:`klx._token_stats_math.log_normaliser` of rows [n, vocab]: ``(m, s, exp(s),
    lse(s))`` with ``s`` and ``exp(s)`` new arrays, dropped rows' ``s`` 0."""
    m, at = ops.max_at(x)
    s = x - m
    if drop is not None:
        s[drop] = 0.0  # NaN there reaches nothing (its results are set to 0)
    if t != 1.0:
        s /= t
    e = ops.nx.exp(s)
    ops.put(e, at, 0.0)  # the mass beside one maximum (whose exp is exactly 1)
    lse = ops.nx.log1p(xp.sum(e, axis=-1, keepdims=True))
    ops.put(e, at, 1.0)
    return m, s, e, lse


def values(
    nx: ModuleType,
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[tuple[Array, ...], RowParts]:
    """:func:`klx._token_stats_math.stats_values` of concrete arrays of `nx` (numpy or torch,
    whose namespace is `xp`), a Python float temperature: the same values, and the row
    parts of the closed-form gradient."""
    ops = _Native(nx)
    names, t = spec.names, float(spec.temperature)
    batch, vocab = tuple(z.shape[:-1]), int(z.shape[-1])
    n = math.prod(batch)
    z2 = xp.reshape(z, (n, vocab))
    ref2 = None if reference is None else xp.reshape(reference, (n, vocab))
    drop = None if keep is None else ~xp.reshape(keep, (n,))
    flat_labels = None if labels is None else xp.reshape(labels, (n,))
    safe = bad = None
    if flat_labels is not None:
        ignored = flat_labels == spec.ignore_index
        drop = ignored if drop is None else drop | ignored
        if "logprob" in names:
            wide = (
                flat_labels if flat_labels.dtype == xp.int64 else xp.astype(flat_labels, xp.int64)
            )
            bad = ((wide < 0) | (wide >= vocab)) & ~ignored
            safe = xp.where(bad | ignored, 0, wide)
    m, s, e, shift_lse = _normaliser(ops, xp, z2, t, drop)
    out: dict[str, Array] = {}
    ref_m = ref_lse = None
    if "lse" in names:
        out["lse"] = ((m if t == 1.0 else m / t) + shift_lse)[:, 0]
    if "logprob" in names:
        assert safe is not None  # ('logprob' needs labels)
        picked = take_along_axis(xp, s, safe[:, None], -1)
        out["logprob"] = xp.where(bad, math.nan, (picked - shift_lse)[:, 0])
    if "entropy" in names or "kl" in names:
        ops.floor(s, float(xp.finfo(s.dtype).min))  # -inf: e = 0 there, and e s = 0
    if "entropy" in names:
        mass = xp.sum(e * s, axis=-1, keepdims=True)
        out["entropy"] = (shift_lse - mass * nx.exp(-shift_lse))[:, 0]
    if "kl" in names:
        e *= nx.exp(-shift_lse)  # p
        if spec.reference_form == "logits":  # as the policy's: equal rows give d = 0
            ref_m, d, phi, ref_lse = _normaliser(ops, xp, ref2, t, drop)
            nx.subtract(s, d, out=d)
            d -= shift_lse - ref_lse
        else:
            d = s - (ref2 if spec.reference_form == "log_probs" else nx.log(ref2))
            d -= shift_lse
            phi = s
        nx.negative(d, out=phi)  # log q - log p
        nx.expm1(phi, out=phi)
        phi += d
        phi *= e
        kl = xp.sum(phi, axis=-1)
        del phi, d
        redo = ~nx.isfinite(kl)
        if drop is not None:
            redo &= ~drop
        if bool(redo.any()):  # one flag read (CPU): these rows by the definition
            sub_labels = None if flat_labels is None else flat_labels[redo]
            again, _ = stats_values(xp, spec, z2[redo], sub_labels, ref2[redo], None)  # type: ignore[index]
            kl[redo] = again[names.index("kl")]
        out["kl"] = kl
    result = []
    for name in names:
        value = out[name]
        if drop is not None:
            value[drop] = 0.0
        result.append(xp.reshape(value, batch))
    col = (*batch, 1)
    parts = RowParts(
        xp.reshape(m, col),
        xp.reshape(shift_lse, col),
        None if ref_m is None else xp.reshape(ref_m, col),
        None if ref_lse is None else xp.reshape(ref_lse, col),
    )
    return tuple(result), parts
