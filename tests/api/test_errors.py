"""Bad input gets a clear TypeError or ValueError naming the argument, the problem and the fix.

What every function shares (`xp`, arrays of two libraries or devices, dtypes) and the
arguments of kl_div and the divergences; sparse_kl_divergence's, kl_estimate's and
fused_linear_divergence's own arguments are tested in their files, and the values that
validation mode reads in test_validation.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import klx

P = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
LOG_Q = np.log(np.array([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]))


@pytest.mark.backends("torch", reason="mixes torch tensors with NumPy arrays")
def test_two_libraries_named(backend):
    with pytest.raises(TypeError, match=r"`input` is a numpy array, `target` is a torch array"):
        klx.kl_div(LOG_Q, backend.asarray(P), reduction="sum")
    with pytest.raises(TypeError, match=r"`p` is a torch array, `q` is a numpy array"):
        klx.kl_divergence(backend.asarray(P), P)


@pytest.mark.parametrize("bad", [[0.1, 0.9], 0.5, "0.5", None])
def test_not_an_array(bad):
    with pytest.raises(TypeError, match=r"`target` must be an array.*convert it first"):
        klx.kl_div(LOG_Q[0, :2], bad, reduction="sum")


def test_shapes_that_do_not_broadcast(backend):
    x = backend.asarray(np.zeros((2, 3)))
    y = backend.asarray(np.full((2, 4), 0.25))
    msg = re.escape(
        "`input` has shape (2, 3) and `target` has shape (2, 4), which do not broadcast"
    )
    with pytest.raises(ValueError, match=msg):
        klx.kl_div(x, y, reduction="sum")
    # different sizes along the distributions' axis: the message names the vocab option
    with pytest.raises(
        ValueError, match=re.escape("`p` has 4 entries and `q` has 3 along axis -1")
    ):
        klx.kl_divergence(y, x)
    with pytest.raises(
        ValueError, match=re.escape("`p` has shape (2, 4) and `q` has shape (3, 4)")
    ):
        klx.kl_divergence(y, backend.asarray(np.full((3, 4), 0.25)))


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [("int32", "int32"), ("int64", "int64"), ("bool", "bool"), ("complex128", "complex128")],
)
def test_non_floating_dtypes(dtype, kind):
    bad = np.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"`target` must have a real floating-point dtype.*{kind}"):
        klx.kl_div(LOG_Q, bad, reduction="sum")
    with pytest.raises(TypeError, match=rf"`q` must have a real floating-point dtype.*{kind}"):
        klx.kl_divergence(P, bad)


def test_integer_dtypes_on_every_backend(backend):
    xp = backend.xp
    ints = xp.ones((2, 3), dtype=xp.int32) if backend.name != "dask" else None
    if ints is None:
        import dask.array as da

        ints = da.ones((2, 3), dtype="int32")
    with pytest.raises(TypeError, match="`input` must have a real floating-point dtype"):
        klx.kl_div(ints, backend.asarray(P), reduction="sum")


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, 1])
def test_unknown_reduction_lists_valid_ones(reduction):
    with pytest.raises(
        ValueError, match="`reduction` must be one of 'none', 'sum', 'mean', 'batchmean'"
    ):
        klx.kl_div(LOG_Q, P, reduction=reduction)


def test_mean_is_refused_by_kl_divergence_with_the_reason():
    with pytest.raises(ValueError, match="use 'batchmean' for the mean over distributions"):
        klx.kl_divergence(P, P, reduction="mean")


def test_log_target_must_be_bool():
    with pytest.raises(TypeError, match="`log_target` must be True or False"):
        klx.kl_div(LOG_Q, P, reduction="sum", log_target="yes")


@pytest.mark.backends("torch", reason="torch devices")
def test_two_devices_torch(backend):
    import torch

    x = torch.zeros(2, 3)
    y = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"`input` is on device.*cpu.*`target` is on device.*meta"):
        klx.kl_div(x, y, reduction="sum")


@pytest.mark.backends("array_api_strict", reason="array_api_strict's several devices")
def test_two_devices_array_api_strict(backend):
    import array_api_strict as xps

    x = xps.asarray(LOG_Q, device=xps.Device("CPU_DEVICE"))
    y = xps.asarray(P, device=xps.Device("device1"))
    with pytest.raises(ValueError, match="move both to one device"):
        klx.kl_div(x, y, reduction="sum")


def test_forms_axis_temperature_beta_where():
    with pytest.raises(ValueError, match="`p_form` must be one of 'probs', 'log_probs', 'logits'"):
        klx.kl_divergence(P, P, p_form="log")
    with pytest.raises(ValueError, match="`temperature`=2.0 applies only to logits"):
        klx.kl_divergence(P, P, temperature=2.0)
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        klx.kl_divergence(P, P, p_form="logits", temperature=0.0)
    with pytest.raises(TypeError, match="`temperature` must be a positive real number"):
        klx.kl_divergence(P, P, p_form="logits", temperature="2")
    with pytest.raises(ValueError, match=r"`axis` 2 is out of range for 2-d arrays"):
        klx.kl_divergence(P, P, axis=2)
    with pytest.raises(ValueError, match=r"at least one dimension"):
        klx.kl_divergence(np.asarray(1.0), np.asarray(1.0))
    with pytest.raises(ValueError, match=r"`beta` must lie in \[0, 1\]"):
        klx.js_divergence(P, P, beta=1.5)
    with pytest.raises(TypeError, match="`where` must be a boolean array"):
        klx.kl_divergence(P, P, where=np.ones(2))
    with pytest.raises(ValueError, match=r"`where` has shape \(3,\), which does not broadcast"):
        klx.kl_divergence(P, P, where=np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="`validate` must be True, False or None"):
        klx.kl_divergence(P, P, validate="yes")


def test_inputs_never_modified(backend):
    x = backend.asarray(np.where(P > 0.15, LOG_Q, -np.inf))
    y = backend.asarray(np.where(P > 0.15, P, 0.0))
    before = backend.to_numpy(x), backend.to_numpy(y)
    for reduction in ("none", "sum", "batchmean"):
        klx.kl_div(x, y, reduction=reduction)
        klx.kl_div(x, y, reduction=reduction, log_target=True)
        klx.kl_divergence(y, x, q_form="log_probs", reduction=reduction)
        klx.js_divergence(y, x, q_form="logits", reduction=reduction)
    np.testing.assert_array_equal(backend.to_numpy(x), before[0])
    np.testing.assert_array_equal(backend.to_numpy(y), before[1])


_XP_CALLS = {
    "kl_div": lambda xp: klx.kl_div(LOG_Q, P, reduction="sum", xp=xp),
    "kl_divergence": lambda xp: klx.kl_divergence(P, P, xp=xp),
    "js_divergence": lambda xp: klx.js_divergence(P, P, xp=xp),
    "skew_kl_divergence": lambda xp: klx.skew_kl_divergence(P, P, xp=xp),
    "tv_distance": lambda xp: klx.tv_distance(P, P, xp=xp),
    "sparse_kl_divergence": lambda xp: klx.sparse_kl_divergence(
        np.zeros((2, 1), dtype=np.int64), np.zeros((2, 1)), P, xp=xp
    ),
    "kl_estimate": lambda xp: klx.kl_estimate(LOG_Q[:, 0], LOG_Q[:, 1], xp=xp),
    "fused_linear_divergence": lambda xp: klx.fused_linear_divergence(
        np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 3)), xp=xp
    ),
}


@pytest.mark.parametrize("function", list(_XP_CALLS))
def test_xp_must_be_a_namespace(function):
    """`xp='numpy'` raised AttributeError ('str' object has no attribute '__name__')."""
    with pytest.raises(TypeError, match=r"`xp` must be an array namespace .* not builtins\.str"):
        _XP_CALLS[function]("numpy")
    import array_api_compat.numpy as xp

    reference = _XP_CALLS[function](None)
    np.testing.assert_array_equal(np.asarray(_XP_CALLS[function](xp)), np.asarray(reference))


def test_numpy_numbers_and_extreme_values_get_clear_answers():
    """np.int64 chunk sizes and np.float32 clamps were refused (axis takes NumPy ints);
    normalizer=10**400 raised OverflowError; a vocabulary of 0 raised IndexError from max()."""
    rng = np.random.default_rng(0)
    h, w_p, w_q = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = klx.fused_linear_divergence(h, w_p, h, w_q, chunk_size=np.int64(2))
    np.testing.assert_array_equal(got, klx.fused_linear_divergence(h, w_p, h, w_q, chunk_size=2))
    lp, lq = np.log(np.full(3, 0.3)), np.log(np.full(3, 0.2))
    np.testing.assert_array_equal(
        klx.kl_estimate(lp, lq, clamp=np.float32(10)), klx.kl_estimate(lp, lq, clamp=10.0)
    )
    with pytest.raises(ValueError, match="`normalizer` must be a finite number >= 0"):
        klx.kl_divergence(P, P, reduction="batchmean", normalizer=10**400)
    with pytest.raises(ValueError, match=r"`q_weight` has no rows \(shape \(0, 3\)\)"):
        klx.fused_linear_divergence(h, np.zeros((0, 3)), h, np.zeros((0, 3)))


@pytest.mark.backends("torch", reason="bfloat16 weights with float32 hidden states")
def test_hidden_and_weight_of_two_dtypes(backend):
    import torch

    rng = np.random.default_rng(0)
    h = torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(5, 3)), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"`p_hidden` is torch.float32 but `p_weight` is torch"):
        klx.fused_linear_divergence(h, w, h, w)


def test_temperature_too_small_for_the_dtype_is_a_clear_error(backend):
    x = backend.asarray([[1.0, 2.0, 3.0]], "float32")
    with pytest.raises(ValueError, match=r"`temperature`=1e-45 is too small for float32"):
        klx.kl_divergence(x, x, p_form="logits", q_form="logits", temperature=1e-45)
    # float64 holds 1 / 1e-45: the right answer (one-hot P = Q)
    y = backend.asarray([[1.0, 2.0, 3.0]], "float64")
    got = klx.kl_divergence(y, y, p_form="logits", q_form="logits", temperature=1e-45)
    got = backend.to_numpy(got)
    assert got[0] == 0.0


def test_array_temperature_must_be_0d_float(backend):
    x = backend.asarray([[1.0, 2.0]])
    with pytest.raises(ValueError, match="`temperature` given as an array must be a 0-d"):
        klx.kl_divergence(
            x, x, p_form="logits", q_form="logits", temperature=backend.asarray([2.0])
        )


@pytest.mark.backends("numpy", reason="NumPy's own kinds of input")
def test_numpy_matrix_masked_arrays_and_scalars_are_refused(backend):
    p = np.array([[0.5, 0.5], [0.25, 0.75]])
    with pytest.warns(PendingDeprecationWarning):  # NumPy's own, on making a matrix
        matrix = np.asmatrix(p)
    with pytest.raises(TypeError, match=r"`p` is a numpy.matrix.*numpy.asarray"):
        klx.kl_divergence(matrix, p)
    with pytest.raises(TypeError, match=r"`q` is a NumPy masked array.*where="):
        klx.js_divergence(p, np.ma.masked_array(p, [[0, 1], [0, 0]]))
    with pytest.raises(TypeError, match=r"`target` is a NumPy masked array"):
        klx.kl_div(np.log(p), np.ma.masked_array(p))
    for scalar in (np.float64(0.5), np.float32(0.5)):
        with pytest.raises(TypeError, match=r"`input` is a NumPy scalar.*numpy.asarray"):
            klx.kl_div(scalar, np.asarray(0.5), reduction="sum")


@pytest.mark.backends("numpy", reason="NumPy arrays of ml_dtypes' bfloat16")
def test_ml_dtypes_bfloat16_numpy_arrays_get_a_clear_error(backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((2, 2), dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"`p` has dtype bfloat16.*astype\(numpy.float32\)"):
        klx.kl_divergence(x, np.ones((2, 2), np.float32))


@pytest.mark.backends("torch", reason="torch's float8 dtypes")
def test_float8_is_refused(backend):
    import torch

    x = torch.full((2, 2), 0.5, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"`p` must have a real floating.*float8 is a storage"):
        klx.kl_divergence(x, x)


def test_xp_keyword_still_checks_the_arguments(backend):
    a = backend.asarray([[0.5, 0.5]])
    with pytest.raises(TypeError, match="`p` must be an array"):
        klx.kl_divergence([[0.5, 0.5]], a, xp=backend.xp)
    with pytest.raises(TypeError, match="`input` must be an array"):
        klx.kl_div([0.5], a, xp=backend.xp)
    got = klx.kl_divergence(a, a, xp=backend.xp)
    assert backend.to_numpy(got)[0] == 0.0


def test_normalizer_errors(backend):
    p = backend.asarray([[0.5, 0.5], [0.1, 0.9]])
    for reduction in ("none", "sum"):
        with pytest.raises(ValueError, match="normalizer.*reduction='batchmean'"):
            klx.tv_distance(p, p, reduction=reduction, normalizer=4)
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="`normalizer` must be a finite number >= 0"):
            klx.kl_divergence(p, p, reduction="batchmean", normalizer=bad)
    with pytest.raises(TypeError, match="`normalizer` must be a number >= 0 or a 0-d array"):
        klx.kl_divergence(p, p, reduction="batchmean", normalizer="4")
    with pytest.raises(TypeError, match="`normalizer` must be a number"):
        klx.kl_divergence(p, p, reduction="batchmean", normalizer=True)
    with pytest.raises(ValueError, match=r"`normalizer` must be a single number.*shape \(2,\)"):
        klx.js_divergence(p, p, reduction="batchmean", normalizer=backend.asarray([1.0, 2.0]))
    with pytest.raises(TypeError, match="`normalizer` must have an integer or real floating"):
        klx.js_divergence(p, p, reduction="batchmean", normalizer=backend.asarray(np.asarray(True)))
    with pytest.raises(ValueError, match="`normalizer` must be a finite number >= 0.*-3"):
        klx.skew_kl_divergence(
            p,
            p,
            reduction="batchmean",
            normalizer=backend.asarray(np.asarray(-3.0)),
            validate=True,
        )
    if backend.name != "numpy":
        with pytest.raises(TypeError, match="one library"):
            klx.kl_divergence(p, p, reduction="batchmean", normalizer=np.asarray(4.0))


def test_alpha_errors(backend):
    p = backend.asarray([0.5, 0.5])
    with pytest.raises(ValueError, match=r"`alpha` must lie in \[0, 1\].*1.5"):
        klx.skew_kl_divergence(p, p, alpha=1.5)
    with pytest.raises(TypeError, match="`alpha` must be a real number"):
        klx.skew_kl_divergence(p, p, alpha="0.1")
