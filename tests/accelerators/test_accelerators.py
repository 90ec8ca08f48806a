"""The accelerators agree with the float64 reference in the conformance cells.

* Triton kernels (torch on CUDA): run here on CPU tensors under ``TRITON_INTERPRET=1``
  (the nox torch session sets it), or on CUDA tensors when a GPU is present.
* The blocked CPU paths (NumPy with threads, torch) are exercised by the conformance
  matrix's 'large' case; here: run-to-run determinism.
"""

from __future__ import annotations

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import triton_device
from support.cases import kl_div_case

CASES = [
    "random",
    "zeros_in_target",
    "neginf_input",
    "q_zero_p_positive",
    "nan",
    "3d",
    "empty",
    "single",
    "scalar",
]
REDUCTIONS = ("none", "sum", "mean", "batchmean")


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_triton_kernels_match_reference(backend, dtype, log_target, case, conformance):
    import torch

    device = triton_device()
    from klx._accel import triton_kl

    log_q, p = kl_div_case(case)
    with np.errstate(divide="ignore"):
        tgt_np = np.log(p) if log_target else p
    x = backend.asarray(log_q, dtype).to(device)
    y = backend.asarray(tgt_np, dtype).to(device)
    xs, ys = backend.to_numpy(x), backend.to_numpy(y)
    for reduction in REDUCTIONS:
        out = triton_kl.kl_div(x, y, reduction, log_target)
        assert out.dtype == x.dtype
        assert out.device == x.device
        assert tuple(out.shape) == (tuple(x.shape) if reduction == "none" else ())
        ref, scale = reference.kl_div(xs, ys, reduction, log_target)
        got = backend.to_numpy(out)
        err = reference.rel_error(got, ref, scale, reference.ATOL.get(dtype, 0))
        conformance(
            f"triton-{device} {dtype}",
            f"{reduction} {'log_target' if log_target else 'probs'}",
            err,
            reference.TOL[dtype],
            value=got,
        )
        assert err <= reference.TOL[dtype], (reduction, err)
        again = triton_kl.kl_div(x, y, reduction, log_target)
        assert torch.equal(out, again) or (
            torch.isnan(out).any() and torch.equal(out.isnan(), again.isnan())
        )
    np.testing.assert_array_equal(backend.to_numpy(x), xs)  # inputs untouched


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_triton_backward_matches_analytic(backend, reduction, log_target):
    import torch

    device = triton_device()
    from klx._accel import triton_kl

    log_q, p = kl_div_case("neginf_input")
    with np.errstate(divide="ignore"):
        tgt_np = np.log(p) if log_target else p
    x = torch.tensor(log_q, device=device, requires_grad=True)
    y = torch.tensor(tgt_np, device=device, requires_grad=True)
    out = triton_kl.kl_div(x, y, reduction, log_target)
    g = torch.ones_like(out) if reduction == "none" else None
    out.backward(g)
    div = {"none": 1, "sum": 1, "mean": log_q.size, "batchmean": log_q.shape[0]}[reduction]
    with np.errstate(all="ignore"):
        w = np.exp(tgt_np) if log_target else tgt_np
        zero = w == 0
        log_w = np.where(zero, 0.0, tgt_np if log_target else np.log(np.where(zero, 1, tgt_np)))
        gx = np.where(zero, 0.0, -w) / div
        gy = np.where(zero, 0.0, (log_w - np.where(zero, 0, log_q) + 1) * (w if log_target else 1))
    np.testing.assert_allclose(x.grad.cpu().numpy(), gx, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(y.grad.cpu().numpy(), gy / div, rtol=1e-12, atol=1e-15)
    # and the same as autograd through the array-API definition
    x2 = torch.tensor(log_q, requires_grad=True)
    y2 = torch.tensor(tgt_np, requires_grad=True)
    ref = (
        klx.kl_div(x2, y2, reduction=reduction, log_target=log_target)
        if reduction != "mean"
        else None
    )
    if ref is not None:
        ref.backward(torch.ones_like(ref) if reduction == "none" else None)
        np.testing.assert_allclose(x.grad.cpu().numpy(), x2.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.backends("numpy", "torch", reason="the blocked CPU paths serve NumPy and torch")
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_blocked_cpu_results_repeat_bit_for_bit(backend, reduction):
    log_q, p = kl_div_case("large")
    x, y = backend.asarray(log_q, "float32"), backend.asarray(p, "float32")
    first = backend.to_numpy(klx.kl_div(x, y, reduction=reduction))
    for _ in range(3):
        np.testing.assert_array_equal(
            backend.to_numpy(klx.kl_div(x, y, reduction=reduction)), first
        )
