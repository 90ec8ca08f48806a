"""token_stats and fused_linear_token_stats against float64 NumPy/SciPy and mpmath.

Every value is compared with an independent reference (SciPy's logsumexp, entr and
rel_entr in float64; mpmath at 50 digits for nearly one-hot rows and P near Q), every
gradient with autodiff of a plain float64 formula written here, never klx with itself.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import special

import klx
from support import reference
from support.asserts import check_array

STATS = ("logprob", "entropy", "kl", "lse")
#: Relative tolerance per dtype (of the terms' scale: lse, and the entropy's size).
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-6}


def ref_stats(z, labels, ref, temperature=1.0, ref_form="logits", keep=None, ignore=-100):
    """The four statistics in float64, by SciPy: logits `z` [..., V] (last axis)."""
    z = np.asarray(z, dtype=np.float64)
    s = z / temperature
    lse = special.logsumexp(s, axis=-1)
    with np.errstate(all="ignore"):
        log_p = s - lse[..., None]
        p = np.exp(log_p)
        out = {"lse": lse, "entropy": np.sum(special.entr(p), axis=-1)}
        if labels is not None:
            safe = np.where(labels == ignore, 0, labels)
            out["logprob"] = np.take_along_axis(log_p, safe[..., None], -1)[..., 0]
        if ref is not None:
            if ref_form == "logits":
                q = np.exp(special.log_softmax(np.asarray(ref) / temperature, axis=-1))
            elif ref_form == "log_probs":
                q = np.exp(ref)
            else:
                q = np.asarray(ref)
            out["kl"] = np.sum(special.rel_entr(p, q), axis=-1)
    drop = np.zeros(z.shape[:-1], bool) if keep is None else ~keep
    if labels is not None:
        drop = drop | (labels == ignore)
    return {k: np.where(drop, 0.0, v) for k, v in out.items()}


def case(rng, rows=5, vocab=7):
    """Logits with a -inf entry and a nearly one-hot row, labels with one ignored."""
    z = rng.normal(scale=2.0, size=(rows, vocab))
    z[0, 3] = -np.inf
    z[1] = -30.0
    z[1, 2] = 5.0
    ref = z + rng.normal(scale=0.5, size=z.shape)
    ref[0, 3] = -np.inf  # q = 0 where p = 0 too: a finite KL
    labels = rng.integers(0, vocab, size=rows)
    labels[0] = 1
    labels[-1] = -100
    return z, labels, ref


def close(got, want, tol, scale):
    got = np.asarray(got)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin]) / np.maximum(scale[fin], 1e-300)
    assert np.all(err <= tol), (got, want, err)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("axis", [-1, 0])
def test_token_stats_match_float64_reference(backend, dtype, temperature, axis):
    rng = np.random.default_rng(1)
    z, labels, ref = case(rng)
    keep = np.array([True, True, True, False, True])
    x, r = backend.asarray(z, dtype), backend.asarray(ref, dtype)
    zr, rr = backend.to_numpy(x), backend.to_numpy(r)  # the values klx sees
    if axis == 0:
        x, r = backend.xp.permute_dims(x, (1, 0)), backend.xp.permute_dims(r, (1, 0))
    got = klx.token_stats(
        x,
        backend.asarray(labels),
        r,
        axis=axis,
        temperature=temperature,
        where=backend.asarray(keep),
    )
    assert list(got) == list(STATS)
    want = ref_stats(zr, labels, rr, temperature, keep=keep)
    scale = np.abs(want["lse"]) + np.max(np.abs(np.where(np.isinf(zr), 0, zr)), -1) / temperature
    for name in STATS:
        check_array(backend, got[name], x, dtype, (5,))
        close(backend.to_numpy(got[name]), want[name], 8 * TOL[dtype], scale)
    assert backend.to_numpy(got["logprob"])[4] == 0.0  # the ignored label
    assert np.all(backend.to_numpy(got["entropy"]) >= 0)


@pytest.mark.parametrize("form", ["log_probs", "probs"])
def test_reference_forms_and_exact_zeros(backend, form):
    """A reference with exact zeros: KL is +inf where P > 0 = Q, finite where both are 0."""
    z = np.array([[1.0, 0.0, -np.inf], [2.0, 1.0, 0.5]])
    q = np.array([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    with np.errstate(divide="ignore"):
        ref = np.log(q) if form == "log_probs" else q
    got = klx.token_stats(backend.asarray(z), reference=backend.asarray(ref), reference_form=form)
    want = ref_stats(z, None, ref, ref_form=form)
    kl = backend.to_numpy(got["kl"])
    assert kl[1] == np.inf and np.isfinite(kl[0])
    np.testing.assert_allclose(kl[0], want["kl"][0], rtol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(got["entropy"]), want["entropy"], rtol=1e-14)


def test_one_hot_rows_have_zero_entropy_and_no_nan(backend):
    z = np.array([[0.0, -np.inf, -np.inf], [-np.inf, 3.0, -np.inf]])
    got = klx.token_stats(backend.asarray(z), backend.asarray(np.array([0, 1])), backend.asarray(z))
    for name, want in (("entropy", 0.0), ("logprob", 0.0), ("kl", 0.0)):
        np.testing.assert_array_equal(backend.to_numpy(got[name]), [want, want])
    np.testing.assert_array_equal(backend.to_numpy(got["lse"]), [0.0, 3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_nearly_one_hot_rows_against_mpmath(backend, temperature):
    """The small entropy and log-probabilities of nearly one-hot rows keep every digit (a
    plain log-sum-exp loses the mass beside the maximum), and KL near P = Q is accurate."""
    z = np.array([[0.0, -40.0, -42.0, -45.0], [10.0, -20.0, -25.0, 9.0]])
    zr = z + np.array([[0.0, 1e-6, -1e-6, 0.0], [1e-7, 0.0, 0.0, -1e-7]])
    labels = np.array([0, 3])
    got = klx.token_stats(
        backend.asarray(z), backend.asarray(labels), backend.asarray(zr), temperature=temperature
    )
    import mpmath

    mp_h = reference.mp_entropy_rows(z, "logits", temperature)
    mp_kl = reference.mp_mix_rows(z, zr, 1.0, "logits", temperature)
    with mpmath.workdps(50):
        mp_lp = []
        for row, y in zip(z, labels, strict=True):
            s = [mpmath.mpf(float(a)) / mpmath.mpf(temperature) for a in row]
            i = max(range(len(s)), key=s.__getitem__)  # log1p of the mass beside the
            rest = mpmath.fsum(mpmath.exp(a - s[i]) for j, a in enumerate(s) if j != i)
            mp_lp.append(float(s[y] - s[i] - mpmath.log1p(rest)))  # maximum: e^-160 kept
    np.testing.assert_allclose(backend.to_numpy(got["entropy"]), mp_h, rtol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(got["logprob"]), mp_lp, rtol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(got["kl"]), mp_kl, rtol=1e-6)
    assert np.all(backend.to_numpy(got["kl"]) > 0)


def test_equal_rows_have_exactly_zero_kl(backend):
    z = np.random.default_rng(3).normal(size=(4, 9))
    got = klx.token_stats(backend.asarray(z), reference=backend.asarray(z), stats=["kl"])
    assert list(got) == ["kl"]
    np.testing.assert_array_equal(backend.to_numpy(got["kl"]), np.zeros(4))


def test_half_inputs_give_float32(backend):
    if "float16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float16")
    z = np.random.default_rng(4).normal(size=(3, 6))
    x = backend.asarray(z, "float16")
    got = klx.token_stats(x, backend.asarray(np.array([0, 1, 2])))
    want = ref_stats(backend.to_numpy(x), np.array([0, 1, 2]), None)
    for name in ("logprob", "entropy", "lse"):
        check_array(backend, got[name], x, "float32", (3,))
        np.testing.assert_allclose(backend.to_numpy(got[name]), want[name], rtol=1e-5)


def test_temperature_as_a_0d_array(backend):
    z = np.random.default_rng(5).normal(size=(3, 5))
    t = backend.asarray(np.array(0.5))
    got = klx.token_stats(backend.asarray(z), temperature=t)
    want = ref_stats(z, None, None, 0.5)
    np.testing.assert_allclose(backend.to_numpy(got["lse"]), want["lse"], rtol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(got["entropy"]), want["entropy"], rtol=1e-13)


def test_default_stats_follow_the_inputs(backend):
    x = backend.asarray(np.zeros((2, 3)))
    y = backend.asarray(np.array([0, 1]))
    assert list(klx.token_stats(x)) == ["entropy", "lse"]
    assert list(klx.token_stats(x, y)) == ["logprob", "entropy", "lse"]
    assert list(klx.token_stats(x, reference=x)) == ["entropy", "kl", "lse"]
    assert list(klx.token_stats(x, y, stats="logprob")) == ["logprob"]


def test_token_stats_errors(backend):
    x = backend.asarray(np.zeros((2, 3)))
    y = backend.asarray(np.array([0, 1]))
    with pytest.raises(ValueError, match="'logprob' .* needs `labels`"):
        klx.token_stats(x, stats=["logprob"])
    with pytest.raises(ValueError, match="'kl' .* needs `reference`"):
        klx.token_stats(x, y, stats=("kl",))
    with pytest.raises(ValueError, match="'entropy', 'kl', 'lse'"):
        klx.token_stats(x, stats=["perplexity"])
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        klx.token_stats(x, x[:, 0])
    with pytest.raises(ValueError, match="`labels` has shape"):
        klx.token_stats(x, backend.asarray(np.array([0, 1, 2])))
    with pytest.raises(ValueError, match="`reference` has shape"):
        klx.token_stats(x, reference=x[:1, ...])
    with pytest.raises(ValueError, match="`reference_form`"):
        klx.token_stats(x, reference=x, reference_form="probabilities")
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        klx.token_stats(x, temperature=0.0)
    if backend.name != "dask":  # a lazy graph is not read by a check
        with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
            klx.token_stats(x, backend.asarray(np.array([0, 3])))


# --------------------------------------------------------------------------- gradients


def _plain_stats(xp, z, labels, zr, t):
    """The four statistics by the textbook formulas (float64 autodiff reference)."""
    s = z / t
    m = xp.max(s, axis=-1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(s - m), axis=-1)) + m[:, 0]
    log_p = s - lse[:, None]
    p = xp.exp(log_p)
    log_q = zr / t - xp.max(zr / t, axis=-1, keepdims=True)
    log_q = log_q - xp.log(xp.sum(xp.exp(log_q), axis=-1, keepdims=True))
    onehot = xp.astype(labels[:, None] == xp.arange(z.shape[-1])[None, :], z.dtype)
    return {
        "logprob": xp.sum(onehot * log_p, axis=-1),
        "entropy": -xp.sum(p * log_p, axis=-1),
        "kl": xp.sum(p * (log_p - log_q), axis=-1),
        "lse": lse,
    }


WEIGHTS = {"logprob": 1.0, "entropy": -0.3, "kl": 0.7, "lse": 0.2}


def _grads(backend, fn, *arrays):
    """Gradients of ``fn(*arrays)`` by the backend's autodiff, as float64 NumPy."""
    if backend.name == "torch":
        xs = [backend.asarray(a).requires_grad_(True) for a in arrays]
        fn(*xs).backward()
        return [backend.to_numpy(x.grad) for x in xs]
    import jax

    got = jax.grad(fn, argnums=tuple(range(len(arrays))))(*(backend.asarray(a) for a in arrays))
    return [np.asarray(g) for g in got]


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_gradients_match_float64_autodiff(backend, temperature):
    rng = np.random.default_rng(6)
    z, zr = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    labels = np.array([0, 5, 2, 3])
    y = backend.asarray(labels)
    xp = backend.xp

    def loss(fn):
        return lambda a, b: sum(WEIGHTS[k] * xp.sum(v) for k, v in fn(a, b).items())

    got = _grads(
        backend, loss(lambda a, b: klx.token_stats(a, y, b, temperature=temperature)), z, zr
    )
    want = _grads(backend, loss(lambda a, b: _plain_stats(xp, a, y, b, temperature)), z, zr)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-13)


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
def test_gradients_finite_at_neg_inf_logits_and_zero_on_dropped_nan_rows(backend):
    z = np.array([[0.0, -np.inf, 1.0], [np.nan, 0.0, 0.0], [2.0, -np.inf, -np.inf]])
    keep = backend.asarray(np.array([True, False, True]))
    y = backend.asarray(np.array([2, 0, 0]))
    xp = backend.xp

    def loss(a):
        out = klx.token_stats(a, y, a * 0.5, where=keep)
        return sum(xp.sum(v) for v in out.values())

    (g,) = _grads(backend, loss, z)
    assert np.all(np.isfinite(g)), g
    np.testing.assert_array_equal(g[1], 0.0)
    # a one-hot row: lse = z_0 (gradient 1 there); the other statistics are constant
    np.testing.assert_array_equal(g[2], [1.0, 0.0, 0.0])
    out = klx.token_stats(backend.asarray(z), y, backend.asarray(z * 0.5), where=keep)
    for v in out.values():
        assert backend.to_numpy(v)[1] == 0.0


@pytest.mark.backends("jax", reason="jax.jit, jax.vmap")
def test_jax_jit_and_vmap(backend):
    import jax

    rng = np.random.default_rng(7)
    z, zr = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    labels = rng.integers(0, 5, size=(3, 4))
    want = ref_stats(z, labels, zr, 2.0)
    jit = jax.jit(lambda a, y, b: klx.token_stats(a, y, b, temperature=2.0))
    mapped = jax.vmap(lambda a, y, b: klx.token_stats(a, y, b, temperature=2.0))
    for f in (jit, mapped):
        got = f(backend.asarray(z), backend.asarray(labels), backend.asarray(zr))
        for name in STATS:
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-13, atol=1e-15)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_torch_compile_fullgraph_values_and_gradients(backend):
    import torch

    torch._dynamo.reset()
    rng = np.random.default_rng(8)
    z, zr = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    labels = torch.tensor([0, 5, -100, 3])

    @torch.compile(fullgraph=True)
    def loss(a, b):
        out = klx.token_stats(a, labels, b, temperature=0.8)
        return out["logprob"].sum() - 0.1 * out["entropy"].sum() + out["kl"].sum(), out["lse"]

    a = torch.tensor(z, requires_grad=True)
    value, lse = loss(a, torch.tensor(zr))
    value.backward()
    keep = labels.numpy() != -100
    want = ref_stats(z, labels.numpy(), zr, 0.8)
    np.testing.assert_allclose(lse.detach().numpy(), want["lse"] * keep, rtol=1e-13)
    np.testing.assert_allclose(
        value.item(), (want["logprob"] - 0.1 * want["entropy"] + want["kl"]).sum(), rtol=1e-12
    )
    b = torch.tensor(z, requires_grad=True)
    plain = _plain_stats(backend.xp, b, torch.where(labels < 0, 0, labels), torch.tensor(zr), 0.8)
    kept = torch.tensor(keep, dtype=torch.float64)
    ((plain["logprob"] - 0.1 * plain["entropy"] + plain["kl"]) * kept).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), atol=1e-13)


# --------------------------------------------------------------------------- fused


def fused_case(rng, tokens=(3, 5), hidden=4, vocab=11):
    h = rng.normal(size=(*tokens, hidden))
    w = rng.normal(size=(vocab, hidden))
    b = rng.normal(size=vocab)
    rh = rng.normal(size=(*tokens, hidden + 1))
    rw = rng.normal(size=(vocab, hidden + 1))
    labels = rng.integers(0, vocab, size=tokens)
    labels[0, 0] = -100
    return h, w, b, rh, rw, labels


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_matches_float64_reference(backend, chunk_size):
    rng = np.random.default_rng(9)
    h, w, b, rh, rw, labels = fused_case(rng)
    keep = np.ones((3, 5), bool)
    keep[1, 2] = False
    x = backend.asarray(h, "float32")
    got = klx.fused_linear_token_stats(
        x,
        backend.asarray(w, "float32"),
        backend.asarray(labels),
        bias=backend.asarray(b, "float32"),
        reference_hidden=backend.asarray(rh, "float32"),
        reference_weight=backend.asarray(rw, "float32"),
        temperature=1.3,
        where=backend.asarray(keep),
        chunk_size=chunk_size,
    )
    f32 = [np.asarray(a, np.float32).astype(np.float64) for a in (h, w, b, rh, rw)]
    z = f32[0] @ f32[1].T + f32[2]
    want = ref_stats(z, labels, f32[3] @ f32[4].T, 1.3, keep=keep)
    assert list(got) == list(STATS)
    for name in STATS:
        check_array(backend, got[name], x, "float32", (3, 5))
        scale = np.abs(want["lse"]) + np.max(np.abs(z), -1) / 1.3
        close(backend.to_numpy(got[name]), want[name], 1e-5, scale)


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_fused_gradients_match_float64_autodiff(backend, chunk_size):
    rng = np.random.default_rng(10)
    h, w, b, rh, rw, labels = fused_case(rng)
    keep = np.ones((3, 5), bool)
    keep[2, 4] = False
    h[2, 4] = np.nan  # a dropped token's NaN reaches nothing
    y, k = backend.asarray(labels), backend.asarray(keep)
    rh_x, rw_x = backend.asarray(rh), backend.asarray(rw)
    xp = backend.xp

    def fused(h_, w_, b_):
        out = klx.fused_linear_token_stats(
            h_,
            w_,
            y,
            bias=b_,
            reference_hidden=rh_x,
            reference_weight=rw_x,
            temperature=0.9,
            where=k,
            chunk_size=chunk_size,
        )
        return sum(WEIGHTS[n] * xp.sum(v) for n, v in out.items())

    def plain(h_, w_, b_):
        hh = xp.reshape(xp.where(k[..., None], h_, 0.0), (15, 4))
        z = hh @ w_.T + b_
        zr = xp.reshape(rh_x, (15, 5)) @ rw_x.T
        flat_y = xp.reshape(xp.where(y < 0, 0, y), (15,))
        kept = xp.astype(xp.reshape(k & (y != -100), (15,)), z.dtype)
        out = _plain_stats(xp, z, flat_y, zr, 0.9)
        return sum(WEIGHTS[n] * xp.sum(v * kept) for n, v in out.items())

    got = _grads(backend, fused, h, w, b)
    want = _grads(backend, plain, h, w, b)
    for g, wnt in zip(got, want, strict=True):
        np.testing.assert_allclose(g, wnt, atol=1e-12)
    assert np.all(got[0][2, 4] == 0.0)


@pytest.mark.backends("jax", reason="jax.jit, jax.vmap")
def test_fused_under_jax_jit_and_vmap(backend):
    import jax

    rng = np.random.default_rng(11)
    h, w, *_, labels = fused_case(rng)
    want = ref_stats(h @ w.T, labels, None)

    def f(h_, y_):
        return klx.fused_linear_token_stats(h_, backend.asarray(w), y_, chunk_size=2)

    jitted = jax.jit(f)(backend.asarray(h), backend.asarray(labels))
    mapped = jax.vmap(f)(backend.asarray(h), backend.asarray(labels))
    for got in (jitted, mapped):
        for name in ("logprob", "entropy", "lse"):
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-12, atol=1e-15)


def test_fused_errors(backend):
    h, w = backend.asarray(np.zeros((2, 3))), backend.asarray(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="`hidden` has shape"):
        klx.fused_linear_token_stats(h, backend.asarray(np.zeros((5, 4))))
    with pytest.raises(ValueError, match="'kl' .* needs `reference`"):
        klx.fused_linear_token_stats(h, w, stats=["kl"])
    with pytest.raises(ValueError, match="without `reference_hidden`"):
        klx.fused_linear_token_stats(h, w, reference_weight=w)
    with pytest.raises(ValueError, match="reference's logits of shape"):
        klx.fused_linear_token_stats(h, w, reference_hidden=h)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        klx.fused_linear_token_stats(h, w, chunk_size=0)


@pytest.mark.backends("numpy", reason="tracemalloc sees NumPy's allocations")
def test_trl_4013_fused_entropy_memory_stays_far_below_the_logits(backend):
    """TRL #4013: the entropy of every token spiked memory from 0.23 GB to 80 GB, as the
    [tokens, vocab] logits and their softmax were formed whole. From hidden states the
    peak is one chunk's temporaries plus the per-token results, whatever the tokens."""
    rng = np.random.default_rng(12)
    tokens, hidden, vocab = 8192, 32, 8000
    h = rng.normal(size=(tokens, hidden)).astype(np.float32)
    w = (rng.normal(size=(vocab, hidden)) / hidden**0.5).astype(np.float32)
    y = rng.integers(0, vocab, size=tokens)
    logits_bytes = tokens * vocab * 4  # 262 MB
    tracemalloc.start()
    try:
        out = klx.fused_linear_token_stats(h, w, y, chunk_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < logits_bytes / 10, (peak, logits_bytes)
    sample = slice(0, 256)  # the float64 reference of a slice (the whole would be 262 MB)
    want = ref_stats(h[sample].astype(np.float64) @ w.T.astype(np.float64), y[sample], None)
    for name in ("logprob", "entropy", "lse"):
        np.testing.assert_allclose(out[name][sample], want[name], rtol=2e-5)


# --------------------------------------------------------------------------- fast paths
# The eager NumPy / torch CPU passes (klx._accel.token_stats_eager), the closed-form
# gradient (torch autograd Function, JAX custom_jvp): against the same float64 references.


def _plain_stats_forms(xp, z, labels, ref, t, form):
    """`_plain_stats` with the reference in `form` (its log-probabilities as given)."""
    out = _plain_stats(xp, z, labels, z, t)  # (its KL replaced below)
    s = z / t
    log_p = s - xp.max(s, axis=-1, keepdims=True)
    log_p = log_p - xp.log(xp.sum(xp.exp(log_p), axis=-1, keepdims=True))
    if form == "logits":
        log_q = ref / t - xp.max(ref / t, axis=-1, keepdims=True)
        log_q = log_q - xp.log(xp.sum(xp.exp(log_q), axis=-1, keepdims=True))
    else:
        log_q = ref if form == "log_probs" else xp.log(ref)
    out["kl"] = xp.sum(xp.exp(log_p) * (log_p - log_q), axis=-1)
    return out


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
@pytest.mark.parametrize("form", ["logits", "log_probs", "probs"])
def test_closed_form_gradients_near_one_hot_rows_every_reference_form(backend, form):
    """The closed-form backward (torch Function / JAX custom_jvp) against autodiff of the
    textbook formulas in float64, on nearly one-hot rows (a mass of e^-40 beside the
    maximum), a flat row and tied maxima; the reference's gradient in each form."""
    z = np.array(
        [[0.0, -40.0, -42.0, -45.0, -38.0], [1.0, 0.5, 0.0, -0.5, 0.2], [3.0, 3.0, 0.0, -1.0, 2.0]]
    )
    zr = z + np.array([[0.0, 1e-3, 0.5, -0.2, 0.0], [0.1, 0.0, -0.1, 0.0, 0.3], [0, 0, 1, 0, 0]])
    ref = {"logits": zr, "log_probs": special.log_softmax(zr, -1), "probs": special.softmax(zr, -1)}
    y = backend.asarray(np.array([0, 3, 1]))
    xp = backend.xp
    t = 0.8 if form == "logits" else 1.0

    def loss(fn):
        return lambda a, b: sum(WEIGHTS[k] * xp.sum(v) for k, v in fn(a, b).items())

    got = _grads(
        backend,
        loss(lambda a, b: klx.token_stats(a, y, b, temperature=t, reference_form=form)),
        z,
        ref[form],
    )
    want = _grads(
        backend, loss(lambda a, b: _plain_stats_forms(xp, a, y, b, t, form)), z, ref[form]
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
def test_closed_form_gradients_at_neg_inf_logits_match_finite_stand_ins(backend):
    """-inf logits (on both sides, or on the policy's alone): the closed form's gradient
    is finite, 0 at those entries, and elsewhere that of the same rows with the -inf
    entries left out (float64 autodiff of the textbook formulas on the shorter rows)."""
    z = np.array([[0.0, -np.inf, 1.0, -2.0], [2.0, 0.5, -np.inf, -1.0]])
    zr = np.array([[0.5, -np.inf, 0.0, -1.0], [1.0, 0.0, 3.0, -1.0]])
    y = np.array([2, 0])
    xp = backend.xp

    def loss(fn, y_):
        return lambda a, b: sum(WEIGHTS[k] * xp.sum(v) for k, v in fn(a, b, y_).items())

    got = _grads(
        backend, loss(lambda a, b, y_: klx.token_stats(a, y_, b), backend.asarray(y)), z, zr
    )
    assert np.all(np.isfinite(got[0])) and np.all(np.isfinite(got[1]))
    assert got[0][0, 1] == 0.0 and got[0][1, 2] == 0.0
    for row, cols in ((0, [0, 2, 3]), (1, [0, 1, 3])):
        # row 1: P is 0 where Q is not; the reference keeps that entry (its softmax does)
        keep_r = cols if row == 0 else [0, 1, 2, 3]
        zz = z[row : row + 1, cols]
        rr = zr[row : row + 1, keep_r]
        if row == 1:  # P over the 4 entries with p = 0 at 2: pad P's logits with -1e3
            zz = np.array([[2.0, 0.5, -1e3, -1.0]])
        yy = backend.asarray(np.array([cols.index(y[row]) if row == 0 else y[row]]))
        want = _grads(backend, loss(lambda a, b, y_: _plain_stats(xp, a, y_, b, 1.0), yy), zz, rr)
        np.testing.assert_allclose(
            got[0][row, cols], want[0][0, [0, 1, 2] if row == 0 else cols], atol=1e-12
        )
        np.testing.assert_allclose(got[1][row, keep_r], want[1][0], atol=1e-12)


@pytest.mark.backends("numpy", "torch", reason="the eager CPU passes")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eager_passes_match_float64_at_a_large_vocabulary(backend, dtype):
    """The in-place passes at a realistic vocabulary (8000) against SciPy in float64,
    with a temperature, dropped rows holding NaN and an ignored label."""
    rng = np.random.default_rng(13)
    z = rng.normal(scale=3.0, size=(6, 8000))
    ref = z + rng.normal(scale=0.2, size=z.shape)
    z[2] = np.nan
    labels = rng.integers(0, 8000, size=6)
    labels[4] = -100
    keep = np.array([True, True, False, True, True, True])
    x, r = backend.asarray(z, dtype), backend.asarray(ref, dtype)
    got = klx.token_stats(
        x, backend.asarray(labels), r, temperature=0.7, where=backend.asarray(keep)
    )
    zr_, rr_ = backend.to_numpy(x), backend.to_numpy(r)
    want = ref_stats(zr_, labels, rr_, 0.7, keep=keep)
    scale = np.abs(want["lse"]) + np.nan_to_num(np.max(np.abs(zr_), -1)) / 0.7
    for name in STATS:
        check_array(backend, got[name], x, dtype, (6,))
        close(backend.to_numpy(got[name]), want[name], 50 * TOL[dtype], scale)
    np.testing.assert_array_equal(backend.to_numpy(got["kl"])[[2, 4]], 0.0)


@pytest.mark.parametrize("case", ["both -inf", "q zero", "p far below q", "nan reference"])
def test_rows_the_fast_passes_leave_to_the_definition(backend, case):
    """KL rows the bare formula cannot take (0 * inf where both sides are -inf, +inf where
    Q is 0 under P > 0, expm1 overflow where P is e^-800 of Q, NaN): taken again by the
    definition, against SciPy's rel_entr in float64; the other rows untouched."""
    z = np.array([[0.0, 1.0, -1.0, 0.5], [1.0, 0.0, 0.0, 2.0]])
    ref = z.copy()
    ref[1] += np.array([0.1, 0.0, -0.2, 0.0])
    if case == "both -inf":
        z[0, 2] = ref[0, 2] = -np.inf
    elif case == "q zero":
        ref[0, 2] = -np.inf
    elif case == "p far below q":
        z[0, 2] = -800.0  # expm1(805) overflows float64 too
        ref[0, 2] = 5.0
    else:
        ref[0, 1] = np.nan
    got = klx.token_stats(backend.asarray(z), reference=backend.asarray(ref))
    want = ref_stats(z, None, ref)
    kl = backend.to_numpy(got["kl"])
    np.testing.assert_allclose(kl, want["kl"], rtol=1e-13, atol=1e-300)
    np.testing.assert_array_equal(np.isnan(kl), np.isnan(want["kl"]))


@pytest.mark.backends("jax", reason="jax.jit")
def test_labels_closed_over_by_jax_jit_are_not_read(backend):
    """Concrete labels captured by a jitted function: their range check is staged with
    the trace, not read (it raised ConcretizationTypeError)."""
    import jax

    rng = np.random.default_rng(14)
    z, labels = rng.normal(size=(3, 5)), backend.asarray(np.array([0, 4, 2]))
    got = jax.jit(lambda a: klx.token_stats(a, labels)["logprob"])(backend.asarray(z))
    want = ref_stats(z, np.array([0, 4, 2]), None)["logprob"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


@pytest.mark.backends("torch", "jax", reason="higher derivatives need autodiff")
def test_forward_mode_and_second_derivatives_through_the_closed_form(backend):
    """JAX: forward mode (jax.jacfwd) through the custom_jvp; torch: a second derivative
    (create_graph=True) through the autograd Function: both against autodiff of the
    textbook formulas in float64."""
    rng = np.random.default_rng(15)
    z, zr = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    y = backend.asarray(np.array([1, 4]))
    xp = backend.xp

    def loss(fn):
        return lambda a, b: sum(WEIGHTS[k] * xp.sum(v) for k, v in fn(a, b).items())

    mine = loss(lambda a, b: klx.token_stats(a, y, b, temperature=1.3))
    plain = loss(lambda a, b: _plain_stats(xp, a, y, b, 1.3))
    if backend.name == "jax":
        import jax

        for fn_a, fn_b in (
            (jax.jacfwd(mine), jax.jacrev(plain)),
            (jax.hessian(mine), jax.hessian(plain)),
        ):
            got = fn_a(backend.asarray(z), backend.asarray(zr))
            want = fn_b(backend.asarray(z), backend.asarray(zr))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)
        return
    import torch

    def grad_norm(fn):
        a = torch.tensor(z, requires_grad=True)
        (g,) = torch.autograd.grad(fn(a, torch.tensor(zr)), a, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), a)
        return g.detach().numpy(), gg.numpy()

    for got, want in zip(grad_norm(mine), grad_norm(plain), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_kl_is_never_negative_near_equal_rows(backend):
    """A reference within 1e-3 of the policy (float32 and float64): every per-token KL is
    >= 0 and within rounding of the float64 reference value (the docs' "never negative")."""
    import mpmath

    rng = np.random.default_rng(77)
    z = rng.normal(scale=3.0, size=(16, 50))
    r = z + 1e-3 * rng.normal(size=z.shape)

    def mp_kl(a, b):  # 40 digits: float64 sums of p log(p / q) cancel here
        with mpmath.workdps(40):
            la = [mpmath.mpf(float(x)) for x in a]
            lb = [mpmath.mpf(float(x)) for x in b]
            za, zb = mpmath.fsum(mpmath.exp(x) for x in la), mpmath.fsum(mpmath.exp(x) for x in lb)
            return float(
                mpmath.fsum(
                    mpmath.exp(x) / za * (x - mpmath.log(za) - y + mpmath.log(zb))
                    for x, y in zip(la, lb, strict=True)
                )
            )

    want = np.array([mp_kl(a, b) for a, b in zip(z, r, strict=True)])
    for dtype in ("float32", "float64"):
        if dtype not in backend.dtypes:
            continue
        got = klx.token_stats(
            backend.asarray(z, dtype), reference=backend.asarray(r, dtype), stats="kl"
        )["kl"]
        got = np.asarray(backend.to_numpy(got), dtype=np.float64)
        assert np.all(got >= 0)
        np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == "float32" else 1e-9)
