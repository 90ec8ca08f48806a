"""The fused forms of TV, the entropy and the cross-entropy from logits, and of the exact
log-softmax (issue 24): against mpmath at 50 digits, eagerly, inside jax.jit and inside
torch.compile(fullgraph=True) on the CPU.

The exact log-softmax finds the maxima and counts their ties by arithmetic
(``floor``/``clip``, no ``where``); TV and the teacher's side of the cross-entropy take
the plain log-sum-exp; the entropy's terms floor ``log p`` instead of a ``where``; TV and
the entropy have closed-form derivatives. Cases: nearly one-hot float32 logits (``[20, 0,
0, 0]`` against ``[19, 0, 0, 0]``, where a plain log-sum-exp rounds the tail's mass away
from ``log p``), ties of the maximum, ``-inf`` logits (also P > 0 = Q), a NaN and a
``+inf`` logit (NaN rows), and temperatures 1 and 1/2 (exact divisions).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy.special import log_softmax as sp_log_softmax

import klx
from support import reference
from support.backends import traced as traced_by

INF, NAN = math.inf, math.nan
T_ROWS = np.array(
    [
        [20.0, 0.0, 0.0, 0.0],
        [3.0, 3.0, -1.0, 0.0],  # a tie of the maximum
        [0.0, -INF, 1.0, 2.0],
        [40.0, 0.0, 0.0, 0.0],
        [NAN, 0.0, 0.0, 0.0],
        [1.0, 0.0, -INF, -INF],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
S_ROWS = np.array(
    [
        [19.0, 0.0, 0.0, 0.0],
        [3.0, 3.0, -1.0, 0.5],
        [0.0, 1.0, -INF, 2.0],  # Q is 0 where P is not: the cross-entropy is +inf
        [40.0, 0.0, 0.0, 0.0],  # P = Q
        [0.0, 0.0, 0.0, 0.0],
        [1.0, INF, 0.0, 0.0],  # a +inf logit: no distribution
        [0.0, 0.0, 0.0, 0.0],
    ]
)
TEMPERATURES = (1.0, 0.5)
EPS32 = float(np.finfo(np.float32).eps)


def _mp_tv_rows(t: np.ndarray, s: np.ndarray, temperature: float) -> np.ndarray:
    def row(x, y):
        p, _ = reference._mp_weights_and_logs(x, "logits", temperature)
        q, _ = reference._mp_weights_and_logs(y, "logits", temperature)
        if any(mpmath.isnan(a) for a in (*p, *q)):
            return mpmath.nan
        return mpmath.fsum(abs(a - b) for a, b in zip(p, q, strict=True)) / 2

    return reference._mp_rows(row, t, s)


def _mp_log_softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    out = np.empty(x.shape)
    with mpmath.workdps(reference.MP_DIGITS):
        for i, r in enumerate(x):
            _, logs = reference._mp_weights_and_logs(r, "logits", temperature)
            out[i] = [float(a) for a in logs]
    return out


def _f32(backend, x):
    """float32 on the backend, and the values it holds (float64 NumPy, exact)."""
    a = backend.asarray(x, "float32")
    return a, backend.to_numpy(a).astype(np.float64)


def _assert_rows(got, want, rtol, atol):
    got = np.asarray(got, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), (got, want)
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_log_softmax_against_mpmath(backend, traced, temperature):
    """The exact log-softmax (arithmetic tie count): a few ulps of each log-probability,
    the tail's mass kept beside a nearly one-hot maximum (``log p = -3 e^-20`` at the top
    of ``[20, 0, 0, 0]``, which a plain log-sum-exp makes 0); NaN rows for NaN and
    ``+inf`` logits; ``-inf`` where a logit is."""
    from klx._agnostic import log_softmax

    x, exact = _f32(backend, np.concatenate([T_ROWS, S_ROWS]))
    xp = backend.xp

    def fn(a):
        return log_softmax(xp, a, -1, temperature)

    with np.errstate(invalid="ignore"):  # (NaN rows, on purpose; klx's callers quiet it)
        got = backend.to_numpy((traced_by(backend, fn) if traced else fn)(x))
    want = _mp_log_softmax(exact, temperature)
    nan_rows = np.isnan(want).all(-1)
    assert np.isnan(got[nan_rows]).all()
    g, w = got[~nan_rows], want[~nan_rows]
    assert np.array_equal(np.isneginf(g), np.isneginf(w))
    fin = np.isfinite(w)
    tol = 4 * np.spacing(np.abs(w[fin]).astype(np.float32)).astype(np.float64) + 1e-45
    assert np.all(np.abs(g[fin] - w[fin]) <= tol), np.max(np.abs(g[fin] - w[fin]) / tol)
    assert got[0, 0] < 0  # [20, 0, 0, 0]: log p of the maximum is -6.2e-9, not 0


@pytest.mark.filterwarnings(  # torch's, from the closed-form row's compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_tv_entropy_cross_entropy_against_mpmath(backend, traced, temperature):
    """float32 logits: the entropy and cross-entropy within 1e-5 of their value (their
    terms are all >= 0), TV within a few ulps of 1 (it reads probabilities, whose
    differences round at the scale of 1 near a maximum: ``1 - 1.7e-8`` is 1 in float32);
    +inf where P > 0 = Q; NaN rows."""
    t, et = _f32(backend, T_ROWS)
    s, es = _f32(backend, S_ROWS)
    common = {"p_form": "logits", "q_form": "logits", "temperature": temperature}

    def calls(a, b):
        return (
            klx.tv_distance(a, b, **common),
            klx.cross_entropy(a, b, **common),
            klx.entropy(b, form="logits", temperature=temperature),
        )

    fn = traced_by(backend, calls) if traced else calls
    tv, ce, h = (backend.to_numpy(v) for v in fn(t, s))
    _assert_rows(tv, _mp_tv_rows(et, es, temperature), rtol=0, atol=4 * EPS32)
    _assert_rows(
        ce, reference.mp_cross_entropy_rows(et, es, "logits", "logits", temperature), 1e-5, 0
    )
    _assert_rows(h, reference.mp_entropy_rows(es, "logits", temperature), 1e-5, 0)
    assert tv[3] == 0 and np.all(tv[~np.isnan(tv)] >= 0)
    assert h[0] > 0 and ce[0] > 0  # the nearly one-hot rows keep their small mass


@pytest.mark.filterwarnings(  # torch's, from the closed-form row's compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_tv_and_entropy_gradients(backend, traced):
    """The closed-form derivatives: TV's finite (0) at P = Q, also with ``-inf`` logits,
    and against the float64 derivative ``(1/T) q (sum(q g) - g)``, ``g = sign(p - q) /
    2``, away from ties; the entropy's against ``-(1/T) p (log p + H)`` (0 where p is),
    with ties of the maximum and ``-inf`` logits. float64 inputs."""
    rng = np.random.default_rng(24)
    t = rng.normal(size=(4, 7))
    s = rng.normal(size=(4, 7))
    t[:, 2] = s[:, 2] = -np.inf
    s[1, 5] = s[1, 0] = s[1].max() + 1.0  # a tie of the maximum
    temperature = 0.5

    def tv(a, b):
        return klx.tv_distance(
            a, b, p_form="logits", q_form="logits", temperature=temperature, reduction="sum"
        )

    def h(b):
        return klx.entropy(b, form="logits", temperature=temperature, reduction="sum")

    def grad(fn, *args):
        if backend.name == "jax":
            import jax

            g = jax.grad(fn, argnums=len(args) - 1)
            g = jax.jit(g) if traced else g
            return np.asarray(g(*(backend.asarray(a) for a in args)))
        xs = [backend.asarray(a) for a in args]
        xs[-1].requires_grad_(True)
        f = traced_by(backend, fn) if traced else fn
        f(*xs).backward()
        return backend.to_numpy(xs[-1].grad)

    same = grad(tv, s, s)
    assert np.all(np.isfinite(same)) and np.all(same == 0)

    lp, lq = sp_log_softmax(t / temperature, -1), sp_log_softmax(s / temperature, -1)
    p, q = np.exp(lp), np.exp(lq)
    g = 0.5 * np.sign(p - q)
    want = q * ((q * g).sum(-1, keepdims=True) - g) / temperature
    np.testing.assert_allclose(grad(tv, t, s), want, rtol=1e-11, atol=1e-15)

    with np.errstate(invalid="ignore", divide="ignore"):
        plogp = np.where(q > 0, q * lq, 0.0)
    entropy = -plogp.sum(-1, keepdims=True)
    want_h = -np.where(q > 0, q * (np.where(q > 0, lq, 0.0) + entropy), 0.0) / temperature
    got_h = grad(h, s)
    assert np.all(got_h[:, 2] == 0)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-11, atol=1e-15)
