"""JS and skew KL between two sets of logits against mpmath (issue 24: their logits-logits
terms are ``p F(r)``, ``r = log(q / p)``, a Taylor polynomial near ``r = 0`` and a direct
form with two ``exp`` and one ``log1p`` beyond): near P = Q, far apart, ``-inf`` logits on
either side, NaN, eagerly and inside ``torch.compile`` / ``jax.jit``, values and
gradients."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import klx

#: (kind, weight): JS's beta and skew KL's alpha, inside [1/16, 15/16] (the logits forms).
WEIGHTS = [("js", 0.5), ("js", 0.1), ("js", 1 / 16), ("skew_kl", 0.1), ("skew_kl", 0.9)]


def _mp_rows(t: np.ndarray, s: np.ndarray, kind: str, w: float) -> np.ndarray:
    """Row values from the logits as given (float values are exact in mpmath), 40 digits."""
    with mpmath.workdps(40):
        wm = mpmath.mpf(w)
        out = []
        for a, b in zip(t, s, strict=True):
            lp, lq = _mp_log_softmax(a), _mp_log_softmax(b)
            total = mpmath.mpf(0)
            for x, y in zip(lp, lq, strict=True):
                p = mpmath.exp(x) if x is not None else mpmath.mpf(0)
                q = mpmath.exp(y) if y is not None else mpmath.mpf(0)
                m = wm * p + (1 - wm) * q
                if p > 0:
                    total += (wm if kind == "js" else 1) * p * mpmath.log(p / m)
                if q > 0 and kind == "js":
                    total += (1 - wm) * q * mpmath.log(q / m)
            out.append(float(total))
    return np.asarray(out)


def _mp_log_softmax(x: np.ndarray) -> list:
    xs = [mpmath.mpf(float(v)) for v in x]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs if v != -mpmath.inf))
    return [v - lse if v != -mpmath.inf else None for v in xs]


def _case(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(24)
    t = 3.0 * rng.normal(size=(3, 40))
    if name == "near":  # P = Q to 1e-3: the value is second order in r
        return t, t + 1e-3 * rng.normal(size=t.shape)
    if name == "middle":  # |r| around the series' edge (1/2)
        return t, t + 0.6 * rng.normal(size=t.shape)
    if name == "far":  # |r| up to 100 and beyond (weights that underflow float32)
        return t, t + rng.uniform(-100.0, 100.0, size=t.shape)
    s = t + rng.normal(size=t.shape)  # -inf on either side, and on both
    t[:, ::5] = -np.inf
    s[:, ::7] = -np.inf
    return t, s


def _call(kind: str, w: float, t, s, **kw):
    if kind == "js":
        return klx.js_divergence(t, s, p_form="logits", q_form="logits", beta=w, **kw)
    return klx.skew_kl_divergence(t, s, p_form="logits", q_form="logits", alpha=w, **kw)


#: float32 near P = Q: the rounding of log p and log q (``eps |log p|``) against an ``r``
#: of 1e-3 is the error of any float32 log-softmax (measured 9e-5 here).
RTOL = {("float32", "near"): 5e-4, "float32": 2e-6, "float64": 1e-12}


@pytest.mark.parametrize("case", ["near", "middle", "far", "neginf"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("kind", "w"), WEIGHTS)
def test_logits_against_mpmath(backend, kind, w, dtype, case):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    t, s = _case(case)
    xt, xs = backend.asarray(t, dtype), backend.asarray(s, dtype)
    want = _mp_rows(backend.to_numpy(xt), backend.to_numpy(xs), kind, w)
    got = backend.to_numpy(_call(kind, w, xt, xs)).astype(np.float64)
    assert np.all(got >= 0.0)
    rtol = RTOL.get((dtype, case), RTOL[dtype])
    if (kind, w) == ("skew_kl", 0.9):
        # s - 1 - log s with s - 1 = (1 - alpha) expm1(r) = 0.06 at |r| = 1/2: 30 ulps
        # of a term lost to it (as p (expm1(u) - u) did); measured 2.8e-6 (float32)
        rtol *= 4.0
    np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.parametrize(("kind", "w"), WEIGHTS)
def test_logits_zero_weights_nan_and_identical(backend, kind, w):
    """A -inf logit on either side: the other side's limit (finite: skew KL where Q is 0
    is ``-p log(alpha) + (alpha - 1) p``'s sum); both -inf: nothing; a NaN or a +inf
    logit: a NaN row; P = Q: exactly 0."""
    inf = math.inf
    t = np.array([[0.0, -inf, 1.0, -inf], [0.0, 1.0, 2.0, 3.0], [0.5, 0.5, -inf, 1.0]])
    s = np.array([[-inf, 0.0, 1.0, -inf], [0.0, math.nan, 2.0, 3.0], [inf, 0.5, 0.0, 1.0]])
    got = backend.to_numpy(_call(kind, w, backend.asarray(t), backend.asarray(s)))
    assert np.isnan(got[1:]).all()
    np.testing.assert_allclose(got[0], _mp_rows(t[:1], s[:1], kind, w)[0], rtol=1e-13)
    same = backend.to_numpy(_call(kind, w, backend.asarray(s[:1]), backend.asarray(s[:1])))
    assert np.all(same == 0.0)


def _reference_grads(t: np.ndarray, s: np.ndarray, kind: str, w: float):
    """float64 autograd of the plain formula (0 * log 0 read as 0), summed over rows."""
    torch = pytest.importorskip("torch")
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    lp, lq = torch.log_softmax(tt, -1), torch.log_softmax(st, -1)
    p, q = lp.exp(), lq.exp()
    m = w * p + (1 - w) * q
    lm = torch.log(torch.where(m > 0, m, 1.0))  # (double wheres: finite gradients)
    value = (p * torch.where(p > 0, lp - lm, 0.0)).sum() * (w if kind == "js" else 1.0)
    if kind == "js":
        value = value + (1 - w) * (q * torch.where(q > 0, lq - lm, 0.0)).sum()
    value.backward()
    return tt.grad.numpy(), st.grad.numpy()


@pytest.mark.slow
@pytest.mark.backends("torch", "jax", reason="torch.compile and jax.jit on the CPU")
@pytest.mark.filterwarnings(  # torch's, from the closed-form row's compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
@pytest.mark.parametrize("case", ["near", "far", "neginf"])
@pytest.mark.parametrize(("kind", "w"), [("js", 0.5), ("js", 0.1), ("skew_kl", 0.1)])
def test_logits_traced_values_and_gradients(backend, kind, w, case):
    """Inside torch.compile(fullgraph=True) (whose CPU code takes expm1 as exp(x) - 1) and
    jax.jit, float32: values as mpmath's, gradients (the closed forms) as float64 autograd
    of the plain formula."""
    t, s = _case(case)
    xt, xs = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    t32, s32 = backend.to_numpy(xt).astype(np.float64), backend.to_numpy(xs).astype(np.float64)
    want = np.sum(_mp_rows(t32, s32, kind, w))
    want_t, want_s = _reference_grads(t32, s32, kind, w)

    def f(a, b):
        return _call(kind, w, a, b, reduction="sum")

    if backend.name == "torch":
        import torch

        torch._dynamo.reset()
        value = float(torch.compile(f, fullgraph=True)(xt, xs))  # no gradient: the definition
        torch._dynamo.reset()
        a, b = xt.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        out = torch.compile(f, fullgraph=True)(a, b)  # the closed-form row
        out.backward()
        value_g, grad_t, grad_s = float(out.detach()), a.grad.numpy(), b.grad.numpy()
    else:
        import jax

        value = float(jax.jit(f)(xt, xs))
        value_g, (grad_t, grad_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(xt, xs)
        value_g, grad_t, grad_s = float(value_g), np.asarray(grad_t), np.asarray(grad_s)
    rtol = 5e-4 if case == "near" else 2e-6
    np.testing.assert_allclose([value, value_g], want, rtol=rtol)
    for got, ref in ((grad_t, want_t), (grad_s, want_s)):
        assert np.isfinite(got).all()
        # float32 against float64: the log-softmaxes' rounding, of the gradient's scale
        tol = 1e-3 if case == "near" else 2e-5  # near: measured 2e-4 (r is 1e-3)
        assert np.max(np.abs(got - ref)) <= tol * max(np.max(np.abs(ref)), 1e-3)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("lam", [0.1, 0.5, 0.8])
def test_kl_mixture_of_subnormal_weights_is_not_negative(backend, lam, traced):
    """The KL mixture between logits whose weights are subnormal (float64 log-probabilities
    near -745): their few bits no longer match ``d``, and the direct form's parts rounded
    below 0 (-5e-324 at lam 0.1 before the clamp came back as a maximum). Never negative,
    and within one subnormal step of mpmath's (itself below 1e-320)."""
    from support.backends import traced as traced_by

    if "float64" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float64")
    t = np.array([[0.0, -744.2], [0.0, -745.0], [0.0, -744.6]])
    s = np.array([[0.0, -745.0], [0.0, -744.2], [0.0, -740.0]])

    def f(a, b):
        return klx.divergence(a, b, "mix", lam=lam, p_form="logits", q_form="logits")

    a, b = backend.asarray(t, "float64"), backend.asarray(s, "float64")
    got = backend.to_numpy((traced_by(backend, f) if traced else f)(a, b)).astype(np.float64)
    assert np.all(got >= 0.0), got
    with mpmath.workdps(40):
        want = []
        for x, y in zip(t, s, strict=True):
            lp, lq = _mp_log_softmax(x), _mp_log_softmax(y)
            row = mpmath.mpf(0)
            for u, v in zip(lp, lq, strict=True):
                p, q = mpmath.exp(u), mpmath.exp(v)
                row += lam * p * (u - v) + (1 - lam) * q * (v - u)
            want.append(float(row))
    assert np.all(np.abs(got - np.asarray(want)) <= 1e-320), (got, want)
