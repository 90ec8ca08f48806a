"""The forward/reverse mixture ``lam KL(P || Q) + (1 - lam) KL(Q || P)`` (by name, 'mix'):
against mpmath at 50 digits, the weighted sum of the two KLs, near P = Q from logits,
its closed-form gradients (traced too) against autodiff of the textbook formula,
fused-linear with gradients, hypothesis properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import klx
from support import reference
from support.asserts import assert_within_ulps, check_array
from support.cases import small_cases
from support.strategies import SETTINGS, another, distributions

#: Each example traces new shapes on JAX: half the shared count keeps the session short.
FEWER = settings(SETTINGS, max_examples=20)

LAMS = [0.0, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lam", LAMS)
def test_against_mpmath(backend, xp, lam, dtype, conformance):
    p, q = small_cases()
    bp, bq = backend.asarray(p, dtype), backend.asarray(q, dtype)
    got = klx.divergence(bp, bq, "mix", lam=lam)
    check_array(backend, got, bp, dtype, (5,))
    want = reference.mix_rows(p, q, lam)
    err = assert_within_ulps(backend.to_numpy(got), want, dtype)
    conformance(
        f"{backend.id} {dtype} forward/reverse KL mix vs mpmath",
        f"lam={lam:g}",
        err,
        1.0,
        value=backend.to_numpy(got),
    )


@FEWER
@given(data=st.data(), lam=st.floats(0.0, 1.0))
def test_is_the_weighted_sum_of_both_kls(backend, data, lam):
    p = data.draw(distributions(zeros=False))
    q = another(data, p)
    bp, bq = backend.asarray(p), backend.asarray(q)
    got = backend.to_numpy(klx.divergence(bp, bq, "mix", lam=lam))
    fwd, rev = reference.kl_rows(p, q, -1)[0], reference.kl_rows(q, p, -1)[0]
    with np.errstate(invalid="ignore"):  # a direction of weight 0 adds nothing
        want = np.where(lam == 0.0, 0.0, lam * fwd) + np.where(lam == 1.0, 0.0, (1 - lam) * rev)
    assert np.all(got >= 0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(backend.to_numpy(klx.divergence(bp, bp, "mix", lam=lam)), 0.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_near_p_equal_q_from_logits(backend, dtype):
    """Logits 1e-3 apart: each direction's terms are >= 0, none cancels."""
    from scipy.special import log_softmax

    rng = np.random.default_rng(1)
    z = rng.normal(size=(8, 1000))
    zq = z + 1e-3 * rng.normal(size=z.shape)
    z, zq = z.astype(dtype).astype(np.float64), zq.astype(dtype).astype(np.float64)
    lp, lq = log_softmax(z, -1), log_softmax(zq, -1)
    want = 0.5 * np.sum(np.exp(lp) * (lp - lq), -1) + 0.5 * np.sum(np.exp(lq) * (lq - lp), -1)
    got = klx.divergence(
        backend.asarray(z, dtype),
        backend.asarray(zq, dtype),
        "mix",
        p_form="logits",
        q_form="logits",
    )
    got = backend.to_numpy(got)
    assert np.all(got >= 0)
    np.testing.assert_allclose(got, want, rtol={"float64": 1e-9, "float32": 3e-4}[dtype])


def _logits_rows():
    """Logits of special rows (temperature 2): general, near-equal (1e-3), P = Q, d far
    above and below 0, a sharp pair, zeros of P (+inf unless lam = 1), of Q (+inf unless
    lam = 0), a vocabulary masked on both sides, a P whose small weights underflow in
    float32, a NaN."""
    rng = np.random.default_rng(12)
    t = rng.normal(scale=2.0, size=(11, 40))
    s = t + 0.5 * rng.normal(size=t.shape)
    s[1] = t[1] + 1e-3 * rng.normal(size=40)
    s[2] = t[2]
    t[3, 0] = 30.0
    s[4, 0] = 30.0
    t[5] *= 10.0
    t[6, ::7] = -np.inf
    s[7, 3] = -np.inf
    t[8, ::5] = s[8, ::5] = -np.inf
    t[9, 1:] -= 250.0
    t[10, 4] = np.nan
    return t, s


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_from_logits_against_mpmath(backend, lam, dtype, conformance):
    """The definition between two logits inputs (``d (p - q) / 2`` at 1/2, ``(2 lam - 1)
    p expm1(-d) + d (lam p - (1 - lam) q)`` else) against mpmath at 50 digits, row by
    row: float64 within 4 ulps (or 1e-15), float32 within 1e-6, +inf and NaN where mpmath
    has them; the near-equal row as its logits allow (1e-9, 1e-2)."""
    t, s = _logits_rows()
    t, s = t.astype(dtype), s.astype(dtype)
    bt, bs = backend.asarray(t, dtype), backend.asarray(s, dtype)
    kw = {"p_form": "logits", "q_form": "logits", "temperature": 2.0, "lam": lam}
    got = klx.divergence(bt, bs, "mix", **kw)
    check_array(backend, got, bt, dtype, (11,))
    got = backend.to_numpy(got).astype(np.float64)
    want = reference.mp_mix_rows(t, s, lam, "logits", 2.0)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    assert got[2] == 0.0
    finite = np.isfinite(want)
    assert np.all(got[finite] >= 0)
    near = {"float64": 1e-9, "float32": 1e-2}[dtype]
    assert abs(got[1] - want[1]) <= near * want[1]
    keep = finite.copy()
    keep[1] = False
    if backend.name == "dask" and dtype == "float64":
        # Dask's chunks take the NumPy row kernels, which rebuild q as p expm1(-d): at d
        # near -125 (row 9's tail, still representable in float64) q carries |d| times
        # the rounding of d, 7 ulps of this row. (In float32 that tail underflows and the
        # row is the definition's.)
        keep[9] = False
        assert abs(got[9] - want[9]) <= 1e-13 * want[9]
    err = assert_within_ulps(got[keep], want[keep], dtype)
    conformance(
        f"{backend.id} {dtype} forward/reverse KL mix from logits vs mpmath",
        f"logits, lam={lam:g}",  # (the report keys cells by this: apart from the probs')
        err,
        1.0,
        value=got,
    )


def _textbook(lib, lp, lq, lam):
    p, q = lib.exp(lp), lib.exp(lq)
    return lib.sum(lam * p * (lp - lq) + (1 - lam) * q * (lq - lp))


@pytest.mark.backends("torch", "jax", reason="closed-form gradients, eager and traced")
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.filterwarnings(  # torch's, from its compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_gradients_match_autodiff_of_the_formula(backend, lam):
    rng = np.random.default_rng(6)
    zp, zq = rng.normal(size=(3, 9)), rng.normal(size=(3, 9))
    t = 1.5
    if backend.name == "torch":
        import torch

        def grads(f, *args):
            a = [torch.tensor(x, requires_grad=True) for x in args]
            return [g.numpy() for g in torch.autograd.grad(f(*a), a)]

        def mine(a, b):
            return klx.divergence(
                a, b, "mix", lam=lam, p_form="logits", q_form="logits", temperature=t
            ).sum()

        def ref(a, b):
            return _textbook(torch, torch.log_softmax(a / t, -1), torch.log_softmax(b / t, -1), lam)

        compiled = torch.compile(mine, fullgraph=True)
        got, want, traced = grads(mine, zp, zq), grads(ref, zp, zq), grads(compiled, zp, zq)
    else:
        import jax
        import jax.numpy as jnp

        def mine(a, b):
            return klx.divergence(
                a, b, "mix", lam=lam, p_form="logits", q_form="logits", temperature=t
            ).sum()

        def ref(a, b):
            ls = jax.nn.log_softmax
            return _textbook(jnp, ls(a / t), ls(b / t), lam)

        args = (jnp.asarray(zp), jnp.asarray(zq))
        got = [np.asarray(g) for g in jax.grad(mine, argnums=(0, 1))(*args)]
        want = [np.asarray(g) for g in jax.grad(ref, argnums=(0, 1))(*args)]
        traced = [np.asarray(g) for g in jax.jit(jax.grad(mine, argnums=(0, 1)))(*args)]
    for g, gt, w in zip(got, traced, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(gt, w, rtol=1e-10, atol=1e-13)


@pytest.mark.backends("torch", "jax", reason="closed-form gradients, eager and traced")
@pytest.mark.parametrize("lam", [0.3, 0.7])
@pytest.mark.filterwarnings(  # torch's, from its compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_student_gradient_where_the_teacher_has_zeros(backend, lam):
    """The student's gradient where the teacher's logits are ``-inf``: on a row where P is
    0 under Q > 0 (KL(Q || P) is +inf) ``-inf`` wherever Q is positive; where both are 0
    at the same entries, finite, autodiff of the textbook formula over the other entries
    (float64), and 0 at those entries."""
    rng = np.random.default_rng(8)
    zp, zq = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    zp[1, ::3] = -np.inf  # P is 0 under Q > 0
    zp[2, 1::2] = zq[2, 1::2] = -np.inf  # both 0
    support = ((0, slice(None)), (2, slice(0, None, 2)))

    def mine(a, b):
        return klx.divergence(a, b, "mix", lam=lam, p_form="logits", q_form="logits").sum()

    want = np.zeros_like(zq)
    want[1] = -np.inf
    if backend.name == "torch":
        import torch

        for row, keep in support:  # the formula's autodiff over the support
            a = torch.tensor(zp[row, keep])
            b = torch.tensor(zq[row, keep], requires_grad=True)
            _textbook(torch, torch.log_softmax(a, -1), torch.log_softmax(b, -1), lam).backward()
            want[row, keep] = b.grad.numpy()

        def grad(f):
            b = torch.tensor(zq, requires_grad=True)
            f(torch.tensor(zp), b).backward()
            return b.grad.numpy()

        got = [grad(mine), grad(torch.compile(mine, fullgraph=True))]
    else:
        import jax
        import jax.numpy as jnp

        ls = jax.nn.log_softmax
        for row, keep in support:
            a = jnp.asarray(zp[row, keep])
            ref = jax.grad(lambda b, a=a: _textbook(jnp, ls(a), ls(b), lam))
            want[row, keep] = np.asarray(ref(jnp.asarray(zq[row, keep])))
        args = (jnp.asarray(zp), jnp.asarray(zq))
        g = jax.grad(mine, argnums=1)
        got = [np.asarray(g(*args)), np.asarray(jax.jit(g)(*args))]
    for g in got:
        np.testing.assert_array_equal(g[1], want[1])
        np.testing.assert_allclose(g[[0, 2]], want[[0, 2]], rtol=1e-10, atol=1e-13)


@pytest.mark.backends("numpy", "torch", "jax", reason="fused_linear_divergence's own paths")
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.8])
def test_fused_linear_value_and_gradients(backend, lam):
    from scipy.special import softmax

    rng = np.random.default_rng(9)
    h, w_t, w_s = rng.normal(size=(6, 4)), rng.normal(size=(9, 4)) / 2, rng.normal(size=(9, 4)) / 2
    want = reference.mix_rows(softmax(h @ w_t.T, axis=-1), softmax(h @ w_s.T, axis=-1), lam)
    args = [backend.asarray(a) for a in (h, w_t, h, w_s)]
    kw = {"divergence": "mix", "lam": lam, "chunk_size": 4}
    got = klx.fused_linear_divergence(*args, reduction="none", **kw)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)
    if backend.name == "numpy":
        return
    if backend.name == "torch":
        import torch

        ws = torch.tensor(w_s, requires_grad=True)
        klx.fused_linear_divergence(*args[:3], ws, reduction="sum", **kw).backward()
        grad = ws.grad.numpy()
        wr = torch.tensor(w_s, requires_grad=True)
        lp = torch.log_softmax(torch.tensor(h) @ torch.tensor(w_t).T, -1)
        lq = torch.log_softmax(torch.tensor(h) @ wr.T, -1)
        _textbook(torch, lp, lq, lam).backward()
        ref = wr.grad.numpy()
    else:
        import jax
        import jax.numpy as jnp

        def f(ws):
            return klx.fused_linear_divergence(*args[:3], ws, reduction="sum", **kw)

        def g(ws):
            ls = jax.nn.log_softmax
            return _textbook(jnp, ls(args[0] @ args[1].T), ls(args[0] @ ws.T), lam)

        grad = np.asarray(jax.grad(f)(jnp.asarray(w_s)))
        ref = np.asarray(jax.grad(g)(jnp.asarray(w_s)))
    np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.backends("numpy", reason="argument checks, backend-independent")
@pytest.mark.parametrize(("lam", "error"), [(1.5, ValueError), ("0.5", TypeError)])
def test_bad_weights_are_refused(backend, lam, error):
    p, q = small_cases()
    with pytest.raises(error, match="`lam`"):
        klx.divergence(p, q, "mix", lam=lam)
