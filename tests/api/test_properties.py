"""Property tests (hypothesis): KL >= 0, = 0 exactly for equal distributions, and agreement
with the float64 SciPy reference on random shapes and values."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import klx
from support import reference
from support.strategies import SETTINGS, distributions, normalize


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
