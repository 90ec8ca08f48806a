"""The conformance matrix of klx.kl_div: backend x device x dtype x reduction x log_target x case.

Each cell compares klx with the float64 NumPy/SciPy reference in ``reference.py``, and
on torch also with torch.nn.functional.kl_div wherever torch's result is finite.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import check_array
from support.cases import KL_DIV_CASES, kl_div_case

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _call(fn, *args, **kwargs):
    if kwargs.get("reduction") == "mean":
        with pytest.warns(klx.KLDivMeanWarning, match="batchmean"):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("case", KL_DIV_CASES)
@pytest.mark.parametrize("log_target", [False, True], ids=["probs", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_kl_div_matches_reference(backend, dtype, reduction, log_target, case, conformance):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    log_q, p = kl_div_case(case)
    with np.errstate(divide="ignore"):
        target_np = np.log(p) if log_target else p
    inp = backend.asarray(log_q, dtype)
    tgt = backend.asarray(target_np, dtype)
    inp_before, tgt_before = backend.to_numpy(inp), backend.to_numpy(tgt)

    result = _call(klx.kl_div, inp, tgt, reduction=reduction, log_target=log_target)

    shape = np.broadcast_shapes(log_q.shape, p.shape) if reduction == "none" else ()
    check_array(backend, result, inp, dtype, shape)
    # The reference sees the values klx saw: the inputs after rounding to `dtype`.
    ref, scale = reference.kl_div(inp_before, tgt_before, reduction, log_target)
    got = backend.to_numpy(result)
    err = reference.rel_error(got, ref, scale, reference.ATOL.get(dtype, 0.0))
    tol = reference.TOL[dtype]
    row = f"{backend.id} {dtype}"
    column = f"{reduction} {'log_target' if log_target else 'probs'}"
    conformance(row, column, err, tol, value=got)
    assert err <= tol, f"error {err:.3g} > {tol:.0e}: got {got}, expected {ref}"
    # Inputs are never modified.
    np.testing.assert_array_equal(backend.to_numpy(inp), inp_before)
    np.testing.assert_array_equal(backend.to_numpy(tgt), tgt_before)

    if backend.name == "torch":
        import torch.nn.functional as F

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = F.kl_div(inp, tgt, reduction=reduction, log_target=log_target)
        theirs = backend.to_numpy(theirs)
        finite = np.isfinite(theirs)
        assert theirs.shape == got.shape
        # torch computes float16/bfloat16 in their own precision (its float16 sums drift
        # far from the truth on large inputs): klx must be as close to torch as its own
        # tolerance plus torch's distance from the reference allow.
        sc = np.broadcast_to(scale, got.shape)[finite]
        atol = reference.ATOL.get(dtype, 0.0)
        torch_off = reference.rel_error(
            theirs[finite], np.broadcast_to(ref, got.shape)[finite], sc, atol
        )
        err_t = reference.rel_error(got[finite], theirs[finite], sc, 2 * atol)
        torch_tol = tol + torch_off
        assert err_t <= torch_tol, f"differs from torch by {err_t:.3g}"


@pytest.mark.backends("torch", reason="compares with torch.nn.functional.kl_div itself")
@pytest.mark.parametrize("case", KL_DIV_CASES)
@pytest.mark.parametrize("log_target", [False, True], ids=["probs", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_div_agrees_with_torch_to_one_ulp(backend, dtype, reduction, log_target, case):
    """The README's claim: where F.kl_div is finite, klx is within one ulp of the terms' scale.

    Measured on CPU at most 0.99 of a unit for 'none' and 0.34 for the reductions; the
    scale is the reference's (the sum of the terms' magnitudes for a reduction).
    """
    import torch.nn.functional as F

    if backend.device.type != "cpu":
        pytest.skip("measured on CPU; a GPU's reductions add in another order")
    log_q, p = kl_div_case(case)
    with np.errstate(divide="ignore"):
        target_np = np.log(p) if log_target else p
    inp, tgt = backend.asarray(log_q, dtype), backend.asarray(target_np, dtype)
    ours = backend.to_numpy(_call(klx.kl_div, inp, tgt, reduction=reduction, log_target=log_target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = F.kl_div(inp, tgt, reduction=reduction, log_target=log_target)
    theirs = backend.to_numpy(theirs)
    _, scale = reference.kl_div(backend.to_numpy(inp), backend.to_numpy(tgt), reduction, log_target)
    finite = np.isfinite(theirs)
    if not finite.any():
        pytest.skip("torch's result has no finite value here (empty, or NaN where klx gives 0)")
    ulp = float(np.finfo(dtype).eps)
    scale = np.maximum(np.broadcast_to(scale, ours.shape)[finite], np.finfo(np.float64).tiny)
    units = np.abs(ours[finite].astype(np.float64) - theirs[finite]) / (ulp * scale)
    assert units.max() <= 1.0, f"klx and F.kl_div differ by {units.max():.2f} ulp of the scale"


def _special_values(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(log Q, P), one special value per row: exact zeros of P (under finite and ``-inf``
    log Q), ``q = 0`` under ``p > 0``, NaN log Q (under ``p > 0`` and ``p = 0``), NaN and
    negative P, a subnormal P, and a dense row."""
    log_q, p = kl_div_case("random")
    log_q, p = log_q[:7, :6].copy(), p[:7, :6].copy()
    p[0, :2] = 0.0  # zeros under finite log q
    p[1, :2], log_q[1, :2] = 0.0, -np.inf  # zeros under q = 0
    log_q[2, 3] = -np.inf  # q = 0 under p > 0: +inf
    log_q[3, 1], p[3, 2], log_q[3, 2] = np.nan, 0.0, np.nan  # NaN under p > 0 and p = 0
    p[4, 0], p[4, 1] = np.nan, -0.25  # NaN and negative P
    p[5, 2] = 1e-40 if dtype == "float32" else 1e-310  # subnormal
    return log_q, p


@pytest.mark.filterwarnings(  # torch's, from inductor's compiled autograd graph
    "ignore::UserWarning"
)
@pytest.mark.backends("torch", reason="torch.compile(fullgraph=True) on the CPU")
@pytest.mark.parametrize("target_grad", [False, True], ids=["target", "target_with_grad"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_div_inside_torch_compile_matches_reference(backend, dtype, target_grad):
    """Inside torch.compile the terms read ``log p`` without a safe stand-in where the target
    carries no derivative (klx._backend_ops.bare_log_serves), with one where it does: both
    match the float64 reference term by term (zeros, ``-inf``, NaN, negative and subnormal
    targets), and their derivatives are finite where the reference's are: ``-p`` in log Q
    (torch's), ``log p - log q + 1`` in P where ``p > 0``, 0 where ``p = 0``."""
    import torch

    log_q, p = _special_values(dtype)
    inp = backend.asarray(log_q, dtype).requires_grad_(True)
    tgt = backend.asarray(p, dtype).requires_grad_(target_grad)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def both(x, y):
        return klx.kl_div(x, y, reduction="none"), klx.kl_div(x, y, reduction="sum")

    terms, total = both(inp, tgt)
    x64, y64 = backend.to_numpy(inp.detach()), backend.to_numpy(tgt.detach())
    for got, reduction in ((terms, "none"), (total, "sum")):
        check_array(backend, got, inp, dtype, (7, 6) if reduction == "none" else ())
        ref, scale = reference.kl_div(x64, y64, reduction, log_target=False)
        err = reference.rel_error(backend.to_numpy(got.detach()), ref, scale)
        assert err <= reference.TOL[dtype], (reduction, err, backend.to_numpy(got.detach()), ref)

    # derivatives of the finite terms' sum: -p in log q, log p - log q + 1 in p > 0
    keep = torch.isfinite(terms.detach())
    torch.where(keep, terms, 0.0).sum().backward()
    fine = np.isfinite(backend.to_numpy(terms.detach()))
    want_x = np.where(fine, -y64, 0.0)
    np.testing.assert_allclose(backend.to_numpy(inp.grad)[fine], want_x[fine], rtol=1e-6)
    if target_grad:
        with np.errstate(all="ignore"):
            want_y = np.where(y64 > 0, np.log(y64) - x64 + 1.0, 0.0)
        got_y = backend.to_numpy(tgt.grad)
        assert np.all(np.isfinite(got_y[fine])), got_y
        ok = fine & (y64 > 1e-30)  # (a subnormal's log is rounded in its own way)
        np.testing.assert_allclose(got_y[ok], want_y[ok], rtol=1e-5)
