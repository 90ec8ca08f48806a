"""entropy and cross_entropy (issue 26, item 4).

Against mpmath at 50 digits on small cases (near-equal P and Q, one-hot, zeros in P or Q,
nearly one-hot) from every form on every backend: float64 within 4 ulps of the row value
or 1e-15 absolute, float32 within 1e-6 relative. Masks, reductions and `normalizer`;
special values; gradients finite at zeros (torch autograd, jax.grad) against float64
derivatives, jax.jit / jax.vmap and torch.compile(fullgraph=True); the CPU row blocks;
Hypothesis properties (H(P, Q) = H(P) + KL(P || Q), 0 <= H(P) <= log n); errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads
from support.strategies import SETTINGS, distributions, normalize

FORMS = ("probs", "log_probs", "logits")
#: Logits are divided by a power of 2, exactly: their rounding is the inputs' alone.
TEMPERATURE = 2.0


def _cases() -> tuple[np.ndarray, np.ndarray]:
    """P and Q (float64 probabilities, 5 outcomes), one case per row."""
    near = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    tiny = 1e-12
    rows = [
        (near, near * (1 + 1e-9 * np.array([1.0, -2.0, 3.0, -1.0, 0.5]))),  # near-equal
        (np.eye(5)[2], np.eye(5)[2]),  # one-hot, equal
        (np.eye(5)[0], np.full(5, 0.2)),  # one-hot P, uniform Q
        (np.array([0.5, 0.0, 0.25, 0.0, 0.25]), near),  # zeros in P
        (np.array([0.5, 0.0, 0.5, 0.0, 0.0]), np.array([0.3, 0.0, 0.3, 0.0, 0.4])),  # in both
        (np.full(5, 0.2), np.array([0.0, 0.5, 0.5, 0.0, 0.0])),  # Q is 0 where P is not
        (np.array([1 - 4 * tiny, tiny, tiny, tiny, tiny]), np.array([1 - 1e-9, *[2.5e-10] * 4])),
        (np.full(5, 0.2), np.full(5, 0.2)),  # uniform: log 5
    ]
    p, q = (np.stack(side) for side in zip(*rows, strict=True))
    return p, q


def _given(p: np.ndarray, form: str) -> np.ndarray:
    """Probabilities `p` in `form` (float64): logits at TEMPERATURE, shifted by 3."""
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    return {"probs": p, "log_probs": log_p, "logits": TEMPERATURE * log_p + 3.0}[form]


def _as_given(backend, x: np.ndarray, dtype: str) -> tuple[object, np.ndarray]:
    """`x` on the backend in `dtype`, and the values it holds (float64 NumPy, exact)."""
    a = backend.asarray(x, dtype)
    return a, backend.to_numpy(a)


def _assert_close_to_reference(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """The issue's tolerances; infinities and NaN where the reference has them. Returns the
    worst error in units of the tolerance (the conformance cell's)."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    infinite = np.isinf(want)
    assert np.array_equal(got[infinite], want[infinite]), (got, want)
    finite = np.isfinite(want)
    assert np.all(np.isfinite(got[finite])), (got, want)
    if dtype == "float64":
        tol = np.maximum(4 * np.spacing(np.abs(want)), 1e-15)
    else:
        tol = 1e-6 * np.abs(want)
    err = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0))
    bad = finite & (err > tol)
    assert not bad.any(), f"rows {np.nonzero(bad)}: {got[bad]} against {want[bad]}"
    ratio = np.divide(err, tol, out=np.zeros_like(err), where=finite & (tol > 0))
    return float(np.max(ratio, initial=0.0))


# --------------------------------------------------------------------------- mpmath


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_entropy_against_mpmath(backend, dtype, form, conformance):
    p, _ = _cases()
    t = TEMPERATURE if form == "logits" else 1.0
    x, exact = _as_given(backend, _given(p, form), dtype)
    got = klx.entropy(x, form=form, temperature=t)
    check_array(backend, got, x, dtype, (p.shape[0],))
    want = reference.mp_entropy_rows(exact, form, t)
    assert np.all(np.isfinite(want)) and np.all(want >= 0)
    err = _assert_close_to_reference(backend.to_numpy(got), want, dtype)
    row = f"{backend.id} {dtype} entropy vs mpmath"
    conformance(row, f"form={form}", err, 1.0, value=backend.to_numpy(got))


@pytest.mark.parametrize("q_form", FORMS)
@pytest.mark.parametrize("p_form", FORMS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_against_mpmath(backend, dtype, p_form, q_form, conformance):
    p, q = _cases()
    t = TEMPERATURE if "logits" in (p_form, q_form) else 1.0
    x, exact_p = _as_given(backend, _given(p, p_form), dtype)
    y, exact_q = _as_given(backend, _given(q, q_form), dtype)
    got = klx.cross_entropy(x, y, p_form=p_form, q_form=q_form, temperature=t)
    check_array(backend, got, x, dtype, (p.shape[0],))
    want = reference.mp_cross_entropy_rows(exact_p, exact_q, p_form, q_form, t)
    assert np.isinf(want[5]) and np.all(np.isfinite(np.delete(want, 5)))
    err = _assert_close_to_reference(backend.to_numpy(got), want, dtype)
    row = f"{backend.id} {dtype} cross-entropy vs mpmath"
    conformance(row, f"{p_form}/{q_form}", err, 1.0, value=backend.to_numpy(got))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_entropy_of_nearly_one_hot_logits_keeps_its_small_mass(backend, temperature):
    """A confident distribution's entropy is the terms of the mass beside its maximum: the
    exact log-softmax keeps that mass's own term, which a plain log-sum-exp (log p = 0 at
    the maximum) drops (2.4% of H for [40, 0, 0, 0]). Relative to the value itself."""
    logits = np.array([[40.0, 0.0, 0.0, 0.0], [0.0, -30.0, -30.0, -45.0], [3.0, 3.0, -50.0, 3.0]])
    x = backend.asarray(logits)
    got = backend.to_numpy(klx.entropy(x, form="logits", temperature=temperature))
    want = reference.mp_entropy_rows(logits, "logits", temperature)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    ce = backend.to_numpy(
        klx.cross_entropy(x, x, p_form="logits", q_form="logits", temperature=temperature)
    )
    np.testing.assert_allclose(ce, want, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- masks and reductions


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "normalizer"])
@pytest.mark.parametrize("kind", ["entropy", "cross_entropy"])
def test_axis_where_and_reductions(backend, kind, reduction):
    """Distributions along axis 1 of a 3-d array, from logits at a temperature, a mask
    over the batch that drops rows holding NaN, and every reduction."""
    rng = np.random.default_rng(26)
    t, s = rng.normal(scale=2.0, size=(4, 6, 3)), rng.normal(scale=2.0, size=(4, 6, 3))
    t[0, 2, :] = -np.inf  # a zero of P in every distribution of the first row
    keep = rng.uniform(size=(4, 3)) < 0.7
    keep[0, 0], keep[1, 1] = True, False
    t_pad = np.where(keep[:, None, :], t, np.nan)  # dropped distributions hold garbage
    temperature = 1.7
    if kind == "entropy":
        rows = reference.mp_entropy_rows(np.moveaxis(t, 1, -1), "logits", temperature)
    else:
        rows = reference.mp_cross_entropy_rows(
            np.moveaxis(t, 1, -1), np.moveaxis(s, 1, -1), "logits", "logits", temperature
        )
    normalizer = 11.0 if reduction == "normalizer" else None
    red = "batchmean" if reduction == "normalizer" else reduction
    kwargs = {
        "axis": 1,
        "temperature": temperature,
        "where": backend.asarray(keep),
        "reduction": red,
        "normalizer": normalizer,
    }
    a, b = backend.asarray(t_pad), backend.asarray(s)
    if kind == "entropy":
        got = klx.entropy(a, form="logits", **kwargs)
    else:
        got = klx.cross_entropy(a, b, p_form="logits", q_form="logits", **kwargs)
    check_array(backend, got, a, "float64", (4, 3) if red == "none" else ())
    want = reference.reduce(rows, red, keep, normalizer)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["entropy", "cross_entropy"])
def test_batchmean_of_nothing_and_a_normalizer_of_zero(backend, kind):
    p = backend.asarray(np.array([[np.nan, 1.0], [0.5, 0.5]]))
    q = backend.asarray(np.array([[0.5, 0.5], [1.0, 0.0]]))

    def f(**kwargs):
        if kind == "entropy":
            return klx.entropy(p, reduction="batchmean", **kwargs)
        return klx.cross_entropy(p, q, reduction="batchmean", **kwargs)

    none_kept = f(where=backend.asarray(np.array([False, False])))
    check_array(backend, none_kept, p, "float64", ())
    assert backend.to_numpy(none_kept) == 0.0
    assert backend.to_numpy(f(normalizer=0)) == 0.0


# --------------------------------------------------------------------------- special values


def test_special_values(backend):
    p = backend.asarray(np.array([[0.5, 0.5], [1.0, 0.0], [0.5, np.nan], [-0.1, 1.1]]))
    got = backend.to_numpy(klx.entropy(p))
    np.testing.assert_allclose(got[0], np.log(2), rtol=1e-15)
    assert got[1] == 0.0, "0 log 0 = 0"
    assert np.isnan(got[2]), "NaN propagates"
    assert got[3] == -np.inf, "a negative probability: -inf, as scipy.special.entr"
    p = backend.asarray(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-0.1, 1.1]]))
    q = backend.asarray(np.array([[0.0, 1.0], [0.0, 1.0], [np.nan, 1.0], [0.5, 0.5], [0.5, 0.5]]))
    got = backend.to_numpy(klx.cross_entropy(p, q))
    assert got[0] == 0.0, "P = 0 where Q = 0: 0"
    assert got[1] == np.inf, "P > 0 = Q: +inf"
    assert np.isnan(got[2]), "NaN in Q propagates, also where P is 0"
    np.testing.assert_allclose(got[3], np.log(2), rtol=1e-15)
    assert got[4] == np.inf, "a negative probability: +inf, as rel_entr"
    logits = backend.asarray(np.array([[0.0, np.inf], [0.0, 1.0]]))
    got = backend.to_numpy(klx.entropy(logits, form="logits"))
    assert np.isnan(got[0]) and np.isfinite(got[1]), "a +inf logit: NaN, that row only"


# --------------------------------------------------------------------------- gradients


def _entropy_grad(p):
    """dH/dp from probabilities: -(log p + 1), 0 where p is 0 (klx's finite convention)."""
    with np.errstate(divide="ignore"):
        return np.where(p > 0, -(np.log(np.where(p > 0, p, 1.0)) + 1.0), 0.0)


@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_from_probabilities_finite_at_zeros(backend):
    p = np.array([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    q = np.array([[0.25, 0.0, 0.5, 0.25], [0.3, 0.0, 0.4, 0.3], [0.4, 0.3, 0.2, 0.1]])
    value, g = value_and_grads(backend, lambda a: klx.entropy(a, reduction="sum"), p)
    np.testing.assert_allclose(value, reference.entropy_rows(p, -1)[0].sum(), rtol=1e-14)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _entropy_grad(p), rtol=1e-13, atol=1e-15)
    value, gp, gq = value_and_grads(
        backend, lambda a, b: klx.cross_entropy(a, b, reduction="sum"), p, q
    )
    np.testing.assert_allclose(value, reference.cross_entropy_rows(p, q, -1)[0].sum(), rtol=1e-14)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))
    safe_q = np.where(q > 0, q, 1.0)
    np.testing.assert_allclose(gp, np.where(p > 0, -np.log(safe_q), 0.0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gq, np.where(p > 0, -p / safe_q, 0.0), rtol=1e-13, atol=1e-15)


@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_from_logits_with_neginf_and_masked_rows(backend):
    """d H / d z = -p (log p + H) / T; d CE / d z_p = -p (log q + CE) / T and
    d CE / d z_q = (q - p) / T, per kept distribution; 0 at -inf logits and in dropped
    distributions (which hold NaN)."""
    rng = np.random.default_rng(27)
    t, s = rng.normal(scale=2.0, size=(5, 6)), rng.normal(scale=2.0, size=(5, 6))
    t[:, 4] = s[:, 4] = -np.inf  # a masked vocabulary entry
    t[1, 0] = -np.inf  # P is 0 where Q is not
    t[3], s[3] = np.nan, -np.inf  # a padding row
    keep = np.array([True, True, True, False, True])
    temperature = 1.5
    n = keep.sum()
    common = {"temperature": temperature, "where": backend.asarray(keep), "reduction": "batchmean"}

    value, g = value_and_grads(backend, lambda a: klx.entropy(a, form="logits", **common), t)
    lp = reference.log_softmax(np.where(keep[:, None], t, 0.0), -1, temperature)
    lq = reference.log_softmax(np.where(keep[:, None], s, 0.0), -1, temperature)
    p, q = np.exp(lp), np.exp(lq)
    plogp = np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0)
    h = -plogp.sum(-1, keepdims=True)
    np.testing.assert_allclose(value, h[keep].sum() / n, rtol=1e-13)
    want = np.where(p > 0, -p * (np.where(p > 0, lp, 0.0) + h), 0.0) / temperature / n
    want[~keep] = 0.0
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, want, rtol=1e-11, atol=1e-15)

    value, gp, gq = value_and_grads(
        backend,
        lambda a, b: klx.cross_entropy(a, b, p_form="logits", q_form="logits", **common),
        t,
        s,
    )
    plogq = np.where(p > 0, p * np.where(q > 0, lq, 0.0), 0.0)
    ce = -plogq.sum(-1, keepdims=True)
    np.testing.assert_allclose(value, ce[keep].sum() / n, rtol=1e-13)
    want_p = np.where(p > 0, -p * (np.where(q > 0, lq, 0.0) + ce), 0.0) / temperature / n
    want_q = (q - p) / temperature / n
    want_p[~keep] = want_q[~keep] = 0.0
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))
    np.testing.assert_allclose(gp, want_p, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(gq, want_q, rtol=1e-11, atol=1e-15)


@pytest.mark.backends("jax", reason="jax.jit, jax.vmap and jax.grad")
def test_jax_jit_vmap_grad(backend):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(28)
    t, s = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    t[:, 2] = -np.inf
    a, b = jnp.asarray(t), jnp.asarray(s)

    def h(x):
        return klx.entropy(x, form="logits", temperature=0.8)

    def ce(x, y):
        return klx.cross_entropy(x, y, p_form="logits", q_form="logits", temperature=0.8)

    np.testing.assert_allclose(np.asarray(jax.jit(h)(a)), np.asarray(jax.vmap(h)(a)), rtol=1e-14)
    np.testing.assert_allclose(
        np.asarray(jax.jit(ce)(a, b)), np.asarray(jax.vmap(ce)(a, b)), rtol=1e-14
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(h)(a)), reference.mp_entropy_rows(t, "logits", 0.8), rtol=1e-13
    )
    g = jax.jit(jax.grad(lambda x: jnp.sum(h(x))))(a)
    gp, gq = jax.jit(jax.grad(lambda x, y: jnp.sum(ce(x, y)), argnums=(0, 1)))(a, b)
    for grad in (g, gp, gq):
        assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(g)[:, 2] == 0) and np.all(np.asarray(gp)[:, 2] == 0)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile")
@pytest.mark.filterwarnings(  # torch's, from the closed-form row's compiled autograd.Function
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_torch_compile_fullgraph(backend):
    import torch

    torch._dynamo.reset()
    rng = np.random.default_rng(29)
    t, s = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    t[:, 3] = -np.inf
    t[2] = np.nan  # a dropped distribution
    keep = torch.tensor([True, True, False, True])

    def loss(a, b):
        h = klx.entropy(a, form="logits", temperature=2.0, where=keep, reduction="batchmean")
        ce = klx.cross_entropy(a, b, p_form="logits", q_form="logits", where=keep, reduction="sum")
        return h + ce

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        a = torch.from_numpy(t.copy()).requires_grad_(True)
        b = torch.from_numpy(s.copy()).requires_grad_(True)
        value = fn(a, b)
        value.backward()
        results.append((value.item(), a.grad.numpy(), b.grad.numpy()))
    (eager, ga, gb), (compiled, ca, cb) = results
    assert np.isfinite(compiled)
    np.testing.assert_allclose(compiled, eager, rtol=1e-13)
    assert np.all(np.isfinite(ca)) and np.all(np.isfinite(cb))
    np.testing.assert_allclose(ca, ga, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cb, gb, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- accelerators


@pytest.mark.backends("numpy", "torch", reason="the CPU row-blocked accelerators")
@pytest.mark.parametrize("kind", ["entropy", "cross_entropy"])
def test_row_blocks_serve_both(backend, kind):
    rng = np.random.default_rng(30)
    shape = (1024, 1025)  # just over the rows' 2**20 elements
    t, s = rng.normal(size=shape), rng.normal(size=shape)
    if kind == "entropy":
        report = klx.explain(klx.entropy, backend.asarray(t), form="logits", reduction="sum")
        rows, _ = reference.entropy_rows(np.exp(reference.log_softmax(t, -1)), -1)
    else:
        report = klx.explain(
            klx.cross_entropy,
            backend.asarray(t),
            backend.asarray(s),
            p_form="logits",
            q_form="logits",
            reduction="sum",
        )
        p = np.exp(reference.log_softmax(t, -1))
        rows = -np.sum(p * reference.log_softmax(s, -1), axis=-1)
    assert report.chosen == f"{'numpy' if backend.name == 'numpy' else 'torch-cpu'}-rows"
    np.testing.assert_allclose(backend.to_numpy(report.result), rows.sum(), rtol=1e-12)


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(data=st.data())
def test_cross_entropy_is_entropy_plus_kl(backend, data):
    p = data.draw(distributions())
    raw = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(0.1, 10.0)))
    q = normalize(raw)  # positive everywhere: every value is finite
    bp, bq = backend.asarray(p), backend.asarray(q)
    ce = backend.to_numpy(klx.cross_entropy(bp, bq))
    h = backend.to_numpy(klx.entropy(bp))
    kl = backend.to_numpy(klx.kl_divergence(bp, bq))
    np.testing.assert_allclose(ce, h + kl, rtol=1e-13, atol=1e-15)
    assert np.all(ce >= h - 1e-15), "Gibbs' inequality: H(P, Q) >= H(P)"
    same = backend.to_numpy(klx.cross_entropy(bp, bp))
    np.testing.assert_array_equal(same, h)


@SETTINGS
@given(data=st.data())
def test_entropy_between_zero_and_log_n(backend, data):
    p = data.draw(distributions())
    n = p.shape[-1]
    h = backend.to_numpy(klx.entropy(backend.asarray(p)))
    assert np.all(h >= 0.0)
    assert np.all(h <= np.log(n) * (1 + 16 * np.finfo(np.float64).eps)), (h, np.log(n))
    logits = data.draw(
        hnp.arrays(np.float64, p.shape, elements=st.floats(-30, 30, allow_subnormal=False))
    )
    h = backend.to_numpy(klx.entropy(backend.asarray(logits), form="logits"))
    assert np.all(h >= 0.0)
    assert np.all(h <= np.log(n) * (1 + 16 * np.finfo(np.float64).eps)), (h, np.log(n))


# --------------------------------------------------------------------------- errors


P = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`form` must be one of 'probs', 'log_probs', 'logits'"):
        klx.entropy(P, form="log")
    with pytest.raises(ValueError, match="`reduction` must be one of 'none', 'sum', 'batchmean'"):
        klx.entropy(P, reduction="mean")
    with pytest.raises(
        ValueError,
        match="`temperature`=2.0 applies only to logits, but `form` is not 'logits'; give "
        "logits with form='logits'",
    ):
        klx.entropy(P, temperature=2.0)
    with pytest.raises(ValueError, match="`q_form` must be one of"):
        klx.cross_entropy(P, P, q_form="log")
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        klx.cross_entropy(P, P, reduction="mean")
    with pytest.raises(ValueError, match="`axis` 2 is out of range"):
        klx.entropy(P, axis=2)


def test_validation_speaks_of_form():
    with pytest.raises(
        ValueError, match="These look like log-probabilities: pass form='log_probs'"
    ):
        klx.entropy(np.log(P), validate=True)
    with pytest.raises(ValueError, match=r"say so \(form='logits'\)"):
        klx.entropy(P * 2.0, validate=True)
    with pytest.raises(ValueError, match="`q` must hold probabilities"):
        klx.cross_entropy(P, -P, validate=True)
    assert np.isfinite(klx.entropy(P, validate=True)).all()


def test_the_entropy_record_keeps_its_name():
    def terms(xp, p, q):
        return p - q

    with pytest.raises(ValueError, match="'entropy' is taken by 'klx.entropy'"):
        klx.register_divergence(klx.Divergence("entropy", terms))
    with pytest.raises(TypeError, match="`zero_at_equal` of 'odd' must be True or False"):
        klx.Divergence("odd", terms, zero_at_equal="no")
