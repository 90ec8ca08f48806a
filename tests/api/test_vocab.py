"""Teacher and student with different vocabulary sizes (klx issue 27, part 5): ``vocab=``.

TRL #2215 / #4562, ms-swift #7950, NeMo-RL #2797: one tokenizer, embedding tables padded to
151,936 and 152,064 rows. The tests keep that structure at 100 and 108 ids (10 and 12 where
gradients are taken by finite differences).

The reference (below, never klx) works in float64 NumPy from the full distributions: it
normalises each side over its own vocabulary, then coarsens by hand, a loop over the
rows ('intersect': the shared ids, then one bin summing the extra ids' probabilities;
'truncate': the shared ids divided by their sum), and sums ``p log(p / q)`` with
``scipy.special.rel_entr``. Gradients are compared with finite differences of that
reference, or with the closed form of the student's logits gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, rel_entr

import klx
from support.asserts import check_array

FORMS = ("logits", "log_probs", "probs")
MODES = ("intersect", "truncate")
REDUCTIONS = ("none", "sum", "batchmean")
#: TRL #2215's sizes, scaled down: the student's table padded to 100 rows, the teacher's to 108.
SMALL, LARGE = 100, 108


# --------------------------------------------------------------------------- reference


def probs_of(x, form, temperature=1.0):
    """A side's probabilities over its own whole vocabulary (float64)."""
    if form == "logits":
        return np.exp(log_softmax(x / temperature, axis=-1))
    return np.exp(x) if form == "log_probs" else x


def coarsened(p, v, mode):
    """One side over the shared bins, row by row: V + 1 ('intersect') or V ('truncate')."""
    rows = []
    for row in p.reshape(-1, p.shape[-1]):
        shared = [float(x) for x in row[:v]]
        if mode == "intersect":
            rows.append([*shared, float(sum(row[v:]))])
        else:
            total = sum(shared)
            rows.append([x / total for x in shared])
    return np.array(rows).reshape((*p.shape[:-1], -1))


def ref_rows(p_probs, q_probs, mode):
    """Per-row KL(P || Q) of the two coarsened distributions."""
    v = min(p_probs.shape[-1], q_probs.shape[-1])
    return rel_entr(coarsened(p_probs, v, mode), coarsened(q_probs, v, mode)).sum(-1)


def reduce(rows, reduction, keep=None):
    if keep is not None:
        rows = np.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(1, rows.size if keep is None else int(keep.sum()))


def side_input(rng, shape, form, temperature):
    """A side given in `form`, and its float64 probabilities."""
    z = rng.normal(scale=2.0, size=shape)
    if form == "logits":
        return z, probs_of(z, "logits", temperature)
    lp = log_softmax(z, axis=-1)
    return (lp, np.exp(lp)) if form == "log_probs" else (np.exp(lp), np.exp(lp))


def close(got, want, dtype):
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (5e-6, 1e-7)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("larger", ["teacher", "student"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_trl_2215_vocab_sizes_match_coarsened_reference(backend, mode, form, larger, dtype):
    """100 vs 108 ids, either side larger, every form: the KL of the coarsened
    distributions, per row and reduced, with a padding mask; inputs never modified."""
    rng = np.random.default_rng(2215)
    t = 2.0 if form == "logits" else 1.0
    v_p, v_q = (LARGE, SMALL) if larger == "teacher" else (SMALL, LARGE)
    p_in, p_probs = side_input(rng, (2, 3, v_p), form, t)
    q_in, _ = side_input(rng, (2, 3, v_q), form, t)
    if mode == "intersect" and larger == "teacher":
        # a finite reference: the teacher's extra ids hold (almost) nothing, except one row
        p_probs[..., SMALL:] = 0.0
        p_probs[1, 2, SMALL:] = 1e-3
        p_probs /= p_probs.sum(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            p_in = {"probs": p_probs, "log_probs": np.log(p_probs), "logits": t * np.log(p_probs)}[
                form
            ]
    keep = np.array([[True, False, True], [True, True, False]])
    x_p, x_q = backend.asarray(p_in, dtype), backend.asarray(q_in, dtype)
    before = [backend.to_numpy(x) for x in (x_p, x_q)]
    # the reference sees the inputs rounded to `dtype`
    p_r, q_r = (probs_of(backend.to_numpy(x), form, t) for x in (x_p, x_q))
    rows = ref_rows(p_r, q_r, mode)
    if mode == "intersect" and larger == "teacher":
        assert np.isinf(rows[1, 2]) and np.isfinite(rows[0]).all()
    for reduction in REDUCTIONS:
        where = backend.asarray(keep) if reduction != "sum" else None
        got = klx.kl_divergence(
            x_p,
            x_q,
            p_form=form,
            q_form=form,
            temperature=t,
            where=where,
            reduction=reduction,
            vocab=mode,
        )
        check_array(backend, got, x_p, dtype, (2, 3) if reduction == "none" else ())
        want = reduce(rows, reduction, None if reduction == "sum" else keep)
        close(backend.to_numpy(got), want, dtype)
    for x, b in zip((x_p, x_q), before, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(x), b)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_forms_middle_axis_and_broadcast_batch(backend, mode):
    """Teacher logits against student probabilities, the vocabulary on axis 1, the
    student's batch broadcast (size 1)."""
    rng = np.random.default_rng(4562)
    a = rng.normal(size=(4, SMALL, 2))
    q_probs = probs_of(rng.normal(size=(1, 2, LARGE)), "logits")
    got = klx.kl_divergence(
        backend.asarray(a),
        backend.asarray(np.moveaxis(q_probs, -1, 1)),
        axis=1,
        p_form="logits",
        temperature=0.5,
        vocab=mode,
    )
    want = ref_rows(probs_of(np.moveaxis(a, 1, -1), "logits", 0.5), q_probs, mode)
    check_array(backend, got, backend.asarray(a), "float64", (4, 2))
    close(backend.to_numpy(got), want, "float64")


def test_intersect_is_infinite_where_only_the_teacher_has_mass_and_truncate_is_not(backend):
    """The truth of 'intersect': P's tail > 0 and Q's tail = 0 gives +inf; 'truncate'
    (the conditionals given a shared token) stays finite; no tail mass: both agree with
    the KL over the shared ids."""
    p = np.array([[0.5, 0.25, 0.25, 0.0], [0.5, 0.25, 0.125, 0.125]])
    q = np.array([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]])
    inter = backend.to_numpy(
        klx.kl_divergence(backend.asarray(p), backend.asarray(q), vocab="intersect")
    )
    trunc = backend.to_numpy(
        klx.kl_divergence(backend.asarray(p), backend.asarray(q), vocab="truncate")
    )
    shared = rel_entr(p[0, :3], q[0]).sum()
    np.testing.assert_allclose(inter, [shared, np.inf], rtol=1e-15)
    p1 = p[1, :3] / p[1, :3].sum()
    np.testing.assert_allclose(trunc, [shared, rel_entr(p1, q[1]).sum()], rtol=1e-14)


def test_conventions_nan_negative_and_inf_logits(backend):
    """NaN propagates, a negative probability among the extra ids gives +inf (rel_entr's
    rule), a +inf logit makes its row NaN, -inf logits in the extra ids carry no mass."""
    q = backend.asarray(np.full((1, 3), 1.0 / 3.0))
    p = np.array([[0.5, 0.25, 0.25, 0.0, 0.0], [0.5, 0.25, 0.25, np.nan, 0.0]])
    p_neg = np.array([[0.5, 0.25, 0.25, 0.25, -0.25]])
    got = backend.to_numpy(klx.kl_divergence(backend.asarray(p), q, vocab="intersect"))
    assert got[0] == pytest.approx(rel_entr(p[0, :3], 1 / 3).sum(), rel=1e-14)
    assert np.isnan(got[1])
    neg = backend.to_numpy(klx.kl_divergence(backend.asarray(p_neg), q, vocab="intersect"))
    assert neg[0] == np.inf
    z = np.array([[1.0, 0.0, -1.0, -np.inf, -np.inf], [1.0, 0.0, -1.0, np.inf, 0.0]])
    got = backend.to_numpy(
        klx.kl_divergence(backend.asarray(z), q, p_form="logits", q_form="probs", vocab="intersect")
    )
    assert got[0] == pytest.approx(rel_entr(probs_of(z[0, :3], "logits"), 1 / 3).sum(), rel=1e-14)
    assert np.isnan(got[1])


def test_equal_sizes_and_size_one_are_unchanged(backend):
    """Equal sizes (or a size 1 that broadcasts) take no transform in any mode."""
    rng = np.random.default_rng(7950)
    p = probs_of(rng.normal(size=(3, 6)), "logits")
    q = probs_of(rng.normal(size=(3, 6)), "logits")
    want = rel_entr(p, q).sum(-1)
    for mode in ("same", *MODES):
        got = klx.kl_divergence(backend.asarray(p), backend.asarray(q), vocab=mode)
        close(backend.to_numpy(got), want, "float64")
    one = np.full((3, 1), 1.0 / 6.0)
    got = klx.kl_divergence(backend.asarray(p), backend.asarray(one), vocab="intersect")
    close(backend.to_numpy(got), rel_entr(p, 1.0 / 6.0).sum(-1), "float64")


# --------------------------------------------------------------------------- errors


def test_mismatch_without_vocab_names_both_sizes_the_axis_and_the_fix(backend):
    p = backend.asarray(np.full((2, LARGE), 1.0 / LARGE))
    q = backend.asarray(np.full((2, SMALL), 1.0 / SMALL))
    with pytest.raises(ValueError, match=r"`p` has 108 entries and `q` has 100 along axis -1") as e:
        klx.kl_divergence(p, q)
    assert "vocab='intersect'" in str(e.value) and "vocab='truncate'" in str(e.value)
    with pytest.raises(ValueError, match="`vocab` must be one of 'same', 'intersect'"):
        klx.kl_divergence(p, q, vocab="union")
    # a batch mismatch too: the shapes' own broadcast error, not the vocabulary's
    with pytest.raises(ValueError, match="do not broadcast"):
        klx.kl_divergence(p, backend.asarray(np.full((3, SMALL), 1.0 / SMALL)))
    with pytest.raises(ValueError, match="unnormalised measures"):
        klx.kl_divergence(p, q, normalized=False, vocab="intersect")


def test_fused_mismatch_without_vocab_names_rows_and_the_fix(backend):
    rng = np.random.default_rng(2797)
    h = backend.asarray(rng.normal(size=(4, 3)))
    w_t = backend.asarray(rng.normal(size=(12, 3)))
    w_s = backend.asarray(rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"`p_weight` has 12 rows and `q_weight` 10.*vocab="):
        klx.fused_linear_divergence(h, w_t, h, w_s)
    with pytest.raises(ValueError, match=r"`p_hidden` \(the teacher's logits.*12 entries"):
        klx.fused_linear_divergence(backend.asarray(rng.normal(size=(4, 12))), None, h, w_s)
    with pytest.raises(ValueError, match=r"`p_bias` must have shape \(12,\)"):
        klx.fused_linear_divergence(
            h, w_t, h, w_s, p_bias=backend.asarray(np.zeros(10)), vocab="intersect"
        )


# --------------------------------------------------------------------------- gradients


def _student_logits_grad(a, b, t, mode):
    """d mean-over-rows KL(P~ || Q~) / d b, P = softmax(a / t), Q = softmax(b / t), in
    closed form: q_i (1 - p~_k / q~_k) / t for id i in bin k ('intersect'); (q~_i - p~_i)
    / t on the shared ids and 0 beyond ('truncate')."""
    p, q = probs_of(a, "logits", t), probs_of(b, "logits", t)
    v = min(a.shape[-1], b.shape[-1])
    pc, qc = coarsened(p, v, mode), coarsened(q, v, mode)
    g = np.zeros_like(b)
    if mode == "intersect":
        bins = np.minimum(np.arange(b.shape[-1]), v)
        g = q * (1.0 - pc[:, bins] / qc[:, bins]) / t
    else:
        g[:, :v] = (qc - pc) / t
    return g / a.shape[0]


def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        g[i] = (f(hi) - f(lo)) / (2 * eps)
    return g


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
@pytest.mark.parametrize("larger", ["teacher", "student"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_finite_and_match_reference_with_inf_logits_in_extra_ids(backend, mode, larger):
    """Both sides' logits gradients (jax.grad under jax.jit, torch autograd) against the
    closed form (student) and finite differences of the reference (teacher), with -inf
    logits among the larger side's extra ids (a masked padding of the table)."""
    from support.autodiff import value_and_grads

    rng = np.random.default_rng(4)
    t = 1.5
    v_p, v_q = (12, 10) if larger == "teacher" else (10, 12)
    a = rng.normal(size=(3, v_p))
    b = rng.normal(size=(3, v_q))
    if larger == "teacher":
        a[:, 10:] = -np.inf  # a teacher whose padded rows are masked: no tail mass
        a[0, 11] = 0.5  # but one row's padding leaks mass: finite only for 'truncate'
        if mode == "intersect":
            a[0, 11] = -np.inf
    else:
        b[:, 11] = -np.inf

    def loss(x, y):
        return klx.kl_divergence(
            x, y, p_form="logits", q_form="logits", temperature=t, reduction="batchmean", vocab=mode
        )

    def ref(x, y):
        return ref_rows(probs_of(x, "logits", t), probs_of(y, "logits", t), mode).mean()

    value, g_a, g_b = value_and_grads(backend, loss, a, b)
    assert value == pytest.approx(ref(a, b), rel=1e-12)
    assert np.isfinite(g_a).all() and np.isfinite(g_b).all()
    np.testing.assert_allclose(g_b, _student_logits_grad(a, b, t, mode), atol=1e-12)
    np.testing.assert_allclose(g_a, _numeric_grad(lambda x: ref(x, b), a), atol=1e-7)
    np.testing.assert_array_equal(g_a[~np.isfinite(a)], 0.0)
    np.testing.assert_array_equal(g_b[~np.isfinite(b)], 0.0)


@pytest.mark.backends("jax", reason="jax.jit")
@pytest.mark.parametrize("mode", MODES)
def test_jax_jit_with_a_traced_temperature(backend, mode):
    import jax

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, LARGE)), rng.normal(size=(4, SMALL))
    f = jax.jit(
        lambda x, y, t: klx.kl_divergence(
            x, y, p_form="logits", q_form="logits", temperature=t, vocab=mode
        )
    )
    got = np.asarray(f(backend.asarray(b), backend.asarray(a), backend.asarray(np.array(2.0))))
    close(got, ref_rows(probs_of(b, "logits", 2.0), probs_of(a, "logits", 2.0), mode), "float64")


# --------------------------------------------------------------------------- fused linear


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("larger", ["teacher", "student"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_matches_reference_from_full_logits(backend, mode, larger, reduction):
    """Chunks of 3 tokens, biases, a padding mask: against the reference built from the
    full float64 logits, with the teacher given by hidden states or by its logits."""
    rng = np.random.default_rng(151936)
    t = 2.0
    v_p, v_q = (LARGE, SMALL) if larger == "teacher" else (SMALL, LARGE)
    h_p, w_p, b_p = rng.normal(size=(2, 4, 5)), rng.normal(size=(v_p, 5)), rng.normal(size=v_p)
    h_q, w_q, b_q = rng.normal(size=(2, 4, 3)), rng.normal(size=(v_q, 3)), rng.normal(size=v_q)
    if larger == "teacher" and mode == "intersect":
        b_p[SMALL:] = -np.inf  # the teacher's padded rows masked: a finite reference
    keep = np.array([[True, True, False, True], [False, True, True, True]])
    zp, zq = h_p @ w_p.T + b_p, h_q @ w_q.T + b_q
    rows = ref_rows(probs_of(zp, "logits", t), probs_of(zq, "logits", t), mode)
    want = reduce(rows, reduction, keep)
    x = [backend.asarray(a) for a in (h_p, w_p, b_p, h_q, w_q, b_q)]
    got = klx.fused_linear_divergence(
        x[0],
        x[1],
        x[3],
        x[4],
        p_bias=x[2],
        q_bias=x[5],
        temperature=t,
        where=backend.asarray(keep),
        reduction=reduction,
        chunk_size=3,
        vocab=mode,
    )
    check_array(backend, got, x[3], "float64", (2, 4) if reduction == "none" else ())
    close(backend.to_numpy(got), want, "float64")
    from_logits = klx.fused_linear_divergence(
        backend.asarray(zp),
        None,
        x[3],
        x[4],
        q_bias=x[5],
        temperature=t,
        where=backend.asarray(keep),
        reduction=reduction,
        chunk_size=3,
        vocab=mode,
    )
    close(backend.to_numpy(from_logits), want, "float64")


@pytest.mark.backends("torch", "jax", reason="gradients need autodiff")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("larger", ["teacher", "student"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_student_gradients_match_closed_form(backend, mode, larger, reduction):
    """The student's hidden-state and weight gradients: the closed-form logits gradient
    of the reference, through the linear layer (dz @ W, dz.T @ h)."""
    from support.autodiff import value_and_grads

    rng = np.random.default_rng(152064)
    t = 1.5
    v_p, v_q = (12, 10) if larger == "teacher" else (10, 12)
    h_p, w_p = rng.normal(size=(5, 4)), rng.normal(size=(v_p, 4))
    h_q, w_q = rng.normal(size=(5, 3)), rng.normal(size=(v_q, 3))
    zp = h_p @ w_p.T
    if larger == "teacher" and mode == "intersect":
        zp[:, 10:] = -np.inf  # the teacher's logits, its padded rows masked

    def loss(h, w):
        out = klx.fused_linear_divergence(
            backend.asarray(zp),
            None,
            h,
            w,
            temperature=t,
            reduction=reduction,
            chunk_size=2,
            vocab=mode,
        )
        return out if reduction == "batchmean" else out.sum() / 5

    _, g_h, g_w = value_and_grads(backend, loss, h_q, w_q)
    dz = _student_logits_grad(zp, h_q @ w_q.T, t, mode)
    np.testing.assert_allclose(g_h, dz @ w_q, atol=1e-12)
    np.testing.assert_allclose(g_w, dz.T @ h_q, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_any_divergence_by_name_aligns_first(backend, mode):
    """klx.divergence(..., vocab=) for JS and TV: the divergence of the coarsened
    distributions (references by their formulas on the reference's bins)."""
    rng = np.random.default_rng(2216)
    p = probs_of(rng.normal(size=(3, LARGE)), "logits")
    q = probs_of(rng.normal(size=(3, SMALL)), "logits")
    pc, qc = coarsened(p, SMALL, mode), coarsened(q, SMALL, mode)
    m = 0.5 * (pc + qc)
    want = {
        "js": 0.5 * rel_entr(pc, m).sum(-1) + 0.5 * rel_entr(qc, m).sum(-1),
        "tv": 0.5 * np.abs(pc - qc).sum(-1),
    }
    for kind, ref in want.items():
        got = klx.divergence(backend.asarray(p), backend.asarray(q), kind, vocab=mode)
        close(backend.to_numpy(got), ref, "float64")


# -- sparse_kl_divergence / sparse_divergence with a larger teacher vocabulary -------------


def _sparse_reference(idx, lp, student_logits, mode, tail):
    """Coarsened bins by hand: P's given ids inside the student's vocabulary, then its tail
    (1 - that mass: with 'intersect' the ids the student lacks are in it); Q likewise."""
    out = []
    for row_i, row_lp, z in zip(idx, lp, student_logits, strict=True):
        q = np.exp(z - z.max())
        q /= q.sum()
        inside = row_i < len(z)
        p_s = np.exp(row_lp[inside])
        q_s = q[row_i[inside]]
        if tail:
            p_bins = np.append(p_s, 1.0 - p_s.sum())
            q_bins = np.append(q_s, 1.0 - q_s.sum())
        else:
            p_bins, q_bins = p_s / p_s.sum(), q_s / q_s.sum()
        out.append(float(np.sum(rel_entr(p_bins, q_bins))))
    return np.array(out)


@pytest.mark.parametrize(("mode", "tail"), [("intersect", True), ("truncate", False)])
def test_trl_2215_sparse_teacher_with_a_larger_vocabulary(backend, mode, tail):
    """A top-k teacher over 108 ids, a student over 100: ids >= 100 go to P's tail bin
    ('intersect') or are left out of a renormalised support ('truncate')."""
    rng = np.random.default_rng(31)
    student = rng.normal(size=(5, 100))
    idx = np.stack([rng.choice(108, size=6, replace=False) for _ in range(5)])
    idx[0, :2] = [100, 107]  # two ids the student lacks
    probs = rng.dirichlet(np.ones(7), size=5)[:, :6] * 0.9
    lp = np.log(probs)
    got = klx.sparse_kl_divergence(
        backend.asarray(idx),
        backend.asarray(lp),
        backend.asarray(student),
        vocab=mode,
        tail=tail,
    )
    check_array(backend, got, backend.asarray(student), "float64", (5,))
    want = _sparse_reference(idx, lp, student, mode, tail)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)


def test_sparse_vocab_errors():
    student = np.zeros((1, 5))
    idx, lp = np.array([[0, 6]]), np.log(np.array([[0.5, 0.3]]))
    with pytest.raises(ValueError, match="vocab='intersect'"):
        klx.sparse_kl_divergence(idx, lp, student)
    with pytest.raises(ValueError, match="tail=False"):
        klx.sparse_kl_divergence(idx, lp, student, vocab="truncate")
    with pytest.raises(ValueError, match="`vocab` must be one of"):
        klx.sparse_kl_divergence(idx, lp, student, vocab="union")


@pytest.mark.backends("jax", reason="jax.vmap")
def test_intersect_maps_under_vmap(backend):
    import jax

    rng = np.random.default_rng(32)
    t = rng.normal(size=(3, 4, 12))
    s = rng.normal(size=(3, 4, 10))

    def kl(a, b):
        return klx.kl_divergence(a, b, p_form="logits", q_form="logits", vocab="truncate")

    got = jax.vmap(kl)(backend.asarray(t), backend.asarray(s))
    p = np.exp(log_softmax(t[..., :10], axis=-1))
    q = np.exp(log_softmax(s, axis=-1))
    np.testing.assert_allclose(np.asarray(got), rel_entr(p, q).sum(-1), rtol=1e-12)


def test_intersect_with_k_equal_to_the_student_vocabulary(backend):
    """k = V_q indices, one of them an id the student lacks: S does not cover the
    vocabulary, so the tail bins stay (not the renormalised value)."""
    lp = log_softmax(np.array([2.0, 1.0, 0.5, -1.0, 0.0, 1.5]))  # teacher, 6 ids
    student = np.array([0.3, -0.2, 0.1, 0.4])  # 4 ids
    idx = np.array([0, 1, 2, 5])
    got, masses = klx.sparse_kl_divergence(
        backend.asarray(idx),
        backend.asarray(lp[idx]),
        backend.asarray(student),
        vocab="intersect",
        return_mass=True,
    )
    want = _sparse_reference(idx[None], lp[idx][None], student[None], "intersect", True)[0]
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)
    q = np.exp(log_softmax(student))
    np.testing.assert_allclose(backend.to_numpy(masses["p_mass"]), np.exp(lp[:3]).sum(), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(masses["q_mass"]), q[:3].sum(), rtol=1e-12)
