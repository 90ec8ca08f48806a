"""The operations klx needs that the array API standard (or a wrapped library) lacks.

Each is one small function that dispatches on the array's library; everything else in
klx is written against the standard only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from klx._namespace import library_name

__all__ = ["expm1", "stop_gradient", "sum_along", "take_along_axis", "with_derivative"]

Array = Any


#: 1 / k! for k = 1 .. 11: Taylor coefficients of expm1, whose truncation after x^11 (x^7
#: in float32 and below) is exact to the dtype's rounding for |x| <= 1/8 (the first term
#: left out is below 3e-17 / 8e-10 of the sum). Beyond 1/8, exp(x) - 1 is within about
#: 8 ulps.
_EXPM1_SERIES = tuple(1.0 / math.factorial(k) for k in range(1, 12))
_EXPM1_RADIUS = 0.125


def expm1(xp: ModuleType, x: Array) -> Array:
    """``xp.expm1(x)``, accurate inside ``torch.compile`` on a CPU too.

    inductor's vectorised CPU code computes ``expm1(x)`` as ``exp(x) - 1`` (torch 2.13:
    ``expm1(1e-6)`` gives 9.54e-7, 5% off), which took klx's near-P = Q forms with it (KL
    from logits within 1e-3 of its teacher: 6e-3 off compiled, 4e-5 eager). There, a
    Horner polynomial of the Taylor series serves ``|x| <= 1/8`` (``exp(x) - 1`` beyond,
    within about 8 ulps); everywhere else the library's own ``expm1``.
    """
    if not _inductor_cpu(x):
        return xp.expm1(x)
    small = xp.abs(x) <= _EXPM1_RADIUS
    xs = xp.where(small, x, 0.0)  # the untaken branch at a safe value
    terms = _EXPM1_SERIES if x.dtype == xp.float64 else _EXPM1_SERIES[:7]
    series = xp.zeros_like(xs) + terms[-1]
    for c in reversed(terms[:-1]):
        series = series * xs + c
    return xp.where(small, series * xs, xp.exp(x) - 1.0)


def _inductor_cpu(x: Array) -> bool:
    """Whether `x` is a CPU tensor inside torch.compile (which traces this check)."""
    if library_name(x) != "torch":
        return False
    torch = sys.modules["torch"]
    return bool(torch.compiler.is_compiling()) and x.device.type == "cpu"


def with_derivative(
    xp: ModuleType,
    x: Array,
    value: Callable[[Array], Array],
    derivative: Callable[[Array], Array],
) -> Array:
    """``value(x)``, elementwise, whose derivative autodiff takes as ``derivative(x)``:
    a ``jax.custom_jvp``, or a ``torch.autograd.Function`` where a gradient is wanted
    (also inside ``torch.compile``); other libraries, ``value(x)``.

    For a function defined by branches (a series near 0, a closed form elsewhere, +inf at
    the edges), whose autodiff differentiates every branch and keeps their masks for the
    backward: ``kl_estimate``'s k3 inside torch.compile took 8x the plain formula's
    gradient.
    """
    lib = library_name(x)
    if lib == "jax":
        jax = sys.modules["jax"]
        f = jax.custom_jvp(value)  # (called, not as a decorator: typed where JAX is not)

        def jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
            (a,), (da,) = primals, tangents
            return f(a), derivative(a) * da

        f.defjvp(jvp)
        return f(x)
    if lib == "torch":
        torch = sys.modules["torch"]
        if torch.is_grad_enabled() and x.requires_grad:
            from klx._torch_derivative import WithDerivative

            return WithDerivative.apply(x, value, derivative)  # type: ignore[no-untyped-call,unused-ignore]
    return value(x)


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

    `x` and `indices` have the same rank and the same shape except along `axis`, where
    `x` may also have size 1 (broadcast against `indices`, never materialised: a (1, V)
    student gathered at (N, k) indices reads and, in torch's backward, writes V entries,
    not N x V). On Dask, `x` is rechunked to one chunk along `axis`, and each block of
    `indices` is gathered from the matching block of `x` by the chunks' own library.
    """
    lib = library_name(x)
    ax = axis % x.ndim
    spread = any(
        a != b for i, (a, b) in enumerate(zip(x.shape, indices.shape, strict=True)) if i != ax
    )
    if lib == "torch" and indices.dtype != xp.int64:
        indices = xp.astype(indices, xp.int64)  # torch gathers with int64 indices only
    if lib == "torch" and spread:
        return _take_broadcast(xp, x, indices, ax)
    if lib != "dask":
        return xp.take_along_axis(x, indices, axis=axis)
    import array_api_compat
    import dask.array as da

    if spread:  # lazily: each block is a NumPy view
        x = xp.broadcast_to(x, (*indices.shape[:ax], x.shape[ax], *indices.shape[ax + 1 :]))
    x = x.rechunk({ax: -1})
    chunks = tuple(c if i != ax else (indices.shape[ax],) for i, c in enumerate(x.chunks))
    indices = indices.rechunk(chunks)

    def gather(block: Array, idx: Array) -> Array:
        return array_api_compat.array_namespace(block).take_along_axis(block, idx, axis=ax)

    return da.map_blocks(gather, x, indices, dtype=x.dtype, chunks=indices.chunks)  # type: ignore[no-untyped-call,unused-ignore]


def _take_broadcast(xp: ModuleType, x: Array, indices: Array, ax: int) -> Array:
    """torch's gather of `indices` from an `x` of size 1 where `indices` is larger.

    One ``take`` from the flattened `x` at each index's flat position (torch's own gather
    needs `x` expanded, and its backward then fills an expanded-size gradient).
    """
    x = xp.moveaxis(x, ax, -1)
    idx = xp.moveaxis(indices, ax, -1)
    n = x.shape[-1]
    rows = xp.reshape(xp.arange(math.prod(x.shape[:-1]), device=x.device), (*x.shape[:-1], 1))
    flat = xp.reshape(rows * n + idx, (-1,))
    out = xp.take(xp.reshape(x, (-1,)), flat, axis=0)
    return xp.moveaxis(xp.reshape(out, idx.shape), -1, ax)


def sum_along(xp: ModuleType, x: Array, axis: int, keepdims: bool = False) -> Array:
    """``xp.sum(x, axis=axis)``, with a float error that grows like log n along any axis.

    NumPy adds a contiguous axis pairwise but a strided one (a leading axis of a C-order
    array) in sequence, whose float32 error grows with its length: 1.7e-5 of the terms'
    scale along axis 0 at 100000 x 4. On NumPy-backed namespaces such an axis is first
    halved pairwise (``x[:h] + x[h:]``: one pass over half the input, then a quarter, ...)
    down to 64 entries; Dask does so in each chunk. The other libraries reduce in trees
    already: their sums are kept.
    """
    n = x.shape[axis]
    ax = axis % x.ndim
    if n is None or n != n or n <= _PAIRWISE_FROM or ax == x.ndim - 1:
        return xp.sum(x, axis=axis, keepdims=keepdims)
    if xp.__name__ == "array_api_compat.dask.array":
        import dask.array as da

        return da.reduction(  # type: ignore[no-untyped-call,unused-ignore]
            x, _chunk_sum, _chunk_sum, axis=ax, keepdims=keepdims, dtype=x.dtype
        )
    if xp.__name__ not in _SEQUENTIAL_STRIDED:
        return xp.sum(x, axis=axis, keepdims=keepdims)
    lead = (slice(None),) * ax

    def at(a: int, b: int) -> tuple[Any, ...]:  # entries a:b of the axis
        return (*lead, slice(a, b), ...)

    while n > _PAIRWISE_FROM:
        h = (n + 1) // 2  # x[:h] + x[h:]; an odd entry is carried as it is
        lo, hi = x[at(0, h)], x[at(h, n)]
        pair = lo[at(0, n - h)] + hi
        x = pair if n == 2 * h else xp.concat([pair, lo[at(n - h, h)]], axis=ax)
        n = h
    return xp.sum(x, axis=ax, keepdims=keepdims)


def _chunk_sum(block: Array, axis: tuple[int, ...], keepdims: bool) -> Array:
    """One Dask chunk's (or partials') sum along its one axis, by :func:`sum_along`."""
    import array_api_compat

    return sum_along(array_api_compat.array_namespace(block), block, axis[0], keepdims)


#: Namespaces whose sum along a strided axis runs in sequence (NumPy's, and those over it).
_SEQUENTIAL_STRIDED = frozenset({"array_api_compat.numpy", "numpy", "array_api_strict"})
#: The axis length from which :func:`sum_along` halves first (NumPy's own pairwise block
#: is 128 entries; 64 keeps any sequential run at most that long).
_PAIRWISE_FROM = 64
