"""`where`, `reduction` and `normalizer`: the token semantics of every reducing function."""

from __future__ import annotations

import numpy as np
import pytest

import klx
from support.cases import top_k_case
from support.reference import k_values, sparse_rows


def test_token_semantics_nothing_kept_and_array_normalizer(backend):
    """'batchmean' with every token dropped is 0 (as for kl_divergence); a 0-d array
    normalizer of the inputs' library divides the sum."""
    rng = np.random.default_rng(29)
    idx, lp, s, q = top_k_case(rng, (4,), 6, 2)
    lq = rng.normal(size=4) - 2.0
    lpol = np.log(rng.uniform(0.1, 1.0, size=4))
    none = backend.asarray(np.zeros(4, dtype=bool))
    args_sparse = (backend.asarray(idx), backend.asarray(lp), backend.asarray(s))
    args_est = (backend.asarray(lpol), backend.asarray(lq))
    for fn, args in ((klx.sparse_kl_divergence, args_sparse), (klx.kl_estimate, args_est)):
        got = backend.to_numpy(fn(*args, where=none, reduction="batchmean"))
        assert got == 0.0
    n = backend.asarray(np.asarray(7.0))
    rows, _ = sparse_rows(idx, lp, q, True)
    got = klx.sparse_kl_divergence(*args_sparse, reduction="batchmean", normalizer=n)
    np.testing.assert_allclose(backend.to_numpy(got), rows.sum() / 7, rtol=1e-12)
    got = klx.kl_estimate(*args_est, reduction="batchmean", normalizer=n)
    np.testing.assert_allclose(
        backend.to_numpy(got), k_values(lpol, lq)["k3"].sum() / 7, rtol=1e-12
    )
    with pytest.raises(ValueError, match="`normalizer` must be a finite number >= 0"):
        klx.sparse_kl_divergence(
            *args_sparse,
            reduction="batchmean",
            normalizer=backend.asarray(np.asarray(-1.0)),
            validate=True,
        )
