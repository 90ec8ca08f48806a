"""Post-training: skew KL and total variation against float64 SciPy/NumPy references on
every backend; gradients against analytic ones and against torch autograd / jax.grad of the
plain formula; the token semantics of every reducing divergence (`normalizer=`, and
'batchmean' when nothing is kept); hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import klx
from support import reference
from support.asserts import check_array
from support.cases import divergence_cases, draw_distribution
from support.strategies import SETTINGS, distributions, normalize

FORMS = ("probs", "log_probs", "logits")

#: Every divergence klx ships (read from its records), its public function, and its reference
#: per distribution (float64 probabilities along the last axis).
FUNCTIONS = divergence_cases({"skew_kl": {"alpha": 0.1}})


def _rows(kind, p, q, axis, alpha):
    if kind == "tv":
        return reference.tv_rows(p, q, axis)
    return reference.skew_kl_rows(p, q, axis, alpha)


def _call(kind, p, q, alpha, **kwargs):
    if kind == "tv":
        return klx.tv_distance(p, q, **kwargs)
    return klx.skew_kl_divergence(p, q, alpha=alpha, **kwargs)


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("q_form", FORMS)
@pytest.mark.parametrize("p_form", FORMS)
@pytest.mark.parametrize(("shape", "axis"), [((6, 9), -1), ((4, 5, 3), 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["skew_kl", "tv"])
def test_matches_reference(backend, kind, dtype, shape, axis, p_form, q_form, conformance):
    rng = np.random.default_rng(11)
    temperature = 2.0 if "logits" in (p_form, q_form) else 1.0
    # Zeros in both: P > 0 where Q = 0 (KL infinite, skew KL finite) and the reverse.
    p_in, p = draw_distribution(rng, shape, axis, p_form, zeros=True, temperature=temperature)
    q_in, q = draw_distribution(rng, shape, axis, q_form, zeros=True, temperature=temperature)
    if p_form != "logits":  # temperature only rescales logits
        p = reference.to_probs(p_in, p_form, axis)
    if q_form != "logits":
        q = reference.to_probs(q_in, q_form, axis)
    xp_p, xp_q = backend.asarray(p_in, dtype), backend.asarray(q_in, dtype)
    p_before, q_before = backend.to_numpy(xp_p), backend.to_numpy(xp_q)
    rows, scale = _rows(kind, p, q, axis, 0.1)
    assert np.all(np.isfinite(rows)), "the cases must exercise finite values only"
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    tol = 1e-12 if dtype == "float64" else 1e-5  # the inputs were rounded to `dtype`
    for reduction in ("none", "sum", "batchmean"):
        got = _call(
            kind,
            xp_p,
            xp_q,
            0.1,
            axis=axis,
            p_form=p_form,
            q_form=q_form,
            temperature=temperature,
            reduction=reduction,
        )
        check_array(backend, got, xp_p, dtype, batch if reduction == "none" else ())
        ref = reference.reduce(rows, reduction)
        ref_scale = reference.reduce(scale, reduction)
        err = reference.rel_error(backend.to_numpy(got), ref, np.maximum(ref_scale, 1.0))
        conformance(f"{backend.id} {dtype} {kind}", reduction, err, tol)
        assert err <= tol, f"{reduction}: error {err:.3g}"
    np.testing.assert_array_equal(backend.to_numpy(xp_p), p_before)  # inputs unmodified
    np.testing.assert_array_equal(backend.to_numpy(xp_q), q_before)


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


def test_nan_propagates_and_disjoint_tv(backend):
    p = backend.asarray([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    q = backend.asarray([[np.nan, 1.0], [0.5, 0.5], [0.0, 1.0]])
    for kind in ("skew_kl", "tv"):
        got = backend.to_numpy(_call(kind, p, q, 0.25))
        assert np.isnan(got[0]), f"{kind}: NaN in Q where P is 0 propagates"
        assert abs(got[1]) <= 4 * np.finfo(np.float64).eps, "0 for P = Q, up to rounding"
    np.testing.assert_allclose(backend.to_numpy(klx.tv_distance(p, q))[2], 1.0, rtol=1e-15)


# --------------------------------------------------------------------------- gradients


def _softmax(backend, x, temperature):
    if backend.name == "torch":
        import torch

        return torch.softmax(x / temperature, dim=-1)
    import jax

    return jax.nn.softmax(x / temperature, axis=-1)


def _plain(backend, kind, alpha, a, b, form, temperature):
    """The formula written plainly in the framework (finite inputs, positive probabilities)."""
    xp = backend.xp
    if form == "logits":
        a, b = _softmax(backend, a, temperature), _softmax(backend, b, temperature)
    if kind == "tv":
        return 0.5 * xp.sum(xp.abs(a - b))
    m = alpha * a + (1 - alpha) * b
    return xp.sum(a * (xp.log(a) - xp.log(m)))


def _value_and_grads(backend, f, a_np, b_np):
    """f(a, b) (a scalar) and its gradients, by the backend's autodiff, as float64 NumPy."""
    if backend.name == "torch":
        a = backend.asarray(a_np).requires_grad_(True)
        b = backend.asarray(b_np).requires_grad_(True)
        value = f(a, b)
        value.backward()
        return float(value.detach()), backend.to_numpy(a.grad), backend.to_numpy(b.grad)
    import jax

    value, (ga, gb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
        backend.asarray(a_np), backend.asarray(b_np)
    )
    return float(value), np.asarray(ga), np.asarray(gb)


@pytest.mark.parametrize("form", ["probs", "logits"])
@pytest.mark.parametrize(("kind", "alpha"), [("skew_kl", 0.1), ("skew_kl", 0.6), ("tv", 0.0)])
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_match_plain_formula(backend, kind, alpha, form):
    rng = np.random.default_rng(13)
    logits_a, logits_b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    if form == "probs":
        a = np.exp(reference.log_softmax(logits_a, -1))
        b = np.exp(reference.log_softmax(logits_b, -1))
    else:
        a, b = logits_a, logits_b
    t = 2.0 if form == "logits" else 1.0

    def ours(x, y):
        return _call(kind, x, y, alpha, p_form=form, q_form=form, temperature=t, reduction="sum")

    value, ga, gb = _value_and_grads(backend, ours, a, b)
    ref_value, ra, rb = _value_and_grads(
        backend, lambda x, y: _plain(backend, kind, alpha, x, y, form, t), a, b
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-13)
    np.testing.assert_allclose(ga, ra, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(gb, rb, rtol=1e-11, atol=1e-14)
    if form == "probs":  # and against the analytic float64 NumPy derivatives
        if kind == "tv":
            ref_a = 0.5 * np.sign(a - b)
            ref_b = -ref_a
        else:
            m = alpha * a + (1 - alpha) * b
            ref_a = np.log(a / m) + 1 - alpha * a / m
            ref_b = -(1 - alpha) * a / m
        np.testing.assert_allclose(ga, ref_a, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(gb, ref_b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("kind", "alpha"), [("skew_kl", 0.1), ("skew_kl", 1.0), ("tv", 0.0)])
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_finite_with_zeros_masks_and_neginf_logits(backend, kind, alpha):
    rng = np.random.default_rng(14)
    t, s = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    t[:, 3] = s[:, 3] = -np.inf  # a masked vocabulary entry in both
    s[0, 1] = -np.inf  # Q is 0 where P is not: KL is +inf, skew KL is finite
    t[1, 2] = -np.inf  # P is 0 where Q is not
    t[2], s[2] = np.nan, -np.inf  # a padding row
    keep = np.array([True, True, False, True, True])

    def ours(a, b):
        return _call(
            kind,
            a,
            b,
            alpha,
            p_form="logits",
            q_form="logits",
            temperature=2.0,
            where=backend.asarray(keep),
            reduction="batchmean",
        )

    value, ga, gb = _value_and_grads(backend, ours, t, s)
    assert np.isfinite(value)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.all(ga[2] == 0) and np.all(gb[2] == 0), "a masked row gets no gradient"
    assert np.all(ga[:, 3] == 0) and np.all(gb[:, 3] == 0)
    # Rows without -inf other than the shared one: the plain formula's gradient.
    rows = [3, 4]
    cols = [0, 1, 2, 4, 5]
    sub_t, sub_s = t[np.ix_(rows, cols)], s[np.ix_(rows, cols)]
    _, ra, rb = _value_and_grads(
        backend,
        lambda x, y: _plain(backend, kind, alpha, x, y, "logits", 2.0) / keep.sum(),
        sub_t,
        sub_s,
    )
    np.testing.assert_allclose(ga[np.ix_(rows, cols)], ra, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(gb[np.ix_(rows, cols)], rb, rtol=1e-11, atol=1e-14)


@pytest.mark.backends("jax", reason="jax.jit, jax.vmap and jax.grad")
def test_jax_jit_vmap_grad(backend):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(15)
    t, s = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    t[:, 2] = -np.inf
    common = {"p_form": "logits", "q_form": "logits"}
    for fn, options in ((klx.skew_kl_divergence, {"alpha": 0.3}), (klx.tv_distance, {})):

        def f(a, b, fn=fn, options=options):
            return fn(a, b, **common, **options)

        rows = jax.jit(f)(jnp.asarray(t), jnp.asarray(s))
        per_row = jax.vmap(f)(jnp.asarray(t), jnp.asarray(s))
        np.testing.assert_allclose(np.asarray(per_row), np.asarray(rows), rtol=1e-13)
        pt = np.exp(reference.log_softmax(t, -1))
        ps = np.exp(reference.log_softmax(s, -1))
        if fn is klx.tv_distance:
            ref, _ = reference.tv_rows(pt, ps, -1)
        else:
            ref, _ = reference.skew_kl_rows(pt, ps, -1, 0.3)
        np.testing.assert_allclose(np.asarray(rows), ref, rtol=1e-12)
        g = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b)), argnums=1))(
            jnp.asarray(t), jnp.asarray(s)
        )
        assert np.all(np.isfinite(np.asarray(g)))


# --------------------------------------------------------------------------- token semantics


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

    value, ga, gb = _value_and_grads(backend, loss, t, s)
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

        value, ga, gb = _value_and_grads(backend, loss, t, s)
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


# --------------------------------------------------------------------------- accelerators


@pytest.mark.backends("numpy", "torch", reason="the CPU row-blocked accelerators")
@pytest.mark.parametrize("kind", ["skew_kl", "tv"])
def test_row_blocks_serve_the_new_kinds(backend, kind):
    rng = np.random.default_rng(17)
    shape = (1024, 1025)  # just over the rows' 2**20 elements
    t, s = rng.normal(size=shape), rng.normal(size=shape)
    report = klx.explain(
        _call,
        kind,
        backend.asarray(t),
        backend.asarray(s),
        0.2,
        p_form="logits",
        q_form="logits",
        reduction="batchmean",
        normalizer=2048,
    )
    assert report.chosen == f"{'numpy' if backend.name == 'numpy' else 'torch-cpu'}-rows"
    rows, _ = _rows(
        kind, np.exp(reference.log_softmax(t, -1)), np.exp(reference.log_softmax(s, -1)), -1, 0.2
    )
    np.testing.assert_allclose(backend.to_numpy(report.result), rows.sum() / 2048, rtol=1e-12)


# --------------------------------------------------------------------------- properties


def _another(data, p):
    """A second distribution of `p`'s shape, with zeros anywhere but its last entry."""
    weights = data.draw(
        hnp.arrays(np.float64, p.shape, elements=st.floats(0.0, 10.0, allow_subnormal=False))
    )
    weights[..., -1] += 1e-3
    return normalize(weights)


@SETTINGS
@given(data=st.data())
def test_tv_in_unit_interval_and_symmetric(backend, data):
    p = data.draw(distributions())
    q = _another(data, p)
    a = backend.to_numpy(klx.tv_distance(backend.asarray(p), backend.asarray(q)))
    b = backend.to_numpy(klx.tv_distance(backend.asarray(q), backend.asarray(p)))
    assert np.all(a >= 0) and np.all(a <= 1 + 1e-15)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, reference.tv_rows(p, q, -1)[0], rtol=1e-13, atol=1e-16)
    same = backend.to_numpy(klx.tv_distance(backend.asarray(p), backend.asarray(p)))
    assert np.all(same == 0.0)


@SETTINGS
@given(data=st.data(), alpha=st.floats(1e-6, 1.0))
def test_skew_kl_finite_bounded_and_kl_at_alpha_zero(backend, data, alpha):
    p = data.draw(distributions())
    q = _another(data, p)  # zeros where P has none: KL(P || Q) may be +inf
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
