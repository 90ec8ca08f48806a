"""Gradients (torch autograd, jax.grad), jax.jit, jax.vmap and torch.compile(fullgraph=True).

Gradients are compared with the analytic float64 derivatives of the pointwise terms:
d/dx [y (log y - x)] = -y and d/dy = log y - x + 1 (0 where y = 0, by klx's convention),
d/dx [e^y (y - x)] = -e^y and d/dy = e^y (y - x + 1).
"""

from __future__ import annotations

import numpy as np
import pytest

import klx
from support import reference
from support.cases import divergence_cases, kl_div_case, top_k_case


def analytic_grads(x, y, log_target):
    with np.errstate(all="ignore"):
        if log_target:
            p = np.exp(y)
            gx = -p
            gy = np.where(p == 0, 0.0, p * (y - x + 1))
        else:
            gx = -y
            gy = np.where(y == 0, 0.0, np.log(np.where(y == 0, 1, y)) - x + 1)
    return gx, gy


@pytest.mark.parametrize("case", ["random", "neginf_input", "zeros_in_target"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.backends("torch", "jax", reason="autodiff: torch autograd and jax.grad")
def test_gradients_match_analytic(backend, case, log_target):
    log_q, p = kl_div_case(case)
    with np.errstate(divide="ignore"):
        y_np = np.log(p) if log_target else p
    gx_ref, gy_ref = analytic_grads(log_q, y_np, log_target)
    if backend.name == "torch":
        x = backend.asarray(log_q).requires_grad_(True)
        y = backend.asarray(y_np).requires_grad_(True)
        klx.kl_div(x, y, reduction="sum", log_target=log_target).backward()
        gx, gy = backend.to_numpy(x.grad), backend.to_numpy(y.grad)
    else:
        import jax

        def f(a, b):
            return klx.kl_div(a, b, reduction="sum", log_target=log_target)

        gx, gy = jax.jit(jax.grad(f, argnums=(0, 1)))(backend.asarray(log_q), backend.asarray(y_np))
        gx, gy = np.asarray(gx), np.asarray(gy)
    assert np.all(np.isfinite(gx)), "gradient w.r.t. input must be finite (torch gives NaN)"
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-14)
    finite = np.isfinite(gy_ref)
    assert np.all(np.isfinite(gy[finite]))
    np.testing.assert_allclose(gy[finite], gy_ref[finite], rtol=1e-10, atol=1e-12)


@pytest.mark.backends("torch", reason="compares with torch's own gradient")
def test_torch_gradient_zero_target_is_finite_where_torch_is_nan(backend):
    import torch
    import torch.nn.functional as F

    x = torch.tensor([-1.0, -np.inf], requires_grad=True)
    y = torch.tensor([0.0, 0.0], requires_grad=True)
    F.kl_div(x, y, reduction="sum").backward()
    assert torch.isnan(y.grad).any() or torch.isnan(x.grad).any(), "torch's NaN, for contrast"
    x.grad, y.grad = None, None
    klx.kl_div(x, y, reduction="sum").backward()
    assert torch.equal(x.grad, torch.zeros(2)) and torch.equal(y.grad, torch.zeros(2))


@pytest.mark.backends("jax", reason="JAX transforms")
def test_jax_jit_vmap_grad_kl_divergence(backend):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 7))
    t = rng.normal(size=(5, 7))
    t[:, 2] = -np.inf  # a masked vocabulary entry
    f = jax.jit(lambda a, b: klx.kl_divergence(a, b, p_form="logits", q_form="logits"))
    rows = f(jnp.asarray(t), jnp.asarray(s))
    per_row = jax.vmap(lambda a, b: klx.kl_divergence(a, b, p_form="logits", q_form="logits"))(
        jnp.asarray(t), jnp.asarray(s)
    )
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(rows), rtol=1e-13)
    from scipy.special import log_softmax, rel_entr

    ref = rel_entr(np.exp(log_softmax(t, axis=-1)), np.exp(log_softmax(s, axis=-1))).sum(-1)
    np.testing.assert_allclose(np.asarray(rows), ref, rtol=1e-12)
    g_t, g_s = jax.grad(
        lambda a, b: klx.kl_divergence(a, b, p_form="logits", q_form="logits", reduction="sum"),
        argnums=(0, 1),
    )(jnp.asarray(t), jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(g_t))) and np.all(np.isfinite(np.asarray(g_s)))
    # d KL / d s = softmax(s) - softmax(t), per row.
    soft = np.exp(log_softmax(s, -1)) - np.exp(log_softmax(t, -1))
    np.testing.assert_allclose(np.asarray(g_s), soft, atol=1e-13)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile")
def test_torch_compile_fullgraph(backend):
    import torch

    torch._dynamo.reset()
    log_q, p = kl_div_case("neginf_input")
    x, y = torch.from_numpy(log_q).float(), torch.from_numpy(p).float()

    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[1] = False

    def masked_js(a):  # JS between rows and reversed rows, from logits, one row masked
        return klx.js_divergence(
            a,
            a.flip(0),
            p_form="logits",
            q_form="logits",
            temperature=2.0,
            where=keep,
            reduction="batchmean",
        )

    @torch.compile(fullgraph=True)
    def loss(a, b):
        return (
            klx.kl_div(a, b, reduction="batchmean"),
            klx.kl_divergence(b, a, q_form="log_probs", reduction="sum"),
            masked_js(a),
        )

    got_div, got_kl, got_js = loss(x, y)
    eager_js = masked_js(x)
    np.testing.assert_allclose(got_js.item(), eager_js.item(), rtol=1e-5)
    ref_div = klx.kl_div(x, y, reduction="batchmean")
    ref, _ = reference.kl_div(log_q, p, "sum", log_target=False)
    assert got_div.dtype == torch.float32 and got_div.shape == ()
    np.testing.assert_allclose(got_div.item(), ref / p.shape[0], rtol=1e-5)
    np.testing.assert_allclose(got_div.item(), ref_div.item(), rtol=1e-6)
    np.testing.assert_allclose(got_kl.item(), ref, rtol=1e-5)


@pytest.mark.backends("jax", reason="jax.custom_jvp")
def test_jax_kl_from_logits_derivatives_in_closed_form(backend):
    """Issue 24: KL from two logits on JAX takes its derivative in closed form (a
    custom_jvp). The value is the definition's to the bit; the gradient matches the float64
    closed form ((q - p) / T, p (d - KL) / T) and autodiff of the definition; forward mode,
    the Hessian and vmap work; dropped distributions get exactly 0, even holding NaN."""
    import jax
    import jax.numpy as jnp
    from scipy.special import log_softmax

    import klx

    rng = np.random.default_rng(24)
    t, s = 2.0 * rng.normal(size=(5, 7)), 2.0 * rng.normal(size=(5, 7))
    t[0, 3] = t[1, 2] = s[1, 2] = -np.inf  # zero teacher mass; both zero
    t[2] = np.nan  # a dropped distribution's garbage
    keep = np.array([True, True, False, True, True])
    temperature = 1.5

    def f(a, b, red="batchmean"):
        return klx.kl_divergence(
            a,
            b,
            p_form="logits",
            q_form="logits",
            temperature=temperature,
            where=jnp.asarray(keep),
            reduction=red,
        )

    a, b = jnp.asarray(t), jnp.asarray(s)
    assert klx.explain(f, a, b).chosen == "jax-closed-form"
    klx.set_accelerators(False)
    try:
        want_v = f(a, b)
        want_h = jax.hessian(lambda y: f(a, y))(b)
    finally:
        klx.set_accelerators(True)
    got_v = jax.jit(f)(a, b)
    assert float(got_v) == float(want_v)  # the definition's value, to the bit
    g_t, g_s = jax.jit(jax.grad(f, argnums=(0, 1)))(a, b)
    lp, lq = log_softmax(t[keep] / temperature, -1), log_softmax(s[keep] / temperature, -1)
    p, q = np.exp(lp), np.exp(lq)
    with np.errstate(invalid="ignore"):
        d = np.where(p == 0, 0.0, lp - lq)
    kl = np.sum(p * d, -1, keepdims=True)
    n = keep.sum()
    np.testing.assert_allclose(np.asarray(g_s)[keep], (q - p) / temperature / n, atol=1e-15)
    want_t = np.where(p == 0, 0.0, p * (d - kl)) / temperature / n
    np.testing.assert_allclose(np.asarray(g_t)[keep], want_t, atol=1e-15)
    assert np.all(np.asarray(g_t)[~keep] == 0) and np.all(np.asarray(g_s)[~keep] == 0)
    np.testing.assert_allclose(jax.hessian(lambda y: f(a, y))(b), want_h, atol=1e-14)
    fwd = jax.jacfwd(lambda y: f(a, y))(b)
    np.testing.assert_allclose(fwd, g_s, atol=1e-16)
    both = jax.vmap(lambda x, y: f(x, y, "sum"))(jnp.stack([a, a]), jnp.stack([b, b]))
    assert both.shape == (2,) and float(both[0]) == float(both[1])


def _torch_value_and_grads(backend, f, x, y, traced):
    """``f(x, y)`` and the derivatives of its sum in both inputs, eagerly or inside
    torch.compile(fullgraph=True), as NumPy arrays."""
    import torch

    run = f
    if traced:
        torch._dynamo.reset()
        run = torch.compile(f, fullgraph=True)
    a = backend.asarray(x).requires_grad_(True)
    b = backend.asarray(y).requires_grad_(True)
    out = run(a, b)
    out.sum().backward()
    return backend.to_numpy(out.detach()), backend.to_numpy(a.grad), backend.to_numpy(b.grad)


def _closed_form_and_definition(backend, f, x, y, value_and_grads, traced):
    """Check that the closed-form row serves ``f(x, y)``; its ``value_and_grads`` (traced
    if asked), and the definition's (eager, with the accelerators off)."""
    row = "torch-closed-form" if backend.name == "torch" else "jax-closed-form"
    probe = backend.asarray(x)
    if backend.name == "torch":
        probe = probe.requires_grad_(True)
    assert klx.explain(f, probe, backend.asarray(y)).chosen == row
    got = value_and_grads(traced)
    klx.set_accelerators(False)
    try:
        want = value_and_grads(False)
    finally:
        klx.set_accelerators(True)
    return got, want


def _check_central_differences(reference_value, t, s, g_t, g_s, keep, h=1e-6):
    """Each finite entry of the kept distributions of `g_t` and `g_s` (the derivatives in
    `t` and `s`) against central differences of the float64 ``reference_value(t, s)``."""
    for got, x, is_t in ((g_t, t, True), (g_s, s, False)):
        for i, j in np.argwhere(np.isfinite(x) & keep[:, None]):
            up, down = x.copy(), x.copy()
            up[i, j] += h
            down[i, j] -= h
            args_up = (up, s) if is_t else (t, up)
            args_down = (down, s) if is_t else (t, down)
            fd = (reference_value(*args_up) - reference_value(*args_down)) / (2 * h)
            np.testing.assert_allclose(got[i, j], fd, rtol=1e-5, atol=1e-9)


#: The divergences whose records have a closed-form derivative from logits.
CLOSED_FORMS = divergence_cases({"js": {"beta": 0.3}, "skew_kl": {"alpha": 0.1}}, closed_form=True)


@pytest.mark.parametrize("kind", [*CLOSED_FORMS, "registered"])
@pytest.mark.backends("jax", reason="jax.jit of the closed-form rows")
def test_jax_jit_drops_distributions_holding_nan_and_infinities(backend, kind):
    """Inside jax.jit the closed-form row computes the value on the inputs as given: a
    dropped distribution's value is discarded by a select, its derivative masked in the
    rule (issue 24). Per distribution ('none'), one that `where` drops is 0 whatever it
    holds (NaN, +inf and -inf logits), and so are its gradients, under any incoming
    gradient; the kept ones match the float64 reference and central finite differences of
    it. 'registered': a copy of the Rényi record under another name, whose derivatives
    read the value (klx's own records recompute what they need of it)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from klx import _divergence_table

    name = kind
    if kind == "registered":
        record = dataclasses.replace(
            _divergence_table.lookup("renyi"), name="renyi_copy", aliases=(), public=""
        )
        klx.register_divergence(record)
        name = "renyi"
    fn, options, ref_rows = CLOSED_FORMS[name]
    rng = np.random.default_rng(29)
    t, s = 1.5 * rng.normal(size=(6, 5)), 1.5 * rng.normal(size=(6, 5))
    t[1] = np.nan  # dropped distributions' garbage
    t[2, 3], s[2] = np.inf, -np.inf
    s[4], t[4] = np.nan, -np.inf
    t[5, 1] = s[5, 1] = -np.inf  # (kept) a masked vocabulary entry in both
    keep = np.array([True, False, False, True, False, True])
    incoming = jnp.asarray([2.0, 1.0, -3.0, -0.5, 4.0, 1.5])
    temperature = 1.3

    def f(a, b):
        common = {"p_form": "logits", "q_form": "logits", "temperature": temperature}
        common |= {"where": jnp.asarray(keep), "reduction": "none", **options}
        if kind == "registered":
            return klx.divergence(a, b, "renyi_copy", **common)
        return fn(a, b, **common)

    def reference_rows(tt, ss):
        p = np.exp(reference.log_softmax(tt[keep], -1, temperature))
        q = np.exp(reference.log_softmax(ss[keep], -1, temperature))
        with np.errstate(divide="ignore", invalid="ignore"):
            return ref_rows(p, q)

    try:
        a, b = jnp.asarray(t), jnp.asarray(s)
        assert klx.explain(f, a, b).chosen == "jax-closed-form"
        rows = jax.jit(f)(a, b)
        weighted = jax.grad(lambda x, y: jnp.sum(incoming * f(x, y)), argnums=(0, 1))
        g_t, g_s = jax.jit(weighted)(a, b)
    finally:
        if kind == "registered":
            _divergence_table.unregister("renyi_copy")
    assert rows.dtype == jnp.float64 and rows.shape == (6,)
    rows, g_t, g_s = np.asarray(rows), np.asarray(g_t), np.asarray(g_s)
    np.testing.assert_array_equal(rows[~keep], 0.0)
    np.testing.assert_allclose(rows[keep], reference_rows(t, s), rtol=1e-12)
    assert np.all(g_t[~keep] == 0.0) and np.all(g_s[~keep] == 0.0), kind
    assert np.all(np.isfinite(g_t)) and np.all(np.isfinite(g_s))
    weights = np.asarray(incoming)[keep]
    _check_central_differences(lambda a, b: reference_rows(a, b) @ weights, t, s, g_t, g_s, keep)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile's backward of the closed-form row")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.parametrize("kind", ["js", "skew_kl", "tv", "alpha", "renyi"])
def test_compiled_transports_take_each_distributions_incoming_gradient(backend, kind, monkeypatch):
    """Inside torch.compile the derivatives that are transports run in the backward, from
    the forward's log-sum-exps and the logits made to depend on the incoming gradient
    (klx._accel.torch_closed_form._in_one_pass). Per distribution ('none'), with a
    temperature: each distribution's gradient is its incoming one times central finite
    differences of the float64 reference, and an infinite incoming gradient gives
    infinities of the derivative's signs there, as eagerly (``c * inf``), not NaN."""
    import torch

    fn, options, ref_rows = CLOSED_FORMS[kind]
    rng = np.random.default_rng(11)
    t, s = 1.5 * rng.normal(size=(3, 7)), 1.5 * rng.normal(size=(3, 7))
    temperature = 0.7
    incoming = np.array([2.0, -0.5, np.inf])

    def f(a, b):
        return fn(a, b, p_form="logits", q_form="logits", temperature=temperature, **options)

    def reference_rows(tt, ss):
        p = np.exp(reference.log_softmax(tt, -1, temperature))
        q = np.exp(reference.log_softmax(ss, -1, temperature))
        return ref_rows(p, q)

    torch._dynamo.reset()
    a = backend.asarray(t).requires_grad_(True)
    b = backend.asarray(s).requires_grad_(True)
    out = torch.compile(f, fullgraph=True)(a, b)
    assert out.shape == (3,) and out.dtype == torch.float64
    out.backward(torch.as_tensor(incoming))
    h = 1e-6
    for got, x, is_t in ((a.grad.numpy(), t, True), (b.grad.numpy(), s, False)):
        fd = np.empty_like(x)
        for i, j in np.ndindex(*x.shape):
            up, down = x.copy(), x.copy()
            up[i, j] += h
            down[i, j] -= h
            rows_up = reference_rows(up, s) if is_t else reference_rows(t, up)
            rows_down = reference_rows(down, s) if is_t else reference_rows(t, down)
            fd[i, j] = (rows_up[i] - rows_down[i]) / (2 * h)
        np.testing.assert_allclose(got[:2], incoming[:2, None] * fd[:2], rtol=1e-5, atol=1e-9)
        assert np.all(got[2] == np.sign(fd[2]) * np.inf), (kind, got[2], fd[2])
    # That path served: made to read the student's logits off by 1, the gradient moves.
    from klx._accel import torch_closed_form

    one_pass = torch_closed_form._in_one_pass

    def off_by_one(xp, call, tt, ss, scale):
        call, tt, ss = one_pass(xp, call, tt, ss, scale)
        return call, tt, ss + 1.0

    monkeypatch.setattr(torch_closed_form, "_in_one_pass", off_by_one)
    torch._dynamo.reset()
    b2 = backend.asarray(s).requires_grad_(True)
    torch.compile(f, fullgraph=True)(backend.asarray(t), b2).backward(torch.ones(3))
    assert not np.allclose(b2.grad.numpy(), fd, rtol=1e-3)  # fd: the student's, above


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CLOSED_FORMS))
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.backends("torch", "jax", reason="closed-form derivatives: torch and JAX rows")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_closed_form_derivatives_match_finite_differences(backend, kind, traced):
    """Issue 24: KL, JS and skew KL between two logits take their derivatives in closed
    form (torch: an autograd.Function, also inside torch.compile(fullgraph=True); JAX: a
    custom_jvp, also inside jax.jit). Both gradients match central finite differences of
    the float64 SciPy reference, and autodiff of the definition; the value is the
    definition's; a -inf teacher logit and a dropped distribution holding NaN are kept."""
    fn, options, ref_rows = CLOSED_FORMS[kind]
    rng = np.random.default_rng(7)
    t, s = 1.5 * rng.normal(size=(4, 9)), 1.5 * rng.normal(size=(4, 9))
    t[3] = np.nan  # a dropped distribution's garbage
    keep_np = np.array([True, True, True, False])
    keep = backend.asarray(keep_np)
    temperature = 1.3
    # a zero of P, where the divergence stays finite with one (not the reverse KL in 'mix')
    zero_of_p = t.copy()
    zero_of_p[0, 4] = -np.inf
    p0 = np.exp(reference.log_softmax(zero_of_p[:1], -1, temperature))
    q0 = np.exp(reference.log_softmax(s[:1], -1, temperature))
    if np.all(np.isfinite(ref_rows(p0, q0))):
        t = zero_of_p

    def f(a, b):
        return fn(
            a,
            b,
            p_form="logits",
            q_form="logits",
            temperature=temperature,
            where=keep,
            reduction="batchmean",
            **options,
        )

    def reference_value(tt, ss):
        p = np.exp(reference.log_softmax(tt[keep_np], -1, temperature))
        q = np.exp(reference.log_softmax(ss[keep_np], -1, temperature))
        return float(np.sum(ref_rows(p, q))) / keep_np.sum()

    def value_and_grads(use):
        if backend.name == "torch":
            out, ga, gb = _torch_value_and_grads(backend, f, t, s, use)
            return float(out), ga, gb
        import jax

        vg = jax.value_and_grad(f, argnums=(0, 1))
        out, (ga, gb) = (jax.jit(vg) if use else vg)(backend.asarray(t), backend.asarray(s))
        return float(out), np.asarray(ga), np.asarray(gb)

    got, want = _closed_form_and_definition(backend, f, t, s, value_and_grads, traced)
    (value, g_t, g_s), (want_value, want_t, want_s) = got, want
    if not traced and backend.name == "torch":
        assert value == want_value  # the definition's value, to the bit
    # (JAX stages the custom_jvp's function as one computation: XLA may fuse its rounding)
    np.testing.assert_allclose(value, want_value, rtol=1e-14)
    np.testing.assert_allclose(value, reference_value(t, s), rtol=1e-12)
    np.testing.assert_allclose(g_t, want_t, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(g_s, want_s, rtol=1e-9, atol=1e-14)
    assert np.all(g_t[~keep_np] == 0) and np.all(g_s[~keep_np] == 0)
    if t[0, 4] == -np.inf:
        assert g_t[0, 4] == 0.0  # no mass of P there, in value and derivative
    _check_central_differences(reference_value, t, s, g_t, g_s, keep_np)
    if backend.name == "torch" and not traced:  # second order: autograd of the closed form
        import torch

        hessians = []
        for on in (True, False):
            klx.set_accelerators(on)
            try:
                b = backend.asarray(s).requires_grad_(True)
                (g,) = torch.autograd.grad(f(backend.asarray(t), b), b, create_graph=True)
                hessians.append(backend.to_numpy(torch.autograd.grad(g.sum(), b)[0]))
            finally:
                klx.set_accelerators(True)
        np.testing.assert_allclose(hessians[0], hessians[1], rtol=1e-9, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.backends("torch", "jax", reason="a derivative registered with torch and JAX")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_k3_derivative_in_closed_form(backend, dtype, traced):
    """Issue 24: k3 = e^r - 1 - r (r = log q - log p) takes its derivative as expm1(r),
    one expression of r (autodiff of its branches kept their masks: 8x the formula's
    gradient inside torch.compile). Against numpy's float64 expm1, eager and traced
    (torch.compile(fullgraph=True), jax.jit), near r = 0 and far from it."""
    r = np.array([-40.0, -1.0, -0.3, -1e-3, 0.0, 1e-8, 0.3, 0.6, 5.0])
    lp_np = -np.linspace(0.5, 3.0, r.size)
    lq_np = lp_np + r
    rtol = {"float32": 2e-6, "float64": 1e-14}[dtype]

    def f(lq, lp):
        return klx.kl_estimate(lp, lq, estimator="k3", reduction="sum")

    lq, lp = backend.asarray(lq_np, dtype), backend.asarray(lp_np, dtype)
    if backend.name == "torch":
        import torch

        run = f
        if traced:
            torch._dynamo.reset()
            run = torch.compile(f, fullgraph=True)
        a, b = lq.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        run(a, b).backward()
        g_q, g_p = a.grad, b.grad
    else:
        import jax

        grad = jax.grad(f, argnums=(0, 1))
        g_q, g_p = (jax.jit(grad) if traced else grad)(lq, lp)
    assert g_q.dtype == lq.dtype and tuple(g_q.shape) == (r.size,)
    r_given = backend.to_numpy(lq).astype(np.float64) - backend.to_numpy(lp)
    want = np.expm1(r_given)
    np.testing.assert_allclose(backend.to_numpy(g_q), want, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(backend.to_numpy(g_p), -want, rtol=rtol, atol=1e-30)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile")
def test_sparse_and_estimate_torch_compile_fullgraph(backend):
    """sparse_kl_divergence and kl_estimate trace into one graph (stop_gradient included),
    equal to eager."""
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


@pytest.mark.slow
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.backends("torch", "jax", reason="closed-form derivatives: torch and JAX rows")
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
def test_kl_of_probabilities_derivatives_in_closed_form(backend, traced):
    """Issue 24: KL(P || Q) between two probability arrays takes its derivatives in closed
    form (``-p / q`` in Q, ``log(p / q) + 1`` in P; autodiff of the definition kept every
    guard's mask, 12x the formula's gradient inside torch.compile). Against those formulas
    in float64 NumPy, eagerly and traced, with zeros of P (also under zeros of Q), Q = 0
    under P > 0 and a negative P (infinite rows: derivatives 0 at these entries, as the
    definition's constants), a NaN Q under P = 0 (a NaN row, NaN derivatives), a dropped
    distribution and near-equal rows; the value is the definition's; second derivatives
    are ``p / q^2`` and ``-1 / q``."""
    rng = np.random.default_rng(11)
    p, q = rng.dirichlet(np.ones(6), size=6), rng.dirichlet(np.ones(6), size=6)
    p[0, :2] = 0.0  # zeros of P under positive Q
    p[1, 0] = q[1, 0] = 0.0  # both zero
    q[2, 3] = 0.0  # Q = 0 under P > 0: an infinite row
    p[1, 3], q[1, 3] = 0.0, np.nan  # NaN propagates, also where P is 0
    p[3, 1] = -0.1  # outside the domain
    q[4] = p[4] * (1 + 1e-4 * rng.normal(size=6))  # near P = Q
    keep_np = np.array([True, True, True, True, True, False])
    p[5] = np.nan  # a dropped distribution's garbage
    keep = backend.asarray(keep_np)

    def f(a, b):
        return klx.kl_divergence(a, b, where=keep, reduction="none")

    def value_and_grads(use):
        if backend.name == "torch":  # (a NaN sum: every row's upstream derivative is 1)
            return _torch_value_and_grads(backend, f, p, q, use)
        import jax
        import jax.numpy as jnp

        def total(a, b):
            v = f(a, b)
            return jnp.sum(v), v

        vg = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
        (_, out), (ga, gb) = (jax.jit(vg) if use else vg)(backend.asarray(p), backend.asarray(q))
        return np.asarray(out), np.asarray(ga), np.asarray(gb)

    got, want = _closed_form_and_definition(backend, f, p, q, value_and_grads, traced)
    (value, g_p, g_q), want_value = got, want[0]
    np.testing.assert_allclose(value, want_value, rtol=1e-14)  # the definition's value
    if backend.name == "torch" and traced:  # and without gradients (no stand-in logs)
        import torch

        torch._dynamo.reset()
        bare = torch.compile(f, fullgraph=True)(backend.asarray(p), backend.asarray(q))
        np.testing.assert_allclose(backend.to_numpy(bare), want_value, rtol=1e-14)
    assert value[2] == value[3] == np.inf and value[1] != value[1]  # q = 0, p < 0; NaN
    assert np.all(np.isfinite(value[[0, 4]])) and value[5] == 0.0
    ok = (p > 0) & (q > 0) & keep_np[:, None]
    undefined = (np.isnan(p) | np.isnan(q)) & keep_np[:, None]
    with np.errstate(all="ignore"):
        want_p = np.where(undefined, np.nan, np.where(ok, np.log(p / q) + 1.0, 0.0))
        want_q = np.where(undefined, np.nan, np.where(ok, -p / q, 0.0))
    np.testing.assert_allclose(g_p, want_p, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g_q, want_q, rtol=1e-12, atol=0)
    if backend.name == "torch" and not traced:  # second order: autograd of the closed form
        import torch

        a = backend.asarray(p).requires_grad_(True)
        b = backend.asarray(q).requires_grad_(True)
        out = f(a, b)
        (gb,) = torch.autograd.grad(out.sum(), b, create_graph=True)
        hq, hp = torch.autograd.grad(gb.sum(), (b, a))
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(
                backend.to_numpy(hq), np.where(ok, p / q**2, 0.0), rtol=1e-12
            )
            np.testing.assert_allclose(
                backend.to_numpy(hp), np.where(ok, -1.0 / q, 0.0), rtol=1e-12
            )
