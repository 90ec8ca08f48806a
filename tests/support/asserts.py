"""Assertions and environment checks shared by the test files."""

from __future__ import annotations

import importlib.util
import os

import array_api_compat
import numpy as np
import pytest

__all__ = ["assert_within_ulps", "check_array", "cuda_route", "triton_device"]


def check_array(backend, result, like, dtype, shape) -> None:
    """Namespace, dtype, shape and device of a result."""
    if backend.name == "mlx":  # array-api-compat does not know MLX: its array type
        assert type(result) is type(like), f"{type(result)} is not {type(like)}"
    else:
        assert array_api_compat.array_namespace(result) is array_api_compat.array_namespace(like)
    assert result.dtype == backend.dtypes[dtype]
    assert tuple(result.shape) == tuple(shape)
    assert backend.device_of(result) == backend.device_of(like)
    if backend.name == "dask":
        import dask.array as da

        assert isinstance(result, da.Array), "dask results stay lazy"


def triton_device() -> str:
    """The device the Triton kernels run on here ('cuda', or 'cpu' interpreted), or skip."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the nox torch session installs it)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    return "cpu"


def cuda_route(backend, monkeypatch) -> None:
    """Let klx's CUDA paths serve this torch backend's tensors, or skip with the reason.

    On the torch-cuda backend they do already. On the torch-cpu backend: where a CUDA
    device exists the torch-cuda backend runs the test on it (skipped here, so a GPU host
    never runs CUDA paths on CPU tensors); without one, CPU tensors are seen as CUDA ones
    (the registry's test-only alias) with the kernels under TRITON_INTERPRET=1.
    """
    import torch

    from klx._accel import gates, registry

    if backend.device.type == "cuda":
        return
    if torch.cuda.is_available():
        pytest.skip("a CUDA path: the torch-cuda backend runs it on the GPU")
    triton_device()  # skips without triton or TRITON_INTERPRET=1
    monkeypatch.setitem(gates.DEVICE_ALIASES, "cpu", "cuda")
    registry.reset_checks()


def assert_within_ulps(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """float64: within 4 ulps of the value or 1e-15 absolute; float32: 1e-6 relative
    (or 1e-12 absolute). Infinities must match. Returns the worst error in units of the
    tolerance."""
    got = np.asarray(got, dtype=np.float64)
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    g, w = got[~inf], want[~inf]
    if dtype == "float64":
        tol = np.maximum(4 * np.spacing(np.abs(w)), 1e-15)
    else:
        tol = np.maximum(1e-6 * np.abs(w), 1e-12)
    ratio = np.abs(g - w) / tol
    assert np.all(ratio <= 1.0), (g, w, ratio)
    return float(ratio.max(initial=0.0))
