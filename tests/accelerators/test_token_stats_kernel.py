"""The Triton row kernel of token_stats (klx._accel.triton_token_stats), under
TRITON_INTERPRET=1 on CPU tensors routed to the CUDA path (support.asserts.cuda_route),
against float64 SciPy and autodiff of a float64 torch formula written here.

Blocks of 16 columns (the module's BLOCK_V, patched) make a vocabulary of 37 three
blocks, the last one masked, at the interpreter's speed.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import klx
from support.asserts import check_array, cuda_route

pytestmark = pytest.mark.backends("torch", reason="the Triton kernels take torch tensors")

#: Relative tolerance per accumulation dtype (float32: the GPU's approximate exp).
TOL = {"float64": 1e-12, "float32": 3e-6}


@pytest.fixture
def launches(backend, monkeypatch):
    """Route the backend's tensors to the CUDA path, with 16-column blocks, and count the
    kernel's launches."""
    cuda_route(backend, monkeypatch)
    from klx._accel import triton_token_stats

    monkeypatch.setattr(triton_token_stats, "BLOCK_V", 16)
    kernel = triton_token_stats._stats_kernel
    calls: list[int] = []

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(triton_token_stats, "_stats_kernel", Spy())
    return calls


def _case(rng, rows=6, vocab=37):
    """Logits with a -inf entry, a nearly one-hot row and a NaN row (dropped by `where`),
    a reference near them, labels with one ignored."""
    z = rng.normal(scale=2.0, size=(rows, vocab))
    z[0, 3] = -np.inf
    z[1] = -30.0
    z[1, 20] = 5.0
    z[4] = np.nan
    ref = z + rng.normal(scale=0.5, size=z.shape)
    ref[0, 3] = -np.inf
    labels = rng.integers(0, vocab, size=rows)
    labels[1] = 20
    labels[2] = -100
    keep = np.ones(rows, bool)
    keep[4] = False
    return z, ref, labels, keep


def _reference(z, ref, labels, keep, temperature):
    """The four statistics in float64 by SciPy, 0 where dropped."""
    s = z / temperature
    with np.errstate(all="ignore"):
        lse = special.logsumexp(s, axis=-1)
        log_p = s - lse[:, None]
        p = np.exp(log_p)
        q = np.exp(special.log_softmax(ref / temperature, axis=-1))
        safe = np.where(labels == -100, 0, labels)
        out = {
            "logprob": np.take_along_axis(log_p, safe[:, None], -1)[:, 0],
            "entropy": np.sum(special.entr(p), axis=-1),
            "kl": np.sum(special.rel_entr(p, q), axis=-1),
            "lse": lse,
        }
    drop = ~keep | (labels == -100)
    return {k: np.where(drop, 0.0, v) for k, v in out.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_matches_float64_scipy_across_blocks(backend, launches, dtype, temperature):
    import torch

    z, ref, labels, keep = _case(np.random.default_rng(3))
    dt = getattr(torch, dtype)
    zt, rt = (torch.tensor(a).to(dt) for a in (z, ref))
    z64, r64 = zt.double().numpy(), rt.double().numpy()  # the values the kernel reads
    out = klx.token_stats(
        zt, torch.tensor(labels), rt, where=torch.tensor(keep), temperature=temperature
    )
    assert launches == [6]
    want = _reference(z64, r64, labels, keep, temperature)
    acc = "float64" if dtype == "float64" else "float32"
    for name in ("logprob", "entropy", "kl", "lse"):
        check_array(backend, out[name], zt, acc, (6,))
        got = out[name].double().numpy()
        scale = np.maximum(np.abs(want[name]), 1.0)
        np.testing.assert_array_less(np.abs(got - want[name]), TOL[acc] * scale + 1e-300)
    assert out["kl"][4] == 0 and out["entropy"][4] == 0  # the NaN row, dropped


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_nearly_one_hot_row_keeps_the_mass_beside_the_maximum(backend, launches, dtype):
    """lse - max = log1p(35 e^-40) = 1.5e-16: a plain log(sum) rounds it to 0; the
    entropy 41 * 35 e^-40 (about 6e-15; SciPy's entr sum is 0.6% off) to float
    accuracy."""
    import torch

    z = np.full((2, 36), -40.0)
    z[:, 7] = 0.0
    zt = torch.tensor(z, dtype=getattr(torch, dtype))
    out = klx.token_stats(zt)
    rest = 35 * np.exp(-40.0)
    want_lse = np.log1p(rest)
    want_h = want_lse + 40.0 * rest / (1.0 + rest)  # sum p (lse - s), in closed form
    np.testing.assert_allclose(out["lse"].double().numpy(), want_lse, rtol=TOL[dtype] * 4)
    np.testing.assert_allclose(out["entropy"].double().numpy(), want_h, rtol=1e-5)
    assert launches == [2]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equal_policy_and_reference_rows_give_exactly_zero_kl(
    backend, launches, dtype, temperature
):
    import torch

    z = np.random.default_rng(4).normal(scale=3.0, size=(5, 37))
    z[0, :5] = -np.inf
    zt = torch.tensor(z, dtype=getattr(torch, dtype))
    kl = klx.token_stats(zt, reference=zt.clone(), stats="kl", temperature=temperature)["kl"]
    assert bool((kl == 0).all()), kl
    assert launches == [5]


def test_minus_inf_logits_against_the_reference(backend, launches):
    """P > 0 where Q = 0: +inf (scipy's rel_entr); -inf on both sides: finite; a row of
    -inf logits (either side): NaN, as the definition's -inf - -inf; an ignored token
    whose row is all -inf: 0."""
    import torch

    z = np.array([[0.0, 1.0, 2.0], [0.0, -np.inf, 2.0], [-np.inf] * 3, [1.0, 2.0, 3.0]])
    r = np.array([[0.0, 1.0, -np.inf], [1.0, -np.inf, 0.0], [0.0, 1.0, 2.0], [-np.inf] * 3])
    labels = np.array([0, 2, 1, 2])
    out = klx.token_stats(torch.tensor(z), torch.tensor(labels), torch.tensor(r))
    p = special.softmax(z[1])
    q = special.softmax(r[1])
    want = np.sum(special.rel_entr(p, q))
    got = out["kl"].numpy()
    assert got[0] == np.inf
    np.testing.assert_allclose(got[1], want, rtol=1e-13)
    assert np.isnan(got[2]) and np.isnan(got[3])
    assert np.isnan(out["lse"][2].item()) and np.isnan(out["entropy"][2].item())
    np.testing.assert_allclose(out["logprob"][1].item(), np.log(p[2]), rtol=1e-13)
    labels[2] = -100
    again = klx.token_stats(torch.tensor(z), torch.tensor(labels), torch.tensor(r))
    assert all(again[k][2].item() == 0 for k in again)


def test_labels_out_of_range_are_nan_where_not_read(backend, launches):
    """Inside the kernel path labels are never read on the host: an out-of-range label
    (the check is skipped here as under a trace) gives NaN, an ignored one 0."""
    import torch

    from klx._accel import triton_token_stats
    from klx._token_stats_math import StatsSpec

    z = torch.tensor(np.random.default_rng(6).normal(size=(3, 37)))
    spec = StatsSpec(("logprob",), 1.0, "logits", -100)
    (got,) = triton_token_stats.values(None, spec, z, torch.tensor([37, -100, 5]), None, None)[0]
    want = special.log_softmax(z.numpy(), axis=-1)[2, 5]
    assert np.isnan(got[0].item())
    assert got[1].item() == 0
    np.testing.assert_allclose(got[2].item(), want, rtol=1e-13)


def _plain_stats(torch, z, labels, ref, keep, t):
    """The four statistics in float64 torch: log_softmax, gather, sums (dropped rows
    zeroed first, so their NaN reaches no gradient)."""
    drop = (~keep | (labels == -100))[:, None]
    z = torch.where(drop, 0.0, z)
    ref = torch.where(drop, 0.0, ref)
    log_p = torch.log_softmax(z / t, -1)
    log_q = torch.log_softmax(ref / t, -1)
    p = log_p.exp()
    safe = torch.where(labels == -100, 0, labels)
    lp = torch.where(p == 0, 0.0, log_p)
    out = [
        log_p.gather(-1, safe[:, None])[:, 0],
        -(p * lp).sum(-1),
        (p * (lp - torch.where(p == 0, 0.0, log_q))).sum(-1),
        torch.logsumexp(z / t, -1),
    ]
    return [torch.where(drop[:, 0], 0.0, v) for v in out]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_through_the_kernel_match_float64_autodiff(backend, launches, temperature):
    import torch

    z, ref, labels, keep = _case(np.random.default_rng(5))
    weights = torch.tensor(np.random.default_rng(7).normal(size=(4, 6)))
    y, k = torch.tensor(labels), torch.tensor(keep)

    def grads(fn):
        a = torch.tensor(z, requires_grad=True)
        b = torch.tensor(ref, requires_grad=True)
        loss = sum((w * v).sum() for w, v in zip(weights, fn(a, b), strict=True))
        loss.backward()
        return a.grad.numpy(), b.grad.numpy()

    def kernel(a, b):
        out = klx.token_stats(a, y, b, where=k, temperature=temperature)
        return [out[n] for n in ("logprob", "entropy", "kl", "lse")]

    got = grads(kernel)
    assert launches == [6]
    want = grads(lambda a, b: _plain_stats(torch, a, y, b, k, temperature))
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)
    assert not got[0][4].any() and not got[1][4].any()  # the dropped NaN row


def test_reference_as_log_probs_keeps_the_torch_path(backend, launches):
    """The kernel takes reference logits only: log-probabilities go the torch way."""
    import torch

    z, other = np.random.default_rng(8).normal(size=(2, 3, 37))
    log_q = special.log_softmax(other, axis=-1)
    out = klx.token_stats(
        torch.tensor(z), reference=torch.tensor(log_q), reference_form="log_probs"
    )
    p = special.softmax(z, axis=-1)
    want = np.sum(special.rel_entr(p, np.exp(log_q)), axis=-1)
    np.testing.assert_allclose(out["kl"].numpy(), want, rtol=1e-12)
    assert launches == []


def test_default_block_with_a_vocabulary_past_it(backend, monkeypatch):
    """The module's own block (2048) with 2100 columns: a whole block and a masked one."""
    import torch

    from klx._accel import triton_token_stats

    cuda_route(backend, monkeypatch)
    assert triton_token_stats.BLOCK_V == 2048
    z = np.random.default_rng(9).normal(scale=3.0, size=(2, 2100))
    r = z + np.random.default_rng(10).normal(scale=0.3, size=z.shape)
    out = klx.token_stats(torch.tensor(z), reference=torch.tensor(r))
    p = special.softmax(z, axis=-1)
    q = special.softmax(r, axis=-1)
    np.testing.assert_allclose(out["lse"].numpy(), special.logsumexp(z, -1), rtol=1e-13)
    np.testing.assert_allclose(out["entropy"].numpy(), special.entr(p).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(out["kl"].numpy(), special.rel_entr(p, q).sum(-1), rtol=1e-12)


def test_fused_linear_token_stats_takes_the_kernel_per_chunk(backend, launches):
    """From hidden states on the CUDA path: each chunk's logits go through the kernel, and
    the values and the hidden states' gradient are the float64 formula's."""
    import torch

    rng = np.random.default_rng(41)
    h, w = rng.normal(size=(7, 5)), rng.normal(size=(37, 5))
    hr, wr = rng.normal(size=(7, 4)), rng.normal(size=(37, 4))
    labels = rng.integers(0, 37, size=7)
    ht = backend.asarray(h).requires_grad_(True)
    out = klx.fused_linear_token_stats(
        ht,
        backend.asarray(w),
        backend.asarray(labels),
        reference_hidden=backend.asarray(hr),
        reference_weight=backend.asarray(wr),
        chunk_size=3,
    )
    assert launches, "the kernel served no chunk"
    z, zr = h @ w.T, hr @ wr.T
    lp, lr = special.log_softmax(z, -1), special.log_softmax(zr, -1)
    want = {
        "logprob": np.take_along_axis(lp, labels[:, None], -1)[:, 0],
        "entropy": -(np.exp(lp) * lp).sum(-1),
        "kl": (np.exp(lp) * (lp - lr)).sum(-1),
        "lse": special.logsumexp(z, -1),
    }
    for name, value in want.items():
        check_array(backend, out[name], ht, "float64", (7,))
        np.testing.assert_allclose(backend.to_numpy(out[name].detach()), value, rtol=1e-11)
    (out["logprob"].sum() + out["entropy"].sum() + out["kl"].sum()).backward()
    hd = torch.tensor(h, requires_grad=True)
    zt = hd @ torch.tensor(w).T
    lpt = torch.log_softmax(zt, -1)
    lrt = torch.log_softmax(torch.tensor(zr), -1)
    ref = (
        lpt.gather(-1, torch.tensor(labels)[:, None]).sum()
        - (lpt.exp() * lpt).sum()
        + (lpt.exp() * (lpt - lrt)).sum()
    )
    ref.backward()
    np.testing.assert_allclose(backend.to_numpy(ht.grad), hd.grad.numpy(), rtol=1e-10, atol=1e-13)
