"""sparse_divergence (forward KL, reverse KL, JS on P's, Q's or both top k) against
independent float64 references written here from the full distributions.

The references take S from the dense float64 distributions (NumPy's argsort), the tail
bins as the sum of each distribution over the indices *not* in S (a boolean mask: no
cancellation), and the divergences with scipy.special.rel_entr; the near-1 masses with
mpmath at 50 digits. Gradients are compared with central differences of the reference.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax, rel_entr

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads

DIRECTIONS = ("forward", "reverse", "js")
SUPPORTS = ("p", "q", "union")
REDUCTIONS = ("none", "sum", "batchmean")


# --------------------------------------------------------------------------- references


def top_k(x, k):
    """Indices of the k largest entries per row (largest first), float64 NumPy."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def support_mask(p, q, k, support, p_idx=None, q_idx=None):
    """Boolean (rows, V): which indices S holds (a union counts an index once)."""
    p_idx = top_k(p, k) if p_idx is None else p_idx
    q_idx = top_k(q, k) if q_idx is None else q_idx
    mask = np.zeros(p.shape, dtype=bool)
    if support in ("p", "union"):
        np.put_along_axis(mask, p_idx, True, axis=-1)
    if support in ("q", "union"):
        np.put_along_axis(mask, q_idx, True, axis=-1)
    return mask


def bins(x, mask, tail):
    """One row's distribution on S (and its tail, summed over the rest), or renormalised."""
    on = x[mask]
    if not tail:
        return on / on.sum()
    return np.append(on, x[~mask].sum())


def divergence(pb, qb, direction):
    with np.errstate(all="ignore"):
        if direction == "forward":
            return rel_entr(pb, qb).sum()
        if direction == "reverse":
            return rel_entr(qb, pb).sum()
        m = 0.5 * (pb + qb)
        return 0.5 * (rel_entr(pb, m).sum() + rel_entr(qb, m).sum())


def reference_rows(p, q, mask, direction, tail):
    """Per-row values and masses (P's and Q's on S) from full float64 distributions."""
    rows = np.array(
        [
            divergence(bins(a, m, tail), bins(b, m, tail), direction)
            for a, b, m in zip(p, q, mask, strict=True)
        ]
    )
    return rows, (p * mask).sum(-1), (q * mask).sum(-1)


def case(rng, rows=5, vocab=9, k=3):
    """Teacher and student logits (correlated, so their top k overlap in part)."""
    t = rng.normal(scale=2.0, size=(rows, vocab))
    s = 0.6 * t + rng.normal(scale=1.5, size=(rows, vocab))
    return t, s, k


def softmax(x):
    return np.exp(log_softmax(x, axis=-1))


def call_args(backend, t, s, support, k, dtype, vllm):
    """P and Q as a trainer gives them: a vLLM teacher (its own top k only) for
    support 'p', else P's full logits; Q always as full logits."""
    x_s = backend.asarray(s, dtype)
    if vllm:
        idx = top_k(t, k)
        lp = np.take_along_axis(log_softmax(t, axis=-1), idx, axis=-1)
        return (
            backend.asarray(lp, dtype),
            x_s,
            {"p_indices": backend.asarray(idx), "p_form": "top_k"},
        )
    kw = {"k": k}
    return backend.asarray(t, dtype), x_s, kw


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_directions_and_supports_match_reference(backend, dtype, direction, support, tail):
    """Every direction x support x tail x reduction; P as a vLLM top k where the support
    is P's, otherwise P's full logits with klx taking the top k."""
    rng = np.random.default_rng(31)
    t, s, k = case(rng)
    vllm = support == "p"
    x_p, x_q, kw = call_args(backend, t, s, support, k, dtype, vllm)
    before = [backend.to_numpy(a) for a in (x_p, x_q)]
    # the reference sees the inputs rounded to `dtype`
    s_r = backend.to_numpy(x_q)
    if vllm:  # the teacher is what it gave: its top k as rounded, the rest its tail
        p_on = np.exp(backend.to_numpy(x_p))
        p_full = softmax(t)
        outside = ~support_mask(p_full, p_full, k, "p")
        rest = np.where(outside, p_full, 0.0)
        p_full = rest * (1 - p_on.sum(-1, keepdims=True)) / rest.sum(-1, keepdims=True)
        np.put_along_axis(p_full, top_k(t, k), p_on, axis=-1)
    else:
        p_full = softmax(backend.to_numpy(x_p))
    q_full = softmax(s_r)
    mask = support_mask(p_full, q_full, k, support)
    rows, p_mass, q_mass = reference_rows(p_full, q_full, mask, direction, tail)
    tol = 1e-12 if dtype == "float64" else 2e-5
    for reduction in REDUCTIONS:
        got, masses = klx.sparse_divergence(
            x_p,
            x_q,
            direction=direction,
            support=support,
            tail=tail,
            reduction=reduction,
            return_mass=True,
            **kw,
        )
        check_array(backend, got, x_q, dtype, (5,) if reduction == "none" else ())
        want = reference.reduce(rows, reduction)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=tol, atol=tol)
        for name, ref in (("p_mass", p_mass), ("q_mass", q_mass)):
            check_array(backend, masses[name], x_q, dtype, (5,))
            np.testing.assert_allclose(backend.to_numpy(masses[name]), ref, rtol=tol)
    for a, b in zip((x_p, x_q), before, strict=True):  # inputs are never modified
        np.testing.assert_array_equal(backend.to_numpy(a), b)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_given_index_sets_and_a_middle_axis(backend, direction):
    """Index sets given by the caller (overlapping: the union counts each once), P as
    log-probabilities and Q as probabilities, the vocabulary on axis 1, with `where`."""
    rng = np.random.default_rng(32)
    t, s, k = case(rng, rows=4, vocab=8)
    p, q = softmax(t), softmax(s)
    p_idx = np.array([[0, 1, 2], [3, 4, 5], [7, 6, 5], [1, 3, 5]])
    q_idx = np.array([[2, 1, 4], [0, 1, 2], [5, 6, 7], [1, 0, 2]])
    keep = np.array([True, True, False, True])
    for support in SUPPORTS:
        mask = support_mask(p, q, k, support, p_idx, q_idx)
        rows, p_mass, q_mass = reference_rows(p, q, mask, direction, True)
        kw = {}
        if support in ("p", "union"):
            kw["p_indices"] = backend.asarray(p_idx.T)
        if support in ("q", "union"):
            kw["q_indices"] = backend.asarray(q_idx.T)
        got, masses = klx.sparse_divergence(
            backend.asarray(np.log(p).T),
            backend.asarray(q.T),
            p_form="log_probs",
            q_form="probs",
            direction=direction,
            support=support,
            axis=0,
            where=backend.asarray(keep),
            return_mass=True,
            validate=True,
            **kw,
        )
        np.testing.assert_allclose(backend.to_numpy(got), np.where(keep, rows, 0), rtol=1e-12)
        np.testing.assert_allclose(
            backend.to_numpy(masses["q_mass"]), np.where(keep, q_mass, 0), rtol=1e-12
        )
        np.testing.assert_allclose(
            backend.to_numpy(masses["p_mass"]), np.where(keep, p_mass, 0), rtol=1e-12
        )


def test_forward_on_p_equals_sparse_kl_divergence(backend):
    """The forward KL on a vLLM teacher's top k is sparse_kl_divergence's (both kept)."""
    rng = np.random.default_rng(33)
    t, s, k = case(rng)
    idx = top_k(t, k)
    lp = np.take_along_axis(log_softmax(t, axis=-1), idx, axis=-1)
    q = softmax(s)
    mask = support_mask(softmax(t), q, k, "p")
    for tail in (True, False):
        p_full = softmax(t)
        rows, _, _ = reference_rows(p_full, q, mask, "forward", tail)
        a = klx.sparse_kl_divergence(
            backend.asarray(idx), backend.asarray(lp), backend.asarray(s), tail=tail
        )
        b = klx.sparse_divergence(
            backend.asarray(lp),
            backend.asarray(s),
            p_indices=backend.asarray(idx),
            p_form="top_k",
            tail=tail,
        )
        np.testing.assert_allclose(backend.to_numpy(a), rows, rtol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(b), rows, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.integers(2, 10),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    direction=st.sampled_from(DIRECTIONS),
    support=st.sampled_from(SUPPORTS),
)
def test_property_coarsened_divergence_bounded_by_dense(vocab, data, seed, direction, support):
    """Any k: the value is the reference's, >= 0, and at most the dense divergence; with
    k = V it is the dense divergence."""
    k = data.draw(st.integers(1, vocab))
    rng = np.random.default_rng(seed)
    t, s, _ = case(rng, rows=3, vocab=vocab)
    p, q = softmax(t), softmax(s)
    got = np.asarray(klx.sparse_divergence(t, s, direction=direction, support=support, k=k))
    rows, _, _ = reference_rows(p, q, support_mask(p, q, k, support), direction, True)
    dense, _, _ = reference_rows(p, q, np.ones_like(p, dtype=bool), direction, False)
    np.testing.assert_allclose(got, rows, rtol=1e-10, atol=1e-15)
    assert np.all(got >= 0)
    assert np.all(got <= dense * (1 + 1e-12) + 1e-15)
    if k == vocab:
        np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-15)


# --------------------------------------------------------------------------- field bugs


def test_verl_5041_reverse_top_k_without_tail_collapses(backend):
    """verl #5041: reverse KL on the student's own top k, renormalised (no tail bin),
    is ~0 for a student collapsed onto one token whose other top-k entries are tokens
    the teacher never uses; the tail bin (the teacher's mass the student left out) keeps
    it at the dense reverse KL."""
    vocab, k = 16, 4
    t = np.zeros((1, vocab))  # the teacher: uniform over tokens 0..11
    t[0, 12:] = -40.0  # ... and ~0 on 12..15
    s = np.full((1, vocab), -30.0)
    s[0, 0] = 10.0  # the student: all its mass on token 0
    s[0, 12:15] = -5.0  # its next top-k entries: where the teacher has no mass
    p, q = softmax(t), softmax(s)
    dense, _, _ = reference_rows(p, q, np.ones_like(p, dtype=bool), "reverse", False)
    mask = support_mask(p, q, k, "q")
    renorm, _, _ = reference_rows(p, q, mask, "reverse", False)
    with_tail, _, _ = reference_rows(p, q, mask, "reverse", True)
    kw = {"direction": "reverse", "support": "q", "k": k}
    x_t, x_s = backend.asarray(t), backend.asarray(s)
    got_renorm = backend.to_numpy(klx.sparse_divergence(x_t, x_s, tail=False, **kw))
    got_tail = backend.to_numpy(klx.sparse_divergence(x_t, x_s, **kw))
    np.testing.assert_allclose(got_renorm, renorm, rtol=1e-10)
    np.testing.assert_allclose(got_tail, with_tail, rtol=1e-10)
    assert got_renorm[0] < 0.01 * dense[0]  # the collapse: the loss says "matched"
    assert got_tail[0] >= 0.99 * dense[0]  # log 12 = 2.48: the tail keeps it honest
    assert dense[0] > 2.4


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("gap", [1e-8, 1e-7])
def test_model_optimizer_2459_distillkit_45_top_k_mass_near_one(backend, gap, direction):
    """Model-Optimizer #2459, DistillKit #45: a tail taken as ``1 - sum p`` cancels (and
    its log gave NaN gradients). A teacher top k whose mass is within `gap` of 1: the
    divergence against mpmath (50 digits) from the same float64 inputs, the tail term
    to 1e-6 relative, and the gradient finite."""
    lp = np.log(np.array([[1 - 3 * gap, 1.5 * gap, 0.5 * gap]]))
    s = np.array([[4.0, 1.0, 0.5, 0.0, -1.0, 2.0]])  # the student: 12% outside
    idx = np.array([[0, 1, 2]])
    want = _mp_reference(lp, idx, s, direction)
    x_lp, x_idx = backend.asarray(lp), backend.asarray(idx)

    def loss(z):
        return klx.sparse_divergence(
            x_lp, z, p_indices=x_idx, p_form="top_k", direction=direction, reduction="sum"
        )

    got = backend.to_numpy(loss(backend.asarray(s)))
    assert abs(float(got) - want) <= 1e-12 * max(abs(want), 1e-3), (got, want)
    if direction == "reverse":  # the tail term q_T log(q_T / p_T) rests on p_T = gap
        assert float(got) > 0.1
    if backend.name in ("torch", "jax"):
        _, g = value_and_grads(backend, loss, s)
        assert np.all(np.isfinite(g)), g


def _mp_reference(lp, idx, s, direction):
    """The divergence of the (k + 1)-bin distributions, in mpmath from float64 inputs."""
    with mpmath.workdps(50):
        z = [mpmath.mpf(float(x)) for x in s[0]]
        total = mpmath.fsum(mpmath.exp(x) for x in z)
        q = [mpmath.exp(x) / total for x in z]
        p_s = [mpmath.exp(mpmath.mpf(float(x))) for x in lp[0]]
        q_s = [q[i] for i in idx[0]]
        pb = [*p_s, 1 - mpmath.fsum(p_s)]
        qb = [*q_s, mpmath.fsum(q[i] for i in range(len(q)) if i not in set(idx[0]))]

        def kl(a, b):
            return mpmath.fsum(x * mpmath.log(x / y) for x, y in zip(a, b, strict=True) if x)

        if direction == "forward":
            return float(kl(pb, qb))
        if direction == "reverse":
            return float(kl(qb, pb))
        m = [(x + y) / 2 for x, y in zip(pb, qb, strict=True)]
        return float((kl(pb, m) + kl(qb, m)) / 2)


@pytest.mark.backends("torch", "jax", reason="float32 gradients by autodiff")
def test_float32_tail_near_one_keeps_its_digits(backend):
    """In float32 a teacher's top-1 of 1 - 1.5e-7 with two small entries leaves a tail of
    1e-7: ``1 - sum`` gives 1.19e-7 or 0 (the spacing of floats near 1 is 6e-8); the log
    space keeps it to float32's own rounding, so the reverse KL (whose tail term rests
    on it) is the mpmath value's to 1e-4, and its gradient finite."""
    probs = np.array([1 - 1.5e-7, 4e-8, 1e-8], dtype=np.float32)
    lp32 = np.log(probs.astype(np.float64)).astype(np.float32)[None]
    idx = np.array([[0, 1, 2]])
    s = np.array([[4.0, 1.0, 0.5, 0.0, -1.0, 2.0]])
    want = _mp_reference(lp32.astype(np.float64), idx, s, "reverse")
    naive_tail = np.float32(1) - np.exp(lp32).sum(dtype=np.float32)
    true_tail = 1 - np.exp(lp32.astype(np.float64)).sum()
    assert abs(naive_tail - true_tail) > 0.1 * true_tail  # the cancellation
    x_lp, x_idx = backend.asarray(lp32, "float32"), backend.asarray(idx)

    def loss(z):
        return klx.sparse_divergence(
            x_lp, z, p_indices=x_idx, p_form="top_k", direction="reverse", reduction="sum"
        )

    got = float(backend.to_numpy(loss(backend.asarray(s, "float32"))))
    assert abs(got - want) <= 1e-4 * want, (got, want)
    s32 = backend.to_numpy(backend.asarray(s, "float32"))
    if backend.name == "torch":
        import torch

        z = torch.tensor(s32, requires_grad=True)
        loss(z).backward()
        g = z.grad.numpy()
    else:
        import jax

        g = np.asarray(jax.grad(loss)(backend.asarray(s32, "float32")))
    assert np.all(np.isfinite(g))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.0, 1e-7, 1e-4, 1e-2]),
    direction=st.sampled_from(DIRECTIONS),
    support=st.sampled_from(SUPPORTS),
    tail=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_verl_7855_never_negative_without_a_clamp(seed, scale, direction, support, tail, dtype):
    """verl #7855: a truncated KL sum was negative in 89% of steps, hidden by a clamp at
    0. A student at or near the teacher: every direction, support and tail is >= 0 as
    computed (klx clamps nothing), and ~0; the truncated sum of p log(p / q) over the
    teacher's top k, on the same inputs, is negative where Q has more mass there."""
    rng = np.random.default_rng(seed)
    # 64 distributions: each truncated sum below is negative about half the time, so all
    # of 8 were >= 0 in 1 of 256 draws (seed 1543271, scale 1e-4); of 64, 2^-64
    t = rng.normal(scale=3.0, size=(64, 50))
    s = t + scale * rng.normal(size=t.shape)
    k = 5
    if support == "p":
        idx = top_k(t, k)
        lp = np.take_along_axis(log_softmax(t, axis=-1), idx, axis=-1).astype(dtype)
        got = klx.sparse_divergence(
            lp, s.astype(dtype), p_indices=idx, p_form="top_k", direction=direction, tail=tail
        )
    else:
        got = klx.sparse_divergence(
            t.astype(dtype), s.astype(dtype), direction=direction, support=support, k=k, tail=tail
        )
    got = np.asarray(got, dtype=np.float64)
    assert np.all(got >= 0), got
    bound = 1e-5 if dtype == np.float32 else 1e-12
    assert np.all(got <= bound + 10 * scale**2 * 9), got
    # the truncated forward sum on the teacher's top k is no divergence: it goes negative
    idx = top_k(t, k)
    ratio = np.take_along_axis(log_softmax(t, axis=-1) - log_softmax(s, axis=-1), idx, -1)
    truncated = (np.exp(np.take_along_axis(log_softmax(t, axis=-1), idx, -1)) * ratio).sum(-1)
    if scale >= 1e-4:
        assert np.any(truncated < 0)


# --------------------------------------------------------------------------- gradients


def _reference_loss(t, s, k, direction, support, tail, temperature=1.0):
    p, q = softmax(t / temperature), softmax(s / temperature)
    mask = support_mask(p, q, k, support)
    return reference_rows(p, q, mask, direction, tail)[0].sum()


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalised"])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradients_match_finite_differences(backend, direction, support, tail):
    """d/d(student logits) and d/d(teacher logits) of every direction and support against
    central differences of the float64 reference (S fixed: no logit near a tie)."""
    rng = np.random.default_rng(34)
    t, s, k = case(rng, rows=3, vocab=7)
    temperature = 1.5

    def loss(a, b):
        return klx.sparse_divergence(
            a,
            b,
            direction=direction,
            support=support,
            k=k,
            tail=tail,
            temperature=temperature,
            reduction="sum",
        )

    value, g_t, g_s = value_and_grads(backend, loss, t, s)
    ref = _reference_loss(t, s, k, direction, support, tail, temperature)
    np.testing.assert_allclose(value, ref, rtol=1e-12)
    h = 1e-6
    for x, g, which in ((t, g_t, 0), (s, g_s, 1)):
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[i] += h
            down[i] -= h
            args_up = (up, s) if which == 0 else (t, up)
            args_down = (down, s) if which == 0 else (t, down)
            fd[i] = (
                _reference_loss(*args_up, k, direction, support, tail, temperature)
                - _reference_loss(*args_down, k, direction, support, tail, temperature)
            ) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-7)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradients_finite_at_minus_inf_logits_and_exact_zeros(backend, direction, support):
    """Logits of -inf on both sides (a masked vocabulary entry), a teacher top k padded
    with -inf log-probabilities, and exact zeros among probabilities: the value is the
    reference's and every gradient is finite (0 at the -inf logits)."""
    t = np.array([[2.0, 1.0, 0.0, -1.0, -np.inf, -np.inf], [0.5, 0.0, 3.0, -np.inf, 1.0, -2.0]])
    s = np.array([[1.0, 2.0, -np.inf, 0.0, -np.inf, -1.0], [0.0, 1.0, 2.0, -np.inf, 0.5, -np.inf]])
    k = 4
    p, q = softmax(t), softmax(s)
    for tail in (True, False):
        ref = reference_rows(p, q, support_mask(p, q, k, support), direction, tail)[0].sum()

        def loss(a, b, tail=tail):
            return klx.sparse_divergence(
                a, b, direction=direction, support=support, k=k, tail=tail, reduction="sum"
            )

        value, g_t, g_s = value_and_grads(backend, loss, t, s)
        if np.isfinite(ref):
            np.testing.assert_allclose(value, ref, rtol=1e-12)
            assert np.all(np.isfinite(g_t)) and np.all(np.isfinite(g_s)), (g_t, g_s)
            assert np.all(g_s[np.isinf(s)] == 0) and np.all(g_t[np.isinf(t)] == 0)
        else:
            assert value == ref
    # probabilities with exact zeros, P's top k padded with -inf (fewer tokens than k)
    q_probs = np.array([[0.5, 0.2, 0.3, 0.0], [0.3, 0.3, 0.0, 0.4]])
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.7, 0.2, 0.0], [0.5, 0.5, 0.0]]))
    idx = np.array([[0, 2, 3], [1, 0, 2]])
    if support == "p":
        x_lp, x_idx = backend.asarray(lp), backend.asarray(idx)

        def loss_probs(b):
            return klx.sparse_divergence(
                x_lp,
                b,
                p_indices=x_idx,
                p_form="top_k",
                q_form="probs",
                direction=direction,
                reduction="sum",
            )

        value, g = value_and_grads(backend, loss_probs, q_probs)
        assert np.isfinite(value) or direction == "reverse"
        if np.isfinite(value):
            assert np.all(np.isfinite(g)), g


@pytest.mark.backends("jax", reason="jax.jit, jax.grad and jax.vmap")
def test_jax_jit_grad_vmap(backend):
    import jax

    rng = np.random.default_rng(35)
    t, s, k = case(rng)
    p, q = softmax(t), softmax(s)
    kw = {"direction": "reverse", "support": "union", "k": k}
    rows, p_mass, _ = reference_rows(p, q, support_mask(p, q, k, "union"), "reverse", True)
    x_t, x_s = backend.asarray(t), backend.asarray(s)
    value, masses = jax.jit(lambda a, b: klx.sparse_divergence(a, b, return_mass=True, **kw))(
        x_t, x_s
    )
    np.testing.assert_allclose(np.asarray(value), rows, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(masses["p_mass"]), p_mass, rtol=1e-12)
    per_row = jax.vmap(lambda a, b: klx.sparse_divergence(a, b, **kw))(x_t, x_s)
    np.testing.assert_allclose(np.asarray(per_row), rows, rtol=1e-12)
    g = jax.jit(jax.grad(lambda b: klx.sparse_divergence(x_t, b, reduction="sum", **kw)))(x_s)
    assert g.shape == x_s.shape and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.backends("torch", reason="torch autograd: masses carry no gradient")
def test_masses_carry_no_gradient(backend):
    rng = np.random.default_rng(36)
    t, s, k = case(rng)
    z = backend.asarray(s).requires_grad_(True)
    value, masses = klx.sparse_divergence(
        backend.asarray(t), z, support="q", k=k, reduction="sum", return_mass=True
    )
    assert value.requires_grad
    assert not masses["p_mass"].requires_grad and not masses["q_mass"].requires_grad


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument_and_the_fix(backend):
    lp = backend.asarray(np.log([[0.5, 0.3]]))
    idx = backend.asarray(np.array([[0, 1]]))
    full = backend.asarray(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"support='q' needs P's log-probabilities at Q's"):
        klx.sparse_divergence(lp, full, p_indices=idx, p_form="top_k", support="q", k=2)
    with pytest.raises(ValueError, match=r"support='union' needs P's log-probabilities"):
        klx.sparse_divergence(lp, full, p_indices=idx, p_form="top_k", support="union", k=2)
    with pytest.raises(ValueError, match="`p_indices` is None"):
        klx.sparse_divergence(lp, full, p_form="top_k")
    with pytest.raises(ValueError, match=r"needs Q's index set: give `q_indices`, or `k`"):
        klx.sparse_divergence(full, full, support="q")
    with pytest.raises(ValueError, match="leave k=None"):
        klx.sparse_divergence(lp, full, p_indices=idx, p_form="top_k", k=2)
    with pytest.raises(ValueError, match="leave q_indices=None"):
        klx.sparse_divergence(full, full, q_indices=idx, k=2)
    with pytest.raises(ValueError, match="`direction` must be one of"):
        klx.sparse_divergence(full, full, k=2, direction="backward")
    with pytest.raises(ValueError, match="`support` must be one of"):
        klx.sparse_divergence(full, full, k=2, support="both")
    with pytest.raises(ValueError, match="the same vocabulary size"):
        klx.sparse_divergence(full, backend.asarray(np.zeros((1, 5))), k=2)
    with pytest.raises(ValueError, match="more than the vocabulary size 4"):
        klx.sparse_divergence(full, full, k=5)
    with pytest.raises(TypeError, match="`k` must be a positive integer"):
        klx.sparse_divergence(full, full, k=2.0)
    with pytest.raises(TypeError, match="`q_indices` must have an integer dtype"):
        klx.sparse_divergence(full, full, support="q", q_indices=full)
    with pytest.raises(TypeError, match="`return_mass` must be True or False"):
        klx.sparse_divergence(full, full, k=2, return_mass=1)
    with pytest.raises(ValueError, match="repeats an index"):
        klx.sparse_divergence(
            full, full, support="q", q_indices=backend.asarray(np.array([[1, 1]])), validate=True
        )
