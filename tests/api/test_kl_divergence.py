"""kl_divergence against scipy.special.rel_entr on every backend, its gradient where P and Q
are both 0, and hypothesis properties: KL >= 0, = 0 exactly for equal distributions, and
agreement (with kl_div's) with the float64 reference on random shapes and values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import klx
from support import reference
from support.asserts import check_array
from support.cases import draw_distribution
from support.strategies import SETTINGS, distributions, normalize

FORMS = ("probs", "log_probs", "logits")
REDUCTIONS = ("none", "sum", "batchmean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("q_form", FORMS)
@pytest.mark.parametrize("p_form", FORMS)
@pytest.mark.parametrize(("shape", "axis"), [((6, 9), -1), ((4, 5, 3), 1), ((7,), 0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_divergence_matches_rel_entr(
    backend, dtype, shape, axis, p_form, q_form, reduction, conformance
):
    rng = np.random.default_rng(1)
    temperature = 2.0 if "logits" in (p_form, q_form) else 1.0
    p_in, p = draw_distribution(rng, shape, axis, p_form, zeros=True, temperature=temperature)
    q_in, q = draw_distribution(rng, shape, axis, q_form, temperature=temperature)
    if p_form != "logits":  # temperature only rescales logits
        p = reference.to_probs(p_in, p_form, axis)
    if q_form != "logits":
        q = reference.to_probs(q_in, q_form, axis)
    xp_p, xp_q = backend.asarray(p_in, dtype), backend.asarray(q_in, dtype)
    got = klx.kl_divergence(
        xp_p,
        xp_q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        reduction=reduction,
    )
    rows, scale = reference.kl_rows(p, q, axis)
    ref = reference.reduce(rows, reduction)
    ref_scale = reference.reduce(scale, reduction)
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    check_array(backend, got, xp_p, dtype, batch if reduction == "none" else ())
    tol = reference.TOL_KL_DIVERGENCE[dtype]
    got = backend.to_numpy(got)
    err = reference.rel_error(got, ref, np.maximum(ref_scale, 1.0))
    conformance(f"{backend.id} {dtype} kl_divergence", reduction, err, tol, value=got)
    assert err <= tol


@pytest.mark.backends("torch", reason="torch autograd")
def test_probabilities_with_zero_q_where_p_zero_have_finite_gradient(backend):
    import torch

    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64, requires_grad=True)
    klx.kl_divergence(p, q, reduction="sum").backward()
    assert torch.all(torch.isfinite(p.grad)) and torch.all(torch.isfinite(q.grad))
    np.testing.assert_allclose(q.grad.numpy(), [[-2.0, -2 / 3, 0.0]])


@SETTINGS
@given(data=st.data())
def test_nonnegative_and_zero_iff_equal(backend, data):
    p = data.draw(distributions())
    raw = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(0.1, 10.0)))
    q = normalize(raw)  # positive everywhere: the KL is finite
    got = backend.to_numpy(klx.kl_divergence(backend.asarray(p), backend.asarray(q)))
    assert np.all(got >= -1e-12)
    same = backend.to_numpy(klx.kl_divergence(backend.asarray(p), backend.asarray(p)))
    assert np.all(same == 0.0), "KL(P || P) is exactly 0"
    js = backend.to_numpy(klx.js_divergence(backend.asarray(p), backend.asarray(p)))
    assert np.all(np.abs(js) <= 4 * np.finfo(np.float64).eps), "JS(P, P) is 0 up to rounding"


@SETTINGS
@given(data=st.data())
def test_agrees_with_reference(backend, data):
    p = data.draw(distributions())
    logits = data.draw(
        hnp.arrays(np.float64, p.shape, elements=st.floats(-30, 30, allow_subnormal=False))
    )
    log_q = reference.log_softmax(logits, -1)
    rows, scale = reference.kl_rows_log(p, log_q, -1)
    got = klx.kl_divergence(backend.asarray(p), backend.asarray(logits), q_form="logits")
    # log-sum-exp of logits has an absolute error of a few eps whatever the KL's size
    # (log(1 + 1e-11) keeps only 5 digits): 1e-3 more scale allows 1e-14 absolute.
    err = reference.rel_error(backend.to_numpy(got), rows, scale + 1e-3)
    assert err <= 1e-11
    reduction = data.draw(st.sampled_from(["none", "sum", "mean", "batchmean"]))
    ref, ref_scale = reference.kl_div(log_q, p, reduction, log_target=False)
    if reduction == "mean":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", klx.KLDivMeanWarning)
            got = klx.kl_div(backend.asarray(log_q), backend.asarray(p), reduction=reduction)
    else:
        got = klx.kl_div(backend.asarray(log_q), backend.asarray(p), reduction=reduction)
    assert reference.rel_error(backend.to_numpy(got), ref, np.maximum(ref_scale, 1e-200)) <= 1e-11


# --------------------------------------------------------------------------- measures


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_generalized_kl_of_measures_is_scipys_kl_div(backend, xp, dtype):
    """normalized=False: non-negative measures as they are, SciPy's special.kl_div summed
    (zeros on either side, masses that do not sum to 1, nearly equal entries)."""
    from scipy import special

    from support.asserts import check_array

    p = np.array([[2.0, 1.0, 0.0, 0.5], [3.0, 0.25, 0.25, 1.0], [1.0, 1.0 + 2.0**-20, 4.0, 0.0]])
    q = np.array([[1.0, 1.0, 0.5, 0.5], [1.0, 0.5, 0.0, 1.0], [1.0, 1.0, 4.0, 0.0]])
    bp, bq = backend.asarray(p, dtype), backend.asarray(q, dtype)
    got = klx.kl_divergence(bp, bq, normalized=False)
    check_array(backend, got, bp, dtype, (3,))
    want = np.sum(special.kl_div(p, q), -1)
    np.testing.assert_allclose(
        backend.to_numpy(got), want, rtol={"float64": 1e-14, "float32": 1e-6}[dtype], atol=1e-15
    )
    by_name = klx.divergence(bp, bq, "generalized_kl")
    np.testing.assert_array_equal(backend.to_numpy(by_name), backend.to_numpy(got))
    # validation checks each entry, not the sums (a negative entry is still refused)
    ok = klx.kl_divergence(bp, bq, normalized=False, validate=True)
    np.testing.assert_array_equal(backend.to_numpy(ok), backend.to_numpy(got))


@pytest.mark.backends("numpy", reason="argument checks, backend-independent")
def test_generalized_kl_refusals(backend):
    p, q = np.array([2.0, 1.0]), np.array([1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative measures"):
        klx.kl_divergence(np.log(p), q, normalized=False, p_form="log_probs")
    with pytest.raises(ValueError, match="negative"):
        klx.kl_divergence(np.array([2.0, -1.0]), q, normalized=False, validate=True)
    with pytest.raises(ValueError, match="sum"):  # the normalised KL still checks the sums
        klx.kl_divergence(p, q, validate=True)
    with pytest.raises(TypeError, match="`normalized`"):
        klx.kl_divergence(p, q, normalized="no")


@pytest.mark.backends("torch", "jax", reason="autodiff of the generalized KL")
def test_generalized_kl_gradients(backend):
    """d/dp = log(p / q), d/dq = 1 - p / q; finite where p is 0 (the term is q there)."""
    p = np.array([2.0, 1.0, 0.0, 0.5])
    q = np.array([1.0, 0.5, 0.5, 0.5])
    if backend.name == "torch":
        import torch

        a, b = torch.tensor(p, requires_grad=True), torch.tensor(q, requires_grad=True)
        ga, gb = (
            g.numpy()
            for g in torch.autograd.grad(klx.kl_divergence(a, b, normalized=False), (a, b))
        )
    else:
        import jax

        f = jax.grad(lambda a, b: klx.kl_divergence(a, b, normalized=False), argnums=(0, 1))
        ga, gb = (np.asarray(g) for g in f(backend.asarray(p), backend.asarray(q)))
    with np.errstate(divide="ignore"):
        want_a = np.where(p > 0, np.log(p / q), 0.0)
    np.testing.assert_allclose(ga[p > 0], want_a[p > 0], rtol=1e-12)
    np.testing.assert_allclose(gb, 1 - p / q, rtol=1e-12)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
