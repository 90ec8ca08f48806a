"""Hypothesis strategies shared by the property tests: random distributions."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Subnormal probabilities may be flushed to zero (XLA on CPU does): scales below 1e-200
# are floored there.
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def distributions(draw, zeros=True):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    weights = draw(
        hnp.arrays(np.float64, shape, elements=st.floats(0.0, 10.0, allow_subnormal=False))
    )
    if not zeros:
        weights = weights + 0.1
    weights[..., 0] += 1e-3  # never an all-zero row
    return normalize(weights)


def normalize(weights):
    """Rows summing to 1, with no subnormal probabilities: XLA flushes those to zero, and
    the float64 reference's mixture 0.5 p then underflows to 0 (an infinite rel_entr)."""
    p = weights / weights.sum(axis=-1, keepdims=True)
    p = np.where(p < 1e-200, 0.0, p)
    return p / p.sum(axis=-1, keepdims=True)


def another(data, p):
    """A second distribution of `p`'s shape, with zeros anywhere but its last entry."""
    weights = data.draw(
        hnp.arrays(np.float64, p.shape, elements=st.floats(0.0, 10.0, allow_subnormal=False))
    )
    weights[..., -1] += 1e-3
    return normalize(weights)
