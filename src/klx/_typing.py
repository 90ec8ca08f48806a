"""The types klx's modules share: one place for what an array and a shape are.

klx never imports an array library to annotate, so an array is ``Any`` to the type checker
(NumPy, torch, JAX, CuPy, Dask, array-api-strict and MLX arrays have no common base type);
the name says what is meant.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Array", "Shape"]

#: An array of any library klx serves.
Array = Any
#: A shape; a size is None where a lazy (Dask) array does not know it yet.
Shape = tuple[int | None, ...]
