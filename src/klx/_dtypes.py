"""Dtype policy: which dtype a result has, and which one it is accumulated in."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from klx._namespace import library_name

__all__ = ["accumulation_dtype", "as_array", "numpy_quiet"]


def accumulation_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float16 and bfloat16 are accumulated in float32; wider dtypes in themselves."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


#: Libraries that compute with NumPy (Dask only later, when it computes).
_NUMPY_BASED = ("numpy", "array_api_strict", "dask")


@contextlib.contextmanager
def numpy_quiet(x: Any) -> Iterator[None]:
    """Silence NumPy's floating-point warnings for `x`'s computation.

    klx's results carry ``inf`` and NaN on purpose (``p > 0`` with ``q = 0`` is ``+inf``;
    NaN inputs propagate), so NumPy's ``RuntimeWarning`` about them is noise.
    """
    if library_name(x) in _NUMPY_BASED:
        import numpy as np  # already imported: x's library runs on NumPy

        with np.errstate(all="ignore"):
            yield
    else:
        yield


def as_array(out: Any) -> Any:
    """NumPy reductions return scalars (``numpy.float64``); klx returns 0-d arrays."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(out, np.generic):
        return np.asarray(out)
    return out
