"""RL aggregation modes (issue 27, part 1): verl's ``loss_agg_mode`` names on every reducing
function and :func:`klx.aggregate`, against a loop over the sequences written here in float64;
the micro-batches' losses, summed with global divisors, are the whole batch's, in value and
gradient; and the field's bugs, by name."""

from __future__ import annotations

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads

MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "group-mean-token-mean",
)
AUTODIFF = pytest.mark.backends("torch", "jax", reason="gradients by the backend's autodiff")


def reference_aggregate(values, mask, mode, *, budget=None, groups=None, divisor=None):
    """The mode by loops over the sequences (rows of 2-d `values`), in float64.

    `divisor` is the global count (tokens, sequences or groups) when given.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    sums, counts = [], []
    for row, keep in zip(values, mask, strict=True):
        sums.append(sum(float(v) for v, k in zip(row, keep, strict=True) if k))
        counts.append(int(keep.sum()))
    used = [i for i, n in enumerate(counts) if n > 0]
    if mode == "token-mean":
        total, count = sum(sums), sum(counts)
    elif mode == "seq-mean-token-sum":
        total, count = sum(sums[i] for i in used), len(used)
    elif mode == "seq-mean-token-mean":
        total, count = sum(sums[i] / counts[i] for i in used), len(used)
    elif mode == "seq-mean-token-sum-norm":
        c = values.shape[1] if budget is None else budget
        total, count = sum(sums[i] / c for i in used), len(used)
    else:
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(int(g), []).append(i)
        total, count = 0.0, 0
        for members in by_group.values():
            tokens = sum(counts[i] for i in members)
            if tokens:
                total += sum(sums[i] for i in members) / tokens
                count += 1
    if divisor is not None:
        count = divisor
    return 0.0 if count == 0 else total / count


def _batch(rng, n_seq=6, length=7, empty=(2,)):
    """Per-token values, a response mask of uneven lengths, and group ids (pairs)."""
    values = rng.normal(size=(n_seq, length))
    lengths = rng.integers(1, length + 1, size=n_seq)
    mask = np.arange(length)[None, :] < lengths[:, None]
    for i in empty:
        mask[i] = False  # an aborted rollout: no kept token
    groups = np.arange(n_seq) // 2
    return values, mask, groups


def _extras(backend, mode, groups, budget=None):
    out = {}
    if mode == "group-mean-token-mean":
        out["group_ids"] = backend.asarray(groups)
    if mode == "seq-mean-token-sum-norm" and budget is not None:
        out["token_budget"] = budget
    return out


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_against_the_loop(backend, mode):
    rng = np.random.default_rng(1)
    values, mask, groups = _batch(rng)
    values_nan = values.copy()
    values_nan[~mask] = np.nan  # padding holds garbage: dropped tokens never count
    for budget in (None, 12.0):
        if budget is not None and mode != "seq-mean-token-sum-norm":
            continue
        got = klx.aggregate(
            backend.asarray(values_nan),
            mode,
            where=backend.asarray(mask),
            **_extras(backend, mode, groups, budget),
        )
        want = reference_aggregate(values, mask, mode, budget=budget, groups=groups)
        check_array(backend, got, backend.asarray(values), "float64", ())
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_kl_divergence_takes_every_mode(backend, mode):
    rng = np.random.default_rng(2)
    _, mask, groups = _batch(rng, n_seq=4, length=5, empty=(1,))
    p = rng.dirichlet(np.ones(9), size=(4, 5))
    q = rng.dirichlet(np.ones(9), size=(4, 5))
    rows, _ = reference.kl_rows(p, q, -1)
    got = klx.kl_divergence(
        backend.asarray(p),
        backend.asarray(q),
        where=backend.asarray(mask),
        reduction=mode,
        **_extras(backend, mode, groups),
    )
    check_array(backend, got, backend.asarray(p), "float64", ())
    want = reference_aggregate(rows, mask, mode, groups=groups)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_kl_estimate_takes_every_mode(backend, mode):
    rng = np.random.default_rng(12)
    _, mask, groups = _batch(rng, n_seq=4, length=6, empty=(0,))
    log_p = np.log(rng.uniform(0.01, 1.0, size=mask.shape))
    log_q = np.log(rng.uniform(0.01, 1.0, size=mask.shape))
    r = log_q - log_p
    got = klx.kl_estimate(
        backend.asarray(log_p),
        backend.asarray(log_q),
        where=backend.asarray(mask),
        reduction=mode,
        **_extras(backend, mode, groups),
    )
    check_array(backend, got, backend.asarray(log_p), "float64", ())
    want = reference_aggregate(np.expm1(r) - r, mask, mode, groups=groups)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)


def test_the_sequence_axis_and_other_divergences(backend):
    """Sequences along axis 0 of the batch shape (tokens first), the distributions along
    axis 1 of the arrays; JS and entropy take the same modes."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6), size=(5, 3)).transpose(0, 2, 1)  # (tokens, vocab, seqs)
    q = rng.dirichlet(np.ones(6), size=(5, 3)).transpose(0, 2, 1)
    mask = rng.random((5, 3)) < 0.7
    mask[:, 1] = False
    rows_js = reference.js_rows(p, q, 1, 0.5)
    kl_rows, _ = reference.kl_rows(p, q, 1)
    got = klx.kl_divergence(
        backend.asarray(p),
        backend.asarray(q),
        axis=1,
        where=backend.asarray(mask),
        reduction="seq-mean-token-mean",
        sequence_axis=0,
    )
    want = reference_aggregate(kl_rows.T, mask.T, "seq-mean-token-mean")
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12)
    ent = klx.entropy(
        backend.asarray(p), axis=1, where=backend.asarray(mask), reduction="token-mean"
    )
    h, _ = reference.entropy_rows(p, 1)
    np.testing.assert_allclose(backend.to_numpy(ent), h[mask].mean(), rtol=1e-12)
    got_js = klx.js_divergence(
        backend.asarray(p), backend.asarray(q), axis=1, reduction="token-mean"
    )
    np.testing.assert_allclose(backend.to_numpy(got_js), rows_js.mean(), rtol=1e-12)


def _micro_batches(n_seq):
    """Uneven micro-batches of sequences: sizes 1, 3, 2 for 6 sequences (groups of 2 whole
    in each but the first two: used by the token and sequence modes)."""
    return [slice(0, 1), slice(1, 4), slice(4, n_seq)]


def _global_divisor(mode, mask, groups):
    if mode == "token-mean":
        return float(mask.sum())
    if mode == "group-mean-token-mean":
        return float(len({int(g) for g, m in zip(groups, mask, strict=True) if m.any()}))
    return float(mask.any(axis=1).sum())


@AUTODIFF
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_add_up_to_the_batch(backend, mode):
    """With the step's global divisor as `normalizer`, the losses of uneven micro-batches,
    summed, are the full batch's loss, and so are their gradients (1e-7 in float64)."""
    rng = np.random.default_rng(5)
    _, mask, groups = _batch(rng, n_seq=6, length=5, empty=(3,))
    logits_p = rng.normal(size=(6, 5, 8))
    logits_q = rng.normal(size=(6, 5, 8))
    divisor = _global_divisor(mode, mask, groups)
    # group mode: a group lies whole in one micro-batch (its token count is taken there)
    parts = [slice(0, 2), slice(2, 6)] if mode == "group-mean-token-mean" else _micro_batches(6)

    def loss(q, sl, normalizer):
        kw = {}
        if mode == "group-mean-token-mean":
            kw["group_ids"] = backend.asarray(groups[sl])
        return klx.kl_divergence(
            backend.asarray(logits_p[sl]),
            q,
            p_form="logits",
            q_form="logits",
            where=backend.asarray(mask[sl]),
            reduction=mode,
            normalizer=normalizer,
            token_budget=9.0 if mode == "seq-mean-token-sum-norm" else None,
            **kw,
        )

    full, full_grad = value_and_grads(backend, lambda q: loss(q, slice(None), None), logits_q)
    total, grad = 0.0, np.zeros_like(logits_q)
    for sl in parts:
        v, g = value_and_grads(backend, lambda q, sl=sl: loss(q, sl, divisor), logits_q[sl])
        total += v
        grad[sl] = g
    np.testing.assert_allclose(total, full, rtol=1e-7, atol=1e-15)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-7, atol=1e-15)
    rows, _ = reference.kl_rows(
        np.exp(reference.log_softmax(logits_p, -1)), np.exp(reference.log_softmax(logits_q, -1)), -1
    )
    want = reference_aggregate(rows, mask, mode, budget=9.0, groups=groups)
    np.testing.assert_allclose(full, want, rtol=1e-12)


def test_verl_911_931_1233_modes_are_not_secretly_identical(backend):
    """Uneven lengths: the four sequence and token modes give four different numbers (two
    of verl's modes once computed the same thing), each its own loop's."""
    rng = np.random.default_rng(6)
    values, mask, _ = _batch(rng, empty=())
    got = {
        m: float(
            backend.to_numpy(klx.aggregate(backend.asarray(values), m, where=backend.asarray(mask)))
        )
        for m in MODES[:4]
    }
    for m, v in got.items():
        np.testing.assert_allclose(v, reference_aggregate(values, mask, m), rtol=1e-13)
    assert len({round(v, 12) for v in got.values()}) == 4, got


def test_verl_7970_aborted_sequences_are_left_out(backend):
    """A fully masked (aborted) sequence is not a sequence with KL 0: adding one changes no
    mode's value (it would drag a seq-mean, and an adaptive KL beta, toward 0)."""
    rng = np.random.default_rng(7)
    values, mask, groups = _batch(rng, n_seq=4, empty=())
    aborted_values = np.vstack([values, rng.normal(size=(2, values.shape[1]))])
    aborted_mask = np.vstack([mask, np.zeros((2, mask.shape[1]), dtype=bool)])
    aborted_groups = np.concatenate([groups, [7, 7]])  # a whole group aborted too
    for mode in MODES:
        a = klx.aggregate(
            backend.asarray(values),
            mode,
            where=backend.asarray(mask),
            **_extras(backend, mode, groups),
        )
        b = klx.aggregate(
            backend.asarray(aborted_values),
            mode,
            where=backend.asarray(aborted_mask),
            **_extras(backend, mode, aborted_groups),
        )
        np.testing.assert_allclose(backend.to_numpy(b), backend.to_numpy(a), rtol=1e-14)


def test_verl_2776_group_token_mean_is_per_group_not_per_micro_batch(backend):
    """DAPO's mean over a group's tokens: a micro-batch holding two groups of different
    sizes averages each group over its own tokens (the micro-batch's token mean would weight
    the larger group more)."""
    values = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = np.array([[True] * 4, [True] * 4, [True, False, False, False]])
    groups = np.array([0, 0, 1])
    got = klx.aggregate(
        backend.asarray(values),
        "group-mean-token-mean",
        where=backend.asarray(mask),
        group_ids=backend.asarray(groups),
    )
    np.testing.assert_allclose(backend.to_numpy(got), (1.0 + 5.0) / 2, rtol=1e-15)
    token_mean = klx.aggregate(backend.asarray(values), "token-mean", where=backend.asarray(mask))
    np.testing.assert_allclose(backend.to_numpy(token_mean), 13.0 / 9.0, rtol=1e-15)


@AUTODIFF
def test_nemo_rl_2745_kl_and_loss_share_one_normalisation(backend):
    """The KL penalty, split over two "ranks" with the step's token count as `normalizer`,
    adds up to the KL of the whole batch; divided by each rank's own count it does not."""
    rng = np.random.default_rng(8)
    log_p = np.log(rng.uniform(0.05, 1.0, size=(4, 6)))
    log_q = np.log(rng.uniform(0.05, 1.0, size=(4, 6)))
    mask = rng.random((4, 6)) < 0.6
    n = float(mask.sum())

    def kl(lp, sl, normalizer):
        return klx.kl_estimate(
            lp,
            backend.asarray(log_q[sl]),
            where=backend.asarray(mask[sl]),
            reduction="token-mean",
            normalizer=normalizer,
        )

    full, _ = value_and_grads(backend, lambda lp: kl(lp, slice(None), None), log_p)
    ranks = (slice(0, 1), slice(1, 4))
    split = sum(value_and_grads(backend, lambda lp, s=s: kl(lp, s, n), log_p[s])[0] for s in ranks)
    local = sum(
        value_and_grads(backend, lambda lp, s=s: kl(lp, s, None), log_p[s])[0] for s in ranks
    )
    r = log_q - log_p
    want = (np.expm1(r) - r)[mask].mean()
    np.testing.assert_allclose([full, split], [want, want], rtol=1e-12)
    assert abs(local - want) > 1e-3 * abs(want)


@AUTODIFF
@pytest.mark.parametrize("mode", MODES)
def test_an_all_empty_batch_is_zero_with_zero_gradient(backend, mode):
    """Nothing kept anywhere: 0 and gradient 0, never NaN (the 'batchmean' decision)."""
    rng = np.random.default_rng(9)
    values = rng.normal(size=(3, 4))
    values[0, 0] = np.nan
    mask = np.zeros((3, 4), dtype=bool)

    def f(v):
        return klx.aggregate(
            v, mode, where=backend.asarray(mask), **_extras(backend, mode, np.arange(3))
        )

    value, grad = value_and_grads(backend, f, values)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(values))


@pytest.mark.backends("jax", reason="jax.jit")
def test_modes_trace_under_jit(backend):
    import jax

    rng = np.random.default_rng(10)
    values, mask, groups = _batch(rng)
    for mode in MODES:
        extras = _extras(backend, mode, groups)
        f = jax.jit(lambda v, m, e=extras, mode=mode: klx.aggregate(v, mode, where=m, **e))
        got = f(backend.asarray(values), backend.asarray(mask))
        want = reference_aggregate(values, mask, mode, groups=groups)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "seq-mean"}, ValueError, "`reduction` must be one of"),
        ({"reduction": "sum", "token_budget": 3.0}, ValueError, "aggregation modes"),
        ({"reduction": "token-mean", "token_budget": 3.0}, ValueError, "seq-mean-token-sum-norm"),
        ({"reduction": "seq-mean-token-sum-norm", "token_budget": 0.0}, ValueError, "> 0"),
        ({"reduction": "group-mean-token-mean"}, ValueError, "needs `group_ids`"),
        ({"reduction": "token-mean", "sequence_axis": 2}, ValueError, "out of range"),
        ({"reduction": "token-mean", "sequence_axis": 1.0}, TypeError, "must be an int"),
        ({"reduction": "sum", "normalizer": 3.0}, ValueError, "normalizer"),
        ({"reduction": "token-mean", "normalizer": -1.0}, ValueError, "normalizer"),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    p = np.full((2, 3, 4), 0.25)
    with pytest.raises(error, match=match):
        klx.kl_divergence(p, p, **kwargs)


def test_group_ids_are_checked():
    p = np.full((2, 3, 4), 0.25)
    with pytest.raises(TypeError, match="integer array"):
        klx.kl_divergence(p, p, reduction="group-mean-token-mean", group_ids=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="one id per sequence"):
        klx.kl_divergence(p, p, reduction="group-mean-token-mean", group_ids=np.arange(3))
    with pytest.raises(ValueError, match="one value only"):
        klx.aggregate(np.array(1.0), "token-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "group-mean-token-mean"])
def test_fused_linear_takes_the_modes(backend, mode):
    """From hidden states, a chunk at a time: the per-token KL of the logits, aggregated."""
    rng = np.random.default_rng(13)
    _, mask, groups = _batch(rng, n_seq=4, length=5, empty=(2,))
    h_t, w_t = rng.normal(size=(4, 5, 6)), rng.normal(size=(11, 6))
    h_s, w_s = rng.normal(size=(4, 5, 3)), rng.normal(size=(11, 3))
    got = klx.fused_linear_divergence(
        backend.asarray(h_t),
        backend.asarray(w_t),
        backend.asarray(h_s),
        backend.asarray(w_s),
        where=backend.asarray(mask),
        reduction=mode,
        chunk_size=3,
        **_extras(backend, mode, groups),
    )
    check_array(backend, got, backend.asarray(h_s), "float64", ())
    rows, _ = reference.kl_rows(
        np.exp(reference.log_softmax(h_t @ w_t.T, -1)),
        np.exp(reference.log_softmax(h_s @ w_s.T, -1)),
        -1,
    )
    want = reference_aggregate(rows, mask, mode, groups=groups)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "group-mean-token-mean"])
def test_sparse_divergences_take_the_modes(backend, mode):
    """The teacher's top k against the student's logits, per token, aggregated."""
    rng = np.random.default_rng(14)
    _, mask, groups = _batch(rng, n_seq=4, length=5, empty=(3,))
    student = rng.normal(size=(4, 5, 12))
    idx = np.argsort(-rng.normal(size=(4, 5, 12)), axis=-1)[..., :3]
    lp = np.log(rng.dirichlet(np.ones(4), size=(4, 5))[..., :3])
    got = klx.sparse_kl_divergence(
        backend.asarray(idx),
        backend.asarray(lp),
        backend.asarray(student),
        where=backend.asarray(mask),
        reduction=mode,
        **_extras(backend, mode, groups),
    )
    check_array(backend, got, backend.asarray(student), "float64", ())
    q = np.exp(reference.log_softmax(student, -1))
    rows, _ = reference.sparse_rows(idx, lp, q, True)
    want = reference_aggregate(rows, mask, mode, groups=groups)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10)


@pytest.mark.backends("jax", reason="jax.vmap")
def test_modes_map_under_vmap(backend):
    """One loss per step, mapped over a leading axis of steps (jax.vmap)."""
    import jax

    rng = np.random.default_rng(15)
    p = rng.dirichlet(np.ones(7), size=(3, 4, 5))  # (steps, sequences, tokens, vocab)
    q = rng.dirichlet(np.ones(7), size=(3, 4, 5))
    mask = rng.random((3, 4, 5)) < 0.6
    mask[1, 2] = False
    rows, _ = reference.kl_rows(p, q, -1)

    def loss(p, q, m):
        return klx.kl_divergence(p, q, where=m, reduction="seq-mean-token-mean")

    got = jax.vmap(loss)(backend.asarray(p), backend.asarray(q), backend.asarray(mask))
    want = [reference_aggregate(rows[i], mask[i], "seq-mean-token-mean") for i in range(3)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_half_precision_counts_past_65504_tokens(backend):
    """float16 counts overflow at 65504: the modes count and sum in float32 (as
    'batchmean' does), so 70000 tokens of one KL average to that KL, not to 0. (One
    sequence: the three modes are the mean over its tokens.)"""
    if "float16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float16")
    n = 70000
    p = np.zeros((1, n, 2))
    q = np.zeros((1, n, 2))
    q[..., 0] = 1.0
    q1 = np.exp(1.0) / (np.exp(1.0) + 1.0)
    want = 0.5 * np.log(0.5 / q1) + 0.5 * np.log(0.5 / (1.0 - q1))
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        got = klx.kl_divergence(
            backend.asarray(p, "float16"),
            backend.asarray(q, "float16"),
            p_form="logits",
            q_form="logits",
            reduction=mode,
        )
        check_array(backend, got, backend.asarray(p, "float16"), "float16", ())
        np.testing.assert_allclose(float(backend.to_numpy(got)), want, rtol=2e-3)
