"""renyi_divergence: against mpmath at 50 digits at every order the issue names (0, the
neighbourhood of 1, infinity), a power sum far below 1, its limits and identities, rows
summed in pieces (Dask chunks along the distribution, fused-linear chunks), gradients,
hypothesis properties (never negative, 0 at P = Q, non-decreasing in the order), errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import klx
from support import reference
from support.asserts import assert_within_ulps, check_array
from support.cases import exact_logits, small_cases
from support.strategies import SETTINGS, another, distributions

#: Each example traces new shapes on JAX: half the shared count keeps the session short.
FEWER = settings(SETTINGS, max_examples=20)

ORDERS = [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, 1 + 1e-9, 2.0, 10.0, math.inf]


def renyi_cases() -> tuple[np.ndarray, np.ndarray]:
    """:func:`small_cases` and a pair whose power sum is far below 1 (P and Q overlap on
    2^-10 of P's mass), where ``1 - a (1 - a) A`` would cancel."""
    p, q = small_cases()
    far_p = [1 - 2.0**-10, 2.0**-10, 0.0, 0.0]
    far_q = [2.0**-40, 0.5 - 2.0**-40, 0.25, 0.25]
    return np.vstack([p, [far_p]]), np.vstack([q, [far_q]])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("alpha", ORDERS)
def test_against_mpmath(backend, xp, alpha, dtype, conformance):
    p, q = renyi_cases()
    bp, bq = backend.asarray(p, dtype), backend.asarray(q, dtype)
    got = klx.renyi_divergence(bp, bq, alpha)
    check_array(backend, got, bp, dtype, (6,))
    want = reference.renyi_rows(p, q, alpha)  # the inputs are exact in either dtype
    err = assert_within_ulps(backend.to_numpy(got), want, dtype)
    conformance(
        f"{backend.id} {dtype} Rényi divergence vs mpmath",
        f"alpha={alpha:g}",
        err,
        1.0,
        value=backend.to_numpy(got),
    )
    assert np.all(backend.to_numpy(got) >= 0)


def test_no_cliff_at_one(backend):
    p, q = renyi_cases()
    bp, bq = backend.asarray(p), backend.asarray(q)
    mid = backend.to_numpy(klx.renyi_divergence(bp, bq, 1.0))
    finite = np.isfinite(mid)
    for side in (1 - 1e-8, 1 + 1e-8):
        near = backend.to_numpy(klx.renyi_divergence(bp, bq, side))
        np.testing.assert_allclose(near[finite], mid[finite], rtol=1e-6, atol=1e-14)


def test_identities(backend):
    """Order 1: KL(P || Q); 1/2: -2 log sum sqrt(p q) (Bhattacharyya's twice); 0: -log
    Q(supp P); infinity: log max p / q."""
    p, q = renyi_cases()
    bp, bq = backend.asarray(p), backend.asarray(q)

    def renyi(alpha):
        return backend.to_numpy(klx.renyi_divergence(bp, bq, alpha))

    kl = backend.to_numpy(klx.kl_divergence(bp, bq))
    np.testing.assert_allclose(renyi(1.0), kl, rtol=1e-14, atol=1e-15)
    bc = np.sum(np.sqrt(p * q), axis=-1)
    np.testing.assert_allclose(renyi(0.5), -2 * np.log(bc), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        renyi(0.0), -np.log(np.sum(np.where(p > 0, q, 0.0), -1)), rtol=1e-14, atol=1e-15
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, p / q, -np.inf)
    np.testing.assert_allclose(renyi(math.inf), np.log(np.max(ratio, -1)), rtol=1e-14, atol=1e-15)
    by_name = klx.divergence(bp, bq, "renyi_inf")
    np.testing.assert_array_equal(backend.to_numpy(by_name), renyi(math.inf))


@pytest.mark.parametrize("form", ["log_probs", "logits"])
def test_forms_and_temperature(backend, form):
    rng = np.random.default_rng(4)
    z_p, z_q = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    t = 0.5 if form == "logits" else 1.0
    lp = z_p / t - np.log(np.sum(np.exp(z_p / t), -1, keepdims=True))
    lq = z_q / t - np.log(np.sum(np.exp(z_q / t), -1, keepdims=True))
    given = (z_p, z_q) if form == "logits" else (lp, lq)
    for alpha in (0.0, 0.3, 1.0, 3.0, math.inf):
        got = klx.renyi_divergence(
            *(backend.asarray(a) for a in given), alpha, p_form=form, q_form=form, temperature=t
        )
        want = reference.renyi_rows(np.exp(lp), np.exp(lq), alpha)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-11, atol=1e-15)


@pytest.mark.backends("dask", reason="Dask chunks along the distribution axis")
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1 - 1e-9, 2.0, math.inf])
def test_dask_chunks_along_the_distribution(backend, alpha):
    """The log is taken after the whole row's sums (or maximum), not per chunk."""
    import dask.array as da

    p, q = renyi_cases()
    dp, dq = da.from_array(p, chunks=(2, 2)), da.from_array(q, chunks=(2, 2))
    got = klx.renyi_divergence(dp, dq, alpha)
    want = reference.renyi_rows(p, q, alpha)
    np.testing.assert_allclose(np.asarray(got.compute()), want, rtol=1e-13, atol=1e-15)


@pytest.mark.backends("numpy", "torch", "jax", reason="fused_linear_divergence's own paths")
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fused_linear(backend, alpha):
    """Each chunk of tokens finishes its own rows: chunk_size 4 of 6 tokens."""
    from scipy.special import softmax

    rng = np.random.default_rng(9)
    h, w_t, w_s = rng.normal(size=(6, 4)), rng.normal(size=(9, 4)) / 2, rng.normal(size=(9, 4)) / 2
    args = [backend.asarray(a) for a in (h, w_t, h, w_s)]
    got = klx.fused_linear_divergence(
        *args, divergence="renyi", alpha=alpha, reduction="none", chunk_size=4
    )
    want = reference.renyi_rows(softmax(h @ w_t.T, axis=-1), softmax(h @ w_s.T, axis=-1), alpha)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)


@FEWER
@given(data=st.data(), a=st.floats(0.0, 5.0), b=st.floats(0.0, 5.0))
def test_properties(backend, data, a, b):
    """Never negative, 0 at P = Q, non-decreasing in the order."""
    p = data.draw(distributions())
    q = another(data, p)
    bp, bq = backend.asarray(p), backend.asarray(q)
    lo, hi = min(a, b), max(a, b)
    r_lo = backend.to_numpy(klx.renyi_divergence(bp, bq, lo))
    r_hi = backend.to_numpy(klx.renyi_divergence(bp, bq, hi))
    r_inf = backend.to_numpy(klx.renyi_divergence(bp, bq, math.inf))
    assert np.all(r_lo >= 0)
    assert np.all(r_hi >= r_lo * (1 - 1e-9) - 1e-12)
    assert np.all(r_inf >= r_hi * (1 - 1e-9) - 1e-12)
    np.testing.assert_allclose(backend.to_numpy(klx.renyi_divergence(bp, bp, lo)), 0.0, atol=1e-15)


@pytest.mark.backends("torch", "jax", reason="autodiff at zeros and at the limits")
@pytest.mark.parametrize("alpha", [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, 1 + 1e-9, 2.0])
def test_gradients(backend, alpha):
    """Finite at exact zeros (where the divergence is), and at interior points equal to
    the textbook formula's autodiff in float64."""
    p, q = small_cases()
    row = slice(3, 4) if alpha < 0.5 else slice(2, 3)
    zp, zq = exact_logits(p[row]), exact_logits(q[row])
    rng = np.random.default_rng(2)
    yp, yq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    if backend.name == "torch":
        import torch

        def grads(a, b):
            a = torch.tensor(a, requires_grad=True)
            b = torch.tensor(b, requires_grad=True)
            out = klx.renyi_divergence(a, b, alpha, p_form="logits", q_form="logits")
            got = torch.autograd.grad(out.sum(), (a, b), allow_unused=True, materialize_grads=True)
            return [g.numpy() for g in got]

        def textbook(a, b):
            a = torch.tensor(a, requires_grad=True)
            b = torch.tensor(b, requires_grad=True)
            lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            if alpha == 1.0:
                out = torch.sum(lp.exp() * (lp - lq))
            else:
                s = torch.logsumexp(alpha * lp + (1 - alpha) * lq, -1)
                out = torch.sum(s / (alpha - 1))
            return [g.numpy() for g in torch.autograd.grad(out, (a, b))]
    else:
        import jax
        import jax.numpy as jnp
        from jax.nn import log_softmax

        def grads(a, b):
            def f(x, y):
                return jnp.sum(klx.renyi_divergence(x, y, alpha, p_form="logits", q_form="logits"))

            return [np.asarray(g) for g in jax.jit(jax.grad(f, argnums=(0, 1)))(a, b)]

        def textbook(a, b):
            def f(x, y):
                lp, lq = log_softmax(x), log_softmax(y)
                if alpha == 1.0:
                    return jnp.sum(jnp.exp(lp) * (lp - lq))
                s = jax.scipy.special.logsumexp(alpha * lp + (1 - alpha) * lq, axis=-1)
                return jnp.sum(s / (alpha - 1))

            return [
                np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
            ]

    for g in grads(zp, zq):
        assert np.all(np.isfinite(g)), g
    if abs(alpha - 1.0) > 1e-6 or alpha == 1.0:  # the textbook form cancels near 1
        for g, w in zip(grads(yp, yq), textbook(yp, yq), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.backends("torch", reason="torch.compile(fullgraph=True)")
def test_torch_compile_fullgraph(backend):
    import torch

    p, q = renyi_cases()
    tp, tq = torch.tensor(p), torch.tensor(q)
    for alpha in (0.5, math.inf):
        f = torch.compile(lambda a, b, al=alpha: klx.renyi_divergence(a, b, al), fullgraph=True)
        want = reference.renyi_rows(p, q, alpha)
        np.testing.assert_allclose(f(tp, tq).numpy(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.backends("numpy", reason="argument checks, backend-independent")
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p, q: klx.renyi_divergence(p, q, -1.0), ValueError, "`alpha` must be a finite"),
        (lambda p, q: klx.renyi_divergence(p, q, "2"), TypeError, "`alpha` must be"),
        (lambda p, q: klx.divergence(p, q, "renyi", alpha=math.inf), ValueError, "order infinity"),
        (lambda p, q: klx.divergence(p, q, "renyi_inf", alpha=2.0), TypeError, "not an option"),
    ],
)
def test_bad_orders_are_refused(backend, call, error, match):
    p, q = renyi_cases()
    with pytest.raises(error, match=match):
        call(p, q)
