"""A divergence defined here, in this file alone, served by klx like its own (issue 25).

Squared Hellinger, ``H^2 = 1/2 sum (sqrt p - sqrt q)^2``, is a plain sum of terms;
Bhattacharyya, ``B = -log sum sqrt(p q)``, needs the record's finishing step (a log of a
sum, like Renyi's). Neither is in klx: each is one :class:`klx.Divergence` record below,
registered for the module's tests. They go through the public API on every backend, through
:func:`klx.fused_linear_divergence` with gradients, through the CPU row blocks and Dask's
chunks, and into :func:`klx.explain`, against float64 NumPy references written here.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import klx
from klx import _divergence_table
from support.asserts import check_array
from support.autodiff import value_and_grads


def hellinger_terms(xp, p, q):
    d = xp.sqrt(p) - xp.sqrt(q)
    return 0.5 * d * d


def bhattacharyya_terms(xp, p, q):
    return xp.sqrt(p * q)


def bhattacharyya_finish(xp, sums):
    return -xp.log(sums)


HELLINGER = klx.Divergence(
    "hellinger_sq",
    hellinger_terms,
    formula="1/2 sum (sqrt p - sqrt q)^2",
    aliases=("h2",),
    public="hellinger_sq",
)
BHATTACHARYYA = klx.Divergence(
    "bhattacharyya",
    bhattacharyya_terms,
    formula="-log sum sqrt(p q)",
    finish=bhattacharyya_finish,
)


@pytest.fixture(scope="module")
def registered():
    fns = {r.name: klx.register_divergence(r) for r in (HELLINGER, BHATTACHARYYA)}
    yield fns
    for r in (HELLINGER, BHATTACHARYYA):
        _divergence_table.unregister(r.name)


# ---------------------------------------------------------------- float64 references


def ref_rows(name, p, q, axis=-1):
    """Per-distribution values from probabilities, in float64."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if name == "hellinger_sq":
        return 0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=axis)
    return -np.log(np.sum(np.sqrt(p * q), axis=axis))


def ref_partials(name, p, q):
    """dD/dp and dD/dq per entry (rows along the last axis)."""
    if name == "hellinger_sq":  # 1 - sum sqrt(p q) on the simplex
        return -0.5 * np.sqrt(q / p), -0.5 * np.sqrt(p / q)
    s = np.sum(np.sqrt(p * q), -1, keepdims=True)
    return -0.5 * np.sqrt(q / p) / s, -0.5 * np.sqrt(p / q) / s


def _probs(rng, shape, zeros=False):
    x = rng.random(shape) + 0.05
    if zeros:
        x[..., ::3] = 0.0
    return x / x.sum(-1, keepdims=True)


NAMES = ["hellinger_sq", "bhattacharyya"]
TOL = {"float32": 2e-6, "float64": 1e-13}


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)) if want.size else 0.0
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- the public API


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_public_api_matches_reference(registered, backend, xp, name, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(0)
    p, q = _probs(rng, (5, 7), zeros=name == "hellinger_sq"), _probs(rng, (5, 7))
    bp, bq = backend.asarray(p, dtype), backend.asarray(q, dtype)
    got = registered[name](bp, bq)
    check_array(backend, got, bp, dtype, (5,))
    _close(backend.to_numpy(got), ref_rows(name, p, q), TOL[dtype])
    # by its name (and alias) through klx.divergence, reduced
    for kind in (name, *(("h2",) if name == "hellinger_sq" else ())):
        total = klx.divergence(bp, bq, kind, reduction="batchmean")
        check_array(backend, total, bp, dtype, ())
        _close(backend.to_numpy(total), ref_rows(name, p, q).mean(), TOL[dtype])


@pytest.mark.parametrize("name", NAMES)
def test_forms_axis_temperature_and_mask(registered, backend, xp, name):
    """Logits at a temperature along axis 0, log-probabilities, and a `where` mask."""
    rng = np.random.default_rng(1)
    zp, zq = rng.normal(size=(6, 4)) * 2, rng.normal(size=(6, 4)) * 2
    t = 1.7
    p, q = special.softmax(zp / t, axis=0), special.softmax(zq / t, axis=0)
    keep = np.array([True, False, True, True])
    want = np.where(keep, ref_rows(name, p, q, axis=0), 0.0)
    fn = registered[name]
    got = fn(
        backend.asarray(zp),
        backend.asarray(zq),
        axis=0,
        p_form="logits",
        q_form="logits",
        temperature=t,
        where=backend.asarray(keep),
    )
    check_array(backend, got, backend.asarray(zp), "float64", (4,))
    _close(backend.to_numpy(got), want, 1e-13)
    logs = fn(
        backend.asarray(np.log(p.T)),
        backend.asarray(np.log(q.T)),
        p_form="log_probs",
        q_form="log_probs",
    )
    _close(backend.to_numpy(logs), ref_rows(name, p, q, axis=0), 1e-13)
    # a NaN in a dropped row stays out of the result
    p_nan = p.T.copy()
    p_nan[1, 0] = np.nan
    masked = fn(
        backend.asarray(p_nan), backend.asarray(q.T), where=backend.asarray(keep), reduction="sum"
    )
    _close(backend.to_numpy(masked), want.sum(), 1e-13)


def test_options_and_names_are_checked(registered):
    p = np.array([0.5, 0.5])
    with pytest.raises(TypeError, match="`beta` is not an option of the divergence 'hellinger_sq'"):
        klx.divergence(p, p, "hellinger_sq", beta=0.3)
    with pytest.raises(ValueError, match="'hellinger_sq'.*'h2'"):
        klx.divergence(p, p, "hellinger")
    with pytest.raises(ValueError, match="the divergence name 'hellinger_sq' is taken"):
        klx.register_divergence(HELLINGER)
    with pytest.raises(ValueError, match="the divergence name 'tvd' is taken by 'tv'"):
        klx.register_divergence(klx.Divergence("other", hellinger_terms, aliases=("tvd",)))
    with pytest.raises(ValueError, match="`reads`"):
        klx.Divergence("bad", hellinger_terms, reads="logits")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        klx.divergence(p, p, "hellinger")
    with pytest.raises(TypeError, match="`kind` must be a divergence's name"):
        klx.divergence(p, p, 3)


def test_records_are_checked_and_names_of_klx_kernels_are_kept(registered):
    """Review findings: klx's own names select its kernels, so no other record may take
    them; records hash as they compare (their derivative included); fields are tuples."""
    p = np.array([0.25, 0.75])
    with pytest.raises(ValueError, match="'kl' is one of klx's own divergences"):
        klx.register_divergence(klx.Divergence("kl", hellinger_terms), replace=True)
    impostor = klx.Divergence("kl", hellinger_terms)
    with pytest.raises(ValueError, match="uses the name 'kl' of the registered divergence"):
        klx.divergence(p, p, impostor)
    a = klx.Divergence("twin", hellinger_terms, aliases=["tw"])  # a list: stored as a tuple
    assert a.aliases == ("tw",) and hash(a) == hash(
        klx.Divergence("twin", hellinger_terms, aliases=("tw",))
    )
    b = klx.Divergence("twin", hellinger_terms, logits_derivatives=lambda *a, **k: (None, None))
    assert a != b
    with pytest.raises(TypeError, match="`aliases`"):
        klx.Divergence("bad", hellinger_terms, aliases="hx")
    with pytest.raises(ValueError, match="the option 'temperature' of 'bad' is an argument"):
        klx.Divergence(
            "bad", hellinger_terms, options=(klx.Option("temperature", 1.0, lambda n, v: v),)
        )
    # an unregistered record of its own name works anywhere a name does
    loose = klx.Divergence("loose_h2", hellinger_terms)
    q = np.array([0.5, 0.5])
    np.testing.assert_allclose(klx.divergence(p, q, loose), ref_rows("hellinger_sq", p, q))
    a_ = _fused_case()
    want, _ = _fused_reference("hellinger_sq", a_, 1.0)
    got = klx.fused_linear_divergence(*(a_[k] for k in ORDER), divergence=loose, reduction="sum")
    _close(got, want, 1e-12)


def test_register_and_lookup_from_threads(registered):
    """The table is swapped whole under a lock: readers in other threads never fail."""
    import threading

    errors = []
    stop = threading.Event()

    def read():
        try:
            while not stop.is_set():
                _divergence_table.lookup("hellinger_sq")
                _divergence_table.names()
        except Exception as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            klx.register_divergence(klx.Divergence(f"tmp_{i}", hellinger_terms))
            _divergence_table.unregister(f"tmp_{i}")
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert not any(n.startswith("tmp_") for n in _divergence_table.names())


# ---------------------------------------------------------------- accelerators, Dask, explain


@pytest.mark.backends("numpy", "torch", reason="the CPU row blocks serve NumPy and torch")
@pytest.mark.parametrize("name", NAMES)
def test_cpu_row_blocks_serve_it(registered, backend, name):
    """At 2^20 elements the CPU row blocks take any divergence: explain says so, and the
    value (rows in pieces, the finishing step per row) matches the reference."""
    rng = np.random.default_rng(2)
    p, q = _probs(rng, (1024, 1024)), _probs(rng, (1024, 1024))
    bp, bq = backend.asarray(p), backend.asarray(q)
    report = klx.explain(registered[name], bp, bq, reduction="sum")
    assert report.chosen == ("numpy-rows" if backend.name == "numpy" else "torch-cpu-rows")
    assert report.function == name
    _close(backend.to_numpy(report.result), ref_rows(name, p, q).sum(), 1e-12)
    small = klx.explain(registered[name], bp[:2, :8], bq[:2, :8])
    assert small.chosen == "definition"


@pytest.mark.backends("dask", reason="Dask's chunks, each by the NumPy row blocks")
@pytest.mark.parametrize("name", NAMES)
def test_dask_chunks_serve_it(registered, backend, name):
    rng = np.random.default_rng(3)
    p, q = _probs(rng, (9, 6)), _probs(rng, (9, 6))
    bp, bq = backend.asarray(p), backend.asarray(q)
    report = klx.explain(registered[name], bp, bq)
    assert report.chosen == "dask-rows"
    check_array(backend, report.result, bp, "float64", (9,))
    _close(backend.to_numpy(report.result), ref_rows(name, p, q), 1e-13)


@pytest.mark.backends("torch", "jax", reason="the closed-form rows need a record's derivative")
def test_closed_form_rows_refuse_it_and_autodiff_serves(registered, backend, xp):
    rng = np.random.default_rng(4)
    zp, zq = backend.asarray(rng.normal(size=(3, 5))), backend.asarray(rng.normal(size=(3, 5)))
    report = klx.explain(registered["hellinger_sq"], zp, zq, p_form="logits", q_form="logits")
    refused = dict(report.refused)
    row = f"{backend.name}-closed-form"
    assert "has no closed-form derivative" in refused[row], str(report)


# ---------------------------------------------------------------- fused linear, with gradients


TOKENS, H_P, H_Q, VOCAB = 6, 5, 4, 9


def _fused_case():
    rng = np.random.default_rng(5)
    return {
        "p_hidden": rng.normal(size=(TOKENS, H_P)),
        "p_weight": rng.normal(size=(VOCAB, H_P)) * 0.7,
        "q_hidden": rng.normal(size=(TOKENS, H_Q)),
        "q_weight": rng.normal(size=(VOCAB, H_Q)) * 0.7,
    }


def _fused_reference(name, a, t):
    """The summed divergence and its gradients w.r.t. the four arrays (float64)."""
    zp, zq = a["p_hidden"] @ a["p_weight"].T, a["q_hidden"] @ a["q_weight"].T
    p, q = special.softmax(zp / t, -1), special.softmax(zq / t, -1)
    gp, gq = ref_partials(name, p, q)
    dzp = p * (gp - np.sum(p * gp, -1, keepdims=True)) / t  # through the softmax
    dzq = q * (gq - np.sum(q * gq, -1, keepdims=True)) / t
    grads = {
        "p_hidden": dzp @ a["p_weight"],
        "p_weight": dzp.T @ a["p_hidden"],
        "q_hidden": dzq @ a["q_weight"],
        "q_weight": dzq.T @ a["q_hidden"],
    }
    return ref_rows(name, p, q).sum(), grads


ORDER = ("p_hidden", "p_weight", "q_hidden", "q_weight")


@pytest.mark.parametrize("name", NAMES)
def test_fused_linear_value(registered, backend, xp, name):
    a = _fused_case()
    want, _ = _fused_reference(name, a, 1.5)
    args = [backend.asarray(a[k]) for k in ORDER]
    got = klx.fused_linear_divergence(
        *args, divergence=name, temperature=1.5, reduction="sum", chunk_size=4
    )
    check_array(backend, got, args[2], "float64", ())
    _close(backend.to_numpy(got), want, 1e-12)


@pytest.mark.backends("torch", "jax", reason="gradients: torch autograd and jax.grad")
@pytest.mark.parametrize("name", NAMES)
def test_fused_linear_gradients(registered, backend, name):
    a = _fused_case()
    want, want_grads = _fused_reference(name, a, 1.5)
    kw = {"divergence": name, "temperature": 1.5, "reduction": "sum", "chunk_size": 4}
    if backend.name == "torch":
        args = [backend.asarray(a[k]).requires_grad_(True) for k in ORDER]
        out = klx.fused_linear_divergence(*args, **kw)
        out.backward()
        grads = {k: backend.to_numpy(x.grad) for k, x in zip(ORDER, args, strict=True)}
    else:
        import jax

        def f(*args):
            return klx.fused_linear_divergence(*args, **kw)

        out, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(
            *[backend.asarray(a[k]) for k in ORDER]
        )
        grads = {k: np.asarray(x, np.float64) for k, x in zip(ORDER, g, strict=True)}
    _close(backend.to_numpy(out), want, 1e-12)
    for k in ORDER:
        _close(grads[k], want_grads[k], 1e-10)


# ---------------------------------------------------------------- traced


@pytest.mark.backends("torch", "jax", reason="autodiff of a registered divergence")
def test_float32_gradient_from_logits_to_rounding(registered, backend):
    """A record without closed-form derivatives is differentiated through klx's
    log-softmax, whose shift by each row's maximum is a constant for autodiff (the
    log-softmax does not depend on it): through the maximum, autodiff added the float32
    rounding of ``sum(softmax) - 1`` times a row's cotangents at its maximum, 2e-6 of the
    gradient's largest entry at 64 x 8192 (torch and jax.jit), now 2e-7. Against float64
    softmaxes (SciPy) and the analytic derivative of squared Hellinger."""
    rng = np.random.default_rng(4)
    zp = (2.0 * rng.normal(size=(64, 8192))).astype(np.float32)
    zq = (2.0 * rng.normal(size=(64, 8192))).astype(np.float32)
    fn = registered["hellinger_sq"]

    def total(b):
        a = backend.asarray(zp, "float32")
        return fn(a, b, p_form="logits", q_form="logits", reduction="sum")

    if backend.name == "torch":
        b = backend.asarray(zq, "float32").requires_grad_(True)
        total(b).backward()
        grad = b.grad
    else:
        import jax

        grad = jax.jit(jax.grad(total))(backend.asarray(zq, "float32"))
    assert str(grad.dtype).endswith("float32")
    got = backend.to_numpy(grad)
    p = special.softmax(zp.astype(np.float64), -1)
    q = special.softmax(zq.astype(np.float64), -1)
    # d/dq of 1/2 (sqrt p - sqrt q)^2 is (1 - sqrt(p / q)) / 2, through the softmax
    g = 0.5 * (1.0 - np.sqrt(p / q))
    want = q * (g - np.sum(q * g, -1, keepdims=True))
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 5e-7, err


@pytest.mark.backends("torch", "jax", reason="autodiff of a registered divergence")
def test_gradient_at_tied_maxima(registered, backend):
    """Through klx's log-softmax, whose maximum is a constant for autodiff, logits tied
    at their maximum (two, three, every one) get the analytic gradient, float64."""
    zp = np.array(
        [[0.3, -1.0, 2.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 0.5, 1.0]]
    )
    zq = np.array([[2.0, 2.0, -1.0, 0.0, 2.0], [3.0, 3.0, 0.0, -2.0, 1.0], [0.7] * 5])
    fn = registered["hellinger_sq"]

    def total(b):
        return fn(backend.asarray(zp), b, p_form="logits", q_form="logits", reduction="sum")

    _, got = value_and_grads(backend, total, zq)
    p, q = special.softmax(zp, -1), special.softmax(zq, -1)
    g = 0.5 * (1.0 - np.sqrt(p / q))
    np.testing.assert_allclose(got, q * (g - np.sum(q * g, -1, keepdims=True)), atol=1e-15)


@pytest.mark.backends("jax", reason="jax.jit and jax.grad of a registered divergence")
def test_inside_jax_jit_and_grad(registered, backend, xp):
    import jax

    rng = np.random.default_rng(6)
    zp, zq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    p, q = special.softmax(zp, -1), special.softmax(zq, -1)
    fn = registered["bhattacharyya"]

    def total(s):
        return fn(backend.asarray(zp), s, p_form="logits", q_form="logits", reduction="sum")

    value, grad = jax.jit(jax.value_and_grad(total))(backend.asarray(zq))
    _close(np.asarray(value), ref_rows("bhattacharyya", p, q).sum(), 1e-13)
    _, gq = ref_partials("bhattacharyya", p, q)
    _close(np.asarray(grad), q * (gq - np.sum(q * gq, -1, keepdims=True)), 1e-12)


@pytest.mark.slow
@pytest.mark.backends("torch", reason="torch.compile(fullgraph=True) of a registered divergence")
def test_inside_torch_compile(registered, backend):
    import torch

    rng = np.random.default_rng(7)
    zp, zq = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    p, q = special.softmax(zp, -1), special.softmax(zq, -1)
    fn = registered["hellinger_sq"]

    @torch.compile(fullgraph=True)
    def total(a, b):
        return fn(a, b, p_form="logits", q_form="logits", reduction="sum")

    s = backend.asarray(zq).requires_grad_(True)
    value = total(backend.asarray(zp), s)
    value.backward()
    _close(backend.to_numpy(value), ref_rows("hellinger_sq", p, q).sum(), 1e-13)
    _, gq = ref_partials("hellinger_sq", p, q)
    _close(backend.to_numpy(s.grad), q * (gq - np.sum(q * gq, -1, keepdims=True)), 1e-12)
