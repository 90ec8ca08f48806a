"""Assertions and environment checks shared by the test files."""

from __future__ import annotations

import importlib.util
import os

import array_api_compat
import pytest

__all__ = ["check_array", "triton_device"]


def check_array(backend, result, like, dtype, shape) -> None:
    """Namespace, dtype, shape and device of a result."""
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
