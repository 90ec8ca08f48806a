"""sparse_kl_divergence against independent float64 references.

The sparse references (``support.reference.sparse_rows``) build P and Q over k + 1 bins
(or k, renormalised) directly from the dense float64 distributions: Q's tail is the sum of
Q over the indices *not* taken (a boolean mask, no cancellation), unlike klx's log-space
subtraction. Gradients are compared with their closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads
from support.cases import top_k_case
from support.reference import sparse_bins, sparse_rows

FORMS = ("logits", "log_probs", "probs")
REDUCTIONS = ("none", "sum", "batchmean")


# --------------------------------------------------------------------------- references


def lp_dense(idx, lp):
    """The teacher's log-probabilities over the vocabulary, from all k = V of them."""
    out = np.empty_like(lp)
    np.put_along_axis(out, idx, lp, axis=-1)
    return out


def q_given(s, q, form, temperature):
    if form == "logits":
        return s
    with np.errstate(divide="ignore"):
        return np.log(q) if form == "log_probs" else q


# --------------------------------------------------------------------------- sparse: values


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.parametrize("q_form", FORMS)
@pytest.mark.parametrize(("batch", "axis"), [((6,), -1), ((2, 3), 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_matches_reference(backend, dtype, batch, axis, q_form, tail, conformance):
    rng = np.random.default_rng(11)
    vocab, k = 9, 4
    temperature = 2.0 if q_form == "logits" else 1.0
    idx, lp, s, q = top_k_case(rng, batch, vocab, k, temperature)
    q_in = q_given(s, q, q_form, temperature)
    if axis != -1:  # the vocabulary on a middle axis
        idx, lp, q_in = (np.moveaxis(a, -1, axis) for a in (idx, lp, q_in))
    x_idx, x_lp = backend.asarray(idx), backend.asarray(lp, dtype)
    x_q = backend.asarray(q_in, dtype)
    before = [backend.to_numpy(a) for a in (x_idx, x_lp, x_q)]
    # The reference sees what klx saw: the inputs rounded to `dtype`.
    lp_r, q_r = backend.to_numpy(x_lp), backend.to_numpy(x_q)
    if axis != -1:
        lp_r, q_r = np.moveaxis(lp_r, axis, -1), np.moveaxis(q_r, axis, -1)
    q_probs = {
        "logits": np.exp(log_softmax(q_r / temperature, axis=-1)),
        "log_probs": np.exp(q_r),
        "probs": q_r,
    }[q_form]
    rows, scale = sparse_rows(
        idx if axis == -1 else np.moveaxis(idx, axis, -1), lp_r, q_probs, tail
    )
    tol = 1e-12 if dtype == "float64" else 2e-6
    for reduction in REDUCTIONS:
        got = klx.sparse_kl_divergence(
            x_idx,
            x_lp,
            x_q,
            q_form=q_form,
            tail=tail,
            axis=axis,
            temperature=temperature,
            reduction=reduction,
        )
        check_array(backend, got, x_lp, dtype, batch if reduction == "none" else ())
        ref = reference.reduce(rows, reduction)
        ref_scale = reference.reduce(scale, reduction)
        err = reference.rel_error(backend.to_numpy(got), ref, np.maximum(ref_scale, 1e-3))
        conformance(f"{backend.id} {dtype} sparse_kl", reduction, err, tol)
        assert err <= tol, (reduction, backend.to_numpy(got), ref)
    for a, b in zip((x_idx, x_lp, x_q), before, strict=True):  # inputs are never modified
        np.testing.assert_array_equal(backend.to_numpy(a), b)


@pytest.mark.parametrize("tail", [True, False])
def test_sparse_with_every_index_is_kl_divergence(backend, tail):
    """k = vocabulary size, indices in any order: the dense KL, for every form of Q."""
    rng = np.random.default_rng(12)
    vocab = 7
    idx, lp, s, q = top_k_case(rng, (5,), vocab, vocab)
    lp_full = lp_dense(idx, lp)
    for form in FORMS:
        q_in = backend.asarray(q_given(s, q, form, 1.0))
        got = klx.sparse_kl_divergence(
            backend.asarray(idx), backend.asarray(lp), q_in, q_form=form, tail=tail
        )
        dense = klx.kl_divergence(backend.asarray(lp_full), q_in, p_form="log_probs", q_form=form)
        np.testing.assert_allclose(
            backend.to_numpy(got), backend.to_numpy(dense), rtol=1e-12, atol=1e-14
        )


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(1, 9),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    tail=st.booleans(),
)
def test_property_full_vocabulary_equals_dense_kl(vocab, rows, seed, tail):
    rng = np.random.default_rng(seed)
    idx, lp, s, q = top_k_case(rng, (rows,), vocab, vocab)
    got = klx.sparse_kl_divergence(idx, lp, s, tail=tail)
    lp_full = lp_dense(idx, lp)
    ref, scale = reference.kl_rows(np.exp(lp_full), q, -1)
    assert reference.rel_error(got, ref, np.maximum(scale, 1e-3)) <= 1e-12


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_property_sparse_is_the_coarsened_kl(vocab, data, seed):
    """Any k: the KL of the k + 1 bins (the reference sums Q's tail directly), >= 0."""
    k = data.draw(st.integers(1, vocab))
    rng = np.random.default_rng(seed)
    idx, lp, s, q = top_k_case(rng, (3,), vocab, k)
    got = np.asarray(klx.sparse_kl_divergence(idx, lp, s))
    ref, scale = sparse_rows(idx, lp, q, True)
    assert reference.rel_error(got, ref, np.maximum(scale, 1e-3)) <= 1e-12
    assert np.all(got >= 0)


def test_sparse_lower_bound_of_dense_kl(backend):
    rng = np.random.default_rng(13)
    t = rng.normal(scale=2.0, size=(6, 10))
    s = rng.normal(size=(6, 10))
    lp_full = log_softmax(t, axis=-1)
    idx = np.argsort(-lp_full, axis=-1)[:, :3]
    lp = np.take_along_axis(lp_full, idx, axis=-1)
    got = backend.to_numpy(
        klx.sparse_kl_divergence(backend.asarray(idx), backend.asarray(lp), backend.asarray(s))
    )
    dense, _ = reference.kl_rows(np.exp(lp_full), np.exp(log_softmax(s, axis=-1)), -1)
    assert np.all(got <= dense + 1e-12) and np.all(got >= 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_where_drops_padding_rows(backend, reduction):
    rng = np.random.default_rng(14)
    idx, lp, s, q = top_k_case(rng, (5,), 8, 3)
    keep = np.array([True, False, True, True, False])
    idx_pad, lp_pad, s_pad = idx.copy(), lp.copy(), s.copy()
    idx_pad[1] = [-1, 99, 99]  # padding rows hold garbage, out-of-range indices included
    lp_pad[1] = np.nan
    s_pad[4] = -np.inf
    got = klx.sparse_kl_divergence(
        backend.asarray(idx_pad),
        backend.asarray(lp_pad),
        backend.asarray(s_pad),
        where=backend.asarray(keep),
        reduction=reduction,
        validate=True,
    )
    rows, _ = sparse_rows(idx, lp, q, True)
    ref = reference.reduce(rows, reduction, keep)
    np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-12)
    if reduction == "batchmean":
        got_n = klx.sparse_kl_divergence(
            backend.asarray(idx_pad),
            backend.asarray(lp_pad),
            backend.asarray(s_pad),
            where=backend.asarray(keep),
            reduction="batchmean",
            normalizer=10,
        )
        np.testing.assert_allclose(backend.to_numpy(got_n), rows[keep].sum() / 10, rtol=1e-12)


def test_sparse_edge_values(backend):
    """Q = 0 on an index where P > 0: inf; P's top k holding all its mass: no tail term;
    a NaN in Q propagates."""
    s = np.array([[0.0, 1.0, -np.inf, 2.0], [0.0, 1.0, 2.0, 3.0], [np.nan, 1.0, 2.0, 3.0]])
    idx = np.array([[2, 0], [3, 1], [1, 2]])
    lp = np.log(np.array([[0.5, 0.2], [0.5, 0.5], [0.5, 0.2]]))
    got = backend.to_numpy(
        klx.sparse_kl_divergence(backend.asarray(idx), backend.asarray(lp), backend.asarray(s))
    )
    q1 = np.exp(log_softmax(s[1]))
    ref1 = 0.5 * np.log(0.5 / q1[3]) + 0.5 * np.log(0.5 / q1[1])  # p_T = 0: no tail term
    assert got[0] == np.inf
    np.testing.assert_allclose(got[1], ref1, rtol=1e-12)
    assert np.isnan(got[2])


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.parametrize("q_form", FORMS)
def test_sparse_student_shared_by_rows_is_not_expanded(backend, q_form, tail):
    """Issue 23 item 17: a (1, V) student against (N, k) teacher entries was broadcast to
    (N, V) first (+769 MiB at 6144 x 32000 in NumPy and torch, 2.2 GB from logits with the
    tail). Values equal the expanded reference's; so with a (B, 1, V) student per sequence
    and padding rows dropped by `where` (one sequence wholly dropped, its student NaN)."""
    rng = np.random.default_rng(21)
    vocab, k, temperature = 11, 3, 1.5 if q_form == "logits" else 1.0
    idx, lp, _, _ = top_k_case(rng, (2, 4), vocab, k)
    s = rng.normal(size=(2, 1, vocab))
    q = np.exp(log_softmax(s / temperature, axis=-1))
    keep = np.array([[True, False, True, True], [False, False, False, False]])
    s_pad, q_pad = s.copy(), q.copy()
    s_pad[1], q_pad[1] = np.nan, np.nan  # a student no kept row uses
    idx_pad = idx.copy()
    idx_pad[0, 1] = [-100, 0, 99]  # a padding row holds garbage indices
    given = q_given(s_pad, q_pad, q_form, temperature)
    with np.errstate(invalid="ignore"):
        rows, _ = sparse_rows(idx, lp, np.broadcast_to(q, (2, 4, vocab)), tail)
    args = (backend.asarray(idx_pad), backend.asarray(lp), backend.asarray(given))
    for reduction in REDUCTIONS:
        got = klx.sparse_kl_divergence(
            *args,
            q_form=q_form,
            tail=tail,
            temperature=temperature,
            where=backend.asarray(keep),
            reduction=reduction,
        )
        check_array(backend, got, args[1], "float64", (2, 4) if reduction == "none" else ())
        want = reference.reduce(rows, reduction, keep)
        out = backend.to_numpy(got)
        np.testing.assert_allclose(
            out[keep] if reduction == "none" else out,
            want[keep] if reduction == "none" else want,
            rtol=1e-12,
        )
    # one student row shared by every distribution, no mask
    one = backend.asarray(q_given(s[:1, :1][0], q[:1, :1][0], q_form, temperature))
    idx2, lp2 = idx.reshape(8, k), lp.reshape(8, k)
    got = klx.sparse_kl_divergence(
        backend.asarray(idx2),
        backend.asarray(lp2),
        one,
        q_form=q_form,
        tail=tail,
        temperature=temperature,
        reduction="none",
    )
    want, _ = sparse_rows(idx2, lp2, np.broadcast_to(q[0, :1], (8, vocab)), tail)
    check_array(backend, got, one, "float64", (8,))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)


@pytest.mark.backends("numpy", reason="tracemalloc sees NumPy's allocations")
def test_sparse_shared_student_allocates_no_expanded_copy(backend):
    """A (1, V) student at (N, k) indices: the peak allocation stays far below N x V."""
    import tracemalloc

    rng = np.random.default_rng(22)
    n, vocab, k = 2048, 4096, 8
    idx = (np.arange(k) * 61 + rng.integers(0, vocab, size=(n, 1))) % vocab
    lp = np.log(rng.dirichlet(np.ones(k), size=n) * 0.9)
    s = rng.normal(size=(1, vocab))
    tracemalloc.start()
    try:
        for form, x in (("logits", s), ("probs", np.exp(log_softmax(s, axis=-1)))):
            for tail in (True, False):
                klx.sparse_kl_divergence(idx, lp, x, q_form=form, tail=tail, reduction="sum")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expanded = n * vocab * 8  # 64 MiB
    assert peak < expanded / 8, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_sparse_gradient_of_a_shared_student_row(backend, tail):
    """The gradient w.r.t. a (1, V) student shared by every distribution is the sum of the
    rows' closed-form gradients; a dropped row adds nothing, even where its stand-in index
    hits a NaN logit no kept row reads (renormalised over the k indices)."""
    rng = np.random.default_rng(23)
    temperature, vocab = 1.5, 8
    idx, lp, _, _ = top_k_case(rng, (4,), vocab, 3, temperature)
    idx[:, :] = np.array([[3, 1, 2], [4, 5, 6], [7, 2, 1], [1, 3, 5]])
    s = rng.normal(size=(1, vocab))
    keep = np.array([True, True, False, True])
    s_pad = s.copy()
    if not tail:
        s_pad[0, 0] = np.nan  # index 0: read by no kept row; a dropped row's stand-in
    q = np.exp(log_softmax(s / temperature, axis=-1))
    x_idx, x_lp, x_keep = backend.asarray(idx), backend.asarray(lp), backend.asarray(keep)

    def loss(z):
        return klx.sparse_kl_divergence(
            x_idx, x_lp, z, tail=tail, temperature=temperature, where=x_keep, reduction="sum"
        )

    value, g = value_and_grads(backend, loss, s_pad)
    if tail:
        q_rows = np.broadcast_to(q, (4, vocab))
        ref = _student_grad(idx, lp, q_rows, tail, keep, temperature).sum(0, keepdims=True)
        rows, _ = sparse_rows(idx, lp, q_rows, tail)
    else:  # renormalised: only the kept rows' indices matter, and index 0 is none of them
        q_k = np.exp(log_softmax(s[:, 1:] / temperature, axis=-1))
        q_rows = np.broadcast_to(q_k, (4, vocab - 1))
        sub = _student_grad(idx - 1, lp, q_rows, tail, keep, temperature).sum(0, keepdims=True)
        ref = np.concatenate([np.zeros((1, 1)), sub], axis=-1)
        rows, _ = sparse_rows(idx - 1, lp, q_rows, tail)
    np.testing.assert_allclose(value, rows[keep].sum(), rtol=1e-12)
    assert g.shape == (1, vocab) and np.all(np.isfinite(g)), g
    np.testing.assert_allclose(g, ref, atol=1e-12)


# --------------------------------------------------------------------------- sparse: gradients


def _student_grad(idx, lp, q, tail, keep, temperature):
    """The closed-form gradient of the kept rows' summed sparse KL w.r.t. the student's
    logits, one row per distribution (see the test below)."""
    k = idx.shape[-1]
    p_bins, q_bins = sparse_bins(idx, lp, q, tail)
    ref = np.zeros_like(q)
    if tail:
        ratio = np.where(q_bins > 0, p_bins / np.where(q_bins > 0, q_bins, 1.0), 0.0)
        tail_ratio = (
            np.zeros_like(q) if k == q.shape[-1] else np.broadcast_to(ratio[:, k:], q.shape).copy()
        )
        np.put_along_axis(tail_ratio, idx, ratio[:, :k], axis=-1)
        ref = q - q * tail_ratio
    else:
        np.put_along_axis(ref, idx, q_bins - p_bins, axis=-1)
    return np.where(keep[:, None], ref / temperature, 0.0)


@pytest.mark.parametrize("k", [3, 8], ids=["top3", "all"])
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_sparse_gradient_with_respect_to_student_logits(backend, tail, k):
    """Closed form: with bins B (the k indices, and the tail), d KL / d z_i =
    (q_i - P_B(i) q_i / Q_B(i)) / T; renormalised: (q~_i - p~_i) / T on the k indices.
    With every index (k = 8) both are the dense KL's (q - p) / T."""
    rng = np.random.default_rng(15)
    temperature = 1.5
    idx, lp, s, q = top_k_case(rng, (4,), 8, k, temperature, masked_vocab=True)
    keep = np.array([True, True, False, True])
    s_pad = s.copy()
    s_pad[2] = np.nan  # a dropped row gets no gradient, whatever it holds
    x_idx, x_lp, x_keep = backend.asarray(idx), backend.asarray(lp), backend.asarray(keep)

    def loss(z):
        return klx.sparse_kl_divergence(
            x_idx, x_lp, z, tail=tail, temperature=temperature, where=x_keep, reduction="sum"
        )

    value, g = value_and_grads(backend, loss, s_pad)
    ref = _student_grad(idx, lp, q, tail, keep, temperature)
    rows, _ = sparse_rows(idx, lp, q, tail)
    np.testing.assert_allclose(value, rows[keep].sum(), rtol=1e-12)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ref, atol=1e-12)
    assert np.all(g[:, -1] == 0), "a -inf logit gets no gradient"
    if k == q.shape[-1]:
        dense = (q - np.exp(lp_dense(idx, lp))) / temperature
        np.testing.assert_allclose(g[keep], dense[keep], atol=1e-12)


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_sparse_gradient_at_tied_maxima(backend, tail):
    """The student's maximum is a constant for autodiff (the log-softmax does not depend
    on the shift): where two or three logits tie at the maximum, the gradient is still
    the closed form's, entry for entry (jax.jit and torch autograd, float64)."""
    rng = np.random.default_rng(16)
    temperature = 1.5
    idx, lp, s, _ = top_k_case(rng, (3,), 8, 3, temperature)
    top = s.max(-1)
    s[0, [2, 5]] = top[0] + 1.0  # two maxima
    s[1, [0, 3, 7]] = top[1] + 0.5  # three
    s[2, :] = 0.25  # every logit a maximum
    q = np.exp(log_softmax(s / temperature, axis=-1))
    x_idx, x_lp = backend.asarray(idx), backend.asarray(lp)

    def loss(z):
        return klx.sparse_kl_divergence(
            x_idx, x_lp, z, tail=tail, temperature=temperature, reduction="sum"
        )

    _, g = value_and_grads(backend, loss, s)
    ref = _student_grad(idx, lp, q, tail, np.ones(3, dtype=bool), temperature)
    np.testing.assert_allclose(g, ref, atol=1e-14)


@pytest.mark.backends("jax", reason="jax.jit and jax.vmap")
def test_sparse_jax_jit_vmap(backend):
    import jax

    rng = np.random.default_rng(16)
    idx, lp, s, q = top_k_case(rng, (5,), 7, 3)
    f = jax.jit(lambda i, a, b: klx.sparse_kl_divergence(i, a, b))
    rows = np.asarray(f(backend.asarray(idx), backend.asarray(lp), backend.asarray(s)))
    per_row = jax.vmap(lambda i, a, b: klx.sparse_kl_divergence(i, a, b))(
        backend.asarray(idx), backend.asarray(lp), backend.asarray(s)
    )
    ref, _ = sparse_rows(idx, lp, q, True)
    np.testing.assert_allclose(rows, ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(per_row), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="validate=False inside the compiled function"):
        jax.jit(lambda i, a, b: klx.sparse_kl_divergence(i, a, b, validate=True))(
            backend.asarray(idx), backend.asarray(lp), backend.asarray(s)
        )


# --------------------------------------------------------------------------- sparse: errors


def test_sparse_errors_always_checked(backend):
    idx = backend.asarray(np.array([[0, 1]]))
    lp = backend.asarray(np.log([[0.5, 0.3]]))
    q = backend.asarray(np.zeros((1, 4)))
    with pytest.raises(TypeError, match="`p_indices` must have an integer dtype"):
        klx.sparse_kl_divergence(backend.asarray(np.array([[0.0, 1.0]])), lp, q)
    with pytest.raises(ValueError, match="one log-probability per index"):
        klx.sparse_kl_divergence(idx, backend.asarray(np.log([[0.5, 0.3, 0.1]])), q)
    with pytest.raises(ValueError, match="more than the vocabulary size 4"):
        klx.sparse_kl_divergence(
            backend.asarray(np.arange(5)[None]), backend.asarray(np.full((1, 5), -2.0)), q
        )
    with pytest.raises(ValueError, match="same number of dimensions"):
        klx.sparse_kl_divergence(idx, lp, backend.asarray(np.zeros(4)))
    with pytest.raises(ValueError, match="`temperature`"):
        klx.sparse_kl_divergence(idx, lp, q, q_form="log_probs", temperature=2.0)
    with pytest.raises(TypeError, match="`tail` must be True or False"):
        klx.sparse_kl_divergence(idx, lp, q, tail="yes")
    with pytest.raises(ValueError, match="normalizer"):
        klx.sparse_kl_divergence(idx, lp, q, reduction="sum", normalizer=3)


@pytest.mark.parametrize(
    ("indices", "log_probs", "match"),
    [
        ([[0, 4]], [[0.5, 0.3]], r"1 index\(es\) outside \[0, 4\)"),
        ([[-1, 2]], [[0.5, 0.3]], r"outside \[0, 4\)"),
        ([[2, 2]], [[0.5, 0.3]], "repeats an index within 1 distribution"),
        ([[0, 1]], [[0.7, 0.6]], "more than probability 1"),
        ([[0, 1]], [[0.5, 1.5]], "must hold log-probabilities"),
    ],
)
def test_sparse_validation_reads_values(backend, indices, log_probs, match):
    idx = backend.asarray(np.array(indices))
    lp = backend.asarray(np.log(np.array(log_probs)))
    q = backend.asarray(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=match):
        klx.sparse_kl_divergence(idx, lp, q, validate=True)


# --------------------------------------------------------------------------- sparse: indices


@pytest.mark.parametrize("index_dtype", ["int32", "int64", "uint8"])
def test_sparse_any_integer_index_dtype(backend, index_dtype):
    rng = np.random.default_rng(27)
    idx, lp, s, q = top_k_case(rng, (3,), 6, 2)
    got = klx.sparse_kl_divergence(
        backend.asarray(idx.astype(index_dtype)),
        backend.asarray(lp),
        backend.asarray(s),
        validate=True,
    )
    rows, _ = sparse_rows(idx, lp, q, True)
    np.testing.assert_allclose(backend.to_numpy(got), rows, rtol=1e-12)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_sparse_zero_teacher_entries_keep_gradients_finite(backend, tail):
    """A top-k list padded with -inf log-probabilities (fewer tokens than k had mass),
    where the student's probability is also 0: value finite, gradient finite, for Q
    given as probabilities, log-probabilities or logits."""
    idx = np.array([[0, 2, 3], [1, 0, 2]])
    q = np.array([[0.5, 0.2, 0.3, 0.0], [0.3, 0.3, 0.0, 0.4]])
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.7, 0.2, 0.0], [0.5, 0.5, 0.0]]))
        log_q = np.log(q)  # -inf logits where Q is 0
    for form in FORMS:
        q_in = q_given(log_q, q, form, 1.0)

        def loss(x, form=form):
            return klx.sparse_kl_divergence(
                backend.asarray(idx),
                backend.asarray(lp),
                x,
                q_form=form,
                tail=tail,
                reduction="sum",
            )

        value, g = value_and_grads(backend, loss, q_in)
        rows, _ = sparse_rows(idx, lp, q, tail)
        np.testing.assert_allclose(value, rows.sum(), rtol=1e-12)
        assert np.all(np.isfinite(g)), (form, g)


@pytest.mark.parametrize("bad", [5, -1, -100])
def test_out_of_range_indices_are_refused(backend, bad):
    """Index V (torch took it as 0; JAX gave NaN) and negative padding ids (-1 selected the
    last entry) were accepted silently, outside validation mode."""
    if backend.name == "dask":
        pytest.skip("a lazy Dask graph is not computed for a check (its rule is tested apart)")
    q = backend.asarray(np.full((2, 5), 0.2))
    lp = backend.asarray(np.log([[0.5, 0.3], [0.6, 0.2]]))
    idx = backend.asarray(np.array([[0, bad], [1, 2]]))
    with pytest.raises(ValueError, match=rf"outside \[0, 5\) .* the first {bad};"):
        klx.sparse_kl_divergence(idx, lp, q)


@pytest.mark.backends("jax", reason="indices traced under jax.jit")
@pytest.mark.parametrize("tail", [True, False])
def test_out_of_range_indices_under_jit_carry_no_mass(backend, tail):
    """Traced, an entry outside the vocabulary carries no mass of P nor of Q: the result is
    that of the distribution without it (by hand: one known entry, and the tail)."""
    import jax

    q = np.full((1, 5), 0.2)
    lp = np.log([[0.5, 0.3]])
    f = jax.jit(
        lambda i: klx.sparse_kl_divergence(
            i, backend.asarray(lp), backend.asarray(q), tail=tail, reduction="sum"
        )
    )
    got = float(f(backend.asarray(np.array([[0, -100]]))))
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8) if tail else 0.0
    assert got == pytest.approx(want, rel=1e-14, abs=1e-300)
    assert float(f(backend.asarray(np.array([[0, 5]])))) == got


@pytest.mark.backends("dask", reason="a lazy Dask graph is not computed by a check")
def test_sparse_index_check_keeps_dask_lazy(backend):
    import dask.array as da

    computed = []

    def counted(block):
        computed.append(1)
        return block

    idx = da.from_array(np.array([[0, 1], [1, 2]]), chunks=(1, 2)).map_blocks(counted)
    computed.clear()  # map_blocks itself calls it on a dummy block to learn the dtype
    lp = backend.asarray(np.log([[0.5, 0.3], [0.6, 0.2]]))
    q = backend.asarray(np.full((2, 5), 0.2))
    out = klx.sparse_kl_divergence(idx, lp, q)
    assert computed == []  # nothing computed by the call itself
    want = klx.sparse_kl_divergence(
        np.array([[0, 1], [1, 2]]), np.log([[0.5, 0.3], [0.6, 0.2]]), np.full((2, 5), 0.2)
    )
    np.testing.assert_allclose(out.compute(), want, rtol=1e-14)


def test_sparse_temperature_too_small_is_refused(backend):
    q = backend.asarray(np.zeros((2, 5)), "float32")
    lp = backend.asarray(np.log([[0.5, 0.3], [0.6, 0.2]]), "float32")
    with pytest.raises(ValueError, match="too small for float32"):
        klx.sparse_kl_divergence(
            backend.asarray(np.array([[0, 1], [1, 2]])), lp, q, q_form="logits", temperature=1e-40
        )
