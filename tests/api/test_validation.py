"""Validation mode: the classic mistakes raise ValueError naming the mistake and the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

import klx

P = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
Q = np.array([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])


def test_valid_input_passes(backend):
    a, b = backend.asarray(np.log(Q)), backend.asarray(P)
    klx.kl_div(a, b, reduction="sum", validate=True)
    klx.kl_div(a, backend.asarray(np.log(P)), reduction="sum", log_target=True, validate=True)
    klx.kl_divergence(b, backend.asarray(Q), validate=True)
    klx.kl_divergence(b, a, q_form="log_probs", validate=True)
    klx.js_divergence(b, backend.asarray(Q), validate=True)
    klx.kl_divergence(
        backend.asarray(np.full((2, 3), 7.0)), a, p_form="logits", q_form="log_probs", validate=True
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_tolerance_scales_with_dtype(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(0)
    g = rng.gamma(1.0, size=(16, 1000))
    p = g / g.sum(-1, keepdims=True)
    # Softmax outputs rounded to the dtype still pass.
    klx.kl_divergence(backend.asarray(p, dtype), backend.asarray(p, dtype), validate=True)
    klx.kl_div(
        backend.asarray(np.log(p), dtype), backend.asarray(p, dtype), reduction="sum", validate=True
    )
    # ... while sums off by several times the documented tolerance do not
    # (2 eps(dtype) + 16 sqrt(n) eps(accumulation): 6e-5 in float32 for n = 1000).
    off_by = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 3e-4, "float64": 1e-12}[dtype]
    off = p.copy()
    off[0] *= 1 + off_by
    with pytest.raises(ValueError, match="sum to 1"):
        klx.kl_divergence(backend.asarray(off, dtype), backend.asarray(p, dtype), validate=True)


def test_probabilities_given_as_log_probabilities(backend):
    with pytest.raises(ValueError, match=r"`input` must hold log-probabilities.*pass their log"):
        klx.kl_div(backend.asarray(Q), backend.asarray(P), reduction="batchmean", validate=True)
    with pytest.raises(ValueError, match=r"`q` must hold log-probabilities"):
        klx.kl_divergence(backend.asarray(P), backend.asarray(Q), q_form="log_probs", validate=True)
    with pytest.raises(ValueError, match=r"`target` must hold log-probabilities.*log_target=False"):
        klx.kl_div(
            backend.asarray(np.log(Q)),
            backend.asarray(P),
            reduction="sum",
            log_target=True,
            validate=True,
        )


def test_small_probabilities_given_as_log_probabilities_are_caught_by_the_sum(backend):
    # 1e-5 is below float32's tolerance for 100000 entries (6e-4), so only the sum shows it.
    uniform = np.full((2, 100_000), 1e-5)
    with pytest.raises(
        ValueError,
        match=r"log-probabilities whose exp sums to 1.*not the "
        r"probabilities themselves",
    ):
        klx.kl_div(
            backend.asarray(uniform, "float32"),
            backend.asarray(uniform, "float32"),
            reduction="sum",
            validate=True,
        )


def test_log_probabilities_given_as_probabilities(backend):
    with pytest.raises(
        ValueError,
        match=r"negative.*look like log-probabilities: pass "
        r"log_target=True",
    ):
        klx.kl_div(
            backend.asarray(np.log(Q)), backend.asarray(np.log(P)), reduction="sum", validate=True
        )
    msg = r"`p` must hold probabilities.*negative.*p_form='log_probs'"
    with pytest.raises(ValueError, match=msg):
        klx.kl_divergence(backend.asarray(np.log(P)), backend.asarray(Q), validate=True)


def test_not_summing_to_one(backend):
    with pytest.raises(ValueError, match=r"`q` must hold probabilities that sum to 1 along axis 1"):
        klx.js_divergence(backend.asarray(P), backend.asarray(Q * 1.1), validate=True)
    with pytest.raises(ValueError, match=r"sum to 1 along axis 0"):
        klx.kl_divergence(backend.asarray(P.T * 2), backend.asarray(Q.T), axis=0, validate=True)


def test_negative_probabilities(backend):
    bad = P.copy()
    bad[0] = [0.6, -0.1, 0.5]
    with pytest.raises(ValueError, match=r"1 value\(s\) are negative \(the lowest is -0.1\)"):
        klx.kl_divergence(backend.asarray(bad), backend.asarray(Q), validate=True)


def test_nan_is_reported(backend):
    bad = P.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="`p` contains 1 NaN"):
        klx.kl_divergence(backend.asarray(bad), backend.asarray(Q), validate=True)


def test_masked_rows_are_not_validated(backend):
    bad = P.copy()
    bad[1] = np.nan
    keep = backend.asarray(np.array([True, False]))
    klx.kl_divergence(backend.asarray(bad), backend.asarray(Q), where=keep, validate=True)


@pytest.mark.backends("jax", reason="jax.jit tracers")
def test_under_jit_says_it_needs_concrete_arrays(backend):
    import jax

    f = jax.jit(lambda a, b: klx.kl_div(a, b, reduction="sum", validate=True))
    with pytest.raises(ValueError, match=r"traced jax array.*validate=False inside the compiled"):
        f(backend.asarray(np.log(Q)), backend.asarray(P))


@pytest.mark.backends("torch", reason="torch.compile")
def test_under_torch_compile_says_it_needs_concrete_arrays(backend):
    import torch

    torch._dynamo.reset()
    f = torch.compile(lambda a, b: klx.kl_div(a, b, reduction="sum", validate=True), fullgraph=True)
    with pytest.raises(Exception, match=r"traced torch array"):
        f(backend.asarray(np.log(Q)), backend.asarray(P))


@pytest.mark.backends("dask", reason="lazy Dask arrays")
def test_dask_validation_computes_the_checks(backend):
    klx.kl_divergence(backend.asarray(P), backend.asarray(Q), validate=True)
    with pytest.raises(ValueError, match="sum to 1"):
        klx.kl_divergence(backend.asarray(P * 2), backend.asarray(Q), validate=True)


def test_kl_div_sum_message_does_not_suggest_p_form(backend):
    x = backend.asarray(np.log([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="sum to 1") as err:
        klx.kl_div(x, backend.asarray([[2.0, 3.0]]), reduction="sum", validate=True)
    assert "p_form" not in str(err.value) and "log_softmax" in str(err.value)
    with pytest.raises(ValueError, match="exp sums to 1") as err:
        klx.kl_div(
            backend.asarray([[-3.0, -3.0]]),
            backend.asarray([[0.5, 0.5]]),
            reduction="sum",
            validate=True,
        )
    assert "p_form" not in str(err.value)


def test_inf_logits_and_empty_rows_are_caught_by_validation(backend):
    ok = backend.asarray([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"`p` holds 1 logit\(s\) equal to \+inf"):
        klx.kl_divergence(
            backend.asarray([[0.0, np.inf, 1.0], [1.0, 1.0, 1.0]]),
            ok,
            p_form="logits",
            q_form="logits",
            validate=True,
        )
    empty = [[-np.inf] * 3, [1.0, 1.0, 1.0]]
    msg = r"`q` has 1 distribution\(s\) in which every logit is -inf"
    with pytest.raises(ValueError, match=msg):
        klx.kl_divergence(
            ok, backend.asarray(empty), p_form="logits", q_form="logits", validate=True
        )
    with pytest.raises(ValueError, match=r"every log-probability is -inf") as err:
        klx.kl_divergence(
            ok,
            backend.asarray([empty[0], [-math.log(3)] * 3]),
            p_form="logits",
            q_form="log_probs",
            validate=True,
        )
    assert "nan" not in str(err.value)
    # the same row dropped by `where` is fine
    keep = backend.asarray(np.array([False, True]))
    klx.kl_divergence(
        ok, backend.asarray(empty), p_form="logits", q_form="logits", where=keep, validate=True
    )


@pytest.mark.backends("torch", reason="torch's meta device")
def test_meta_tensors_with_validation_get_a_clear_error(backend):
    import torch

    x = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"`input`.*'meta' device.*validate=False"):
        klx.kl_div(x, x, reduction="sum", validate=True)
    out = klx.kl_div(x, x, reduction="sum", validate=False)  # shapes only: fine
    assert out.device.type == "meta" and out.shape == ()
