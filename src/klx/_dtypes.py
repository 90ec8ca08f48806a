"""Dtype policy: which dtype a result has, and which one it is accumulated in."""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType
from typing import Any

from klx._backends import LIBRARIES

__all__ = ["accumulation_dtype", "as_array", "numpy_quiet"]


def accumulation_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float16 and bfloat16 are accumulated in float32; wider dtypes in themselves."""
    key = (xp.__name__, dtype)
    acc = _ACCUMULATION.get(key)
    if acc is None:
        acc = _ACCUMULATION[key] = xp.float32 if xp.finfo(dtype).bits < 32 else dtype
    return acc


#: (namespace name, dtype) -> accumulation dtype: `finfo` costs microseconds per call.
_ACCUMULATION: dict[tuple[str, Any], Any] = {}


#: Libraries that compute with NumPy (Dask only later, when it computes), by top-level
#: package name.
_NUMPY_BASED = tuple(lib.name for lib in LIBRARIES if lib.numpy_based)


def numpy_quiet(x: Any) -> contextlib.AbstractContextManager[Any]:
    """A context that silences NumPy's floating-point warnings for `x`'s computation.

    klx's results carry ``inf`` and NaN on purpose (``p > 0`` with ``q = 0`` is ``+inf``;
    NaN inputs propagate), so NumPy's ``RuntimeWarning`` about them is noise. For arrays
    of other libraries it is a shared do-nothing context (no per-call generator).
    """
    # the defining module's top package: a string lookup, cheaper than library_name
    if type(x).__module__.partition(".")[0] in _NUMPY_BASED:
        import numpy as np  # already imported: x's library runs on NumPy

        return np.errstate(all="ignore")  # type: ignore[no-any-return,unused-ignore]
    return _QUIET


_QUIET = contextlib.nullcontext()


def as_array(out: Any) -> Any:
    """NumPy reductions return scalars (``numpy.float64``); klx returns 0-d arrays."""
    if type(out).__module__ != "numpy":  # (no read of sys.modules: see _backends.library)
        return out
    np = sys.modules.get("numpy")
    generic = getattr(np, "generic", None)  # None while another thread imports NumPy
    if generic is not None and isinstance(out, generic):
        return np.asarray(out)  # type: ignore[union-attr]
    return out
