"""sparse_kl_divergence and kl_estimate against independent float64 references.

The sparse references build P and Q over k + 1 bins (or k, renormalised) directly from
the dense float64 distributions: Q's tail is the sum of Q over the indices *not* taken
(a boolean mask, no cancellation), unlike klx's log-space subtraction. Gradients are
compared with their closed forms; the estimators with exact expectations (and gradients
of expectations) over the categorical distribution they sample.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, rel_entr, xlogy

import klx
from support import reference
from support.asserts import check_array

FORMS = ("logits", "log_probs", "probs")
REDUCTIONS = ("none", "sum", "batchmean")


# --------------------------------------------------------------------------- references


def top_k_case(rng, batch, vocab, k, temperature=1.0, masked_vocab=False):
    """Teacher log-probs, their top-k indices (shuffled), student logits (float64)."""
    t = rng.normal(scale=2.0, size=(*batch, vocab))
    s = rng.normal(scale=1.5, size=(*batch, vocab))
    if masked_vocab:
        s[..., -1] = -np.inf  # a vocabulary entry the student never puts mass on
        t[..., -1] = -np.inf
    lp_full = log_softmax(t, axis=-1)
    order = np.argsort(-lp_full, axis=-1, kind="stable")[..., :k]
    idx = rng.permuted(order, axis=-1)  # any order
    lp = np.take_along_axis(lp_full, idx, axis=-1)
    return idx, lp, s, np.exp(log_softmax(s / temperature, axis=-1))


def sparse_bins(idx, lp, q, tail):
    """P and Q over the bins (k + tail, or k renormalised), the last axis; float64."""
    p_s = np.exp(lp)
    q_s = np.take_along_axis(q, idx, axis=-1)
    if not tail:
        return p_s / p_s.sum(-1, keepdims=True), q_s / q_s.sum(-1, keepdims=True)
    if idx.shape[-1] == q.shape[-1]:  # every index: no tail bin
        return p_s, q_s
    outside = np.ones(q.shape, dtype=bool)
    np.put_along_axis(outside, idx, False, axis=-1)
    q_t = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    p_t = np.maximum(1.0 - p_s.sum(-1, keepdims=True), 0.0)
    return np.concatenate([p_s, p_t], -1), np.concatenate([q_s, q_t], -1)


def sparse_rows(idx, lp, q, tail):
    """Reference sparse KL per distribution, and its scale."""
    p, qq = sparse_bins(idx, lp, q, tail)
    with np.errstate(all="ignore"):
        rows = rel_entr(p, qq).sum(-1)
        scale = (np.abs(xlogy(p, p)) + np.abs(xlogy(p, qq))).sum(-1)
    return rows, scale


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

    value, g = _value_and_grad(backend, loss, s_pad)
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


def _value_and_grad(backend, f, x):
    """f(x) (a scalar) and its gradient w.r.t. the float64 NumPy array x."""
    if backend.name == "torch":
        t = backend.asarray(x).requires_grad_(True)
        v = f(t)
        v.backward()
        return float(v.detach()), backend.to_numpy(t.grad)
    import jax

    v, g = jax.jit(jax.value_and_grad(f))(backend.asarray(x))
    return float(v), np.asarray(g)


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

    value, g = _value_and_grad(backend, loss, s_pad)
    ref = _student_grad(idx, lp, q, tail, keep, temperature)
    rows, _ = sparse_rows(idx, lp, q, tail)
    np.testing.assert_allclose(value, rows[keep].sum(), rtol=1e-12)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ref, atol=1e-12)
    assert np.all(g[:, -1] == 0), "a -inf logit gets no gradient"
    if k == q.shape[-1]:
        dense = (q - np.exp(lp_dense(idx, lp))) / temperature
        np.testing.assert_allclose(g[keep], dense[keep], atol=1e-12)


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


# --------------------------------------------------------------------------- estimators


def categorical(rng, vocab):
    """A policy's and a reference's log-probabilities over `vocab` tokens."""
    return log_softmax(rng.normal(size=vocab)), log_softmax(rng.normal(size=vocab))


def k_values(log_p, log_q):
    """k1, k2, k3 per token in float64 (k3 with mpmath, 40 digits beyond the cancellation)."""
    r = log_q - log_p

    def k3(x):
        if not np.isfinite(x):
            return np.nan if np.isnan(x) else np.inf
        digits = 40 + max(0, -math.floor(math.log10(abs(x)))) if x else 40
        with mpmath.workdps(digits):
            return float(mpmath.expm1(mpmath.mpf(x)) - mpmath.mpf(x))

    k3s = np.array([k3(float(x)) for x in np.ravel(r)]).reshape(np.shape(r))
    return {"k1": -r, "k2": r * r / 2, "k3": k3s}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimator_means_converge_to_exact(backend, estimator):
    """Over samples of P: k1 and k3 average to KL(P || Q), k2 to E_P[r^2] / 2."""
    rng = np.random.default_rng(21)
    lp_all, lq_all = categorical(rng, 6)
    n = 20000
    x = rng.choice(6, size=n, p=np.exp(lp_all))
    lp, lq = backend.asarray(lp_all[x]), backend.asarray(lq_all[x])
    per_token = backend.to_numpy(klx.kl_estimate(lp, lq, estimator=estimator))
    mean = backend.to_numpy(klx.kl_estimate(lp, lq, estimator=estimator, reduction="batchmean"))
    exact_kl = float(
        backend.to_numpy(
            klx.kl_divergence(
                backend.asarray(lp_all),
                backend.asarray(lq_all),
                p_form="log_probs",
                q_form="log_probs",
            )
        )
    )
    ref_kl, _ = reference.kl_rows(np.exp(lp_all), np.exp(lq_all), -1)
    np.testing.assert_allclose(exact_kl, ref_kl, rtol=1e-12)  # klx's exact KL is SciPy's
    target = exact_kl
    if estimator == "k2":
        target = float(np.sum(np.exp(lp_all) * (lp_all - lq_all) ** 2 / 2))
    stderr = per_token.std() / math.sqrt(n)
    assert abs(float(mean) - target) <= 5 * stderr, (float(mean), target, stderr)
    np.testing.assert_allclose(float(mean), per_token.mean(), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_estimate_values_match_reference(backend, dtype, conformance):
    rng = np.random.default_rng(22)
    r = np.concatenate(
        [rng.normal(scale=0.1, size=20), rng.normal(scale=5.0, size=20), [1e-9, -1e-9, 0.0]]
    )
    log_p = np.log(rng.uniform(0.01, 1.0, size=r.shape))
    log_q = log_p + r
    keep = rng.uniform(size=r.shape) < 0.8
    x_p, x_q = backend.asarray(log_p, dtype), backend.asarray(log_q, dtype)
    lp_r, lq_r = backend.to_numpy(x_p), backend.to_numpy(x_q)
    ref = k_values(lp_r, lq_r)
    r_r = lq_r - lp_r
    tol = 8 * float(np.finfo(dtype).eps)
    for est in ("k1", "k2", "k3"):
        for gradient in ("estimator", "straight_through", "importance"):
            for reduction in REDUCTIONS:
                got = klx.kl_estimate(
                    x_p,
                    x_q,
                    estimator=est,
                    gradient=gradient,
                    where=backend.asarray(keep),
                    reduction=reduction,
                )
                check_array(backend, got, x_p, dtype, r.shape if reduction == "none" else ())
                want = reference.reduce(ref[est], reduction, keep)
                # k1: the rounding of log q - log p; k2, k3: relative to the value, times
                # the condition number of k3 in r (at most 1 + |r|).
                sizes = (
                    np.abs(lp_r) + np.abs(lq_r)
                    if est == "k1"
                    else np.abs(ref[est]) * (1 + np.abs(r_r))
                )
                scale = reference.reduce(sizes, reduction, keep)
                err = reference.rel_error(backend.to_numpy(got), want, np.maximum(scale, 1e-300))
                conformance(f"{backend.id} {dtype} kl_estimate", f"{reduction} {est}", err, tol)
                assert err <= tol, (est, gradient, reduction, err)


def test_k3_is_stable_for_large_log_ratios(backend):
    """No overflow before the value's own, no cancellation near 0, no silent clamp."""
    r = np.array([-700.0, -50.0, -1e-12, 1e-12, 3.0, 30.0, 700.0, 710.0, np.inf, -np.inf])
    zeros = np.zeros_like(r)
    got = backend.to_numpy(klx.kl_estimate(backend.asarray(zeros), backend.asarray(r)))
    ref = k_values(zeros, r)["k3"][:-3]
    np.testing.assert_allclose(got[:-3], ref, rtol=4e-15)  # 30 -> 1.07e13: not clamped
    assert got[-3] == np.inf and got[-2] == np.inf and got[-1] == np.inf
    clamped = backend.to_numpy(
        klx.kl_estimate(backend.asarray(zeros), backend.asarray(r), clamp=10.0)
    )
    np.testing.assert_allclose(clamped, np.minimum(np.r_[ref, np.inf, np.inf, np.inf], 10.0))
    naive = np.exp(r[:-3]) - 1 - r[:-3]  # loses every digit at |r| = 1e-12
    assert abs(naive[2] - ref[2]) / ref[2] > 1e-3


def test_estimate_masks_and_normalizer(backend):
    log_p = np.array([-1.0, -0.5, np.nan, -2.0])
    log_q = np.array([-1.5, -0.25, 0.0, -np.inf])
    keep = np.array([True, True, False, False])
    x = {"where": backend.asarray(keep)}
    got = klx.kl_estimate(
        backend.asarray(log_p), backend.asarray(log_q), reduction="batchmean", **x
    )
    ref = k_values(log_p[:2], log_q[:2])["k3"]
    np.testing.assert_allclose(backend.to_numpy(got), ref.mean(), rtol=1e-14)
    got = klx.kl_estimate(
        backend.asarray(log_p), backend.asarray(log_q), reduction="batchmean", normalizer=8, **x
    )
    np.testing.assert_allclose(backend.to_numpy(got), ref.sum() / 8, rtol=1e-14)
    rows = backend.to_numpy(klx.kl_estimate(backend.asarray(log_p), backend.asarray(log_q)))
    assert np.isnan(rows[2]) and rows[3] == np.inf


def test_estimate_errors(backend):
    a = backend.asarray(np.array([-1.0, -2.0]))
    with pytest.raises(ValueError, match="`estimator` must be one of 'k1', 'k2', 'k3'"):
        klx.kl_estimate(a, a, estimator="low_var_kl")
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        klx.kl_estimate(a, a, gradient="k2")
    with pytest.raises(ValueError, match="used only by gradient='importance'"):
        klx.kl_estimate(a, a, log_p_old=a)
    with pytest.raises(ValueError, match="`clamp` must be positive"):
        klx.kl_estimate(a, a, clamp=0.0)
    with pytest.raises(TypeError, match="`log_q` must have a real floating-point dtype"):
        klx.kl_estimate(a, backend.asarray(np.array([1, 2])))
    with pytest.raises(ValueError, match="do not broadcast"):
        klx.kl_estimate(a, backend.asarray(np.zeros(3)))


# Each gradient option's expected gradient, w.r.t. the policy's logits theta, for samples
# of P = softmax(theta): p * (h - <p, h>) with h = f(d) + f'(d) for the gradient of E_P[f]
# (d = log p - log q); KL(Q || P)'s is p - q.


def _grad_of_mean(p, d, f, df):
    h = f(d) + df(d)
    return p * (h - np.sum(p * h))


def _targets(lp_all, lq_all):
    p, q = np.exp(lp_all), np.exp(lq_all)
    d = lp_all - lq_all
    kl = _grad_of_mean(p, d, lambda d: d, lambda d: np.ones_like(d))
    mean_k2 = _grad_of_mean(p, d, lambda d: d * d / 2, lambda d: d)
    zero = np.zeros_like(p)
    return {
        ("k1", "estimator"): zero,
        ("k2", "estimator"): kl,
        ("k3", "estimator"): p - q,  # the gradient of KL(Q || P)
        ("k1", "straight_through"): kl,
        ("k2", "straight_through"): kl,
        ("k3", "straight_through"): kl,
        ("k1", "importance"): kl,
        ("k2", "importance"): mean_k2,
        ("k3", "importance"): kl,
    }


def _per_sample_grads(backend, theta, x, lq, lp_old, estimator, gradient):
    """Per-sample gradients w.r.t. theta (one copy of theta per sample), summed loss."""
    n, vocab = len(x), theta.size
    onehot = backend.asarray(np.eye(vocab)[x])
    thetas = np.broadcast_to(theta, (n, vocab)).copy()
    lq = backend.asarray(lq)
    old = None if lp_old is None else backend.asarray(lp_old)

    def loss(t, logsumexp):
        lp_x = ((t - logsumexp(t)) * onehot).sum(-1)  # log softmax(theta) at the samples
        return klx.kl_estimate(
            lp_x, lq, estimator=estimator, gradient=gradient, log_p_old=old, reduction="sum"
        )

    if backend.name == "torch":
        import torch

        t = backend.asarray(thetas).requires_grad_(True)
        loss(t, lambda a: torch.logsumexp(a, dim=-1, keepdim=True)).backward()
        return backend.to_numpy(t.grad)
    import jax
    from jax.scipy.special import logsumexp

    g = jax.jit(jax.grad(lambda t: loss(t, lambda a: logsumexp(a, axis=-1, keepdims=True))))
    return np.asarray(g(backend.asarray(thetas)))


@pytest.mark.parametrize("gradient", ["estimator", "straight_through", "importance"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradient_options_estimate_their_targets(backend, gradient):
    rng = np.random.default_rng(23)
    vocab, n = 5, 20000
    theta = rng.normal(size=vocab)
    lp_all = log_softmax(theta)
    lq_all = log_softmax(rng.normal(size=vocab))
    x = rng.choice(vocab, size=n, p=np.exp(lp_all))
    targets = _targets(lp_all, lq_all)
    for estimator in ("k1", "k2", "k3"):
        g = _per_sample_grads(backend, theta, x, lq_all[x], None, estimator, gradient)
        mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
        target = targets[(estimator, gradient)]
        assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean, target)


@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_importance_weighting_off_policy(backend):
    """Samples from an older policy: rho * k3 is unbiased for KL(P || Q) in value, and
    its gradient for the KL's gradient (DeepSeek-V3.2's correction)."""
    rng = np.random.default_rng(24)
    vocab, n = 5, 20000
    theta = rng.normal(size=vocab)
    lp_all = log_softmax(theta)
    lp_old_all = log_softmax(theta + rng.normal(scale=0.5, size=vocab))
    lq_all = log_softmax(rng.normal(size=vocab))
    x = rng.choice(vocab, size=n, p=np.exp(lp_old_all))
    for estimator in ("k1", "k3"):
        values = backend.to_numpy(
            klx.kl_estimate(
                backend.asarray(lp_all[x]),
                backend.asarray(lq_all[x]),
                estimator=estimator,
                gradient="importance",
                log_p_old=backend.asarray(lp_old_all[x]),
            )
        )
        kl, _ = reference.kl_rows(np.exp(lp_all), np.exp(lq_all), -1)
        assert abs(values.mean() - kl) <= 5 * values.std() / math.sqrt(n)
        g = _per_sample_grads(backend, theta, x, lq_all[x], lp_old_all[x], estimator, "importance")
        target = _targets(lp_all, lq_all)[(estimator, "importance")]
        mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
        assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean, target)


@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradient_options_change_the_gradient_not_the_value(backend):
    """On-policy, straight-through and importance weighting leave the value k3; a dropped
    token with an infinite log-ratio gets no gradient, and straight-through keeps the
    gradient finite even where the value is infinite."""
    lp = np.array([-1.0, -0.3, -2.0])
    lq = np.array([-1.2, -np.inf, -0.5])
    keep = backend.asarray(np.array([True, False, True]))
    k3 = k_values(lp[[0, 2]], lq[[0, 2]])["k3"]
    for gradient in ("estimator", "straight_through", "importance"):

        def loss(a, gradient=gradient):
            return klx.kl_estimate(
                a, backend.asarray(lq), gradient=gradient, where=keep, reduction="sum"
            )

        value, g = _value_and_grad(backend, loss, lp)
        np.testing.assert_allclose(value, k3.sum(), rtol=1e-15)
        assert np.all(np.isfinite(g)) and g[1] == 0

    def unmasked(a):
        return klx.kl_estimate(a, backend.asarray(lq), gradient="straight_through").sum()

    value, g = _value_and_grad(backend, unmasked, lp)
    assert value == np.inf and np.all(np.isfinite(g))


@pytest.mark.backends("jax", reason="jax.jit and jax.vmap")
def test_estimate_jax_jit_vmap(backend):
    import jax

    rng = np.random.default_rng(25)
    lp, lq = np.log(rng.uniform(0.1, 1, size=(4, 6))), np.log(rng.uniform(0.1, 1, size=(4, 6)))
    f = jax.jit(lambda a, b: klx.kl_estimate(a, b, gradient="straight_through"))
    v = jax.vmap(lambda a, b: klx.kl_estimate(a, b, reduction="sum"))
    ref = k_values(lp, lq)["k3"]
    np.testing.assert_allclose(np.asarray(f(lp, lq)), ref, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(v(lp, lq)), ref.sum(-1), rtol=1e-14)


@settings(max_examples=100, deadline=None)
@given(r=st.floats(-700.0, 700.0), log_p=st.floats(-30.0, 0.0))
def test_property_k3_nonnegative_and_exact_to_a_few_ulps(r, log_p):
    log_q = np.array([log_p + r])
    log_p = np.array([log_p])
    got = float(klx.kl_estimate(log_p, log_q)[0])
    ref = float(k_values(log_p, log_q)["k3"][0])  # of the rounded log-ratio klx sees
    assert got >= 0
    assert abs(got - ref) <= 8 * np.finfo(np.float64).eps * ref


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_is_computed_in_float32(backend, dtype):
    """float16 / bfloat16 inputs: computed in float32, rounded once to the input dtype."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(26)
    idx, lp, s, _ = top_k_case(rng, (4,), 9, 3)
    x_lp, x_s = backend.asarray(lp, dtype), backend.asarray(s, dtype)
    lp_r, s_r = backend.to_numpy(x_lp), backend.to_numpy(x_s)
    got = klx.sparse_kl_divergence(backend.asarray(idx), x_lp, x_s)
    check_array(backend, got, x_lp, dtype, (4,))
    rows, scale = sparse_rows(idx, lp_r, np.exp(log_softmax(s_r, axis=-1)), True)
    unit = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # one rounding of the result
    atol = reference.ATOL.get(dtype, 0.0)  # float16's subnormal spacing
    assert reference.rel_error(backend.to_numpy(got), rows, np.maximum(scale, 1e-3), atol) <= unit
    lq = lp_r + rng.normal(scale=0.3, size=lp_r.shape)
    x_lq = backend.asarray(lq, dtype)
    est = klx.kl_estimate(x_lp, x_lq)
    check_array(backend, est, x_lp, dtype, lp.shape)
    ref = k_values(lp_r, backend.to_numpy(x_lq))["k3"]
    np.testing.assert_allclose(backend.to_numpy(est), ref, rtol=unit, atol=atol)


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


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile")
def test_torch_compile_fullgraph(backend):
    """Both functions trace into one graph (stop_gradient included), equal to eager."""
    import torch

    torch._dynamo.reset()
    rng = np.random.default_rng(28)
    idx, lp, s, _ = top_k_case(rng, (4,), 9, 3)
    x_idx, x_lp = backend.asarray(idx), backend.asarray(lp)
    keep = backend.asarray(np.array([True, False, True, True]))
    lq = backend.asarray(rng.normal(size=4) - 2.0)

    def losses(z):
        lp_pol = torch.log_softmax(z, -1)[:, 0]
        return (
            klx.sparse_kl_divergence(
                x_idx, x_lp, z, temperature=2.0, where=keep, reduction="batchmean"
            ),
            klx.kl_estimate(
                lp_pol, lq, gradient="straight_through", where=keep, reduction="batchmean"
            ),
            klx.kl_estimate(lp_pol, lq, gradient="importance", reduction="sum"),
        )

    z = backend.asarray(s).requires_grad_(True)
    compiled = torch.compile(losses, fullgraph=True)(z)
    eager = losses(z)
    for c, e in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(c.item(), e.item(), rtol=1e-12)
    (g_c,) = torch.autograd.grad(sum(compiled), z)
    (g_e,) = torch.autograd.grad(sum(eager), z)
    np.testing.assert_allclose(g_c.numpy(), g_e.numpy(), rtol=1e-10, atol=1e-14)


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

        value, g = _value_and_grad(backend, loss, q_in)
        rows, _ = sparse_rows(idx, lp, q, tail)
        np.testing.assert_allclose(value, rows.sum(), rtol=1e-12)
        assert np.all(np.isfinite(g)), (form, g)


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


@pytest.mark.parametrize(
    ("dtype", "log_p", "log_p_old", "log_q", "want"),
    [
        # rho = e^-88 underflows while k3 = e^89 - 90 overflows in float32: e - 90 e^-88.
        ("float32", -90.0, -2.0, -1.0, math.e - 90 * math.exp(-88)),
        # rho = e^-10000 and k3 = e^10000 - 10001 in float64: 1 - 10001 e^-10000.
        ("float64", -10000.0, 0.0, 0.0, 1.0),
        ("float64", -1.0, -1.5, -1.2, math.exp(0.5) * (math.exp(-0.2) - 1 + 0.2)),
    ],
)
def test_importance_k3_value_without_overflow(backend, dtype, log_p, log_p_old, log_q, want):
    """rho * k3 was +inf (float32) and NaN (float64) where the product itself is finite."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    got = klx.kl_estimate(
        backend.asarray([log_p], dtype),
        backend.asarray([log_q], dtype),
        log_p_old=backend.asarray([log_p_old], dtype),
        gradient="importance",
        reduction="sum",
    )
    np.testing.assert_allclose(
        backend.to_numpy(got), want, rtol=4e-7 if dtype == "float32" else 1e-15
    )


@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
@pytest.mark.parametrize("r", [1e-4, 0.1, -5.0, 20.0, 30.0])
def test_on_policy_importance_k3_gradient_in_float32(backend, r):
    """The on-policy gradient of rho k3 is -r in log p and e^r - 1 in log q; float32 gave
    -32 at r = 20 and 0 at r = 30 (k3 and its derivative cancelling)."""

    def loss(lp, lq):
        return klx.kl_estimate(lp, lq, gradient="importance", reduction="sum")

    lp, lq = backend.asarray([0.0], "float32"), backend.asarray([r], "float32")
    if backend.name == "torch":
        lp.requires_grad_(True)
        lq.requires_grad_(True)
        loss(lp, lq).backward()
        g_p, g_q = backend.to_numpy(lp.grad), backend.to_numpy(lq.grad)
    else:
        import jax

        g_p, g_q = (np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(lp, lq))
    np.testing.assert_allclose(g_p, [-r], rtol=2e-6)
    np.testing.assert_allclose(g_q, [math.expm1(r)], rtol=2e-6)


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


@pytest.mark.backends("torch", reason="autodiff through an overflowing value")
def test_importance_k3_overflowing_value_is_inf_not_nan(backend):
    import torch

    f32 = torch.float32  # rho = e^80 and k3 = 1e5: their product overflows float32
    lp = torch.tensor([0.0], dtype=f32, requires_grad=True)
    lq = torch.tensor([-1e5], dtype=f32, requires_grad=True)
    old = torch.tensor([-80.0], dtype=f32)
    v = klx.kl_estimate(lp, lq, log_p_old=old, gradient="importance", reduction="sum")
    v.backward()
    assert (
        float(v.detach()) == math.inf
        and torch.isfinite(lp.grad).all()
        and torch.isfinite(lq.grad).all()
    )
