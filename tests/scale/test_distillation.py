"""Distillation-scale KL from logits: the one-pass Triton kernel (torch on CUDA; here under
TRITON_INTERPRET=1 on CPU tensors) and the row-blocked CPU path, against float64 SciPy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import triton_device
from support.distill import distill_logits, js_rows_and_gradients, kl_rows_and_gradients


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_triton_one_pass_kernel_matches_reference(backend, dtype):
    import torch

    device = triton_device()
    from klx._accel import triton_distill

    rng = np.random.default_rng(0)
    t_np, s_np = distill_logits(rng, 6, 5000)  # several vocabulary blocks
    t = backend.asarray(t_np, dtype).to(device).requires_grad_(True)
    s = backend.asarray(s_np, dtype).to(device).requires_grad_(True)
    kl_ref, scale, gs_ref, gt_ref = kl_rows_and_gradients(
        backend.to_numpy(t), backend.to_numpy(s), 2.0
    )
    rows = triton_distill.kl_rows_from_logits(t, s, 2.0)
    assert rows.shape == (6,)
    assert rows.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    tol = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}[dtype]
    assert reference.rel_error(backend.to_numpy(rows), kl_ref, scale) <= tol
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], dtype=rows.dtype, device=device)
    (rows * weights).sum().backward()
    w = weights.cpu().numpy()[:, None]
    # gradients are stored in the input's dtype: its rounding, relative
    rtol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[dtype]
    atol = 1e-15 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(backend.to_numpy(s.grad), gs_ref * w, rtol=rtol, atol=atol)
    np.testing.assert_allclose(backend.to_numpy(t.grad), gt_ref * w, rtol=rtol, atol=atol)
    assert np.all(backend.to_numpy(s.grad)[2] == 0)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_triton_kernel_masks_nan_padding_rows(backend):
    import torch

    device = triton_device()
    from klx._accel import triton_distill

    rng = np.random.default_rng(1)
    t_np, s_np = distill_logits(rng, 4, 300)
    t_np[2] = np.nan  # a padding row
    t = torch.tensor(t_np, device=device, requires_grad=True)
    s = torch.tensor(s_np, device=device, requires_grad=True)
    keep = torch.tensor([True, True, False, True], device=device)
    rows = triton_distill.kl_rows_from_logits(t, s, 1.0)
    loss = torch.where(keep, rows, 0.0).sum() / keep.sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(t.grad[2] == 0) and torch.all(s.grad[2] == 0)
    assert torch.all(torch.isfinite(t.grad)) and torch.all(torch.isfinite(s.grad))


@pytest.mark.backends("numpy", "torch", reason="the row-blocked CPU paths serve NumPy and torch")
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_row_blocked_cpu_path_matches_reference(backend, kind):
    rng = np.random.default_rng(2)
    t, s = distill_logits(rng, 300, 4000)  # 1.2M elements: past the row-blocking threshold
    keep = rng.uniform(size=300) > 0.1
    fn = klx.kl_divergence if kind == "kl" else klx.js_divergence
    got = fn(
        backend.asarray(t, "float32"),
        backend.asarray(s, "float32"),
        p_form="logits",
        q_form="logits",
        temperature=2.0,
        where=backend.asarray(keep),
        reduction="none",
    )
    t32 = backend.to_numpy(backend.asarray(t, "float32"))
    s32 = backend.to_numpy(backend.asarray(s, "float32"))
    if kind == "kl":
        ref, _, _, _ = kl_rows_and_gradients(t32, s32, 2.0)
    else:
        p = np.exp(reference.log_softmax(t32, -1, 2.0))
        q = np.exp(reference.log_softmax(s32, -1, 2.0))
        ref = reference.js_rows(p, q, -1, 0.5)
    np.testing.assert_allclose(
        backend.to_numpy(got), np.where(keep, ref, 0.0), rtol=1e-5, atol=1e-7
    )


@pytest.mark.slow
@pytest.mark.backends("numpy", reason="tracemalloc sees NumPy's allocations")
def test_numpy_2048_by_32000_logits_in_bounded_memory(backend):
    """2048 x 32000 float32 logits (250 MiB each): extra peak memory under 64 MB, and the
    'batchmean' matches float64 to 1e-5 relative."""
    rng = np.random.default_rng(3)
    rows, vocab = 2048, 32000
    t = rng.standard_normal((rows, vocab), dtype=np.float32)
    s = rng.standard_normal((rows, vocab), dtype=np.float32)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    got = klx.kl_divergence(
        t, s, p_form="logits", q_form="logits", temperature=2.0, reduction="batchmean"
    )
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"extra peak {peak / 2**20:.1f} MiB"
    ref = np.mean(
        np.concatenate(
            [
                kl_rows_and_gradients(
                    t[i : i + 256].astype(np.float64), s[i : i + 256].astype(np.float64), 2.0
                )[0]
                for i in range(0, rows, 256)
            ]
        )
    )
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("beta", [0.5, 0.1, 1.0])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_triton_js_kernel_matches_reference(backend, dtype, beta):
    device = triton_device()
    from klx._accel import triton_distill

    rng = np.random.default_rng(4)
    t_np, s_np = distill_logits(rng, 5, 4500)
    t = backend.asarray(t_np, dtype).to(device).requires_grad_(True)
    s = backend.asarray(s_np, dtype).to(device).requires_grad_(True)
    js_ref, gt_ref, gs_ref = js_rows_and_gradients(
        backend.to_numpy(t), backend.to_numpy(s), 2.0, beta
    )
    rows = triton_distill.js_rows_from_logits(t, s, 2.0, beta)
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(backend.to_numpy(rows), js_ref, rtol=tol, atol=tol)
    rows.sum().backward()
    rtol = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2}[dtype]
    atol = 1e-15 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(backend.to_numpy(t.grad), gt_ref, rtol=rtol, atol=atol)
    np.testing.assert_allclose(backend.to_numpy(s.grad), gs_ref, rtol=rtol, atol=atol)
