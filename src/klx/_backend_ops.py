"""The two operations klx needs that the array API standard (or a wrapped library) lacks.

Each is one small function that dispatches on the array's library; everything else in
klx is written against the standard only.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from klx._namespace import library_name

__all__ = ["stop_gradient", "take_along_axis"]

Array = Any


def stop_gradient(x: Array) -> Array:
    """`x` with the same value and no gradient: torch ``detach``, JAX ``lax.stop_gradient``.

    Libraries without automatic differentiation (NumPy, CuPy, Dask, array-api-strict)
    return `x` itself.
    """
    lib = library_name(x)
    if lib == "torch":
        return x.detach()
    if lib == "jax":
        return sys.modules["jax"].lax.stop_gradient(x)
    return x


def take_along_axis(xp: ModuleType, x: Array, indices: Array, axis: int) -> Array:
    """``xp.take_along_axis`` (array API 2023.12), also for Dask, which lacks it, and for
    torch with indices of any integer dtype.

    `x` and `indices` have the same rank and the same shape except along `axis`. On
    Dask, `x` is rechunked to one chunk along `axis`, and each block of `indices` is
    gathered from the matching block of `x` by the chunks' own library.
    """
    lib = library_name(x)
    if lib == "torch" and indices.dtype != xp.int64:
        indices = xp.astype(indices, xp.int64)  # torch gathers with int64 indices only
    if lib != "dask":
        return xp.take_along_axis(x, indices, axis=axis)
    import array_api_compat
    import dask.array as da

    ax = axis % x.ndim
    x = x.rechunk({ax: -1})
    chunks = tuple(c if i != ax else (indices.shape[ax],) for i, c in enumerate(x.chunks))
    indices = indices.rechunk(chunks)

    def gather(block: Array, idx: Array) -> Array:
        return array_api_compat.array_namespace(block).take_along_axis(block, idx, axis=ax)

    return da.map_blocks(gather, x, indices, dtype=x.dtype, chunks=indices.chunks)  # type: ignore[no-untyped-call,unused-ignore]
