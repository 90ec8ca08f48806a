"""The types klx's modules share: what an array, a shape and a call object are.

klx never imports an array library to annotate, so an array is ``Any`` to the type checker
(NumPy, torch, JAX, CuPy, Dask, array-api-strict and MLX arrays have no common base type);
the name says what is meant.

The call objects (a public call's arguments, checked once and frozen) are defined beside
the function that builds them: :class:`KLDivCall` and :class:`DivergenceCall` in
:mod:`klx._call`, :class:`SparseCall` in :mod:`klx._sparse`, :class:`EstimateCall` in
:mod:`klx._estimators`. Those modules import this one, so this one names them for the type
checker only and loads them on first attribute access at run time (no import cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from klx._call import DivergenceCall, KLDivCall
    from klx._estimators import EstimateCall
    from klx._sparse_call import SparseCall

__all__ = [
    "Array",
    "Call",
    "DivergenceCall",
    "EstimateCall",
    "KLDivCall",
    "Shape",
    "SparseCall",
]

#: An array of any library klx serves.
Array = Any
#: A shape; a size is None where a lazy (Dask) array does not know it yet.
Shape = tuple[int | None, ...]
#: A call the accelerator registry serves: one of :func:`klx.kl_div`, or one of a
#: divergence between distributions along an axis.
Call: TypeAlias = "KLDivCall | DivergenceCall"

_DEFINED_IN = {
    "KLDivCall": "klx._call",
    "DivergenceCall": "klx._call",
    "SparseCall": "klx._sparse",
    "EstimateCall": "klx._estimators",
}


def __getattr__(name: str) -> Any:
    """The call classes, imported from their modules when first asked for."""
    if name in _DEFINED_IN:
        import importlib

        return getattr(importlib.import_module(_DEFINED_IN[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
