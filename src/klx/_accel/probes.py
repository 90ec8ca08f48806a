"""First-use probes: rows on which an accelerator must equal the definition.

The small rows hold what breaks fast paths: a zero target, a ``-inf`` log-probability or
logit, a NaN, and (for the divergences) a row that `where` drops. For the GPU rows a wide
probe is added, made to run what a real call runs: rows longer than one 2048-element block
with a ragged tail and the call's vocabulary's phase modulo 16 (the kernels' unmasked
vector branch and the launcher's divisibility specialisation), one of them a student
within 1e-3 of its teacher (checked to 1% of its value, where a cancelling kernel is
100% off). With gradients the backward kernels are checked on it too. All are built in
the call's own library, device and dtype; the comparisons are read back in one transfer
(one device synchronisation). Costs well under a millisecond on the CPU accelerators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from klx import _agnostic
from klx._accel.table import Accelerator
from klx._call import DivergenceCall, KLDivCall, parse_divergence, parse_kl_div
from klx._typing import Call

__all__ = ["mismatch"]

_NEG_INF = -math.inf
#: Probabilities of P and Q: a zero of P against mass of Q, a zero of Q against a
#: zero of P, and a plain row.
_P = ((0.5, 0.25, 0.25, 0.0), (0.1, 0.2, 0.3, 0.4), (0.0, 0.5, 0.5, 0.0))
_Q = ((0.4, 0.3, 0.3, 0.0), (0.25, 0.25, 0.25, 0.25), (0.1, 0.2, 0.3, 0.4))
#: Logits with a -inf entry; the last row (dropped by `where`) holds a NaN.
_P_LOGITS = ((2.0, 1.0, _NEG_INF, 0.5), (0.0, 0.0, 0.0, 0.0), (math.nan, 1.0, 2.0, 3.0))
_Q_LOGITS = ((1.5, _NEG_INF, 0.3, 0.5), (3.0, -1.0, 0.5, 0.0), (0.0, math.nan, 1.0, 1.0))
#: The Triton kernels' block (elements of a row per step): the wide probe is longer.
_BLOCK = 2048


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


def _wide_logits(vocab: int) -> tuple[list[list[float]], list[list[float]]]:
    """Teacher and student logits of two rows: a student within 1e-3 of its teacher (and
    shifted by 1.5, as two models' logits are), and an unrelated one."""
    t = [3.0 * math.sin(0.7 * i) + math.cos(1.3 * i) for i in range(vocab)]
    near = [v + 1e-3 * math.sin(2.1 * i + 0.3) + 1.5 for i, v in enumerate(t)]
    far = [2.0 * math.cos(0.37 * i) for i in range(vocab)]
    return [t, t], [near, far]


def _as_form(rows: list[list[float]], form: str) -> list[list[float]]:
    """Logits rows as the form asked (log-softmax, or its exp)."""
    if form == "logits":
        return rows
    out = []
    for row in rows:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        logs = [v - lse for v in row]
        out.append(logs if form == "log_probs" else [math.exp(v) for v in logs])
    return out


def _wide_vocab(vocab: int | None) -> int:
    """Past one block, with a ragged tail, at the call's vocabulary's phase modulo 16."""
    return _BLOCK + 16 + (0 if vocab is None else vocab % 16)


def mismatch(
    row: Accelerator, fn: Callable[[Any], Any], call: Call, grad: bool = False
) -> str | None:
    """How `fn` (the row's implementation) differs from the definition, or None."""
    xp = call.xp
    checks: list[tuple[str, Any, Any, float]] = []  # (what, got, want, relative tol)
    gpu = "cuda" in row.devices
    if isinstance(call, KLDivCall):  # a row of operation 'kl_div'
        a = call.input
        target = _log(_P) if call.log_target else [list(r) for r in _P]
        probe = parse_kl_div(
            _like(a, xp, _log(_Q)), _like(a, xp, target), call.reduction, call.log_target, False, xp
        )
        checks.append(("special values", *_forward(xp, fn, probe, _agnostic.kl_div), 0.0))
        if gpu:
            t, s = _wide_logits(_wide_vocab(a.shape[-1] if a.ndim else None))
            y = _as_form(t, "log_probs" if call.log_target else "probs")
            wide = parse_kl_div(
                _like(a, xp, _as_form(s, "log_probs")),
                _like(a, xp, y),
                call.reduction,
                call.log_target,
                False,
                xp,
            )
            checks.append(("rows past one block", *_forward(xp, fn, wide, _agnostic.kl_div), 0.0))
            if grad:
                checks += _gradients(xp, fn, wide, ("input", "target"), _agnostic.kl_div)
        return _verdict(xp, checks, a.dtype)
    a = call.p
    where = _like(a, xp, [True, True, False]) if call.keep is not None else None
    if where is not None:
        where = xp.astype(where, xp.bool)
    small = _divergence_probe(
        call,
        _like(a, xp, _given(_P, call.p_form, _P_LOGITS)),
        _like(a, xp, _given(_Q, call.q_form, _Q_LOGITS)),
        where,
    )
    checks.append(("special values", *_forward(xp, fn, small, _rows), 0.0))
    if gpu:
        t, s = _wide_logits(_wide_vocab(a.shape[-1]))
        wide = _divergence_probe(
            call,
            _like(a, xp, _as_form(t, call.p_form)),
            _like(a, xp, _as_form(s, call.q_form)),
            None,
        )
        got, want = _forward(xp, fn, wide, _rows)
        checks.append(("rows past one block", got, want, 0.0))
        checks.append(("a student within 1e-3 of its teacher", got[0], want[0], 1e-2))
        if grad:
            checks += _gradients(xp, fn, wide, ("p", "q"), _rows)
    return _verdict(xp, checks, a.dtype)


def _divergence_probe(call: DivergenceCall, p: Any, q: Any, where: Any) -> Any:
    return parse_divergence(
        call.divergence,
        p,
        q,
        axis=-1,
        p_form=call.p_form,
        q_form=call.q_form,
        temperature=call.temperature,
        where=where,
        reduction="none",
        validate=False,
        xp=call.xp,
        options=dict(call.options),
    )


def _rows(xp: Any, probe: Any) -> Any:
    """The definition's per-distribution values of a divergence probe."""
    return _agnostic.divergence(xp, probe)


def _forward(xp: Any, fn: Callable[[Any], Any], probe: Any, definition: Any) -> tuple[Any, Any]:
    """`fn`'s result and the definition's, without gradients."""
    with _no_grad(probe):
        got = fn(probe)
        if hasattr(probe, "kind"):
            got = _agnostic.finish_rows(xp, probe, got)
        return got, definition(xp, probe)


def _gradients(
    xp: Any, fn: Callable[[Any], Any], probe: Any, names: tuple[str, str], definition: Any
) -> list[tuple[str, Any, Any, float]]:
    """The gradients of both inputs through `fn` (its backward kernels) and through the
    definition, of a weighted sum of the results (torch only; grad mode on, whatever the
    caller's)."""
    import torch

    leaves = {n: getattr(probe, n).detach().clone().requires_grad_(True) for n in names}
    grads = []
    for impl, rows in ((fn, True), (lambda c: definition(xp, c), False)):
        call = probe._replace(**leaves)
        with torch.enable_grad():
            result = impl(call)
            if hasattr(call, "kind") and rows:
                result = _agnostic.finish_rows(xp, call, result)
            weights = torch.linspace(
                0.5, 1.5, result.numel(), dtype=result.dtype, device=result.device
            )
            total = (result.reshape(-1) * weights).sum()
            grads.append(torch.autograd.grad(total, list(leaves.values())))
    return [
        (f"the gradient of {name}", g_fn, g_def, 0.0)
        for name, g_fn, g_def in zip(names, grads[0], grads[1], strict=True)
    ]


def _no_grad(probe: Any) -> Any:
    import contextlib

    for name in ("p", "input"):
        x = getattr(probe, name, None)
        if x is not None and type(x).__module__.startswith("torch"):
            import torch

            return torch.no_grad()
    return contextlib.nullcontext()


def _verdict(xp: Any, checks: list[tuple[str, Any, Any, float]], dtype: Any) -> str | None:
    """The first check that fails, read back in one transfer, or None."""
    measures = []
    for _, got, want, rel in checks:
        if tuple(got.shape) != tuple(want.shape):
            return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
        measures.append(_measures(xp, got, want, rel))
    values = _host(xp, xp.stack([m for group in measures for m in group]))
    eps = float(xp.finfo(dtype).eps)
    for i, (what, _, _, rel) in enumerate(checks):
        special, err, scale = values[3 * i : 3 * i + 3]
        if special:
            return f"{what}: NaN or infinity where the definition has none, or the reverse"
        # the near-equal row: 1% of its value, plus two of the dtype's spacings there (a
        # float16 result of 1e-7 is subnormal, its spacing 6e-8: no relative bound holds)
        spacing = max(eps * scale, float(xp.finfo(dtype).smallest_normal) * eps)
        tol = rel * scale + 2 * spacing if rel else 64 * eps * (1.0 + scale)
        if err > tol:
            return f"{what}: differs by {err:.3g} (tolerance {tol:.3g})"
    return None


def _measures(xp: Any, got: Any, want: Any, rel: float) -> tuple[Any, Any, Any]:
    """As 0-d float64 arrays: whether the special values differ, the largest difference
    where both are finite, and the largest finite value (the scale)."""
    wide = getattr(xp, "float64", xp.float32)
    g = xp.reshape(xp.astype(got, wide), (-1,))
    w = xp.reshape(xp.astype(want, wide), (-1,))
    finite = xp.isfinite(g) & xp.isfinite(w)
    special = (
        (xp.isnan(g) != xp.isnan(w))
        | (xp.isinf(w) & (g != w))
        | (xp.isinf(g) & ~finite & ~xp.isinf(w))
    )
    zero = xp.zeros_like(g)
    err = xp.max(xp.where(finite, xp.abs(g - w), zero))
    scale = xp.max(xp.where(finite, xp.abs(w), zero))
    return xp.astype(xp.any(special), wide), err, scale


def _host(xp: Any, values: Any) -> list[float]:
    """A 1-d array's values as Python floats: one copy to the host."""
    tolist = getattr(values, "tolist", None)
    if tolist is not None:
        return [float(v) for v in tolist()]
    return [float(v) for v in values]  # pragma: no cover - a library without tolist
