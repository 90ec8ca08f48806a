"""Numerical truth and robustness (issue 10): exactness, accuracy against mpmath and
float64 references, and the out-of-domain rules.

Each rule tested here is stated in docs/numerics.md and in the README's conventions. The
inputs refused with a message are tested in test_errors.py, validation's messages in
test_validation.py, the validation switch and ``KLX_NUM_THREADS`` in test_config.py.
"""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
from scipy import special, stats

import klx
from support import reference
from support.asserts import check_array
from support.cases import top_k_case
from support.reference import k_values, sparse_rows

FORMS = ("probs", "log_probs", "logits")
TORCH = "torch's own API (autograd, torch.compile, torch.func, its dtypes and devices)"
NUMPY = "NumPy's own kinds of input, and SciPy's recipe on NumPy arrays"


def _given(p: np.ndarray, form: str) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return p if form == "probs" else np.log(p) + (3.0 if form == "logits" else 0.0)


def _mp_kl(log_p, log_q) -> float:
    """KL from float64 log-probabilities, in 50-digit arithmetic."""
    mpmath.mp.dps = 50
    return float(
        sum(
            mpmath.exp(mpmath.mpf(float(a))) * (mpmath.mpf(float(a)) - mpmath.mpf(float(b)))
            for a, b in zip(log_p, log_q, strict=True)
        )
    )


def _mp_log_softmax(x) -> list:
    mpmath.mp.dps = 50
    xs = [mpmath.mpf(float(v)) for v in x]
    lse = mpmath.log(sum(mpmath.exp(v) for v in xs))
    return [v - lse for v in xs]


# ------------------------------------------------------------------ 1. JS(P, P) = 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("form", FORMS)
def test_js_of_identical_inputs_is_exactly_zero(backend, form, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(10), size=300)
    p[:5, 3] = 0.0  # zeros (a -inf log-probability) included
    p = np.vstack([p, [[0.1, 0.2, 0.7] + [0.0] * 7]])
    x = backend.asarray(_given(p, form), dtype)
    for beta in (0.5, 0.1, 0.9):
        js = backend.to_numpy(klx.js_divergence(x, x, p_form=form, q_form=form, beta=beta))
        assert np.all(js == 0.0), f"JS(P, P) must be exactly 0; worst {js.min():.3g}"
    # so the square root (SciPy's jensenshannon) is 0, never NaN
    assert not np.isnan(np.sqrt(js)).any()


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_js_is_never_negative_for_nearly_equal_inputs(backend, beta):
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(10), size=500)
    q = p * (1 + 1e-9 * rng.standard_normal(p.shape))
    q /= q.sum(-1, keepdims=True)
    for form in FORMS:
        got = backend.to_numpy(
            klx.js_divergence(
                backend.asarray(_given(p, form)),
                backend.asarray(_given(q, form)),
                p_form=form,
                q_form=form,
                beta=beta,
            )
        )
        assert np.all(got >= 0), f"{form}: {np.sum(got < 0)} negative rows"


# ------------------------------------------------------------------ 2. near-equal P, Q

#: SciPy's gh-20710 cases: terms of nearly equal arguments, and arguments far apart.
_NEAR = [
    (0.9456657713430001, 0.9456657713430094),
    (0.48066098564791515, 0.48066098564794774),
    (0.786048657854401, 0.7860486578542367),
    (0.5, 0.5000000000000001),
    (1e-200, 1e200),
    (4.0, 2.23e-308),
]


def test_rel_entr_accuracy_of_nearly_equal_terms_matches_scipy(backend):
    """SciPy's gh-20710 tests: relative error 1e-13 against mpmath (x log(x / y))."""
    x = np.array([a for a, _ in _NEAR])
    y = np.array([b for _, b in _NEAR])
    mpmath.mp.dps = 40
    want = [float(mpmath.mpf(a) * mpmath.log(mpmath.mpf(a) / mpmath.mpf(b))) for a, b in _NEAR]
    # one term per distribution: distributions of length 1
    got = klx.kl_divergence(backend.asarray(x[:, None]), backend.asarray(y[:, None]))
    got = backend.to_numpy(got)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    np.testing.assert_allclose(special.rel_entr(x, y), want, rtol=1e-13, atol=0)  # SciPy too


def test_js_of_nearly_equal_probabilities_is_accurate(backend):
    p = np.array([[0.9456657713430001, 1 - 0.9456657713430001]])
    q = np.array([[0.9456657713430094, 1 - 0.9456657713430094]])
    mpmath.mp.dps = 50
    want = 0.0
    for a, b in zip(p[0], q[0], strict=True):
        a, b = mpmath.mpf(a), mpmath.mpf(b)
        m = (a + b) / 2
        want += a / 2 * mpmath.log(a / m) + b / 2 * mpmath.log(b / m)
    got = backend.to_numpy(klx.js_divergence(backend.asarray(p), backend.asarray(q)))
    assert got[0] >= 0
    # a second-order quantity: cancellation leaves about eps / |r| = 1e-3 relative
    np.testing.assert_allclose(got[0], float(want), rtol=1e-2)


# ------------------------------------------------------------------ 3. near-one-hot logits


def _kl_of_logits(backend, a, b, dtype):
    got = klx.kl_divergence(
        backend.asarray(a, dtype), backend.asarray(b, dtype), p_form="logits", q_form="logits"
    )
    return backend.to_numpy(got)


@pytest.mark.parametrize(
    ("a", "b", "dtype", "rtol"),
    [
        ([20.0, 0, 0, 0], [19.0, 0, 0, 0], "float32", 1e-5),
        ([15.0] + [0.0] * 99, [16.0] + [0.0] * 99, "float32", 1e-5),
        ([15.0] + [0.0] * 99, [16.0] + [0.0] * 99, "float64", 1e-12),
        ([40.0, 1.0, 0.5], [40.0, 1.5, 0.5], "float64", 1e-12),
    ],
)
def test_near_one_hot_logits(backend, a, b, dtype, rtol):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    a32 = np.asarray(np.asarray(a, dtype=dtype), dtype=np.float64)
    b32 = np.asarray(np.asarray(b, dtype=dtype), dtype=np.float64)
    want = _mp_kl(_mp_log_softmax(a32), _mp_log_softmax(b32))
    got = _kl_of_logits(backend, a32, b32, dtype)
    assert got >= 0, "KL >= 0"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_kl_from_logits_is_never_negative(backend):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 8)) * 5
    a[:, 0] += 25  # nearly one-hot
    b = a + 1e-7 * rng.standard_normal(a.shape)
    for dtype in ("float32", "float64"):
        got = _kl_of_logits(backend, a, b, dtype)
        assert np.all(got >= 0), f"{dtype}: {np.sum(got < 0)} negative"


# ------------------------------------------------------------------ 4. temperature


@pytest.mark.backends("jax", reason="JAX transforms (jax.jit, jax.grad, vmap)")
def test_tiny_temperature_under_jit_matches_eager_and_reference(backend):
    import jax

    rng = np.random.default_rng(5)
    t = rng.uniform(-1e4, 1e4, size=(64, 16)).astype(np.float32)
    s = rng.uniform(-1e4, 1e4, size=(64, 16)).astype(np.float32)
    s[::2] = t[::2] + rng.uniform(-1, 1, size=(32, 16)).astype(np.float32) * 1e-3

    def f(a, b):
        return klx.kl_divergence(a, b, p_form="logits", q_form="logits", temperature=1e-6)

    ta, sa = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    jitted = np.asarray(jax.jit(f)(ta, sa), dtype=np.float64)
    eager = np.asarray(f(ta, sa), dtype=np.float64)
    lp = reference.log_softmax(t.astype(np.float64), -1, 1e-6)
    lq = reference.log_softmax(s.astype(np.float64), -1, 1e-6)
    want, scale = reference.kl_rows_log(np.exp(lp), lq, -1)
    assert reference.rel_error(jitted, want, scale + 1.0) <= 2e-6
    assert reference.rel_error(eager, want, scale + 1.0) <= 2e-6


@pytest.mark.backends("jax", reason="JAX transforms (jax.jit, jax.grad, vmap)")
def test_traced_temperature_under_jit_and_grad(backend):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(6)
    t, s = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))

    def loss(temp):
        return klx.kl_divergence(
            jnp.asarray(t),
            jnp.asarray(s),
            p_form="logits",
            q_form="logits",
            temperature=temp,
            reduction="sum",
        )

    def ref(temp):
        lp, lq = reference.log_softmax(t, -1, temp), reference.log_softmax(s, -1, temp)
        return reference.kl_rows_log(np.exp(lp), lq, -1)[0].sum()

    got = float(jax.jit(loss)(jnp.asarray(2.0)))
    np.testing.assert_allclose(got, ref(2.0), rtol=1e-12)
    grad = float(jax.jit(jax.grad(loss))(2.0))
    h = 1e-5
    np.testing.assert_allclose(grad, (ref(2.0 + h) - ref(2.0 - h)) / (2 * h), rtol=1e-6)
    # annealed inside a jitted loop
    temps = jnp.linspace(1.0, 3.0, 4)
    annealed = np.asarray(jax.jit(jax.vmap(loss))(temps))
    np.testing.assert_allclose(annealed, [ref(float(v)) for v in temps], rtol=1e-12)


@pytest.mark.backends("torch", reason=TORCH)
def test_learned_temperature_tensor_gets_a_gradient(backend):
    import torch

    rng = np.random.default_rng(7)
    t, s = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    temp = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = klx.kl_divergence(
        torch.from_numpy(t),
        torch.from_numpy(s),
        p_form="logits",
        q_form="logits",
        temperature=temp,
        reduction="sum",
    )
    out.backward()

    def ref(v):
        lp, lq = reference.log_softmax(t, -1, v), reference.log_softmax(s, -1, v)
        return reference.kl_rows_log(np.exp(lp), lq, -1)[0].sum()

    np.testing.assert_allclose(out.item(), ref(2.0), rtol=1e-12)
    np.testing.assert_allclose(temp.grad.item(), (ref(2 + 1e-5) - ref(2 - 1e-5)) / 2e-5, rtol=1e-6)


# ------------------------------------------------------------------ 5. second-order gradients


@pytest.mark.backends("torch", reason=TORCH)
def test_js_second_order_gradients_are_finite_at_zero_probabilities(backend):
    import torch

    p = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64, requires_grad=True)
    (grad_p,) = torch.autograd.grad(klx.js_divergence(p, q), p, create_graph=True)
    (h,) = torch.autograd.grad(grad_p.sum(), q)
    # d JS / d p_i = log(2 p_i / (p_i + q_i)) / 2 (0 where p_i = 0, klx's convention), so
    # d^2 / dp_i dq_i = -1 / (2 (p_i + q_i)), and 0 at p_i = 0.
    np.testing.assert_allclose(h.numpy(), [-1 / 1.5, 0.0, -0.5], rtol=1e-13)


@pytest.mark.backends("torch", reason=TORCH)
@pytest.mark.parametrize("form", ["probs", "logits"])
def test_js_hessian_finite_with_zeros_and_neginf_logits(backend, form):
    import torch

    p = np.array([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.6, 0.4]])
    q = np.array([[0.25, 0.25, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    a = torch.from_numpy(_given(p, form))
    b = torch.from_numpy(_given(q, form))

    def f(x, y):
        return klx.js_divergence(x, y, p_form=form, q_form=form, reduction="sum", beta=0.3)

    hess = torch.autograd.functional.hessian(f, (a, b))
    for row in hess:
        for block in row:
            assert torch.isfinite(block).all(), "every second derivative is finite"


# ------------------------------------------------------------------ 6. Liger's JSD


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_float32_js_matches_liger_reference_within_1e_6(backend, beta):
    """Liger Kernel's JSD test: log-probabilities of shape (2, 16, 3200) in float32."""
    rng = np.random.default_rng(8)
    lp = special.log_softmax(rng.standard_normal((2, 16, 3200)), axis=-1).astype(np.float32)
    lq = special.log_softmax(rng.standard_normal((2, 16, 3200)), axis=-1).astype(np.float32)
    # float64 reference on the very float32 values
    p, q = np.exp(lp.astype(np.float64)), np.exp(lq.astype(np.float64))
    log_m = np.log(beta * p + (1 - beta) * q)
    want = np.sum(beta * p * (lp - log_m) + (1 - beta) * q * (lq - log_m))
    got = klx.js_divergence(
        backend.asarray(lp, "float32"),
        backend.asarray(lq, "float32"),
        p_form="log_probs",
        q_form="log_probs",
        beta=beta,
        reduction="sum",
    )
    assert abs(backend.to_numpy(got) - want) / want <= 1e-6


# ------------------------------------------------------------------ 7. outside the domain


def test_negative_probability_gives_inf_as_rel_entr(backend):
    p = np.array([[1.5, -0.5], [0.5, 0.5], [0.0, 1.0]])
    q = np.array([[0.5, 0.5], [1.5, -0.5], [-0.5, 1.5]])
    want = special.rel_entr(p, q).sum(-1)
    assert np.all(want == np.inf)
    kl = backend.to_numpy(klx.kl_divergence(backend.asarray(p), backend.asarray(q)))
    assert np.all(kl == np.inf)
    js = backend.to_numpy(klx.js_divergence(backend.asarray(p), backend.asarray(q)))
    assert np.all(js == np.inf)
    # kl_div's target (probabilities) follows the same rule; torch's own gives NaN
    terms = klx.kl_div(
        backend.asarray(np.log([[0.5, 0.5]])), backend.asarray([[1.5, -0.5]]), reduction="none"
    )
    assert backend.to_numpy(terms)[0, 1] == np.inf


def test_underflowing_log_probability_against_zero_is_inf(backend):
    """log p = -150 is p > 0 (not representable in float32): against q = 0 it is +inf."""
    lp = np.array([[0.0, -150.0]])
    lq = np.array([[0.0, -np.inf]])
    for dtype in ("float32", "float64"):
        got = klx.kl_divergence(
            backend.asarray(lp, dtype),
            backend.asarray(lq, dtype),
            p_form="log_probs",
            q_form="log_probs",
        )
        assert backend.to_numpy(got)[0] == np.inf
        terms = klx.kl_div(
            backend.asarray(lq, dtype), backend.asarray(lp, dtype), log_target=True, reduction="sum"
        )
        assert backend.to_numpy(terms) == np.inf


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_nan_on_the_zero_weighted_side_propagates(backend, beta):
    p = np.array([[0.5, np.nan], [0.5, 0.5]])
    q = np.array([[0.5, 0.5], [0.5, 0.5]])
    for a, b in ((p, q), (q, p)):
        got = backend.to_numpy(klx.js_divergence(backend.asarray(a), backend.asarray(b), beta=beta))
        assert np.isnan(got[0]) and got[1] == 0.0


# ------------------------------------------------------------------ 8. subnormals


def test_subnormal_probabilities(backend):
    """float32 q = 1e-40 is subnormal: XLA on the CPU flushes it to 0 (a platform limit,
    docs/numerics.md), and the KL is then +inf; elsewhere it is exact."""
    p = backend.asarray([0.5, 0.5], "float32")
    q = backend.asarray([1.0, 1e-40], "float32")
    got = float(backend.to_numpy(klx.kl_divergence(p, q)))
    qv = np.asarray([1.0, 1e-40], dtype=np.float32).astype(np.float64)
    want = special.rel_entr([0.5, 0.5], qv).sum()
    if backend.name == "jax":
        flushes = bool(backend.xp.log(backend.asarray([1e-40], "float32"))[0] == -np.inf)
        if flushes:
            assert got == np.inf
            return
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------ 9. scipy.stats.entropy


@pytest.mark.backends("numpy", reason=NUMPY)
@pytest.mark.parametrize(("ps", "qs"), [((3,), (2, 1)), ((2, 3), (3,)), ((4, 1), (1, 5))])
def test_readme_recipe_for_scipy_stats_entropy_broadcasts_first(backend, ps, qs):
    rng = np.random.default_rng(9)
    p, q = rng.uniform(0.1, 2, size=ps), rng.uniform(0.1, 2, size=qs)
    want = stats.entropy(p, q, axis=-1)
    # the README's row: broadcast first, then normalise
    p2, q2 = np.broadcast_arrays(p, q)
    a = -1
    got = klx.kl_divergence(p2 / p2.sum(a, keepdims=True), q2 / q2.sum(a, keepdims=True), axis=a)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------------------------ 11. Dask unknown sizes


@pytest.mark.backends("dask", reason="Dask arrays of unknown chunk sizes")
def test_dask_unknown_chunk_sizes(backend):
    import dask.array as da

    rng = np.random.default_rng(10)
    p = rng.dirichlet(np.ones(13), size=10)
    q = rng.dirichlet(np.ones(13), size=10)
    keep = p[:, 0] > 0.05
    pd, qd = da.from_array(p, chunks=(4, 13)), da.from_array(q, chunks=(4, 13))
    mask = da.from_array(keep, chunks=4)
    pu, qu = pd[mask], qd[mask]
    assert math.isnan(pu.shape[0])
    rows, _ = reference.kl_rows(p[keep], q[keep], -1)
    got = klx.kl_divergence(pu, qu, reduction="batchmean")
    np.testing.assert_allclose(got.compute(), rows.mean(), rtol=1e-12)
    ref, _ = reference.kl_div(np.log(q[keep]), p[keep], "mean", log_target=False)
    with pytest.warns(klx.KLDivMeanWarning):
        mean = klx.kl_div(da.log(qu), pu)
    np.testing.assert_allclose(mean.compute(), ref, rtol=1e-12)
    bm, _ = reference.kl_div(np.log(q[keep]), p[keep], "batchmean", log_target=False)
    np.testing.assert_allclose(
        klx.kl_div(da.log(qu), pu, reduction="batchmean").compute(), bm, rtol=1e-12
    )
    # against a (1, 13) row: broadcast lazily
    one = da.from_array(q[:1], chunks=(1, 13))
    want, _ = reference.kl_rows(p[keep], q[:1], -1)
    np.testing.assert_allclose(klx.kl_divergence(pu, one).compute(), want, rtol=1e-12)
    # against a known size other than 1: an error now, not at compute()
    with pytest.raises(ValueError, match=r"4 along axis -1: the two vocabularies differ"):
        klx.kl_divergence(pu, da.ones((1, 4)) / 4)
    with pytest.raises(ValueError, match=r"not known yet.*compute_chunk_sizes"):
        klx.kl_divergence(pu, da.from_array(q[:3], chunks=(3, 13)))
    # unknown along the distribution axis
    with pytest.raises(ValueError, match="size of the distributions"):
        klx.kl_divergence(pu, qu, axis=0)


@pytest.mark.backends("dask", reason="Dask arrays of unknown chunk sizes")
def test_dask_unknown_chunk_sizes_exact_log_softmax(backend):
    """The exact log-softmax (cross-entropy and entropy from logits, a one-sided KL) and
    the entropy of log-probabilities on rows of unknown count: array-api-compat's Dask
    ``clip`` refuses a NaN in the shape, which klx's floors do not use there."""
    import dask.array as da
    from scipy.special import log_softmax

    rng = np.random.default_rng(14)
    t, s = rng.normal(size=(10, 7)), rng.normal(size=(10, 7))
    keep = t[:, 0] > -0.5
    mask = da.from_array(keep, chunks=4)
    tu, su = da.from_array(t, chunks=(4, 7))[mask], da.from_array(s, chunks=(4, 7))[mask]
    assert math.isnan(tu.shape[0])
    lp, lq = log_softmax(t[keep], -1), log_softmax(s[keep], -1)
    p = np.exp(lp)
    ce = klx.cross_entropy(tu, su, p_form="logits", q_form="logits")
    np.testing.assert_allclose(ce.compute(), -(p * lq).sum(-1), rtol=1e-12)
    ent = klx.entropy(da.log(da.exp(tu) / da.exp(tu).sum(-1, keepdims=True)), form="log_probs")
    np.testing.assert_allclose(ent.compute(), -(p * lp).sum(-1), rtol=1e-12)
    kl = klx.kl_divergence(da.exp(tu) / da.exp(tu).sum(-1, keepdims=True), su, q_form="logits")
    np.testing.assert_allclose(kl.compute(), (p * (lp - lq)).sum(-1), rtol=1e-12)


# ------------------------------------------------------------------ 12. torch.compile


@pytest.mark.slow
@pytest.mark.backends("torch", reason=TORCH)
def test_torch_compile_fullgraph_mean_new_temperature_and_dynamic(backend):
    import torch

    torch._dynamo.reset()
    rng = np.random.default_rng(11)
    x = torch.log_softmax(torch.from_numpy(rng.normal(size=(4, 8))), -1)
    y = torch.softmax(torch.from_numpy(rng.normal(size=(4, 8))), -1)

    @torch.compile(fullgraph=True)
    def f(a, b, temperature):
        return klx.kl_div(a, b), klx.kl_divergence(
            b, a, p_form="logits", q_form="logits", temperature=temperature
        )

    for temperature in (2.0, 3.0):  # a new value: recompiled, not a failure
        mean, rows = f(x, y, temperature)
        want, _ = reference.kl_div(x.numpy(), y.numpy(), "mean", log_target=False)
        np.testing.assert_allclose(mean.item(), want, rtol=1e-12)
        lp = reference.log_softmax(y.numpy(), -1, temperature)
        lq = reference.log_softmax(x.numpy(), -1, temperature)
        np.testing.assert_allclose(
            rows.numpy(), reference.kl_rows_log(np.exp(lp), lq, -1)[0], rtol=1e-12
        )

    g = torch.compile(
        lambda a, b: klx.kl_divergence(a, b, p_form="logits", q_form="logits", reduction="sum"),
        fullgraph=True,
        dynamic=True,
    )
    for n in (4, 3, 2):
        got = g(y[:n], x[:n]).item()
        lp, lq = reference.log_softmax(y[:n].numpy(), -1), reference.log_softmax(x[:n].numpy(), -1)
        np.testing.assert_allclose(
            got, reference.kl_rows_log(np.exp(lp), lq, -1)[0].sum(), rtol=1e-12
        )


@pytest.mark.slow
@pytest.mark.backends("torch", reason=TORCH)
def test_validate_inside_fullgraph_names_the_problem(backend):
    import torch

    torch._dynamo.reset()
    f = torch.compile(lambda a, b: klx.kl_div(a, b, validate=True, reduction="sum"), fullgraph=True)
    x = torch.log_softmax(torch.ones(2, 3), -1)
    # Dynamo wraps any exception raised while tracing; its text carries klx's message.
    with pytest.raises(Exception, match=r"traced torch array.*validate=False inside the compiled"):
        f(x, torch.exp(x))


# ------------------------------------------------------------------ 13. torch.func


@pytest.mark.backends("torch", reason=TORCH)
def test_torch_func_vmap_and_forward_mode(backend):
    import torch
    import torch.autograd.forward_ad as fwAD

    rng = np.random.default_rng(12)
    for n in (8, 131072 // 64):  # small, and past the accelerators' sizes (131,072 elements)
        x = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, 64))), -1)
        y = torch.softmax(torch.from_numpy(rng.normal(size=(n, 64))), -1)
        got = torch.func.vmap(lambda a, b: klx.kl_div(a, b, reduction="sum"))(x, y)
        want, _ = reference.kl_div_terms(x.numpy(), y.numpy(), log_target=False)
        np.testing.assert_allclose(got.numpy(), want.sum(-1), rtol=1e-12)
        tangent = torch.from_numpy(rng.normal(size=(n, 64)))
        with fwAD.dual_level(), warnings.catch_warnings():
            # torch loads its forward-AD decompositions with its own deprecated torch.jit
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
            out = klx.kl_div(fwAD.make_dual(x, tangent), y, reduction="sum")
            jvp = fwAD.unpack_dual(out).tangent
        np.testing.assert_allclose(jvp.item(), float((-y * tangent).sum()), rtol=1e-10)
        _, jvp2 = torch.func.jvp(lambda a, y=y: klx.kl_div(a, y, reduction="sum"), (x,), (tangent,))
        np.testing.assert_allclose(jvp2.item(), float((-y * tangent).sum()), rtol=1e-10)


# ------------------------------------------------------------------ 15. NumPy numbers as arguments


def test_numpy_numbers_as_temperature_beta_and_axis(backend):
    rng = np.random.default_rng(13)
    t, s = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    a, b = backend.asarray(t), backend.asarray(s)
    got = klx.kl_divergence(
        a, b, p_form="logits", q_form="logits", temperature=np.float32(2.0), axis=np.int64(-1)
    )
    lp, lq = reference.log_softmax(t, -1, 2.0), reference.log_softmax(s, -1, 2.0)
    np.testing.assert_allclose(
        backend.to_numpy(got), reference.kl_rows_log(np.exp(lp), lq, -1)[0], rtol=1e-12
    )
    p, q = np.exp(lp), np.exp(lq)
    got = klx.js_divergence(
        backend.asarray(p), backend.asarray(q), beta=np.float32(0.25), axis=np.int32(1)
    )
    np.testing.assert_allclose(backend.to_numpy(got), reference.js_rows(p, q, 1, 0.25), rtol=1e-12)
    for bad in (np.bool_(True), True):
        with pytest.raises(TypeError, match="`beta` must be a real number"):
            klx.js_divergence(backend.asarray(p), backend.asarray(q), beta=bad)


# ------------------------------------------------------------------ 18. -inf logits, small weights


def test_kl_from_logits_with_neginf_on_both_sides(backend):
    """-inf logits where both P and Q are 0 (a masked vocabulary) contribute nothing."""
    t = np.array([[2.0, -np.inf, 0.5, -np.inf], [0.0, 1.0, -np.inf, 3.0]])
    s = np.array([[1.0, -np.inf, 0.3, 2.0], [0.5, -0.5, -np.inf, 1.0]])
    p, q = np.exp(reference.log_softmax(t, -1)), np.exp(reference.log_softmax(s, -1))
    want, scale = reference.kl_rows(p, q, -1)
    got = klx.kl_divergence(
        backend.asarray(t), backend.asarray(s), p_form="logits", q_form="logits"
    )
    assert reference.rel_error(backend.to_numpy(got), want, scale) <= 1e-12


def _mp_mixture(p, q, w, kind: str) -> float:
    """JS (weight w on P) or skew KL(P || w P + (1 - w) Q) of float values, 50 digits."""
    mpmath.mp.dps = 50
    w = mpmath.mpf(w)
    total = mpmath.mpf(0)
    for a, b in zip(p, q, strict=True):
        a, b = mpmath.mpf(float(a)), mpmath.mpf(float(b))
        m = w * a + (1 - w) * b
        if a > 0:
            total += (w if kind == "js" else 1) * a * mpmath.log(a / m)
        if b > 0 and kind == "js":
            total += (1 - w) * b * mpmath.log(b / m)
    return float(total)


#: q / p from e^-46 to e^46 (a teacher's near-impossible tokens), and ordinary rows.
_FAR = (
    ([0.5, 0.5], [1e-20, 1 - 1e-20]),
    ([1e-20, 1 - 1e-20], [0.5, 0.5]),
    ([0.7, 0.2, 0.1], [0.1, 0.3, 0.6]),
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("kind", "w"),
    [("js", 1e-9), ("js", 1 - 1e-9), ("skew_kl", 1e-9), ("js", 1 / 16), ("skew_kl", 0.05)],
)
def test_small_mixture_weights_against_mpmath(backend, kind, w, dtype):
    """JS with beta = 1e-9 (or 1 - 1e-9) and skew KL with alpha = 1e-9 were +inf in float32
    where q / p is below e^-30: (1 - w) expm1(r) rounded to -1 and log1p gave -inf."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rtol = 2e-6 if dtype == "float32" else 1e-13  # measured: 1.0e-6 (8.5 eps), 2.8e-16
    for p, q in _FAR:
        p = np.asarray(p) / np.sum(p)
        q = np.asarray(q) / np.sum(q)
        xp_p, xp_q = backend.asarray(p, dtype), backend.asarray(q, dtype)
        seen_p = backend.to_numpy(xp_p)  # as rounded to `dtype`
        for q_form, q_given in (("probs", xp_q), ("log_probs", backend.xp.log(xp_q))):
            seen_q = backend.to_numpy(q_given).astype(np.float64)  # Q as klx sees it
            want = _mp_mixture(seen_p, seen_q if q_form == "probs" else np.exp(seen_q), w, kind)
            if kind == "js":
                got = klx.js_divergence(xp_p, q_given, q_form=q_form, beta=w)
            else:
                got = klx.skew_kl_divergence(xp_p, q_given, q_form=q_form, alpha=w)
            np.testing.assert_allclose(backend.to_numpy(got), want, rtol=rtol, err_msg=q_form)


@pytest.mark.backends("numpy", "torch", "jax", reason="fused_linear_divergence's own paths")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("beta", [1e-9, 1 - 1e-9])
def test_fused_js_with_a_small_weight_against_mpmath(backend, beta, dtype):
    rng = np.random.default_rng(3)
    h, w_p, w_q = (
        rng.normal(size=(4, 8)),
        3 * rng.normal(size=(50, 8)),
        3 * rng.normal(size=(50, 8)),
    )
    args = [backend.asarray(a, dtype) for a in (h, w_p, h, w_q)]
    h64, p64, q64 = (backend.to_numpy(a).astype(np.float64) for a in (args[0], args[1], args[3]))
    want = 0.0
    for zp, zq in zip(h64 @ p64.T, h64 @ q64.T, strict=True):
        lp, lq = special.log_softmax(zp), special.log_softmax(zq)
        want += _mp_mixture(np.exp(lp), np.exp(lq), beta, "js")
    got = klx.fused_linear_divergence(*args, divergence="js", beta=beta, reduction="sum")
    np.testing.assert_allclose(
        backend.to_numpy(got), want, rtol=2e-6 if dtype == "float32" else 1e-9
    )


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_a_plus_inf_logit_is_nan_on_a_zero_weighted_side_too(backend, w):
    """docs/numerics.md: a +inf logit (no distribution) gives NaN. At beta = 0 JS gave 0
    (the side's weight is 0, so its NaN log-probabilities were never looked at)."""
    bad = backend.asarray([[math.inf, 0.0, 1.0]])
    good = backend.asarray([[0.0, 1.0, 2.0]])
    forms = {"p_form": "logits", "q_form": "logits"}
    for p, q in ((bad, good), (good, bad)):
        assert np.isnan(backend.to_numpy(klx.js_divergence(p, q, beta=w, **forms))).all()
        got = klx.skew_kl_divergence(p, q, alpha=w, **forms)
        assert np.isnan(backend.to_numpy(got)).all()


@pytest.mark.parametrize("form", ["probs", "logits"])
def test_definition_sums_a_leading_axis_to_float32_accuracy(backend, form):
    """Issue 23 item 7: distributions along axis 0 (100000 x 4, float32) were summed in
    sequence by NumPy's definition: 1.9e-5 of the terms' scale from logits (3e-6 from
    probabilities), past the stated 1e-5; the log-sum-exp and the terms now add pairwise."""
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(100_000), size=4).T.copy()
    q = rng.dirichlet(np.ones(100_000), size=4).T.copy()
    terms = p * np.log(p / q)
    want, scale = np.sum(terms, axis=0), np.sum(np.abs(terms), axis=0)
    given = (p, q) if form == "probs" else (np.log(p) + 3.0, np.log(q) - 2.0)
    a, b = (backend.asarray(x, "float32") for x in given)
    klx.set_accelerators(False)
    try:
        report = klx.explain(klx.kl_divergence, a, b, axis=0, p_form=form, q_form=form)
    finally:
        klx.set_accelerators(True)
    assert report.chosen == "definition", str(report)
    check_array(backend, report.result, a, "float32", (4,))
    got = backend.to_numpy(report.result)
    assert np.max(np.abs(got - want) / scale) < 2e-6


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile's CPU code")
@pytest.mark.parametrize("kind", ["kl", "js", "skew_kl"])
def test_near_p_equal_q_inside_torch_compile(backend, kind):
    """inductor's vectorised CPU code takes expm1(x) as exp(x) - 1 (expm1(1e-6) = 9.5e-7):
    compiled, KL and JS between float32 logits 1e-3 apart (32000 wide) were 6e-3 and 1e-2
    off float64 (4e-5 eagerly). klx's expm1 keeps its digits there (a Taylor polynomial for
    |x| <= 1/8). Skew KL from logits was 72% off even eagerly (its terms -p u cancelled);
    it now adds m - p, as KL adds q - p."""
    import torch
    from scipy.special import log_softmax, rel_entr

    rng = np.random.default_rng(3)
    t = 2.0 * rng.normal(size=(8, 4000))
    s = t + 1e-3 * rng.normal(size=t.shape)
    p, q = np.exp(log_softmax(t, -1)), np.exp(log_softmax(s, -1))
    if kind == "kl":
        want, fn, options = rel_entr(p, q).sum(-1), klx.kl_divergence, {}
    elif kind == "js":
        m = 0.5 * (p + q)
        want = 0.5 * rel_entr(p, m).sum(-1) + 0.5 * rel_entr(q, m).sum(-1)
        fn, options = klx.js_divergence, {}
    else:
        want = rel_entr(p, 0.1 * p + 0.9 * q).sum(-1)
        fn, options = klx.skew_kl_divergence, {"alpha": 0.1}

    def f(a, b):
        return fn(a, b, p_form="logits", q_form="logits", **options)

    torch._dynamo.reset()
    args = (backend.asarray(t, "float32"), backend.asarray(s, "float32"))
    got = torch.compile(f, fullgraph=True)(*args)
    assert got.dtype == torch.float32 and got.shape == (8,) and got.device == args[0].device
    err = np.max(np.abs(backend.to_numpy(got) - want) / want)
    assert err < 5e-4, err  # the float32 definition eagerly: 2e-4


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile's CPU code")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_expm1_inside_torch_compile(backend, dtype):
    """klx's expm1 inside torch.compile on a CPU (inductor's own is exp(x) - 1): within
    10 ulps of numpy's over [-3, 3] (measured: 8), exact at 0, the edges as expm1's."""
    import torch

    from klx._backend_ops import expm1

    x = np.concatenate([np.linspace(-3, 3, 20001), [1e-8, -1e-8, 0.125, -0.125, 1e-30]])
    edges = np.array([0.0, -np.inf, np.inf, np.nan, -50.0])
    torch._dynamo.reset()
    f = torch.compile(lambda a: expm1(torch, a), fullgraph=True)
    xt = backend.asarray(x, dtype)
    want = np.expm1(backend.to_numpy(xt).astype(np.float64))
    got = backend.to_numpy(f(xt)).astype(np.float64)
    eps = float(np.finfo(dtype).eps)
    assert np.max(np.abs(got - want) / np.abs(want)) <= 10 * eps
    got_edges = backend.to_numpy(f(backend.asarray(edges, dtype)))
    np.testing.assert_array_equal(got_edges, np.expm1(edges).astype(dtype))


# ------------------------------------------------------------------ 19. float16 and bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_is_computed_in_float32(backend, dtype):
    """float16 / bfloat16 inputs: computed in float32, rounded once to the input dtype."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(26)
    idx, lp, s, _ = top_k_case(rng, (4,), 9, 3)
    x_lp, x_s = backend.asarray(lp, dtype), backend.asarray(s, dtype)
    lp_r, s_r = backend.to_numpy(x_lp), backend.to_numpy(x_s)
    got = klx.sparse_kl_divergence(backend.asarray(idx), x_lp, x_s)
    check_array(backend, got, x_lp, dtype, (4,))
    rows, scale = sparse_rows(idx, lp_r, np.exp(special.log_softmax(s_r, axis=-1)), True)
    unit = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # one rounding of the result
    atol = reference.ATOL.get(dtype, 0.0)  # float16's subnormal spacing
    assert reference.rel_error(backend.to_numpy(got), rows, np.maximum(scale, 1e-3), atol) <= unit
    lq = lp_r + rng.normal(scale=0.3, size=lp_r.shape)
    x_lq = backend.asarray(lq, dtype)
    est = klx.kl_estimate(x_lp, x_lq)
    check_array(backend, est, x_lp, dtype, lp.shape)
    ref = k_values(lp_r, backend.to_numpy(x_lq))["k3"]
    np.testing.assert_allclose(backend.to_numpy(est), ref, rtol=unit, atol=atol)


def _underflow_reference(kind: str, option: float, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The row values of float64 probabilities (whose small weights do not underflow)."""
    if kind == "kl":
        return reference.kl_rows(p, q, -1)[0]
    if kind == "js":
        return reference.js_rows(p, q, -1, option)
    if kind == "skew_kl":
        return reference.skew_kl_rows(p, q, -1, option)[0]
    if kind == "mix":
        return reference.mix_rows(p, q, option)
    if kind == "alpha":
        return reference.alpha_rows(p, q, option)
    return reference.renyi_rows(p, q, option)


@pytest.mark.parametrize(
    ("kind", "option"),
    [
        ("kl", None),
        ("js", 0.5),
        ("skew_kl", 0.1),
        ("mix", 0.3),
        ("mix", 0.0),
        ("alpha", 0.3),
        ("alpha", 0.7),
        ("alpha", 2.0),
        ("alpha", -1.0),
        ("renyi", 0.5),
    ],
)
def test_float32_logits_whose_tail_underflows(backend, kind, option):
    """Float32 logits 250 below their maximum at T = 2: weights of e^-125, 0 in float32
    but positive. Each divergence keeps their limit (a term of q where p vanishes): KL
    was 26% off (the vanished terms were 0, not q), skew KL and alpha NaN (0 * inf:
    expm1 of a log-ratio of 125 against a weight of 0). Against the float64 row values,
    where those weights are still 1e-55; +inf where that value is beyond float32."""
    from scipy.special import softmax

    rng = np.random.default_rng(7)
    t = rng.normal(scale=2.0, size=(3, 40)).astype(np.float32)
    s = (t + 0.5 * rng.normal(size=t.shape)).astype(np.float32)
    t[0, 1:] -= 250.0  # P's tail underflows
    s[1, 1:] -= 250.0  # Q's tail underflows
    opts = (
        {}
        if option is None
        else {"js": {"beta": option}, "skew_kl": {"alpha": option}, "mix": {"lam": option}}.get(
            kind, {"alpha": option}
        )
    )
    kw = {"p_form": "logits", "q_form": "logits", "temperature": 2.0, **opts}
    out = klx.divergence(backend.asarray(t, "float32"), backend.asarray(s, "float32"), kind, **kw)
    check_array(backend, out, backend.asarray(t, "float32"), "float32", (3,))
    got = backend.to_numpy(out).astype(np.float64)
    p = softmax(t.astype(np.float64) / 2.0, axis=-1)
    q = softmax(s.astype(np.float64) / 2.0, axis=-1)
    want = _underflow_reference(kind, option, p, q)
    beyond = want > np.finfo(np.float32).max
    assert np.all(np.isposinf(got[beyond]))
    np.testing.assert_allclose(got[~beyond], want[~beyond], rtol=2e-6)


def _edge_logits(seed: int, spread: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Two (6, 48) logits whose log-ratios are about +-`spread` (within 20%)."""
    rng = np.random.default_rng(seed)
    t = 2.0 * rng.normal(size=(6, 48))
    sign = rng.choice([-1.0, 1.0], size=t.shape)
    s = t + sign * spread * (1.0 + 0.2 * rng.random(size=t.shape))
    np_dtype = np.float32 if dtype == "float32" else np.float64
    return t.astype(np_dtype), s.astype(np_dtype)


def _assert_edge(got: np.ndarray, want: np.ndarray, dtype: str, spread: float) -> None:
    """Within what the inputs allow: the rounding of d (``|log p|`` ulps) alone gives 2e-4
    (float32) and 2e-10 (float64) at 1e-3 apart (as with expm1 before the series)."""
    near = spread < 0.1
    tol = (3e-4 if near else 2e-6) if dtype == "float32" else (1e-9 if near else 1e-12)
    err = np.max(np.abs(got - want) / want)
    assert err < tol, err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spread", [1e-3, 0.3, 0.5, 0.7, 2.0])
def test_kl_from_logits_across_the_series_edge(backend, xp, dtype, spread):
    """KL between logits sums ``p g(-d)`` (``g(x) = e^x - 1 - x``) as a Taylor series for
    ``|d| <= 1/2`` and as ``p d + q - p`` beyond: rows whose log-ratios sit on either side
    of that edge agree with mpmath (of the same rounded inputs) as the inputs allow."""
    t, s = _edge_logits(11, spread, dtype)
    want = np.array(
        [_mp_kl(_mp_log_softmax(a), _mp_log_softmax(b)) for a, b in zip(t, s, strict=True)]
    )
    a, b = backend.asarray(t, dtype), backend.asarray(s, dtype)
    got = klx.kl_divergence(a, b, p_form="logits", q_form="logits")
    check_array(backend, got, a, dtype, (6,))
    _assert_edge(backend.to_numpy(got), want, dtype, spread)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spread", [1e-3, 0.3, 0.5, 0.7, 2.0])
def test_mixture_from_logits_across_the_series_edge(backend, xp, dtype, spread):
    """The KL mixture between logits, ``lam p g(-d) + (1 - lam) q g(d)`` by one series in
    ``d^2`` for ``|d| <= 1/2`` and as written beyond, against mpmath on both sides of the
    edge."""
    from scipy.special import log_softmax

    t, s = _edge_logits(13, spread, dtype)
    p = np.exp(log_softmax(t.astype(np.float64), -1))
    q = np.exp(log_softmax(s.astype(np.float64), -1))
    want = reference.mix_rows(p, q, 0.3)
    a, b = backend.asarray(t, dtype), backend.asarray(s, dtype)
    got = klx.divergence(a, b, "mix", lam=0.3, p_form="logits", q_form="logits")
    check_array(backend, got, a, dtype, (6,))
    _assert_edge(backend.to_numpy(got), want, dtype, spread)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile's CPU code")
@pytest.mark.parametrize("spread", [0.3, 0.5, 0.7])
def test_kl_from_logits_series_edge_inside_torch_compile(backend, spread):
    """The same edge inside torch.compile on a CPU, where the series is what inductor runs
    (its own expm1 is exp(x) - 1)."""
    import torch

    rng = np.random.default_rng(12)
    t = 2.0 * rng.normal(size=(6, 48))
    sign = rng.choice([-1.0, 1.0], size=t.shape)
    s = (t + sign * spread * (1.0 + 0.2 * rng.random(size=t.shape))).astype(np.float32)
    t = t.astype(np.float32)
    want = np.array(
        [_mp_kl(_mp_log_softmax(a), _mp_log_softmax(b)) for a, b in zip(t, s, strict=True)]
    )

    def f(a, b):
        return klx.kl_divergence(a, b, p_form="logits", q_form="logits")

    torch._dynamo.reset()
    a, b = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    got = torch.compile(f, fullgraph=True)(a, b)
    check_array(backend, got, a, "float32", (6,))
    err = np.max(np.abs(backend.to_numpy(got) - want) / want)
    assert err < 2e-6, err
