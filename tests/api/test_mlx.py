"""MLX, the seventh backend: what the shared suite cannot ask of it (issue 25).

The rest of the suite runs on MLX through the `xp` fixture (``--backend=mlx``, the nox
session ``tests(backend='mlx')``). Here: ``mx.grad`` and ``mx.compile`` of the public
functions against closed forms and the eager values, the derivative MLX takes from klx's
adapter (``mx.custom_function``), and the accuracy fixes of klx's MLX namespace, each
against float64 NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import klx

pytestmark = pytest.mark.backends("mlx", reason="MLX's own transforms: mx.grad, mx.compile")


@pytest.fixture
def mx():
    import mlx.core

    return mlx.core


def _np(x):
    import mlx.core

    return np.array(x.astype(mlx.core.float64), dtype=np.float64)


def test_grad_of_kl_from_logits_is_the_closed_form(backend, mx):
    """d KL(softmax(t/T) || softmax(s/T)) / ds = (q - p) / T, per row."""
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    temp = 1.5
    tt, ss = backend.asarray(t), backend.asarray(s)

    def total(s_):
        return klx.kl_divergence(
            tt, s_, p_form="logits", q_form="logits", temperature=temp, reduction="sum"
        )

    grad = mx.grad(total)(ss)
    p, q = special.softmax(t / temp, -1), special.softmax(s / temp, -1)
    np.testing.assert_allclose(_np(grad), (q - p) / temp, rtol=1e-12, atol=1e-15)
    value, grad2 = mx.value_and_grad(total)(ss)
    np.testing.assert_allclose(_np(value), special.rel_entr(p, q).sum(), rtol=1e-12)
    np.testing.assert_array_equal(_np(grad2), _np(grad))


@pytest.mark.parametrize(
    "fn", [klx.kl_divergence, klx.js_divergence, klx.skew_kl_divergence, klx.tv_distance]
)
def test_compiled_equals_eager(backend, mx, fn):
    """Every divergence inside ``mx.compile``: the eager value, within rounding."""
    rng = np.random.default_rng(1)
    t, s = (
        backend.asarray(rng.normal(size=(4, 9)), "float32"),
        backend.asarray(rng.normal(size=(4, 9)), "float32"),
    )
    keep = backend.asarray(np.array([True, False, True, True]))

    def f(a, b, k):
        return fn(a, b, p_form="logits", q_form="logits", where=k, reduction="batchmean")

    eager = f(t, s, keep)
    compiled = mx.compile(f)(t, s, keep)
    assert compiled.dtype == mx.float32 and compiled.shape == ()
    np.testing.assert_allclose(_np(compiled), _np(eager), rtol=1e-6)


def test_kl_div_compiled_and_its_gradient(backend, mx):
    """torch's kl_div contract on MLX: value and d/d input = -target / batch."""
    rng = np.random.default_rng(2)
    p = special.softmax(rng.normal(size=(5, 6)), -1)
    p[0, :2] = 0.0
    p /= p.sum(-1, keepdims=True)
    log_q = special.log_softmax(rng.normal(size=(5, 6)), -1)
    x, y = backend.asarray(log_q), backend.asarray(p)

    def f(x_):
        return klx.kl_div(x_, y, reduction="batchmean")

    value, grad = mx.compile(mx.value_and_grad(f))(x)
    np.testing.assert_allclose(_np(value), special.rel_entr(p, np.exp(log_q)).sum() / 5, rtol=1e-12)
    np.testing.assert_allclose(_np(grad), -p / 5, rtol=1e-12, atol=0)


def test_k3_takes_the_adapters_derivative(backend, mx):
    """kl_estimate's k3 differentiates as expm1(r) (an mx.custom_function): finite and
    exact where autodiff of its series and branches would read every branch."""
    rng = np.random.default_rng(3)
    log_p, log_q = -rng.uniform(0.1, 5, 64), -rng.uniform(0.1, 5, 64)
    log_q[:3] = log_p[:3] + np.array([1e-9, -1e-9, 0.0])  # r at and near 0
    a, b = backend.asarray(log_p), backend.asarray(log_q)

    def total(a_):
        return klx.kl_estimate(a_, b, estimator="k3", reduction="sum")

    value, grad = mx.value_and_grad(total)(a)
    r = log_q - log_p
    np.testing.assert_allclose(_np(value), np.sum(np.expm1(r) - r), rtol=1e-12)
    np.testing.assert_allclose(_np(grad), -np.expm1(r), rtol=1e-12, atol=1e-300)
    _, (tangent,) = mx.jvp(
        lambda a_: klx.kl_estimate(a_, b, estimator="k3"), [a], [mx.ones_like(a)]
    )
    np.testing.assert_allclose(_np(tangent), -np.expm1(r), rtol=1e-12, atol=1e-300)


def test_namespace_is_accurate_where_mlx_is_not(backend, mx):
    """klx's MLX namespace: float64 exp within 1.1 ulps (MLX's own: float32-accurate),
    float32 log, log1p, expm1 and exp within half an ulp of float64's rounding, and sums
    accumulated in float64 on the CPU."""
    from klx import _array_api_mlx as xm

    rng = np.random.default_rng(4)
    a = np.concatenate([np.linspace(-708, 709.7, 20001), rng.normal(size=2000) * 5])
    got = _np(xm.exp(mx.array(a, dtype=mx.float64)))
    assert np.max(np.abs(got - np.exp(a)) / np.exp(a)) < 1.1 * 2.0**-52
    edges = np.array([-np.inf, np.inf, np.nan, 710.0, -746.0, -744.5])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(_np(xm.exp(mx.array(edges, dtype=mx.float64))), np.exp(edges))
    for name, x in [
        ("exp", rng.uniform(-20, 5, 50000)),
        ("log", rng.uniform(1e-6, 2, 50000)),
        ("log1p", rng.uniform(-1e-3, 1e-3, 50000)),
        ("expm1", rng.uniform(-1e-3, 1e-3, 50000)),
    ]:
        x32 = x.astype(np.float32)
        got = _np(getattr(xm, name)(mx.array(x32)))
        want = getattr(np, name)(x32.astype(np.float64))
        ulps = np.abs(got - want) / np.abs(want) / 2.0**-23
        assert np.max(ulps) <= 0.5 + 1e-6, (name, np.max(ulps))
    s = rng.uniform(-1, 1, 100000).astype(np.float32)
    total = float(_np(xm.sum(mx.array(s))))
    assert abs(total - s.astype(np.float64).sum()) <= 2.0**-24 * abs(total)


def test_exact_log_softmax_on_mlx(backend, mx):
    """Cross-entropy and entropy from logits take the exact log-softmax, whose maxima klx
    finds with ``floor`` (in klx's MLX namespace), against SciPy in float64."""
    t = np.array([[1.0, 2.0, 0.0, -1.0], [20.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    s = np.array([[0.5, 2.0, 1.0, -1.0], [19.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    lp = special.log_softmax(t.astype(np.float64), -1)
    lq = special.log_softmax(s.astype(np.float64), -1)
    ce = klx.cross_entropy(mx.array(t), mx.array(s), p_form="logits", q_form="logits")
    np.testing.assert_allclose(np.array(ce), -(np.exp(lp) * lq).sum(-1), rtol=2e-6)
    ent = klx.entropy(mx.array(t), form="logits")
    np.testing.assert_allclose(np.array(ent), -(np.exp(lp) * lp).sum(-1), rtol=2e-5)
