"""`where`, `reduction` and `normalizer`: the token semantics of every reducing function
(masked rows, 'batchmean' when nothing is kept, a normalizer of 0, micro-batches)."""

from __future__ import annotations

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads
from support.cases import divergence_cases, draw_distribution, top_k_case
from support.reference import k_values, sparse_rows

REDUCTIONS = ("none", "sum", "batchmean")


#: Every divergence klx ships (read from its records), its public function, and its reference
#: per distribution (float64 probabilities along the last axis).
FUNCTIONS = divergence_cases({"skew_kl": {"alpha": 0.1}}, logits=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_where_masks_padding_rows(backend, reduction):
    rng = np.random.default_rng(4)
    t = rng.normal(size=(5, 6))
    s = rng.normal(size=(5, 6))
    keep = np.array([True, False, True, True, False])
    t_pad, s_pad = t.copy(), s.copy()
    t_pad[1] = np.nan  # padding rows hold garbage
    s_pad[4] = -np.inf
    got = klx.kl_divergence(
        backend.asarray(t_pad),
        backend.asarray(s_pad),
        p_form="logits",
        q_form="logits",
        where=backend.asarray(keep),
        reduction=reduction,
    )
    pt = np.exp(reference.log_softmax(t, -1))
    rows, _ = reference.kl_rows(pt, np.exp(reference.log_softmax(s, -1)), -1)
    ref = reference.reduce(rows, reduction, keep)
    np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-12)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_normalizer_divides_the_kept_sum(backend, kind):
    fn, options, ref_rows = FUNCTIONS[kind]
    rng = np.random.default_rng(16)
    _, p = draw_distribution(rng, (6, 5), -1, "probs")
    _, q = draw_distribution(rng, (6, 5), -1, "probs")
    keep = np.array([True, False, True, True, False, True])
    rows = ref_rows(p, q)
    xp_p, xp_q, where = backend.asarray(p), backend.asarray(q), backend.asarray(keep)
    for normalizer, value in (
        (7, 7.0),
        (2.5, 2.5),
        (backend.asarray(np.asarray(11.0)), 11.0),
        (backend.asarray(np.asarray(11)), 11.0),  # an integer count, as mask.sum() gives
        (0, 0.0),  # a step without tokens
    ):
        got = fn(xp_p, xp_q, **options, where=where, reduction="batchmean", normalizer=normalizer)
        check_array(backend, got, xp_p, "float64", ())
        ref = reference.reduce(rows, "batchmean", keep, normalizer=value)
        np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-13)
    # Micro-batches normalised by the step's token count add up to the step's mean.
    halves = [slice(0, 3), slice(3, 6)]
    total = sum(
        backend.to_numpy(
            fn(
                backend.asarray(p[h]),
                backend.asarray(q[h]),
                **options,
                where=backend.asarray(keep[h]),
                reduction="batchmean",
                normalizer=int(keep.sum()),
            )
        )
        for h in halves
    )
    whole = fn(xp_p, xp_q, **options, where=where, reduction="batchmean")
    np.testing.assert_allclose(total, backend.to_numpy(whole), rtol=1e-13)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_batchmean_of_nothing_is_zero(backend, kind):
    fn, options, _ = FUNCTIONS[kind]
    p = np.array([[np.nan, 1.0, 0.0], [0.2, 0.3, 0.5]])  # garbage in dropped rows
    q = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    none_kept = backend.asarray(np.array([False, False]))
    got = fn(
        backend.asarray(p), backend.asarray(q), **options, where=none_kept, reduction="batchmean"
    )
    check_array(backend, got, backend.asarray(p), "float64", ())
    assert backend.to_numpy(got) == 0.0
    empty = fn(backend.asarray(p[:0]), backend.asarray(q[:0]), **options, reduction="batchmean")
    check_array(backend, empty, backend.asarray(p), "float64", ())
    assert backend.to_numpy(empty) == 0.0


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_batchmean_of_nothing_has_zero_gradient(backend, kind):
    fn, options, _ = FUNCTIONS[kind]
    t = np.array([[np.nan, 1.0, -np.inf], [0.2, 3.0, 0.5]])
    s = np.array([[-np.inf, 0.0, 0.0], [1.0, -np.inf, 0.0]])
    keep = np.array([False, False])

    def loss(a, b):
        return fn(
            a,
            b,
            **options,
            p_form="logits",
            q_form="logits",
            where=backend.asarray(keep),
            reduction="batchmean",
        )

    value, ga, gb = value_and_grads(backend, loss, t, s)
    assert value == 0.0
    assert np.array_equal(ga, np.zeros_like(t)) and np.array_equal(gb, np.zeros_like(s))


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_a_normalizer_of_zero_gives_zero_with_tokens_present(backend, kind):
    """docs/post-training.md: a normalizer of 0 (no tokens in the whole batch) gives 0 and
    gradient 0; it returned the undivided sum when this call held tokens."""
    fn, options, _ = FUNCTIONS[kind]
    rng = np.random.default_rng(17)
    t, s = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    for normalizer in (0, 0.0, backend.asarray(np.asarray(0.0))):

        def loss(a, b, normalizer=normalizer):
            return fn(
                a,
                b,
                **options,
                p_form="logits",
                q_form="logits",
                reduction="batchmean",
                normalizer=normalizer,
            )

        value, ga, gb = value_and_grads(backend, loss, t, s)
        assert value == 0.0
        assert np.array_equal(ga, np.zeros_like(t)) and np.array_equal(gb, np.zeros_like(s))


@pytest.mark.backends("jax", reason="a traced normalizer under jax.jit")
def test_normalizer_traced_under_jit(backend):
    import jax
    import jax.numpy as jnp

    p = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4]])
    f = jax.jit(lambda a, b, n: klx.skew_kl_divergence(a, b, reduction="batchmean", normalizer=n))
    got = f(jnp.asarray(p), jnp.asarray(q), jnp.asarray(10))
    rows, _ = reference.skew_kl_rows(p, q, -1, 0.1)
    np.testing.assert_allclose(float(got), rows.sum() / 10, rtol=1e-13)


@pytest.mark.backends("numpy", "torch", "jax", reason="the other reducing functions' own paths")
def test_a_normalizer_of_zero_gives_zero_in_sparse_estimate_and_fused(backend):
    rng = np.random.default_rng(18)
    p = rng.dirichlet(np.ones(5), size=3)
    idx = np.argsort(-p, axis=-1)[:, :2]
    top = np.log(np.take_along_axis(p, idx, axis=-1))
    q = rng.dirichlet(np.ones(5), size=3)
    h, w, w2 = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    calls = {
        "sparse_kl_divergence": lambda n: klx.sparse_kl_divergence(
            backend.asarray(idx),
            backend.asarray(top),
            backend.asarray(q),
            reduction="batchmean",
            normalizer=n,
        ),
        "kl_estimate": lambda n: klx.kl_estimate(
            backend.asarray(np.log(q[:, 0])),
            backend.asarray(np.log(p[:, 0])),
            reduction="batchmean",
            normalizer=n,
        ),
        "fused_linear_divergence": lambda n: klx.fused_linear_divergence(
            backend.asarray(h),
            backend.asarray(w),
            backend.asarray(h),
            backend.asarray(w2),
            reduction="batchmean",
            normalizer=n,
        ),
    }
    for name, call in calls.items():
        assert backend.to_numpy(call(2.0)) != 0.0, name  # tokens are present
        for n in (0, 0.0, backend.asarray(np.asarray(0.0))):
            assert backend.to_numpy(call(n)) == 0.0, name


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
