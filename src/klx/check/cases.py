"""The inputs of :mod:`klx.check` and the cases each path runs on them.

Probabilities with exact zeros, ``-inf`` log-probabilities and logits, put on a device in
the dtype checked; every reduction x ``log_target`` of ``kl_div``, and KL and JS from
logits at two temperatures, each compared with :mod:`klx.check.reference` and required
to be served by the path under check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from klx._backends import CheckDevice
from klx.check.reference import ATOL, TOLERANCE, _error, _ref_kl_div, _ref_rows


def _cases(np: Any, rows: int, cols: int, seed: int = 0) -> dict[str, Any]:
    """Inputs in float64: probabilities with exact zeros, -inf log-probabilities, logits."""
    rng = np.random.default_rng(seed)
    p = rng.random((rows, cols)) ** 3
    p[:, ::8] = 0.0  # one target entry in eight is exactly 0
    p /= p.sum(axis=-1, keepdims=True)
    q = rng.random((rows, cols)) + 0.05
    q /= q.sum(axis=-1, keepdims=True)
    log_q = np.log(q)
    log_q[0, 0] = -np.inf  # -inf where the target is 0: torch gives NaN, klx 0
    t = rng.normal(size=(rows, cols)) * 3
    s = rng.normal(size=(rows, cols)) * 3
    t[1, 2] = -np.inf
    return {"p": p, "log_q": log_q, "t": t, "s": s}


def _served(klx: Any, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising if the path `expected` did not serve it."""
    report = klx.explain(fn, *args, **kwargs)
    if report.chosen != expected:
        msg = f"served by {report.chosen}, not {expected}: " + "; ".join(
            f"{name}: {why}" for name, why in report.refused
        )
        raise RuntimeError(msg)
    return report.result


def _kl_div_cases(
    np: Any, klx: Any, lib: CheckDevice, dtype: str, expected: str
) -> tuple[int, float, list[str]]:
    """Every reduction x log_target of kl_div by the path `expected`, against the reference."""
    case = _cases(np, 6, 40)
    cells, worst, bad = 0, 0.0, []
    for log_target in (False, True):
        with np.errstate(divide="ignore"):
            y64 = np.log(case["p"]) if log_target else case["p"]
        x = lib.put(case["log_q"], dtype)
        y = lib.put(y64, dtype)
        xs, ys = lib.get(x), lib.get(y)  # the values in `dtype`, for the reference
        for reduction in ("none", "sum", "mean", "batchmean"):
            ref, scale = _ref_kl_div(np, xs, ys, reduction, log_target)
            out = _served(
                klx, expected, klx.kl_div, x, y, reduction=reduction, log_target=log_target
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale, ATOL.get(dtype, 0.0))
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"kl_div {reduction} log_target={log_target}: error {err:.3g}")
    return cells, worst, bad


def _rows_cases(
    np: Any, klx: Any, lib: CheckDevice, dtype: str, kinds: Sequence[str], expected: str
) -> tuple[int, float, list[str]]:
    case = _cases(np, 6, 40, seed=1)
    t, s = lib.put(case["t"], dtype), lib.put(case["s"], dtype)
    ts, ss = lib.get(t), lib.get(s)
    cells, worst, bad = 0, 0.0, []
    for kind in kinds:
        for temperature in (1.0, 2.0):
            ref = _ref_rows(np, kind, ts, ss, temperature, 0.5)
            scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)) or 1.0
            fn = klx.kl_divergence if kind == "kl" else klx.js_divergence
            out = _served(
                klx, expected, fn, t, s, p_form="logits", q_form="logits", temperature=temperature
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale)
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"{kind} from logits T={temperature}: error {err:.3g}")
    return cells, worst, bad
