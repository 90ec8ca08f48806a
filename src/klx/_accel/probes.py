"""First-use probes: a few small rows on which an accelerator must equal the definition.

The rows hold what breaks fast paths: a zero target, a ``-inf`` log-probability or
logit, a NaN, and (for the divergences) a row that `where` drops. They are built in the
call's own library, device and dtype, so the probe runs the same compiled kernel the call
will. Costs well under a millisecond on the CPU accelerators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from klx import _agnostic
from klx._call import parse_divergence, parse_kl_div

__all__ = ["mismatch"]

_NEG_INF = -math.inf
#: Probabilities of P and Q: a zero of P against mass of Q, a zero of Q against a
#: zero of P, and a plain row.
_P = ((0.5, 0.25, 0.25, 0.0), (0.1, 0.2, 0.3, 0.4), (0.0, 0.5, 0.5, 0.0))
_Q = ((0.4, 0.3, 0.3, 0.0), (0.25, 0.25, 0.25, 0.25), (0.1, 0.2, 0.3, 0.4))
#: Logits with a -inf entry; the last row (dropped by `where`) holds a NaN.
_P_LOGITS = ((2.0, 1.0, _NEG_INF, 0.5), (0.0, 0.0, 0.0, 0.0), (math.nan, 1.0, 2.0, 3.0))
_Q_LOGITS = ((1.5, _NEG_INF, 0.3, 0.5), (3.0, -1.0, 0.5, 0.0), (0.0, math.nan, 1.0, 1.0))


def _log(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[math.log(v) if v > 0 else _NEG_INF for v in row] for row in rows]


def _given(rows: Sequence[Sequence[float]], form: str, logits: Any) -> Any:
    if form == "probs":
        return [list(r) for r in rows]
    if form == "log_probs":
        return _log(rows)
    return [list(r) for r in logits]


def _like(call_array: Any, xp: Any, values: Any) -> Any:
    device = getattr(call_array, "device", None)
    if device is None:
        return xp.asarray(values, dtype=call_array.dtype)
    return xp.asarray(values, dtype=call_array.dtype, device=device)


def mismatch(row: Any, fn: Callable[[Any], Any], call: Any) -> str | None:
    """How `fn` (the row's implementation) differs from the definition, or None."""
    xp = call.xp
    if row.operation == "kl_div":
        a = call.input
        target = _log(_P) if call.log_target else [list(r) for r in _P]
        kl_probe = parse_kl_div(
            _like(a, xp, _log(_Q)),
            _like(a, xp, target),
            call.reduction,
            call.log_target,
            False,
            xp,
        )
        return _differ(xp, fn(kl_probe), _agnostic.kl_div(xp, kl_probe), a.dtype)
    a = call.p
    where = _like(a, xp, [True, True, False]) if call.keep is not None else None
    if where is not None:
        where = xp.astype(where, xp.bool)
    probe = parse_divergence(
        call.kind,
        _like(a, xp, _given(_P, call.p_form, _P_LOGITS)),
        _like(a, xp, _given(_Q, call.q_form, _Q_LOGITS)),
        axis=-1,
        p_form=call.p_form,
        q_form=call.q_form,
        temperature=call.temperature,
        where=where,
        reduction="none",
        validate=False,
        xp=xp,
        **dict(call.options),
    )
    got = _agnostic.finish_rows(xp, probe, fn(probe))
    return _differ(xp, got, _agnostic.divergence(xp, probe), a.dtype)


def _differ(xp: Any, got: Any, want: Any, dtype: Any) -> str | None:
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    wide = getattr(xp, "float64", xp.float32)
    g = xp.astype(got, wide)
    w = xp.astype(want, wide)
    finite = xp.isfinite(g) & xp.isfinite(w)
    special = (
        (xp.isnan(g) != xp.isnan(w))
        | (xp.isinf(w) & (g != w))
        | (xp.isinf(g) & ~finite & ~xp.isinf(w))
    )
    if bool(xp.any(special)):
        return "NaN or infinity where the definition has none, or the reverse"
    err = (
        float(xp.max(xp.where(finite, xp.abs(g - w), 0.0)))
        if g.ndim
        else float(xp.where(finite, xp.abs(g - w), 0.0))
    )
    scale = 1.0 + float(
        xp.max(xp.where(finite, xp.abs(w), 0.0)) if w.ndim else xp.where(finite, xp.abs(w), 0.0)
    )
    tol = 64 * float(xp.finfo(dtype).eps) * scale
    if err > tol:
        return f"differs by {err:.3g} (tolerance {tol:.3g})"
    return None
