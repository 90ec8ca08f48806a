"""js_divergence against scipy.spatial.distance.jensenshannon on every backend: symmetric and
bounded by log 2 from any form (its accuracy near P = Q is in test_numerics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon

import klx
from support import reference
from support.cases import draw_distribution
from support.strategies import SETTINGS, distributions, normalize

FORMS = ("probs", "log_probs", "logits")
REDUCTIONS = ("none", "sum", "batchmean")


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.0, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_js_divergence_matches_scipy(backend, beta, reduction, conformance):
    rng = np.random.default_rng(2)
    _, p = draw_distribution(rng, (5, 8), -1, "probs", zeros=True)
    _, q = draw_distribution(rng, (5, 8), -1, "probs", zeros=True)
    got = klx.js_divergence(backend.asarray(p), backend.asarray(q), beta=beta, reduction=reduction)
    ref_rows = reference.js_rows(p, q, -1, beta)
    if beta == 0.5:  # SciPy returns the square root of JS at beta = 1/2
        np.testing.assert_allclose(ref_rows, jensenshannon(p, q, axis=-1) ** 2, rtol=1e-12)
    ref = reference.reduce(ref_rows, reduction)
    got = backend.to_numpy(got)
    err = reference.rel_error(got, ref, np.maximum(np.abs(ref), 1e-3))
    conformance(f"{backend.id} float64 js_divergence", reduction, err, 1e-12, value=got)
    assert err <= 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_js_symmetric_bounded_from_any_form(backend, form):
    rng = np.random.default_rng(3)
    p_in, _ = draw_distribution(rng, (4, 6), -1, form, zeros=True)
    q_in, _ = draw_distribution(rng, (4, 6), -1, form, zeros=True)
    a = backend.to_numpy(
        klx.js_divergence(backend.asarray(p_in), backend.asarray(q_in), p_form=form, q_form=form)
    )
    b = backend.to_numpy(
        klx.js_divergence(backend.asarray(q_in), backend.asarray(p_in), p_form=form, q_form=form)
    )
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert np.all(a >= 0)
    assert np.all(a <= np.log(2) + 1e-12)


@SETTINGS
@given(data=st.data())
def test_js_bounded_and_symmetric(backend, data):
    p = data.draw(distributions())
    q = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(0.0, 5.0)))
    q[..., -1] += 1e-3
    q = normalize(q)
    a = backend.to_numpy(klx.js_divergence(backend.asarray(p), backend.asarray(q)))
    b = backend.to_numpy(klx.js_divergence(backend.asarray(q), backend.asarray(p)))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert np.all(a >= -1e-15)
    assert np.all(a <= np.log(2) + 1e-12)
    np.testing.assert_allclose(a, reference.js_rows(p, q, -1, 0.5), rtol=1e-10, atol=1e-14)
