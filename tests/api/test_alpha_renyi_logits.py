"""The alpha-divergence and Rényi's divergence between two sets of logits (issue 24): their
terms from the plain log-softmaxes (a Taylor polynomial near P = Q, the written form
beyond; at order 1/2 two exponentials per element) and their closed-form derivatives,
against mpmath at 50 digits, eagerly, inside jax.jit and inside
torch.compile(fullgraph=True) on the CPU (where inductor takes ``expm1`` as ``exp(x) -
1``).

Cases (float32 logits): within 1e-3 of each other, far apart, so far apart that the power
sum underflows the dtype (Rényi's shifted sum), ``-inf`` logits on either side and on
both, a NaN row; orders 1/2, 2, near 1 (0.999, 1.001), 0.3 and 5. Gradients: against
central differences of the mpmath value; Rényi's of order 2 between far-apart logits
were NaN by autodiff of the definition (its overflowing alpha terms), and are finite now.
Second derivatives: the closed form's against the definition's (float64).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import klx
from support import reference
from support.backends import traced as traced_by

ORDERS = [0.5, 2.0, 0.999, 1.001, 0.3, 5.0]
KINDS = ("alpha", "renyi")


def _logits() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(24)
    t = 2.0 * rng.normal(size=(6, 9))
    s = 2.0 * rng.normal(size=(6, 9))
    s[0] = t[0] + 1e-3 * rng.normal(size=9)  # near P = Q
    t[2, 1] = -np.inf  # P is 0 there
    s[2, 4] = -np.inf  # Q is 0 there
    t[3, 5] = s[3, 5] = -np.inf  # both
    t[4], s[4] = 100.0 * rng.normal(size=9), 300.0 * rng.normal(size=9)  # sum p^a q^b < 1e-38
    s[5, 2] = np.nan
    return t, s


def _mp_value(kind: str, alpha: float, x: np.ndarray, y: np.ndarray) -> mpmath.mpf:
    """One row's divergence from logits, in mpmath (the logits' float values exactly)."""
    p, _ = reference._mp_weights_and_logs(x, "logits", 1.0)
    q, _ = reference._mp_weights_and_logs(y, "logits", 1.0)
    if any(mpmath.isnan(v) for v in (*p, *q)):
        return mpmath.nan
    a = mpmath.mpf(alpha)
    if alpha > 1 and any(u > 0 and v == 0 for u, v in zip(p, q, strict=True)):
        return mpmath.inf
    power = mpmath.fsum(u**a * v ** (1 - a) for u, v in zip(p, q, strict=True) if u and v)
    if kind == "alpha":
        return (1 - power) / (a * (1 - a))
    return mpmath.log(power) / (a - 1) if power else mpmath.inf


def _mp_rows(kind: str, alpha: float, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    return reference._mp_rows(lambda x, y: _mp_value(kind, alpha, x, y), t, s)


def _call(kind: str, alpha: float):
    fn = klx.alpha_divergence if kind == "alpha" else klx.renyi_divergence

    def call(a, b):
        return fn(a, b, alpha, p_form="logits", q_form="logits", reduction="none")

    return call


@pytest.mark.parametrize("alpha", ORDERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_values_against_mpmath(backend, kind, alpha, traced):
    """float32 logits: within 5e-4 of the exact value (near P = Q the float32 logits'
    own log-softmax rounding, about 1e-4 there, is the floor), +inf where it is infinite
    or overflows float32, NaN rows, never negative."""
    t, s = _logits()
    a, b = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    et, es = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    fn = _call(kind, alpha)
    with np.errstate(invalid="ignore"):
        got = np.asarray(backend.to_numpy((traced_by(backend, fn) if traced else fn)(a, b)))
    want = _mp_rows(kind, alpha, et, es)
    got = got.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    big = np.isinf(want) | (np.abs(want) > np.finfo(np.float32).max)
    assert np.all(got[big] == np.inf), (got, want)
    ok = np.isfinite(want) & ~big
    np.testing.assert_allclose(got[ok], want[ok], rtol=5e-4, atol=0)
    assert np.all(got[~np.isnan(got)] >= 0)


#: The mpmath references of test_gradients_against_mpmath, by (kind, order).
_MP_GRADS: dict[tuple[str, float], tuple] = {}


def _mp_grads(kind: str, alpha: float, t: np.ndarray, s: np.ndarray, rows) -> tuple:
    """Central differences (step 1e-6) of the mpmath value of each row in `rows`."""
    h = 1e-6
    out = []
    for x in (t, s):
        g = np.zeros_like(x)
        for i in rows:
            for j in np.flatnonzero(np.isfinite(x[i])):
                up, down = x[i].copy(), x[i].copy()
                up[j] += h
                down[j] -= h
                args_up = (up, s[i]) if x is t else (t[i], up)
                args_down = (down, s[i]) if x is t else (t[i], down)
                with mpmath.workdps(reference.MP_DIGITS):
                    diff = _mp_value(kind, alpha, *args_up) - _mp_value(kind, alpha, *args_down)
                    g[i, j] = float(diff / (2 * h))
        out.append(g)
    return tuple(out)


def _grads(backend, fn, t, s, traced):
    """float32 gradients of ``sum(fn(t, s) * w)`` in both inputs (w: 1 on the finite rows)."""
    if backend.name == "jax":
        import jax
        import jax.numpy as jnp

        def total(a, b):
            v = fn(a, b)
            return jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0))

        g = jax.grad(total, argnums=(0, 1))
        g = jax.jit(g) if traced else g
        ga, gb = g(backend.asarray(t, "float32"), backend.asarray(s, "float32"))
        return np.asarray(ga, dtype=np.float64), np.asarray(gb, dtype=np.float64)
    import torch

    a = backend.asarray(t, "float32").requires_grad_(True)
    b = backend.asarray(s, "float32").requires_grad_(True)

    def total(a, b):
        v = fn(a, b)
        return torch.where(torch.isfinite(v), v, 0.0).sum()

    (traced_by(backend, total) if traced else total)(a, b).backward()
    return backend.to_numpy(a.grad).astype(np.float64), backend.to_numpy(b.grad).astype(np.float64)


@pytest.mark.filterwarnings(  # torch's, from the closed-form row's compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.backends("torch", "jax", reason="closed-form derivatives: torch and JAX rows")
@pytest.mark.parametrize("alpha", [0.5, 2.0, 0.999, 1.001, 0.3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_gradients_against_mpmath(backend, kind, alpha, traced):
    """The closed-form derivatives of float32 calls, in the teacher's and the student's
    logits, within 5e-3 of each row's largest derivative (central differences of the
    mpmath value): near P = Q, far apart, ``-inf`` logits (a derivative of 0 there), and
    far apart at order 2, where autodiff of the definition gave NaN."""
    t, s = _logits()
    t, s = t[:5].astype(np.float32).astype(np.float64), s[:5].astype(np.float32).astype(np.float64)
    if kind == "alpha":  # its value overflows float32 there
        t, s = t[:4], s[:4]
    rows = [i for i in range(len(t)) if not (alpha > 1 and i == 2)]  # +inf: Q is 0 under P
    g_t, g_s = _grads(backend, _call(kind, alpha), t, s, traced)
    key = (kind, alpha)  # the same for the eager and the traced call, and every backend
    if key not in _MP_GRADS:
        _MP_GRADS[key] = _mp_grads(kind, alpha, t, s, rows)
    w_t, w_s = _MP_GRADS[key]
    for i in rows:
        scale = max(np.abs(w_t[i]).max(), np.abs(w_s[i]).max())
        for got, want in ((g_t[i], w_t[i]), (g_s[i], w_s[i])):
            assert np.all(np.isfinite(got)), (i, got)
            np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 * scale, err_msg=f"row {i}")
    assert np.all(np.isfinite(g_t)) and np.all(np.isfinite(g_s))  # also rows dropped
    assert g_s[3, 5] == 0 and g_t[3, 5] == 0 and (2 not in rows or g_t[2, 1] == 0)  # -inf


@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.backends("torch", "jax", reason="second derivatives: torch and JAX")
@pytest.mark.parametrize("alpha", [0.5, 2.0, 0.999])
@pytest.mark.parametrize("kind", KINDS)
def test_second_derivatives_match_the_definition(backend, kind, alpha):
    """Second derivatives in the student's logits (float64) through the closed form (the
    derivative of the derivative) match those of autodiff of the definition."""
    rng = np.random.default_rng(5)
    t, s = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    fn = klx.alpha_divergence if kind == "alpha" else klx.renyi_divergence

    def f(a, b):
        return fn(a, b, alpha, p_form="logits", q_form="logits", reduction="sum")

    def hessian():
        if backend.name == "jax":
            import jax

            return np.asarray(jax.hessian(lambda y: f(backend.asarray(t), y))(backend.asarray(s)))
        import torch

        a = backend.asarray(t)
        h = torch.autograd.functional.hessian(lambda y: f(a, y), backend.asarray(s))
        return backend.to_numpy(h)

    got = hessian()
    klx.set_accelerators(False)
    try:
        want = hessian()
    finally:
        klx.set_accelerators(True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.backends("torch", "jax", reason="second derivatives: torch and JAX")
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_renyi_second_derivative_without_common_support(backend, alpha):
    """Reverse over reverse (the gradient of a gradient's projection) where one row has no
    common support (Rényi is +inf there, its derivative 0): 0 on that row, not NaN (JAX's
    power sum of 0 once sent a 0 cotangent into ``log(0)``); the other row as autodiff of
    the definition (float64)."""
    rng = np.random.default_rng(9)
    t, s = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    t[1, :3] = -np.inf
    s[1, 3:] = -np.inf
    w = rng.normal(size=(2, 6))

    def f(a, b):
        return klx.renyi_divergence(a, b, alpha, p_form="logits", q_form="logits", reduction="none")

    def second():
        if backend.name == "jax":
            import jax
            import jax.numpy as jnp

            a, d = jnp.asarray(t), jnp.asarray(w)

            def projected(y):
                return jnp.sum(jax.grad(lambda z: jnp.sum(f(a, z)[0]) + f(a, z)[1] * 0.0)(y) * d)

            return np.asarray(jax.grad(projected)(jnp.asarray(s)))
        import torch

        a, d = torch.tensor(t), torch.tensor(w)
        y = torch.tensor(s, requires_grad=True)
        rows = f(a, y)
        (g,) = torch.autograd.grad(rows[0] + rows[1] * 0.0, y, create_graph=True)
        (h,) = torch.autograd.grad((g * d).sum(), y)
        return h.numpy()

    got = second()
    assert np.all(got[1] == 0.0), got[1]
    klx.set_accelerators(False)
    try:
        want = second()
    finally:
        klx.set_accelerators(True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-12)


def test_renyi_gradient_far_apart_is_finite_at_order_two():
    """Guard for the case that was NaN (no backend fixture: torch only, eager)."""
    torch = pytest.importorskip("torch")
    t, s = _logits()
    a = torch.tensor(t[4:5], dtype=torch.float32)
    b = torch.tensor(s[4:5], dtype=torch.float32, requires_grad=True)
    klx.renyi_divergence(a, b, 2.0, p_form="logits", q_form="logits").backward()
    assert torch.isfinite(b.grad).all() and math.isfinite(float(b.grad.abs().sum()))


@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.backends("torch", reason="torch autograd of a float64 formula as the reference")
@pytest.mark.parametrize(("kind", "alpha"), [("alpha", 0.7), ("alpha", -0.3), ("renyi", 2.0)])
def test_gradients_of_peaked_rows(backend, kind, alpha):
    """float32 closed-form gradients of rows whose top entry holds nearly all the mass in
    both P and Q, against torch autograd of the textbook formula in float64: within 2e-5
    of each row's largest entry (1e-6 measured). As ``(p S - p^a q^b) / b`` with the
    value's ``S`` they were 7e-3 off (alpha 0.7) and 3e-4 (Rényi 2)."""
    import torch

    rng = np.random.default_rng(31)
    t = 3.0 * rng.normal(size=(6, 400))
    t[:, 0] += 12.0
    s = t + 0.3 * rng.normal(size=t.shape)

    def reference_grads():
        a = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        power = torch.exp(alpha * lp + (1.0 - alpha) * lq).sum(-1)
        if kind == "alpha":
            value = (1.0 - power) / (alpha * (1.0 - alpha))
        else:
            value = torch.log(power) / (alpha - 1.0)
        value.sum().backward()
        return a.grad.numpy(), b.grad.numpy()

    fn = klx.alpha_divergence if kind == "alpha" else klx.renyi_divergence
    a = backend.asarray(t, "float32").requires_grad_(True)
    b = backend.asarray(s, "float32").requires_grad_(True)
    fn(a, b, alpha, p_form="logits", q_form="logits", reduction="sum").backward()
    for got, want in zip((a.grad, b.grad), reference_grads(), strict=True):
        got = backend.to_numpy(got).astype(np.float64)
        scale = np.abs(want).max(axis=-1, keepdims=True)
        assert np.max(np.abs(got - want) / scale) < 2e-5


@pytest.mark.parametrize("alpha", [0.3, 0.7])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_renyi_of_large_logits(backend, alpha, traced):
    """Logits near 1e10 (float32 spacing 1024) and, divided by T = 0.01, near 1e7: the
    shift of Rényi's far form (torch: from the shifted logits, not the raw ones, whose
    rounding, ulp(logit) / T, overflowed exp and gave 0 or +inf) keeps the value mpmath's."""
    t = np.array([[1e10, 1e10 - 16384.0, 1e10 - 4096.0], [1e5, 1e5 - 64.0, 1e5 - 80.0]])
    s = np.array([[1e10 - 16384.0, 1e10, 1e10 - 8192.0], [1e5 - 48.0, 1e5, 1e5 - 96.0]])
    a, b = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    et, es = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    temps = (1.0, 0.01)

    def f(x, y):
        rows = [
            klx.renyi_divergence(
                x[i : i + 1, ...],
                y[i : i + 1, ...],
                alpha,
                p_form="logits",
                q_form="logits",
                temperature=temps[i],
                reduction="sum",
            )
            for i in range(2)
        ]
        return rows[0], rows[1]

    got = (traced_by(backend, f) if traced else f)(a, b)
    got = np.array([float(backend.to_numpy(g)) for g in got])
    scale = np.array(temps)[:, None]
    want = _mp_rows("renyi", alpha, et / scale, es / scale)
    np.testing.assert_allclose(got, want, rtol=1e-5)
