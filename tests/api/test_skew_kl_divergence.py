"""skew_kl_divergence alone: every alpha against the float64 reference where the supports
are disjoint (KL infinite, skew KL -log alpha), and hypothesis properties (finite, bounded
by -log alpha, the KL at alpha = 0). Its tests with TV are in test_divergences.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import klx
from support import reference
from support.cases import draw_distribution
from support.strategies import SETTINGS, another, distributions


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_skew_kl_alphas_with_disjoint_support(backend, alpha, conformance):
    rng = np.random.default_rng(12)
    _, p = draw_distribution(rng, (5, 8), -1, "probs", zeros=True)
    _, q = draw_distribution(rng, (5, 8), -1, "probs", zeros=True)
    p[0], q[0] = [1.0] + [0.0] * 7, [0.0] + [1 / 7] * 7  # disjoint: KL is +inf
    got = backend.to_numpy(
        klx.skew_kl_divergence(backend.asarray(p), backend.asarray(q), alpha=alpha)
    )
    rows, scale = reference.skew_kl_rows(p, q, -1, alpha)
    if alpha == 0.0:
        assert got[0] == np.inf
    else:
        np.testing.assert_allclose(got[0], -math.log(alpha), rtol=1e-14, atol=1e-300)
    err = reference.rel_error(got, rows, np.maximum(scale, 1.0))
    conformance(f"{backend.id} float64 skew_kl alpha", f"none alpha={alpha}", err, 1e-12)
    assert err <= 1e-12


@SETTINGS
@given(data=st.data(), alpha=st.floats(1e-6, 1.0))
def test_skew_kl_finite_bounded_and_kl_at_alpha_zero(backend, data, alpha):
    p = data.draw(distributions())
    q = another(data, p)  # zeros where P has none: KL(P || Q) may be +inf
    xp_p, xp_q = backend.asarray(p), backend.asarray(q)
    got = backend.to_numpy(klx.skew_kl_divergence(xp_p, xp_q, alpha=alpha))
    assert np.all(np.isfinite(got))
    assert np.all(got >= -1e-12)
    assert np.all(got <= -math.log(alpha) * (1 + 1e-12) + 1e-12), "KL(P || M) <= log(1/alpha)"
    rows, scale = reference.skew_kl_rows(p, q, -1, alpha)
    assert reference.rel_error(got, rows, scale + 1e-3) <= 1e-11
    # At alpha = 0 the mixture is Q: exactly the KL, infinities included.
    skew = backend.to_numpy(klx.skew_kl_divergence(xp_p, xp_q, alpha=0.0))
    np.testing.assert_array_equal(skew, backend.to_numpy(klx.kl_divergence(xp_p, xp_q)))
