"""tv_distance alone: hypothesis properties (in [0, 1], symmetric, 0 for P = Q, the float64
reference). Its tests with skew KL are in test_divergences.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import klx
from support import reference
from support.strategies import SETTINGS, another, distributions


@SETTINGS
@given(data=st.data())
def test_tv_in_unit_interval_and_symmetric(backend, data):
    p = data.draw(distributions())
    q = another(data, p)
    a = backend.to_numpy(klx.tv_distance(backend.asarray(p), backend.asarray(q)))
    b = backend.to_numpy(klx.tv_distance(backend.asarray(q), backend.asarray(p)))
    assert np.all(a >= 0) and np.all(a <= 1 + 1e-15)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, reference.tv_rows(p, q, -1)[0], rtol=1e-13, atol=1e-16)
    same = backend.to_numpy(klx.tv_distance(backend.asarray(p), backend.asarray(p)))
    assert np.all(same == 0.0)
