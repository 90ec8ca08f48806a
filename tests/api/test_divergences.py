"""What the divergences share, tested across them: special values (disjoint supports, NaN),
gradients through masks and -inf logits, dtype promotion, a student within 1e-3 of its
teacher, the records (by name, the docs table); and skew KL and TV together against their
float64 references, the plain formula's gradients and the CPU row blocks.

Each divergence's own tests are in its file (test_kl_divergence.py, test_js_divergence.py,
...); masks, reductions and `normalizer` in test_reductions.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import klx
from support import reference
from support.asserts import check_array
from support.autodiff import value_and_grads
from support.cases import divergence_cases, draw_distribution

FORMS = ("probs", "log_probs", "logits")


def test_disjoint_supports(backend):
    p = backend.asarray([[1.0, 0.0], [0.5, 0.5]])
    q = backend.asarray([[0.0, 1.0], [0.5, 0.5]])
    kl = backend.to_numpy(klx.kl_divergence(p, q))
    js = backend.to_numpy(klx.js_divergence(p, q))
    assert kl[0] == np.inf
    assert kl[1] == 0.0
    np.testing.assert_allclose(js, [np.log(2), 0.0], rtol=1e-15)


def test_nan_propagates(backend):
    p = backend.asarray([[0.0, 1.0], [0.5, 0.5]])
    q = backend.asarray([[np.nan, 1.0], [0.5, 0.5]])
    kl = backend.to_numpy(klx.kl_divergence(p, q))
    assert np.isnan(kl[0])
    assert kl[1] == 0.0
    js = backend.to_numpy(klx.js_divergence(p, q))
    assert np.isnan(js[0])


@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_finite_with_masks_and_neginf_logits(backend):
    rng = np.random.default_rng(5)
    t = rng.normal(size=(4, 6))
    s = rng.normal(size=(4, 6))
    t[:, 3] = -np.inf  # a masked vocabulary entry in both
    s[:, 3] = -np.inf
    t[2] = np.nan  # a padding row
    s[2] = -np.inf
    keep = np.array([True, True, False, True])

    t[0, 1] = -np.inf  # P is 0 where Q is not (the mixture at beta = 1 is P: 0 there)

    def loss(a, b, kind):
        common = {
            "p_form": "logits",
            "q_form": "logits",
            "temperature": 2.0,
            "where": backend.asarray(keep),
            "reduction": "batchmean",
        }
        if kind == "kl":
            return klx.kl_divergence(a, b, **common)
        return klx.js_divergence(a, b, beta=float(kind[2:]), **common)  # "js0.5": beta 0.5

    for kind in ("kl", "js0.5", "js0", "js1"):
        if backend.name == "torch":
            a = backend.asarray(t).requires_grad_(True)
            b = backend.asarray(s).requires_grad_(True)
            value = loss(a, b, kind)
            value.backward()
            value = value.detach()
            ga, gb = backend.to_numpy(a.grad), backend.to_numpy(b.grad)
        else:
            import jax

            value, (ga, gb) = jax.value_and_grad(loss, argnums=(0, 1))(
                backend.asarray(t), backend.asarray(s), kind
            )
            ga, gb = np.asarray(ga), np.asarray(gb)
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
        assert np.all(ga[2] == 0) and np.all(gb[2] == 0), "a masked row gets no gradient"
        assert np.all(ga[:, 3] == 0) and np.all(gb[:, 3] == 0)
    # d KL / d s = (softmax(s/T) - softmax(t/T)) / T / (kept rows), on kept rows.
    ps = np.exp(reference.log_softmax(s, -1, 2.0))
    pt = np.exp(reference.log_softmax(t, -1, 2.0))
    if backend.name == "torch":
        b = backend.asarray(s).requires_grad_(True)
        loss(backend.asarray(t), b, "kl").backward()
        g = backend.to_numpy(b.grad)
    else:
        import jax

        g = np.asarray(jax.grad(lambda b: loss(backend.asarray(t), b, "kl"))(backend.asarray(s)))
    rows = keep.nonzero()[0]
    np.testing.assert_allclose(g[rows], ((ps - pt) / 2.0 / keep.sum())[rows], atol=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "out"), [("float32", "float64", "float64"), ("float64", "float32", "float64")]
)
def test_mixed_dtypes_promote_as_the_standard_says(backend, a, b, out):
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    q = np.array([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    x, y = backend.asarray(np.log(q), a), backend.asarray(p, b)
    for result in (
        klx.kl_div(x, y, reduction="sum"),
        klx.kl_divergence(y, x, q_form="log_probs"),
        klx.js_divergence(y, x, q_form="log_probs", reduction="batchmean"),
    ):
        assert result.dtype == backend.dtypes[out]
    ref, _ = reference.kl_div(
        np.log(q).astype(a).astype(float), p.astype(b).astype(float), "sum", False
    )
    np.testing.assert_allclose(backend.to_numpy(klx.kl_div(x, y, reduction="sum")), ref, rtol=1e-6)


def _near_rows(rng, rows, vocab, noise):
    """Teacher and student logits, the student within `noise` of the teacher and shifted."""
    t = rng.normal(scale=3.0, size=(rows, vocab))
    return t, t + noise * rng.normal(size=(rows, vocab)) + 1.5


def _near_reference(kind, form, t, s):
    """float64 KL, JS (beta 1/2) or skew KL (alpha 0.1) per row, in forms without
    cancellation, of logits `t`, `s` (normalised here) or of probabilities as given
    (summing to 1 only up to their rounding: no renormalising, as klx and scipy's rel_entr
    take them)."""
    from scipy.special import log_softmax, rel_entr

    if form == "logits":
        lp, lq = log_softmax(t, axis=-1), log_softmax(s, axis=-1)
        p, q = np.exp(lp), np.exp(lq)
        d = lp - lq
        if kind == "kl":
            return np.sum(p * (d + np.expm1(-d)), axis=-1)
        if kind == "skew_kl":
            u = np.log1p(0.9 * np.expm1(-d))  # log(m / p), m = 0.1 p + 0.9 q
            return np.sum(p * (np.expm1(u) - u), axis=-1)  # -p u + (m - p)
    else:
        p, q = t, s
        if kind == "kl":
            return np.sum(rel_entr(p, q), axis=-1)
        d = -np.log1p((q - p) / p)  # log(p / q), its q - p exact
    u = np.log1p(0.5 * np.expm1(-d))  # log(m / p)
    v = np.log1p(0.5 * np.expm1(d))  # log(m / q)
    return np.sum(-(0.5 * p * u + 0.5 * q * v), axis=-1)


@pytest.mark.parametrize(
    ("kind", "form"),
    [("kl", "logits"), ("kl", "probs"), ("js", "logits"), ("js", "probs"), ("skew_kl", "logits")],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_near_equal_rows_on_every_backend(backend, dtype, kind, form, conformance):
    """Issue 22 (the conformance matrix): a student within 1e-3 of its teacher, the common
    case late in distillation and in RL, where a cancelling formula loses every digit.
    Each value against float64 (relative to the value itself, not to a scale). Skew KL
    from logits (issue 24) was 72% off in float32: its terms -p u cancelled."""
    from scipy.special import softmax

    rng = np.random.default_rng(40)
    t, s = _near_rows(rng, 4, 32000, 1e-3)
    a, b = backend.asarray(t, dtype), backend.asarray(s, dtype)
    if form == "probs":
        a, b = (backend.asarray(softmax(backend.to_numpy(x), axis=-1), dtype) for x in (a, b))
    want = _near_reference(kind, form, backend.to_numpy(a), backend.to_numpy(b))
    fn = {"kl": klx.kl_divergence, "js": klx.js_divergence, "skew_kl": klx.skew_kl_divergence}
    options = {"alpha": 0.1} if kind == "skew_kl" else {}
    got = fn[kind](a, b, p_form=form, q_form=form, reduction="none", **options)
    check_array(backend, got, a, dtype, (4,))
    got = backend.to_numpy(got)
    err = float(np.max(np.abs(got - want) / want))
    tol = {"float32": 3e-4, "float64": 1e-12}[dtype]  # measured: 1.1e-4, 7.2e-14
    conformance(f"{backend.id} {dtype} near P = Q ({form})", f"{kind} none", err, tol, value=got)
    assert np.all(got >= 0)
    assert err <= tol, err


# --------------------------------------------------------------------------- the records


@pytest.mark.parametrize("name", list(divergence_cases()))
def test_divergence_by_name_is_the_public_function(backend, xp, name):
    """``klx.divergence(p, q, name)`` (and each alias) is the record's public function, and
    both match the float64 reference: the records, not a hand list, name the divergences."""
    fn, options, ref_rows = divergence_cases({"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}})[name]
    rng = np.random.default_rng(11)
    p, _ = draw_distribution(rng, (3, 6), -1, "probs", zeros=True)
    q, _ = draw_distribution(rng, (3, 6), -1, "probs")
    bp, bq = backend.asarray(p), backend.asarray(q)
    want = ref_rows(p, q)
    got = fn(bp, bq, **options)
    check_array(backend, got, bp, "float64", (3,))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-12, atol=1e-15)
    from klx._divergence_table import DIVERGENCES

    for kind in (name, *DIVERGENCES[name].aliases):
        by_name = klx.divergence(bp, bq, kind, **options)
        np.testing.assert_array_equal(backend.to_numpy(by_name), backend.to_numpy(got))


@pytest.mark.parametrize("name", list(divergence_cases()))
def test_zero_at_equal_distributions_as_the_record_says(backend, name):
    """D(P, P) is 0 (up to rounding) for every record whose ``zero_at_equal`` says so; for
    the others (the cross-entropy, H(P) there) it is the reference's value."""
    from klx._divergence_table import DIVERGENCES

    fn, options, ref_rows = divergence_cases()[name]
    rng = np.random.default_rng(12)
    p, _ = draw_distribution(rng, (4, 7), -1, "probs", zeros=True)
    bp = backend.asarray(p)
    got = backend.to_numpy(fn(bp, bp, **options))
    if DIVERGENCES[name].zero_at_equal:
        assert np.all(np.abs(got) <= 4 * np.finfo(np.float64).eps), got
    else:
        np.testing.assert_allclose(got, ref_rows(p, p), rtol=1e-13)
        assert np.all(got > 0)


def test_docs_divergence_table_is_the_records():
    from klx import _divergence_table

    text = (Path(__file__).parents[2] / "docs" / "divergences.md").read_text()
    begin, end = "<!-- divergence-table: begin -->\n", "\n<!-- divergence-table: end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == _divergence_table.markdown_table(), (
        "docs/divergences.md is out of date: paste klx._divergence_table.markdown_table()"
    )


# --------------------------------------------------------------------------- skew KL and TV


def _rows(kind, p, q, axis, alpha):
    if kind == "tv":
        return reference.tv_rows(p, q, axis)
    return reference.skew_kl_rows(p, q, axis, alpha)


def _call(kind, p, q, alpha, **kwargs):
    if kind == "tv":
        return klx.tv_distance(p, q, **kwargs)
    return klx.skew_kl_divergence(p, q, alpha=alpha, **kwargs)


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


def test_nan_propagates_and_disjoint_tv(backend):
    p = backend.asarray([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    q = backend.asarray([[np.nan, 1.0], [0.5, 0.5], [0.0, 1.0]])
    for kind in ("skew_kl", "tv"):
        got = backend.to_numpy(_call(kind, p, q, 0.25))
        assert np.isnan(got[0]), f"{kind}: NaN in Q where P is 0 propagates"
        assert abs(got[1]) <= 4 * np.finfo(np.float64).eps, "0 for P = Q, up to rounding"
    np.testing.assert_allclose(backend.to_numpy(klx.tv_distance(p, q))[2], 1.0, rtol=1e-15)


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

    value, ga, gb = value_and_grads(backend, ours, a, b)
    ref_value, ra, rb = value_and_grads(
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

    value, ga, gb = value_and_grads(backend, ours, t, s)
    assert np.isfinite(value)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.all(ga[2] == 0) and np.all(gb[2] == 0), "a masked row gets no gradient"
    assert np.all(ga[:, 3] == 0) and np.all(gb[:, 3] == 0)
    # Rows without -inf other than the shared one: the plain formula's gradient.
    rows = [3, 4]
    cols = [0, 1, 2, 4, 5]
    sub_t, sub_s = t[np.ix_(rows, cols)], s[np.ix_(rows, cols)]
    _, ra, rb = value_and_grads(
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
