"""kl_estimate against exact expectations and float64 references.

The estimators are checked with exact expectations (and gradients of expectations) over
the categorical distribution they sample; k3 against mpmath.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads
from support.reference import k_values

REDUCTIONS = ("none", "sum", "batchmean")


def categorical(rng, vocab):
    """A policy's and a reference's log-probabilities over `vocab` tokens."""
    return log_softmax(rng.normal(size=vocab)), log_softmax(rng.normal(size=vocab))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimator_means_converge_to_exact(backend, estimator):
    """Over samples of P: k1 and k3 average to KL(P || Q), k2 to E_P[r^2] / 2."""
    rng = np.random.default_rng(21)
    lp_all, lq_all = categorical(rng, 6)
    n = 20000
    x = rng.choice(6, size=n, p=np.exp(lp_all))
    lp, lq = backend.asarray(lp_all[x]), backend.asarray(lq_all[x])
    per_token = backend.to_numpy(klx.kl_estimate(lp, lq, estimator=estimator))
    mean = backend.to_numpy(klx.kl_estimate(lp, lq, estimator=estimator, reduction="batchmean"))
    exact_kl = float(
        backend.to_numpy(
            klx.kl_divergence(
                backend.asarray(lp_all),
                backend.asarray(lq_all),
                p_form="log_probs",
                q_form="log_probs",
            )
        )
    )
    ref_kl, _ = reference.kl_rows(np.exp(lp_all), np.exp(lq_all), -1)
    np.testing.assert_allclose(exact_kl, ref_kl, rtol=1e-12)  # klx's exact KL is SciPy's
    target = exact_kl
    if estimator == "k2":
        target = float(np.sum(np.exp(lp_all) * (lp_all - lq_all) ** 2 / 2))
    stderr = per_token.std() / math.sqrt(n)
    assert abs(float(mean) - target) <= 5 * stderr, (float(mean), target, stderr)
    np.testing.assert_allclose(float(mean), per_token.mean(), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_estimate_values_match_reference(backend, dtype, conformance):
    rng = np.random.default_rng(22)
    r = np.concatenate(
        [rng.normal(scale=0.1, size=20), rng.normal(scale=5.0, size=20), [1e-9, -1e-9, 0.0]]
    )
    log_p = np.log(rng.uniform(0.01, 1.0, size=r.shape))
    log_q = log_p + r
    keep = rng.uniform(size=r.shape) < 0.8
    x_p, x_q = backend.asarray(log_p, dtype), backend.asarray(log_q, dtype)
    lp_r, lq_r = backend.to_numpy(x_p), backend.to_numpy(x_q)
    ref = k_values(lp_r, lq_r)
    r_r = lq_r - lp_r
    tol = 8 * float(np.finfo(dtype).eps)
    for est in ("k1", "k2", "k3"):
        for gradient in ("estimator", "straight_through", "importance"):
            for reduction in REDUCTIONS:
                got = klx.kl_estimate(
                    x_p,
                    x_q,
                    estimator=est,
                    gradient=gradient,
                    where=backend.asarray(keep),
                    reduction=reduction,
                )
                check_array(backend, got, x_p, dtype, r.shape if reduction == "none" else ())
                want = reference.reduce(ref[est], reduction, keep)
                # k1: the rounding of log q - log p; k2, k3: relative to the value, times
                # the condition number of k3 in r (at most 1 + |r|).
                sizes = (
                    np.abs(lp_r) + np.abs(lq_r)
                    if est == "k1"
                    else np.abs(ref[est]) * (1 + np.abs(r_r))
                )
                scale = reference.reduce(sizes, reduction, keep)
                err = reference.rel_error(backend.to_numpy(got), want, np.maximum(scale, 1e-300))
                conformance(f"{backend.id} {dtype} kl_estimate", f"{reduction} {est}", err, tol)
                assert err <= tol, (est, gradient, reduction, err)


def test_k3_is_stable_for_large_log_ratios(backend):
    """No overflow before the value's own, no cancellation near 0, no silent clamp."""
    r = np.array([-700.0, -50.0, -1e-12, 1e-12, 3.0, 30.0, 700.0, 710.0, np.inf, -np.inf])
    zeros = np.zeros_like(r)
    got = backend.to_numpy(klx.kl_estimate(backend.asarray(zeros), backend.asarray(r)))
    ref = k_values(zeros, r)["k3"][:-3]
    np.testing.assert_allclose(got[:-3], ref, rtol=4e-15)  # 30 -> 1.07e13: not clamped
    assert got[-3] == np.inf and got[-2] == np.inf and got[-1] == np.inf
    clamped = backend.to_numpy(
        klx.kl_estimate(backend.asarray(zeros), backend.asarray(r), clamp=10.0)
    )
    np.testing.assert_allclose(clamped, np.minimum(np.r_[ref, np.inf, np.inf, np.inf], 10.0))
    naive = np.exp(r[:-3]) - 1 - r[:-3]  # loses every digit at |r| = 1e-12
    assert abs(naive[2] - ref[2]) / ref[2] > 1e-3


def test_estimate_masks_and_normalizer(backend):
    log_p = np.array([-1.0, -0.5, np.nan, -2.0])
    log_q = np.array([-1.5, -0.25, 0.0, -np.inf])
    keep = np.array([True, True, False, False])
    x = {"where": backend.asarray(keep)}
    got = klx.kl_estimate(
        backend.asarray(log_p), backend.asarray(log_q), reduction="batchmean", **x
    )
    ref = k_values(log_p[:2], log_q[:2])["k3"]
    np.testing.assert_allclose(backend.to_numpy(got), ref.mean(), rtol=1e-14)
    got = klx.kl_estimate(
        backend.asarray(log_p), backend.asarray(log_q), reduction="batchmean", normalizer=8, **x
    )
    np.testing.assert_allclose(backend.to_numpy(got), ref.sum() / 8, rtol=1e-14)
    rows = backend.to_numpy(klx.kl_estimate(backend.asarray(log_p), backend.asarray(log_q)))
    assert np.isnan(rows[2]) and rows[3] == np.inf


def test_estimate_errors(backend):
    a = backend.asarray(np.array([-1.0, -2.0]))
    with pytest.raises(ValueError, match="`estimator` must be one of 'k1', 'k2', 'k3'"):
        klx.kl_estimate(a, a, estimator="low_var_kl")
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        klx.kl_estimate(a, a, gradient="k2")
    with pytest.raises(ValueError, match="used only by gradient='importance'"):
        klx.kl_estimate(a, a, log_p_old=a)
    with pytest.raises(ValueError, match="`clamp` must be positive"):
        klx.kl_estimate(a, a, clamp=0.0)
    with pytest.raises(TypeError, match="`log_q` must have a real floating-point dtype"):
        klx.kl_estimate(a, backend.asarray(np.array([1, 2])))
    with pytest.raises(ValueError, match="do not broadcast"):
        klx.kl_estimate(a, backend.asarray(np.zeros(3)))


# Each gradient option's expected gradient, w.r.t. the policy's logits theta, for samples
# of P = softmax(theta): p * (h - <p, h>) with h = f(d) + f'(d) for the gradient of E_P[f]
# (d = log p - log q); KL(Q || P)'s is p - q.


def _grad_of_mean(p, d, f, df):
    h = f(d) + df(d)
    return p * (h - np.sum(p * h))


def _targets(lp_all, lq_all):
    p, q = np.exp(lp_all), np.exp(lq_all)
    d = lp_all - lq_all
    kl = _grad_of_mean(p, d, lambda d: d, lambda d: np.ones_like(d))
    mean_k2 = _grad_of_mean(p, d, lambda d: d * d / 2, lambda d: d)
    zero = np.zeros_like(p)
    return {
        ("k1", "estimator"): zero,
        ("k2", "estimator"): kl,
        ("k3", "estimator"): p - q,  # the gradient of KL(Q || P)
        ("k1", "straight_through"): kl,
        ("k2", "straight_through"): kl,
        ("k3", "straight_through"): kl,
        ("k1", "importance"): kl,
        ("k2", "importance"): mean_k2,
        ("k3", "importance"): kl,
    }


def _per_sample_grads(backend, theta, x, lq, lp_old, estimator, gradient):
    """Per-sample gradients w.r.t. theta (one copy of theta per sample), summed loss."""
    n, vocab = len(x), theta.size
    onehot = backend.asarray(np.eye(vocab)[x])
    thetas = np.broadcast_to(theta, (n, vocab)).copy()
    lq = backend.asarray(lq)
    old = None if lp_old is None else backend.asarray(lp_old)

    def loss(t, logsumexp):
        lp_x = ((t - logsumexp(t)) * onehot).sum(-1)  # log softmax(theta) at the samples
        return klx.kl_estimate(
            lp_x, lq, estimator=estimator, gradient=gradient, log_p_old=old, reduction="sum"
        )

    if backend.name == "torch":
        import torch

        t = backend.asarray(thetas).requires_grad_(True)
        loss(t, lambda a: torch.logsumexp(a, dim=-1, keepdim=True)).backward()
        return backend.to_numpy(t.grad)
    import jax
    from jax.scipy.special import logsumexp

    g = jax.jit(jax.grad(lambda t: loss(t, lambda a: logsumexp(a, axis=-1, keepdims=True))))
    return np.asarray(g(backend.asarray(thetas)))


@pytest.mark.parametrize("gradient", ["estimator", "straight_through", "importance"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradient_options_estimate_their_targets(backend, gradient):
    rng = np.random.default_rng(23)
    vocab, n = 5, 20000
    theta = rng.normal(size=vocab)
    lp_all = log_softmax(theta)
    lq_all = log_softmax(rng.normal(size=vocab))
    x = rng.choice(vocab, size=n, p=np.exp(lp_all))
    targets = _targets(lp_all, lq_all)
    for estimator in ("k1", "k2", "k3"):
        g = _per_sample_grads(backend, theta, x, lq_all[x], None, estimator, gradient)
        mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
        target = targets[(estimator, gradient)]
        assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean, target)


@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_importance_weighting_off_policy(backend):
    """Samples from an older policy: rho * k3 is unbiased for KL(P || Q) in value, and
    its gradient for the KL's gradient (DeepSeek-V3.2's correction)."""
    rng = np.random.default_rng(24)
    vocab, n = 5, 20000
    theta = rng.normal(size=vocab)
    lp_all = log_softmax(theta)
    lp_old_all = log_softmax(theta + rng.normal(scale=0.5, size=vocab))
    lq_all = log_softmax(rng.normal(size=vocab))
    x = rng.choice(vocab, size=n, p=np.exp(lp_old_all))
    for estimator in ("k1", "k3"):
        values = backend.to_numpy(
            klx.kl_estimate(
                backend.asarray(lp_all[x]),
                backend.asarray(lq_all[x]),
                estimator=estimator,
                gradient="importance",
                log_p_old=backend.asarray(lp_old_all[x]),
            )
        )
        kl, _ = reference.kl_rows(np.exp(lp_all), np.exp(lq_all), -1)
        assert abs(values.mean() - kl) <= 5 * values.std() / math.sqrt(n)
        g = _per_sample_grads(backend, theta, x, lq_all[x], lp_old_all[x], estimator, "importance")
        target = _targets(lp_all, lq_all)[(estimator, "importance")]
        mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
        assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean, target)


@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradient_options_change_the_gradient_not_the_value(backend):
    """On-policy, straight-through and importance weighting leave the value k3; a dropped
    token with an infinite log-ratio gets no gradient, and straight-through keeps the
    gradient finite even where the value is infinite."""
    lp = np.array([-1.0, -0.3, -2.0])
    lq = np.array([-1.2, -np.inf, -0.5])
    keep = backend.asarray(np.array([True, False, True]))
    k3 = k_values(lp[[0, 2]], lq[[0, 2]])["k3"]
    for gradient in ("estimator", "straight_through", "importance"):

        def loss(a, gradient=gradient):
            return klx.kl_estimate(
                a, backend.asarray(lq), gradient=gradient, where=keep, reduction="sum"
            )

        value, g = value_and_grads(backend, loss, lp)
        np.testing.assert_allclose(value, k3.sum(), rtol=1e-15)
        assert np.all(np.isfinite(g)) and g[1] == 0

    def unmasked(a):
        return klx.kl_estimate(a, backend.asarray(lq), gradient="straight_through").sum()

    value, g = value_and_grads(backend, unmasked, lp)
    assert value == np.inf and np.all(np.isfinite(g))


@pytest.mark.backends("jax", reason="jax.jit and jax.vmap")
def test_estimate_jax_jit_vmap(backend):
    import jax

    rng = np.random.default_rng(25)
    lp, lq = np.log(rng.uniform(0.1, 1, size=(4, 6))), np.log(rng.uniform(0.1, 1, size=(4, 6)))
    f = jax.jit(lambda a, b: klx.kl_estimate(a, b, gradient="straight_through"))
    v = jax.vmap(lambda a, b: klx.kl_estimate(a, b, reduction="sum"))
    ref = k_values(lp, lq)["k3"]
    np.testing.assert_allclose(np.asarray(f(lp, lq)), ref, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(v(lp, lq)), ref.sum(-1), rtol=1e-14)


@settings(max_examples=100, deadline=None)
@given(r=st.floats(-700.0, 700.0), log_p=st.floats(-30.0, 0.0))
def test_property_k3_nonnegative_and_exact_to_a_few_ulps(r, log_p):
    log_q = np.array([log_p + r])
    log_p = np.array([log_p])
    got = float(klx.kl_estimate(log_p, log_q)[0])
    ref = float(k_values(log_p, log_q)["k3"][0])  # of the rounded log-ratio klx sees
    assert got >= 0
    assert abs(got - ref) <= 8 * np.finfo(np.float64).eps * ref


@pytest.mark.parametrize(
    ("dtype", "log_p", "log_p_old", "log_q", "want"),
    [
        # rho = e^-88 underflows while k3 = e^89 - 90 overflows in float32: e - 90 e^-88.
        ("float32", -90.0, -2.0, -1.0, math.e - 90 * math.exp(-88)),
        # rho = e^-10000 and k3 = e^10000 - 10001 in float64: 1 - 10001 e^-10000.
        ("float64", -10000.0, 0.0, 0.0, 1.0),
        ("float64", -1.0, -1.5, -1.2, math.exp(0.5) * (math.exp(-0.2) - 1 + 0.2)),
    ],
)
def test_importance_k3_value_without_overflow(backend, dtype, log_p, log_p_old, log_q, want):
    """rho * k3 was +inf (float32) and NaN (float64) where the product itself is finite."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    got = klx.kl_estimate(
        backend.asarray([log_p], dtype),
        backend.asarray([log_q], dtype),
        log_p_old=backend.asarray([log_p_old], dtype),
        gradient="importance",
        reduction="sum",
    )
    np.testing.assert_allclose(
        backend.to_numpy(got), want, rtol=4e-7 if dtype == "float32" else 1e-15
    )


@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
@pytest.mark.parametrize("r", [1e-4, 0.1, -5.0, 20.0, 30.0])
def test_on_policy_importance_k3_gradient_in_float32(backend, r):
    """The on-policy gradient of rho k3 is -r in log p and e^r - 1 in log q; float32 gave
    -32 at r = 20 and 0 at r = 30 (k3 and its derivative cancelling)."""

    def loss(lp, lq):
        return klx.kl_estimate(lp, lq, gradient="importance", reduction="sum")

    lp, lq = backend.asarray([0.0], "float32"), backend.asarray([r], "float32")
    if backend.name == "torch":
        lp.requires_grad_(True)
        lq.requires_grad_(True)
        loss(lp, lq).backward()
        g_p, g_q = backend.to_numpy(lp.grad), backend.to_numpy(lq.grad)
    else:
        import jax

        g_p, g_q = (np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(lp, lq))
    np.testing.assert_allclose(g_p, [-r], rtol=2e-6)
    np.testing.assert_allclose(g_q, [math.expm1(r)], rtol=2e-6)


@pytest.mark.backends("torch", reason="autodiff through an overflowing value")
def test_importance_k3_overflowing_value_is_inf_not_nan(backend):
    import torch

    f32 = torch.float32  # rho = e^80 and k3 = 1e5: their product overflows float32
    lp = torch.tensor([0.0], dtype=f32, requires_grad=True)
    lq = torch.tensor([-1e5], dtype=f32, requires_grad=True)
    old = torch.tensor([-80.0], dtype=f32)
    v = klx.kl_estimate(lp, lq, log_p_old=old, gradient="importance", reduction="sum")
    v.backward()
    assert (
        float(v.detach()) == math.inf
        and torch.isfinite(lp.grad).all()
        and torch.isfinite(lq.grad).all()
    )


#: Log-ratios r = log q - log p for k3 against mpmath: near 0 (where e^r - 1 - r cancels),
#: both sides of the series' edge (|r| = 1/2), far, and beyond float32's exponent range.
K3_RATIOS = [0.0, 1e-8, -1e-8, 1e-4, -1e-4, 0.3, -0.3, 0.5, -0.5, 0.6, -0.6]
K3_RATIOS += [3.0, -5.0, -12.0, 30.0, -30.0, 100.0, -100.0]


def _k3_case(dtype):
    """log_p, log_q (as given in `dtype`, rounded) for K3_RATIOS, then the edges: log q =
    -inf (r = -inf), log p = -inf (r = +inf), log q = +inf, NaN in log p."""
    n = len(K3_RATIOS)
    lp = -np.linspace(0.5, 3.0, n)
    lq = lp + np.array(K3_RATIOS)
    lp = np.r_[lp, -1.0, -np.inf, -2.0, np.nan]
    lq = np.r_[lq, -np.inf, -1.0, np.inf, -1.0]
    return lp.astype(dtype), lq.astype(dtype)


def _k3_mpmath(r, clamp=None):
    """k3 = e^r - 1 - r and its derivative e^r - 1 in mpmath (60 digits) at the float
    log-ratios `r`; clipped to `clamp` (derivative 0 beyond), inf and NaN as the limits."""
    values, derivatives = [], []
    for x in r:
        if np.isnan(x):
            v = d = math.nan
        elif np.isinf(x):
            v, d = math.inf, (math.inf if x > 0 else -1.0)
        else:
            with mpmath.workdps(60):
                m = mpmath.mpf(float(x))
                v, d = float(mpmath.expm1(m) - m), float(mpmath.expm1(m))
        if clamp is not None and v > clamp:
            v, d = clamp, 0.0
        values.append(v)
        derivatives.append(d)
    return np.array(values), np.array(derivatives)


def _assert_ulps(got, want, dtype, ulps, what):
    got = np.asarray(got, dtype=np.float64)
    same = np.isnan(got) == np.isnan(want)
    assert same.all(), (what, got, want)
    big = np.finfo(dtype).max
    over = np.abs(want) > big  # beyond the dtype's range: +-inf
    assert (got[over] == np.sign(want[over]) * np.inf).all(), (what, got[over], want[over])
    ok = ~np.isnan(want) & ~over
    err = np.abs(got[ok] - want[ok]) / np.maximum(np.abs(want[ok]), np.finfo(dtype).tiny)
    bound = np.broadcast_to(ulps, want.shape)[ok] * np.finfo(dtype).eps
    assert (err <= bound).all(), (what, err / np.finfo(dtype).eps)


@pytest.mark.slow
@pytest.mark.parametrize("clamp", [None, 10.0], ids=["plain", "clamp"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.backends("torch", "jax", reason="torch.compile and jax.jit, with autodiff")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_k3_value_and_derivative_against_mpmath(backend, dtype, traced, clamp):
    """Issue 24: k3 as one series, one exponential and selects against constants, its
    derivative as k3 + r, against mpmath: float32 r near 0 (1e-8, 1e-4, where e^r - 1 - r
    cancels), the series' edge, +-30, +-100 (beyond float32's range), log-probabilities
    of -inf and +inf, NaN; eager, inside torch.compile(fullgraph=True) on a CPU, and
    jax.jit. With `clamp` a clipped entry's derivative is 0: it was NaN (0 * e^r) where
    e^r overflows (r = 100 in float32, r = +inf)."""
    lp_np, lq_np = _k3_case(dtype)
    r = lq_np.astype(np.float64) - lp_np.astype(np.float64)  # the log-ratio klx sees
    r = r.astype(dtype).astype(np.float64)  # rounded to the dtype, as computed
    want, dwant = _k3_mpmath(r, clamp)

    def f(lq, lp):
        return klx.kl_estimate(lp, lq, estimator="k3", clamp=clamp)

    def loss(lq, lp):
        return klx.kl_estimate(lp, lq, estimator="k3", clamp=clamp, reduction="sum")

    lq, lp = backend.asarray(lq_np, dtype), backend.asarray(lp_np, dtype)
    if backend.name == "torch":
        import torch

        value, total = f, loss
        if traced:
            torch._dynamo.reset()
            value = torch.compile(f, fullgraph=True)
            total = torch.compile(loss, fullgraph=True)
        got = backend.to_numpy(value(lq, lp))
        a, b = lq.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        total(a, b).backward()
        g_q, g_p = backend.to_numpy(a.grad), backend.to_numpy(b.grad)
    else:
        import jax

        value, grad = f, jax.grad(loss, argnums=(0, 1))
        if traced:
            value, grad = jax.jit(value), jax.jit(grad)
        got = backend.to_numpy(value(lq, lp))
        g_q, g_p = (backend.to_numpy(g) for g in grad(lq, lp))
    # the value to 2 ulps (near 0 and at the series' edge alike); the derivative to 2
    # ulps, and to the rounding of |r| in k3 + r below -1/2 (|r| / 2 ulps: 15 at -30)
    _assert_ulps(got, want, dtype, 2, "value")
    slack = np.where(r < -0.5, np.minimum(np.abs(np.nan_to_num(r)), 40.0) / 2, 0.0) + 2
    for name, g, sign in (("d/dlog_q", g_q, 1.0), ("d/dlog_p", g_p, -1.0)):
        got_d = np.asarray(g, dtype=np.float64)
        finite = ~np.isinf(r)  # d/dlog_p at log p = -inf: autodiff of -inf - x
        _assert_ulps(got_d[finite], sign * dwant[finite], dtype, 2 + slack[finite], name)
        edges = np.isinf(r) & (name == "d/dlog_q")
        np.testing.assert_array_equal(got_d[edges], dwant[edges])


def test_k3_tiny_log_ratio_rounds_once(backend):
    """k3 = r^2 / 2 below float64's normal range (r = 6.3e-160: 2e-319) is rounded once:
    r^2 formed first was rounded into the subnormals (1.99464e-319 for 1.99467e-319)."""
    if "float64" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float64")
    if backend.name == "jax":
        pytest.skip("XLA's CPU code flushes subnormal results to 0")
    r = np.array([6.316124357648773e-160, 1e-155, -3e-158])
    zeros = np.zeros_like(r)
    got = backend.to_numpy(
        klx.kl_estimate(backend.asarray(zeros, "float64"), backend.asarray(r, "float64"))
    )
    with mpmath.workdps(400):
        want = [float(mpmath.expm1(mpmath.mpf(x)) - mpmath.mpf(x)) for x in r]
    np.testing.assert_array_equal(got, want)
