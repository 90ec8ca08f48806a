"""The Triton kernels' behaviour that a first GPU would otherwise be the first to show
(issue 13), under TRITON_INTERPRET=1 on CPU tensors (the nox torch session sets it):

* GPU float semantics: a compiled kernel receives a Python float as fp32; the fixture
  `gpu_float_args` makes the interpreter do the same, and float64 results stay exact;
* every launch runs inside ``torch.cuda.device(<the tensors' device>)``;
* second derivatives raise; ``torch.func.grad`` works; ``vmap`` raises a clear error;
* the online log-sum-exp stays finite when a rescale factor underflows (inf x 0);
* the per-row result may be modified in place before backward;
* row-strided inputs (``logits[:, :-1]``) are taken as they are, in any 16-byte phase;
* sizes that are no multiple of the block (whole blocks unmasked, a masked tail).

64-bit addressing and 16-byte loads are checked in the compiled code by
tests/test_triton_compile.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from klx._accel import gates, registry
from support import reference
from support.asserts import triton_device
from support.distill import distill_logits, js_rows_and_gradients, kl_rows_and_gradients
from support.gpu_math import fp32_float_arguments


@pytest.fixture
def gpu_float_args(monkeypatch):
    """The interpreter with the GPU's handling of Python float arguments: fp32 (conftest
    applies it to every test under TRITON_INTERPRET=1; these tests say so explicitly)."""
    triton = pytest.importorskip("triton")
    fp32_float_arguments(monkeypatch)
    return triton


class _Launches:
    """Replaces every kernel with a spy that records each launch's arguments and whether
    it ran inside ``torch.cuda.device`` (which is replaced by a recorder)."""

    def __init__(self, monkeypatch):
        import torch

        from klx._accel import triton_distill, triton_kl

        self.calls: list[dict] = []
        self.guards: list[object] = []
        self.depth = 0
        spy = self

        class Device:
            def __init__(self, device):
                spy.guards.append(device)

            def __enter__(self):
                spy.depth += 1

            def __exit__(self, *exc):
                spy.depth -= 1

        monkeypatch.setattr(torch.cuda, "device", Device)
        for module in (triton_kl, triton_distill):
            for name in dir(module):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))
        for cls in (triton_distill._KLRows, triton_distill._JSRows):
            monkeypatch.setattr(cls, "BACKWARD", self._wrap(cls.BACKWARD))

    def _wrap(self, kernel):
        spy = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.calls.append({"args": args, "kwargs": kwargs, "guarded": spy.depth > 0})
                    return kernel[grid](*args, **kwargs)

                return launch

        return Spy()


def _torch():
    import torch

    return torch


def _logit_pair(seed, rows, vocab, device):
    """Float64 logits (with -inf entries) as NumPy arrays and as leaf tensors."""
    torch = _torch()
    t_np, s_np = distill_logits(np.random.default_rng(seed), rows, vocab)
    t = torch.tensor(t_np, device=device, requires_grad=True)
    s = torch.tensor(s_np, device=device, requires_grad=True)
    return t_np, s_np, t, s


def _kl_div_inputs(device, dtype="float64", n=(6, 7)):
    torch = _torch()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(n[-1]), size=n[0])
    p[0, 2] = 0.0
    log_q = np.log(rng.dirichlet(np.ones(n[-1]), size=n[0]))
    x = torch.tensor(log_q, device=device).to(getattr(torch, dtype)).requires_grad_(True)
    y = torch.tensor(p, device=device).to(getattr(torch, dtype)).requires_grad_(True)
    return x, y


def _analytic_kl_div_grads(x, y, div):
    """d/dx = -y / div, d/dy = (log y - x + 1) / div, 0 where y is 0 (probabilities)."""
    xs, ys = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    zero = ys == 0
    with np.errstate(divide="ignore"):
        gy = np.where(zero, 0.0, np.log(np.where(zero, 1.0, ys)) - xs + 1.0)
    return np.where(zero, 0.0, -ys) / div, gy / div


# -- GPU float semantics -------------------------------------------------------------


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("log_target", [False, True])
def test_float64_kl_div_gradient_exact_with_gpu_float_args(
    backend, gpu_float_args, reduction, log_target
):
    torch = _torch()
    from klx._accel import triton_kl

    x, y = _kl_div_inputs(triton_device())
    target = torch.log(y.detach()) if log_target else y.detach()
    target.requires_grad_(True)
    triton_kl.kl_div(x, target, reduction, log_target).backward()
    x2 = x.detach().clone().requires_grad_(True)
    w = y.detach().cpu()
    div = {"mean": w.numel(), "batchmean": w.shape[0], "sum": 1}[reduction]
    gx, _ = _analytic_kl_div_grads(x2, w, div)
    np.testing.assert_allclose(x.grad.cpu().numpy(), gx, rtol=1e-13, atol=1e-16)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_float64_distillation_exact_with_gpu_float_args(backend, gpu_float_args):
    from klx._accel import triton_distill

    device = triton_device()
    t_np, s_np, t, s = _logit_pair(5, 3, 2100, device)
    rows = triton_distill.kl_rows_from_logits(t, s, 3.0)
    kl_ref, scale, gs_ref, gt_ref = kl_rows_and_gradients(t_np, s_np, 3.0)
    assert reference.rel_error(rows.detach().cpu().numpy(), kl_ref, scale) <= 1e-13
    rows.sum().backward()
    np.testing.assert_allclose(t.grad.cpu().numpy(), gt_ref, rtol=1e-11, atol=1e-16)
    np.testing.assert_allclose(s.grad.cpu().numpy(), gs_ref, rtol=1e-11, atol=1e-16)
    for beta in (0.5, 0.1):
        t.grad = s.grad = None
        js = triton_distill.js_rows_from_logits(t, s, 3.0, beta)
        js_ref, gt_ref, gs_ref = js_rows_and_gradients(t_np, s_np, 3.0, beta)
        np.testing.assert_allclose(js.detach().cpu().numpy(), js_ref, rtol=1e-13, atol=1e-16)
        js.sum().backward()
        np.testing.assert_allclose(t.grad.cpu().numpy(), gt_ref, rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(s.grad.cpu().numpy(), gs_ref, rtol=1e-10, atol=1e-16)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_no_python_float_reaches_a_kernel(backend, monkeypatch):
    torch = _torch()
    from klx._accel import triton_distill, triton_kl

    launches = _Launches(monkeypatch)
    x, y = _kl_div_inputs(triton_device())
    triton_kl.kl_div(x, y, "mean", False).backward()
    t, s = (a.detach().clone().requires_grad_(True) for a in (x, y))
    triton_distill.kl_rows_from_logits(t, s, 3.0).sum().backward()
    triton_distill.js_rows_from_logits(t, s, 3.0, 0.3).sum().backward()
    assert len(launches.calls) == 6
    for call in launches.calls:
        assert not any(type(a) is float for a in call["args"]), call["args"]
        assert any(isinstance(a, torch.Tensor) for a in call["args"])
        # Issue 22 item 7: never left to TRITON_DEFAULT_FP_FUSION (Triton 3.9 warns at every
        # compile where it is unset, and a later Triton changes the default)
        assert call["kwargs"].get("enable_fp_fusion") is True, call["kwargs"]


# -- device guard, CUDA-graph capture ----------------------------------------------------


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_every_launch_runs_under_the_device_guard(backend, monkeypatch):
    from klx._accel import triton_distill, triton_kl

    launches = _Launches(monkeypatch)
    x, y = _kl_div_inputs(triton_device())
    for reduction in ("none", "sum"):
        out = triton_kl.kl_div(x, y, reduction, False)
        out.backward(_torch().ones_like(out))
    t, s = (a.detach().clone().requires_grad_(True) for a in (x, y))
    triton_distill.kl_rows_from_logits(t, s, 1.0).sum().backward()
    triton_distill.js_rows_from_logits(t, s, 1.0, 0.5).sum().backward()
    assert len(launches.calls) == 8
    assert all(call["guarded"] for call in launches.calls)
    # the tensors' GPU; for CPU tensors (the interpreter) the guard's no-op index
    assert launches.guards == [x.device if x.is_cuda else -1] * 8


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_device_guard_selects_the_tensors_gpu(backend, monkeypatch):
    import types

    torch = _torch()
    from klx._accel import triton_common

    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d))
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    triton_common.device_guard(fake)
    assert seen == [torch.device("cuda", 1)]


# -- autograd: double backward, torch.func ---------------------------------------------


def _entry_points(device):
    torch = _torch()
    from klx._accel import triton_distill, triton_kl

    rng = np.random.default_rng(6)
    t_np, s_np = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    t = torch.tensor(t_np, device=device, requires_grad=True)
    s = torch.tensor(s_np, device=device, requires_grad=True)
    return {
        "kl_div": lambda a, b: triton_kl.kl_div(a, torch.softmax(b, -1), "sum", False),
        "kl_rows": lambda a, b: triton_distill.kl_rows_from_logits(a, b, 2.0).sum(),
        "js_rows": lambda a, b: triton_distill.js_rows_from_logits(a, b, 2.0, 0.3).sum(),
    }, (t, s)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("name", ["kl_div", "kl_rows", "js_rows"])
def test_second_derivative_raises(backend, name):
    torch = _torch()
    fns, (t, s) = _entry_points(triton_device())
    (g,) = torch.autograd.grad(fns[name](t, s), t, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(g.square().sum(), t)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("name", ["kl_div", "kl_rows", "js_rows"])
def test_torch_func_grad_matches_autograd(backend, name):
    torch = _torch()
    fns, (t, s) = _entry_points(triton_device())
    fn = fns[name]
    g_t, g_s = torch.func.grad(fn, argnums=(0, 1))(t.detach(), s.detach())
    e_t, e_s = torch.autograd.grad(fn(t, s), (t, s))
    torch.testing.assert_close(g_t, e_t, rtol=0, atol=0)
    torch.testing.assert_close(g_s, e_s, rtol=0, atol=0)
    # and against the definition
    if name == "kl_rows":
        ref = kl_rows_and_gradients(t.detach().cpu().numpy(), s.detach().cpu().numpy(), 2.0)
        np.testing.assert_allclose(g_t.cpu().numpy(), ref[3], rtol=1e-12, atol=1e-15)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("name", ["kl_div", "kl_rows", "js_rows"])
def test_gradient_of_one_input_only(backend, name):
    """A detached teacher (distillation): only the second input's gradient is computed,
    the same as when both are asked for."""
    torch = _torch()
    fns, (t, s) = _entry_points(triton_device())
    (only_s,) = torch.autograd.grad(fns[name](t.detach(), s), s)
    _, both_s = torch.autograd.grad(fns[name](t, s), (t, s))
    torch.testing.assert_close(only_s, both_s, rtol=0, atol=0)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("name", ["kl_div", "kl_rows", "js_rows"])
def test_vmap_raises_a_clear_error(backend, name):
    torch = _torch()
    fns, (t, s) = _entry_points(triton_device())
    with pytest.raises(NotImplementedError, match=r"vmap.*generic path"):
        torch.func.vmap(fns[name])(t.detach()[None], s.detach()[None])


# -- the online log-sum-exp ----------------------------------------------------------------


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_online_update_underflowing_rescale_is_not_nan(backend, dtype):
    """p > 0 = q in the first block, the row's maximum in a later one: exp(m_old - m_new)
    underflows to 0, those p are 0, and KL is finite (it was inf * 0 = NaN)."""
    torch = _torch()
    from klx._accel import triton_distill

    device = triton_device()
    vocab = 2 * triton_distill.BLOCK_V + 100
    rng = np.random.default_rng(7)
    t = rng.normal(size=(2, vocab))
    s = rng.normal(size=(2, vocab))
    s[:, 3] = -np.inf  # q = 0 where the first block's p > 0
    t[0, vocab - 5] = 1000.0  # the maximum in the last block: p underflows elsewhere
    t[1, 10] = 1000.0  # the maximum in the first block
    tt = torch.tensor(t, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    ss = torch.tensor(s, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    rows = triton_distill.kl_rows_from_logits(tt, ss, 1.0)
    t, s = tt.detach().double().cpu().numpy(), ss.detach().double().cpu().numpy()
    kl_ref, scale, gs_ref, _ = kl_rows_and_gradients(t, s, 1.0)
    assert np.all(np.isfinite(kl_ref))
    # float32: lse_t is about 1000, so its rounding is about 1000 * 2^-24 absolute
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert reference.rel_error(rows.detach().cpu().numpy(), kl_ref, scale) <= tol
    rows.sum().backward()
    assert torch.isfinite(tt.grad).all() and torch.isfinite(ss.grad).all()
    np.testing.assert_allclose(ss.grad.cpu().numpy(), gs_ref, rtol=1e-5, atol=1e-7)


# -- in-place on the result --------------------------------------------------------------


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_result_may_be_modified_in_place_before_backward(backend, kind):
    torch = _torch()
    from klx._accel import triton_distill

    device = triton_device()
    t_np, s_np, t, s = _logit_pair(8, 4, 300, device)
    mask = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64, device=device)
    if kind == "kl":
        rows = triton_distill.kl_rows_from_logits(t, s, 2.0)
        _, _, gs_ref, gt_ref = kl_rows_and_gradients(t_np, s_np, 2.0)
    else:
        rows = triton_distill.js_rows_from_logits(t, s, 2.0, 0.5)
        _, gt_ref, gs_ref = js_rows_and_gradients(t_np, s_np, 2.0, 0.5)
    rows.view(2, 2).mul_(mask.view(2, 2))  # through a view, as the dispatcher returns it
    rows.sum().backward()
    w = mask.cpu().numpy()[:, None]
    np.testing.assert_allclose(t.grad.cpu().numpy(), gt_ref * w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.grad.cpu().numpy(), gs_ref * w, rtol=1e-12, atol=1e-15)


# -- layouts: row strides, sizes that are no multiple of the block -----------------------


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_the_rows_layout_gate(backend):
    """The registry's 'rows' layout (the Triton rows' gate): unit stride along each row,
    rows at a stride of their own, such as logits[:, :-1]."""
    torch = _torch()
    a = torch.zeros(4, 9, dtype=torch.float32)
    b = torch.zeros(4, 10, dtype=torch.float32)
    for x in (a, b[:, :-1], b[:, 1:]):
        assert gates._rows_layout("torch", x)
    assert not gates._rows_layout("torch", a.T)  # column-major
    assert not gates._rows_layout("torch", b[:, ::2])  # stride 2 along the row
    assert not gates._rows_layout("torch", a.as_strided((4, 9), (5, 1)))  # overlapping


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("pad", [(1, 1), (1, 3), (0, 4), (2, 0)])
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_distillation_takes_strided_rows_as_they_are(backend, monkeypatch, kind, pad):
    """t = logits[:, :-pad_t] of rows in every 16-byte phase, s another layout; no copy."""
    torch = _torch()
    from klx._accel import triton_distill

    device = triton_device()
    launches = _Launches(monkeypatch)
    vocab = triton_distill.BLOCK_V + 61
    t_np, s_np = distill_logits(np.random.default_rng(9), 5, vocab)
    t_full = torch.tensor(np.pad(t_np, ((0, 0), (0, pad[0]))), device=device)
    s_full = torch.tensor(np.pad(s_np, ((0, 0), (0, pad[1]))), device=device)
    t_full = t_full.to(torch.float32).requires_grad_(True)
    s_full = s_full.to(torch.float32).requires_grad_(True)
    t, s = t_full[:, :vocab], s_full[:, :vocab]
    assert gates._rows_layout("torch", t) and gates._rows_layout("torch", s)
    if kind == "kl":
        rows = triton_distill.kl_rows_from_logits(t, s, 2.0)
        t32, s32 = t.detach().double().cpu().numpy(), s.detach().double().cpu().numpy()
        ref, _, gs_ref, gt_ref = kl_rows_and_gradients(t32, s32, 2.0)
    else:
        rows = triton_distill.js_rows_from_logits(t, s, 2.0, 0.3)
        t32, s32 = t.detach().double().cpu().numpy(), s.detach().double().cpu().numpy()
        ref, gt_ref, gs_ref = js_rows_and_gradients(t32, s32, 2.0, 0.3)
    np.testing.assert_allclose(rows.detach().cpu().numpy(), ref, rtol=2e-6, atol=1e-7)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5], device=device)
    (rows * weights).sum().backward()
    w = weights.cpu().numpy()[:, None]
    gt = t_full.grad.cpu().numpy()
    gs = s_full.grad.cpu().numpy()
    np.testing.assert_allclose(gt[:, :vocab], gt_ref * w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gs[:, :vocab], gs_ref * w, rtol=1e-5, atol=1e-7)
    assert np.all(gt[:, vocab:] == 0) and np.all(gs[:, vocab:] == 0)
    first = launches.calls[0]["args"]
    assert first[0].data_ptr() == t_full.data_ptr()  # the input itself, not a copy
    assert first[1].data_ptr() == s_full.data_ptr()


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_kl_div_takes_strided_rows_as_they_are(backend, reduction):
    torch = _torch()
    from klx._accel import triton_kl

    device = triton_device()
    rng = np.random.default_rng(10)
    cols = triton_kl.BLOCK + 37
    x_full = torch.tensor(np.log(rng.dirichlet(np.ones(cols + 1), size=3)), device=device)
    y_np = rng.dirichlet(np.ones(cols), size=3)
    y_np[1, 5] = 0.0
    y_full = torch.tensor(np.pad(y_np, ((0, 0), (1, 2))), device=device)
    x_full.requires_grad_(True)
    y_full.requires_grad_(True)
    x, y = x_full[:, :-1], y_full[:, 1:-2]
    assert gates._rows_layout("torch", x) and gates._rows_layout("torch", y)
    assert not x.is_contiguous() and not y.is_contiguous()
    out = triton_kl.kl_div(x, y, reduction, False)
    xs, ys = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    ref, scale = reference.kl_div(xs, ys, reduction, False)
    assert out.shape == x.shape if reduction == "none" else out.shape == ()
    assert reference.rel_error(out.detach().cpu().numpy(), ref, scale) <= 1e-12
    out.backward(torch.ones_like(out))
    div = {"none": 1, "sum": 1, "mean": xs.size, "batchmean": xs.shape[0]}[reduction]
    gx, gy = _analytic_kl_div_grads(x, y, div)
    np.testing.assert_allclose(x_full.grad[:, :-1].cpu().numpy(), gx, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(y_full.grad[:, 1:-2].cpu().numpy(), gy, rtol=1e-12, atol=1e-16)
    assert torch.all(x_full.grad[:, -1] == 0)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("n", [32001, 2 * 2048 + 1])
def test_kl_div_sizes_off_the_block(backend, n):
    """Whole blocks unmasked, the tail masked: sizes that are no multiple of 16 or BLOCK."""
    torch = _torch()
    from klx._accel import triton_kl

    device = triton_device()
    rng = np.random.default_rng(11)
    p = rng.dirichlet(np.ones(n))
    log_q = np.log(rng.dirichlet(np.ones(n)))
    x = torch.tensor(log_q, device=device, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(p, device=device, dtype=torch.float32)
    xs, ys = x.detach().double().cpu().numpy(), y.double().cpu().numpy()
    for reduction in ("none", "sum"):
        out = triton_kl.kl_div(x, y, reduction, False)
        ref, scale = reference.kl_div(xs, ys, reduction, False)
        assert reference.rel_error(out.detach().double().cpu().numpy(), ref, scale) <= 2e-6
    out.backward()
    np.testing.assert_array_equal(x.grad.cpu().numpy(), -y.cpu().numpy())


@pytest.mark.slow
@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_kl_div_past_2_to_the_31_elements_on_a_gpu(backend):
    """Issue 13, items 1 and 2, on a GPU (about 26 GB): offsets past 2^31 address the
    right elements in 'none', 'sum' and the backward pass."""
    torch = _torch()
    from klx._accel import triton_kl

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device with about 26 GB free (32-bit offsets wrap at 2^31)")
    n = 2**31 + 4099
    x = torch.full((n,), -1.0, device="cuda", requires_grad=True)
    y = torch.full((n,), 0.5, device="cuda")
    with torch.no_grad():
        x[-7:] = -3.0  # past 2^31: a wrapped offset would read -1 (or fault)
    out = triton_kl.kl_div(x, y, "none", False)
    tail = out[-9:].cpu().double().numpy()
    expect = 0.5 * (np.log(0.5) - np.array([-1.0] * 2 + [-3.0] * 7))
    np.testing.assert_allclose(tail, expect, rtol=1e-6)
    del out
    total = triton_kl.kl_div(x, y, "sum", False)
    exact = (n - 7) * 0.5 * (np.log(0.5) + 1.0) + 7 * 0.5 * (np.log(0.5) + 3.0)
    np.testing.assert_allclose(total.item(), exact, rtol=1e-5)
    total.backward()
    np.testing.assert_array_equal(x.grad[-9:].cpu().numpy(), -0.5)


# -- near P = Q (issue 22, item 1) ---------------------------------------------------------


def _near_pair(rng, rows, vocab, noise, dtype):
    """Teacher logits and a student within `noise` of them (shifted by a constant, as two
    models' logits are), rounded to `dtype`; their float64 values for the reference."""
    torch = _torch()
    t = rng.normal(scale=3.0, size=(rows, vocab))
    s = t + noise * rng.normal(size=(rows, vocab)) + 1.5
    dt = getattr(torch, dtype)
    device = triton_device()
    tt, ss = (torch.tensor(a).to(dt).to(device) for a in (t, s))
    return tt, ss, tt.double().cpu().numpy(), ss.double().cpu().numpy()


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("noise", [1e-3, 1e-2])
def test_kl_rows_near_p_equal_q_are_accurate_and_never_negative(backend, noise, dtype):
    """The one-pass kernel took KL = a / l_t - lse_t + lse_s: two log-sum-exps of about 10
    cancelling, so a float32 KL of 1.2e-7 came out as 0, 9.5e-7 or -9.5e-7. The terms
    p phi(-d) of the definition are >= 0 and the lse rounding enters squared: within
    3e-5 of float64 (with the GPU's approximate exp, which the interpreter emulates)."""
    from klx._accel import triton_distill

    t, s, t64, s64 = _near_pair(np.random.default_rng(31), 8, 32000, noise, dtype)
    want, _, gs_want, gt_want = kl_rows_and_gradients(t64, s64, 1.0)
    t.requires_grad_(True)
    s.requires_grad_(True)
    rows = triton_distill.kl_rows_from_logits(t, s, 1.0)
    got = rows.detach().double().cpu().numpy()
    assert np.all(got > 0), got
    np.testing.assert_allclose(got, want, rtol=3e-5)
    rows.sum().backward()
    if dtype == "float32":  # the gradient: (q - p) and p (d - KL), to float32's rounding of d
        scale = np.max(np.abs(gs_want))
        assert np.max(np.abs(s.grad.double().numpy() - gs_want)) <= 1e-3 * scale
        scale = np.max(np.abs(gt_want))
        assert np.max(np.abs(t.grad.double().numpy() - gt_want)) <= 1e-2 * scale


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("noise", [1e-3, 1e-2])
def test_js_rows_near_p_equal_q_are_accurate(backend, noise, beta):
    """The kernel took p (log p - log m) with log m a logaddexp of two logs near -10: JS
    20-50% low at 3e-8. The definition's u, v forms (log1p of expm1) are exactly 0 at
    P = Q and within 6e-5 of float64 near it (the float32 definition itself is 1.3e-4 off
    on these rows, measured with klx's accelerators off)."""
    from klx._accel import triton_distill

    t, s, t64, s64 = _near_pair(np.random.default_rng(32), 8, 32000, noise, "float32")
    want, _, _ = js_rows_and_gradients(t64, s64, 1.0, beta)
    got = triton_distill.js_rows_from_logits(t, s, 1.0, beta).double().cpu().numpy()
    assert np.all(got > 0), got
    np.testing.assert_allclose(got, want, rtol=6e-5)
    same = triton_distill.js_rows_from_logits(t, t, 1.0, beta)
    assert bool((same == 0).all()), same


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
def test_the_interpreter_computes_exp_as_a_gpu(backend):
    """The suite's kernels meet ex2.approx of the float32 product x log2(e) (conftest's
    autouse fixture; support/gpu_math.py), not NumPy's correctly rounded exp."""
    torch = _torch()
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if triton_device() != "cpu":
        pytest.skip("on a GPU the hardware's own exp runs")

    @triton.jit
    def exp_kernel(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y_ptr + o, tl.exp(tl.load(x_ptr + o)))

    x = torch.linspace(-20.0, -19.0, 64, dtype=torch.float32)
    y = torch.empty_like(x)
    exp_kernel[(1,)](x, y, N=64)
    err = (y.double() / torch.exp(x.double()) - 1).abs().max().item()
    assert 2e-7 < err < 2.5e-6, err


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_float16_mean_is_divided_before_the_cast(backend, reduction):
    """Issue 22 item 2: the kernels' float16 'sum' was cast to float16 before the division,
    so a 'mean' whose 'sum' is past 65504 came out inf. The division is in float32."""
    import klx
    from klx._accel import gates

    torch = _torch()
    rng = np.random.default_rng(33)
    x = -500.0 * rng.random((512, 512))  # log-probabilities of Q, down to -500
    y = rng.dirichlet(np.ones(512), size=512)
    xt = torch.tensor(x).to(torch.float16).to(triton_device())
    yt = torch.tensor(y).to(torch.float16).to(triton_device())
    if triton_device() == "cpu":
        gates.DEVICE_ALIASES["cpu"] = "cuda"  # the CUDA row, on CPU tensors
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", klx.KLDivMeanWarning)  # 'mean' on purpose
            report = klx.explain(klx.kl_div, xt, yt, reduction=reduction)
    finally:
        gates.DEVICE_ALIASES.clear()
        registry.reset_checks()
    assert report.chosen == "triton-kl-div", str(report)
    got = report.result
    assert got.dtype == torch.float16 and got.shape == ()
    x16, y16 = (a.double().cpu().numpy() for a in (xt, yt))
    want, _ = reference.kl_div(x16, y16, reduction, False)
    assert reference.kl_div(x16, y16, "sum", False)[0] > 65504  # past float16's largest
    np.testing.assert_allclose(float(got), want, rtol=2e-3)


@pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_a_row_of_minus_inf_logits_is_nan(backend, kind):
    """A row whose logits are all -inf holds no distribution: NaN, as the definition says
    (a review of the two-pass kernels found 1.0 for KL and 0.35 for JS)."""
    import math

    from klx._accel import triton_distill

    torch = _torch()
    inf = math.inf
    t = torch.tensor([[-inf] * 5, [1.0, 2, 3, 4, 5], [1.0, 2, 3, 4, 5]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2, 3, 4, 5], [-inf] * 5, [0.0, 2, 1, 4, 3]], dtype=torch.float64)
    t, s = t.to(triton_device()), s.to(triton_device())
    with np.errstate(divide="ignore", invalid="ignore"):  # the interpreter's log(0)
        if kind == "kl":
            got = triton_distill.kl_rows_from_logits(t, s, 1.0)
        else:
            got = triton_distill.js_rows_from_logits(t, s, 1.0, 0.5)
    got = got.cpu().numpy()
    assert np.isnan(got[:2]).all() and np.isfinite(got[2]), got
