"""alpha_divergence: Amari's family against mpmath at 50 digits (near-equal P and Q,
one-hot, zeros in P or in Q) at every order the issue names, through the limits 0 and 1;
its identities (KL both ways, four times the squared Hellinger distance, the swap
symmetry); every form; gradients; fused-linear; hypothesis properties; errors."""

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

#: The orders of issue 26's truth table (infinity is Rényi's only).
ORDERS = [-1.0, 0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, 1 + 1e-9, 2.0, 10.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("alpha", ORDERS)
def test_against_mpmath(backend, xp, alpha, dtype, conformance):
    p, q = small_cases()
    bp, bq = backend.asarray(p, dtype), backend.asarray(q, dtype)
    got = klx.alpha_divergence(bp, bq, alpha)
    check_array(backend, got, bp, dtype, (5,))
    want = reference.alpha_rows(p, q, alpha)  # the inputs are exact in either dtype
    err = assert_within_ulps(backend.to_numpy(got), want, dtype)
    conformance(
        f"{backend.id} {dtype} alpha-divergence vs mpmath",
        f"alpha={alpha:g}",
        err,
        1.0,
        value=backend.to_numpy(got),
    )
    assert np.all(backend.to_numpy(got) >= 0)


@pytest.mark.parametrize("at", [0.0, 1.0])
def test_no_cliff_at_the_limits(backend, at):
    """1e-8 either side of 0 and 1 the value moves by O(1e-8) of itself, not more."""
    p, q = small_cases()
    bp, bq = backend.asarray(p), backend.asarray(q)
    mid = backend.to_numpy(klx.alpha_divergence(bp, bq, at))
    finite = np.isfinite(mid)
    for side in (at - 1e-8, at + 1e-8):
        near = backend.to_numpy(klx.alpha_divergence(bp, bq, side))
        np.testing.assert_allclose(near[finite], mid[finite], rtol=1e-6, atol=1e-14)


def test_identities(backend):
    """alpha = 1 is KL(P || Q), alpha = 0 is KL(Q || P), alpha = 1/2 is 4 H^2 with
    H^2 = 1/2 sum (sqrt p - sqrt q)^2, and D_a(P || Q) = D_(1-a)(Q || P)."""
    p, q = small_cases()
    bp, bq = backend.asarray(p), backend.asarray(q)
    kl_pq = reference.kl_rows(p, q, -1)[0]
    kl_qp = reference.kl_rows(q, p, -1)[0]
    np.testing.assert_allclose(
        backend.to_numpy(klx.alpha_divergence(bp, bq, 1.0)), kl_pq, rtol=1e-14, atol=1e-15
    )
    np.testing.assert_allclose(
        backend.to_numpy(klx.alpha_divergence(bp, bq, 0.0)), kl_qp, rtol=1e-14, atol=1e-15
    )
    h2 = 0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=-1)
    np.testing.assert_allclose(
        backend.to_numpy(klx.alpha_divergence(bp, bq, 0.5)), 4 * h2, rtol=1e-14, atol=1e-15
    )
    for a in (-1.0, 0.3, 2.0):
        np.testing.assert_allclose(
            backend.to_numpy(klx.alpha_divergence(bp, bq, a)),
            backend.to_numpy(klx.alpha_divergence(bq, bp, 1.0 - a)),
            rtol=1e-13,
            atol=1e-15,
        )


@pytest.mark.parametrize("form", ["log_probs", "logits"])
def test_forms_and_temperature(backend, form):
    rng = np.random.default_rng(3)
    z_p, z_q = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    t = 2.0 if form == "logits" else 1.0
    lp = z_p / t - np.log(np.sum(np.exp(z_p / t), -1, keepdims=True))
    lq = z_q / t - np.log(np.sum(np.exp(z_q / t), -1, keepdims=True))
    given = (z_p, z_q) if form == "logits" else (lp, lq)
    for alpha in (0.0, 0.3, 1.0, 2.5):
        got = klx.alpha_divergence(
            *(backend.asarray(a) for a in given), alpha, p_form=form, q_form=form, temperature=t
        )
        want = reference.alpha_rows(np.exp(lp), np.exp(lq), alpha)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12, atol=1e-15)


def test_where_and_reductions(backend):
    p, q = small_cases()
    keep = np.array([True, False, True, True, False])
    bp, bq = backend.asarray(p), backend.asarray(q)
    rows = reference.alpha_rows(p, q, 0.7)
    got = klx.alpha_divergence(bp, bq, 0.7, where=backend.asarray(keep), reduction="batchmean")
    check_array(backend, got, bp, "float64", ())
    np.testing.assert_allclose(backend.to_numpy(got), rows[keep].sum() / keep.sum(), rtol=1e-13)
    got = klx.alpha_divergence(bp, bq, 0.7, reduction="sum")
    np.testing.assert_allclose(backend.to_numpy(got), rows.sum(), rtol=1e-13)


@FEWER
@given(data=st.data(), alpha=st.floats(-3.0, 4.0))
def test_properties(backend, data, alpha):
    """Never negative; exactly 0 for P = Q; continuous in alpha."""
    p = data.draw(distributions())
    q = another(data, p)
    bp, bq = backend.asarray(p), backend.asarray(q)
    got = backend.to_numpy(klx.alpha_divergence(bp, bq, alpha))
    assert np.all(got >= 0)
    np.testing.assert_array_equal(backend.to_numpy(klx.alpha_divergence(bp, bp, alpha)), 0.0)
    near = backend.to_numpy(klx.alpha_divergence(bp, bq, alpha + 1e-9))
    finite = np.isfinite(got) & (got < 1e6)
    # the terms q / alpha and p / (1 - alpha) move by 1e-9 / alpha of themselves
    steep = 1e-9 / max(min(abs(alpha), abs(1.0 - alpha)), 1e-9)
    np.testing.assert_allclose(near[finite], got[finite], rtol=1e-6 + 2 * steep, atol=1e-12)


def _textbook(torch, p, q, alpha):
    """The definition as written, in float64 torch (interior points only)."""
    a = alpha
    return torch.sum((a * p + (1 - a) * q - p**a * q ** (1 - a)) / (a * (1 - a)), dim=-1)


@pytest.mark.backends("torch", reason="torch autograd against the textbook formula's")
@pytest.mark.parametrize("alpha", [-1.0, 0.3, 0.5, 2.0])
def test_torch_gradients(backend, alpha):
    import torch

    rng = np.random.default_rng(5)
    z = rng.normal(size=(2, 2, 5))
    p = torch.softmax(torch.tensor(z[0]), -1).requires_grad_(True)
    q = torch.softmax(torch.tensor(z[1]), -1).requires_grad_(True)
    got = torch.autograd.grad(klx.alpha_divergence(p, q, alpha, reduction="sum"), (p, q))
    want = torch.autograd.grad(_textbook(torch, p, q, alpha).sum(), (p, q))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.backends("torch", "jax", reason="autodiff at zeros and at the limits")
@pytest.mark.parametrize("alpha", [0.0, 1e-9, 1 - 1e-9, 1.0, 1 + 1e-9])
def test_gradients_finite_at_zeros_and_limits(backend, alpha):
    """Exact zeros (-inf logits, 0 probabilities) where the divergence is finite: zeros
    in Q below alpha = 1/2, zeros in P above."""
    p, q = small_cases()
    row = slice(3, 4) if alpha < 0.5 else slice(2, 3)
    p, q = p[row], q[row]
    if backend.name == "torch":
        import torch

        zp = torch.tensor(exact_logits(p), requires_grad=True)
        zq = torch.tensor(exact_logits(q), requires_grad=True)
        out = klx.alpha_divergence(zp, zq, alpha, p_form="logits", q_form="logits")
        assert bool(torch.isfinite(out).all())
        grads = [g.numpy() for g in torch.autograd.grad(out.sum(), (zp, zq))]
        tp, tq = torch.tensor(p, requires_grad=True), torch.tensor(q, requires_grad=True)
        grads += [
            g.numpy()
            for g in torch.autograd.grad(klx.alpha_divergence(tp, tq, alpha).sum(), (tp, tq))
        ]
    else:
        import jax
        import jax.numpy as jnp

        def f(a, b, form):
            return jnp.sum(klx.alpha_divergence(a, b, alpha, p_form=form, q_form=form))

        g = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)
        grads = [
            np.asarray(x)
            for x in g(jnp.asarray(exact_logits(p)), jnp.asarray(exact_logits(q)), "logits")
        ]
        grads += [np.asarray(x) for x in g(jnp.asarray(p), jnp.asarray(q), "probs")]
    for gr in grads:
        assert np.all(np.isfinite(gr)), gr


@pytest.mark.backends("jax", reason="jax.jit, jax.vmap")
def test_jax_jit_and_vmap(backend):
    import jax
    import jax.numpy as jnp

    p, q = small_cases()
    f = jax.jit(lambda a, b: klx.alpha_divergence(a, b, 0.3))
    np.testing.assert_allclose(
        np.asarray(f(jnp.asarray(p), jnp.asarray(q))),
        reference.alpha_rows(p, q, 0.3),
        rtol=1e-13,
        atol=1e-15,
    )
    rows = jax.vmap(lambda a, b: klx.alpha_divergence(a, b, 0.3))(jnp.asarray(p), jnp.asarray(q))
    np.testing.assert_allclose(
        np.asarray(rows), reference.alpha_rows(p, q, 0.3), rtol=1e-13, atol=1e-15
    )


@pytest.mark.backends("torch", reason="torch.compile(fullgraph=True)")
def test_torch_compile_fullgraph(backend):
    import torch

    p, q = small_cases()
    tp, tq = torch.tensor(p), torch.tensor(q)
    f = torch.compile(lambda a, b: klx.alpha_divergence(a, b, 0.3, reduction="sum"), fullgraph=True)
    np.testing.assert_allclose(float(f(tp, tq)), reference.alpha_rows(p, q, 0.3).sum(), rtol=1e-12)


@pytest.mark.backends("numpy", "torch", "jax", reason="fused_linear_divergence's own paths")
def test_fused_linear(backend):
    rng = np.random.default_rng(9)
    h, w_t, w_s = rng.normal(size=(6, 4)), rng.normal(size=(9, 4)) / 2, rng.normal(size=(9, 4)) / 2
    args = [backend.asarray(a) for a in (h, w_t, h, w_s)]
    got = klx.fused_linear_divergence(
        *args, divergence="alpha", alpha=0.3, reduction="sum", chunk_size=4
    )
    z_p, z_q = h @ w_t.T, h @ w_s.T
    from scipy.special import softmax as soft

    np.testing.assert_allclose(
        float(backend.to_numpy(got)),
        reference.alpha_rows(soft(z_p, axis=-1), soft(z_q, axis=-1), 0.3).sum(),
        rtol=1e-12,
    )


@pytest.mark.backends("numpy", reason="argument checks, backend-independent")
@pytest.mark.parametrize(
    ("alpha", "error", "match"),
    [(math.inf, ValueError, "`alpha` must be finite"), ("0.5", TypeError, "`alpha` must be")],
)
def test_bad_orders_are_refused(backend, alpha, error, match):
    p, q = small_cases()
    with pytest.raises(error, match=match):
        klx.alpha_divergence(p, q, alpha)
