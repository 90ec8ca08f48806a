"""The operations klx needs that the array API standard (or a wrapped library) lacks.

Each is one small function that asks the array's library adapter (:mod:`klx._backends`);
everything else in klx is written against the standard only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from klx._backends import by_name, library
from klx._namespace import library_of
from klx._typing import Array

__all__ = [
    "at_least",
    "bare_log_serves",
    "expm1",
    "stop_gradient",
    "sum_along",
    "take_along_axis",
    "top_k_indices",
    "with_derivative",
]


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


def bare_log_serves(x: Array) -> bool:
    """Whether a term may take ``log(x)`` as it is where ``x <= 0`` (``-inf`` or NaN, a
    later `where` replacing that term), not the log of a safe stand-in: inside
    torch.compile on a CPU, for a tensor that no derivative is taken of.

    There inductor's ``log`` is a function call, and a select that feeds it took a
    compiled ``kl_div`` to 1.8x the formula's time (1.0x without). A stand-in of
    arithmetic (a maximum at the smallest subnormal) runs the log's slow subnormal path
    at every zero (5.6x with 1/8 zero targets), at the smallest normal it changes the
    terms of subnormal `x`, and a derivative in `x` needs a select either way (``log``'s
    ``1 / x`` is infinite at 0: ``0 * inf``).
    """
    if not _inductor_cpu(x):
        return False
    # (not the adapter's records_gradients: Dynamo cannot trace is_inference_mode_enabled)
    torch = sys.modules["torch"]
    return not (torch.is_grad_enabled() and x.requires_grad)


def _inductor_cpu(x: Array) -> bool:
    """Whether `x` is a CPU tensor inside torch.compile (which traces this check)."""
    lib = library(x)
    return lib is not None and lib.inductor_cpu(x)


def with_derivative(
    xp: ModuleType,
    x: Array,
    value: Callable[[Array], Array],
    derivative: Callable[[Array], Array],
) -> Array:
    """``value(x)``, elementwise, whose derivative autodiff takes as ``derivative(x)``:
    a ``jax.custom_jvp``, a ``torch.autograd.Function`` where a gradient is wanted
    (also inside ``torch.compile``); other libraries, ``value(x)`` (each library's
    adapter, :mod:`klx._backends`).

    For a function defined by branches (a series near 0, a closed form elsewhere, +inf at
    the edges), whose autodiff differentiates every branch and keeps their masks for the
    backward: ``kl_estimate``'s k3 inside torch.compile took 8x the plain formula's
    gradient.
    """
    lib = library(x)
    return value(x) if lib is None else lib.with_derivative(xp, x, value, derivative)


def stop_gradient(x: Array) -> Array:
    """`x` with the same value and no gradient: torch ``detach``, JAX ``lax.stop_gradient``.

    Libraries without automatic differentiation (NumPy, CuPy, Dask, array-api-strict)
    return `x` itself.
    """
    lib = library(x)
    return x if lib is None else lib.stop_gradient(x)


def take_along_axis(xp: ModuleType, x: Array, indices: Array, axis: int) -> Array:
    """``xp.take_along_axis`` (array API 2023.12), also for Dask, which lacks it, and for
    torch with indices of any integer dtype (each library's adapter,
    :meth:`klx._backends.Library.take_along_axis`).

    `x` and `indices` have the same rank and the same shape except along `axis`, where
    `x` may also have size 1 (broadcast against `indices`, never materialised: a (1, V)
    student gathered at (N, k) indices reads and, in torch's backward, writes V entries,
    not N x V). On Dask, `x` is rechunked to one chunk along `axis`, and each block of
    `indices` is gathered from the matching block of `x` by the chunks' own library.
    """
    ax = axis % x.ndim
    spread = any(
        a != b for i, (a, b) in enumerate(zip(x.shape, indices.shape, strict=True)) if i != ax
    )
    lib = library(x)
    if lib is None:
        return xp.take_along_axis(x, indices, axis=ax)
    return lib.take_along_axis(xp, x, indices, ax, spread)


def top_k_indices(xp: ModuleType, x: Array, k: int) -> Array:
    """The indices of the `k` largest entries of `x` along its last axis (largest first),
    which carry no gradient: torch ``topk``, ``jax.lax.top_k``, Dask's ``argtopk``, and a
    descending ``argsort`` elsewhere (the array API has no top k). The values are read
    through :func:`stop_gradient`, so no derivative is recorded for the selection.
    """
    lib = library(x)
    name = "" if lib is None else lib.name
    x = stop_gradient(x)
    if name == "torch":
        return x.topk(k, dim=-1).indices
    if name == "jax":
        import jax

        return jax.lax.top_k(x, k)[1]
    if name == "dask":
        import dask.array as da

        return da.argtopk(x, k, axis=-1)  # type: ignore[no-untyped-call, unused-ignore]
    return xp.argsort(x, axis=-1, descending=True, stable=True)[..., :k]


def sum_along(xp: ModuleType, x: Array, axis: int, keepdims: bool = False) -> Array:
    """``xp.sum(x, axis=axis)``, with a float error that grows like log n along any axis.

    NumPy adds a contiguous axis pairwise but a strided one (a leading axis of a C-order
    array) in sequence (its adapter's ``sequential_strided_sums``), whose float32 error
    grows with its length: 1.7e-5 of the terms' scale along axis 0 at 100000 x 4. On
    NumPy-backed namespaces such an axis is first
    halved pairwise (``x[:h] + x[h:]``: one pass over half the input, then a quarter, ...)
    down to 64 entries; Dask does so in each chunk. The other libraries reduce in trees
    already: their sums are kept.
    """
    n = x.shape[axis]
    ax = axis % x.ndim
    if n is None or n != n or n <= _PAIRWISE_FROM or ax == x.ndim - 1:
        return xp.sum(x, axis=axis, keepdims=keepdims)
    lib = by_name(library_of(xp))
    by_chunks = lib.reduce_chunks(x, _chunk_sum, ax, keepdims)
    if by_chunks is not None:
        return by_chunks
    if not lib.sequential_strided_sums:
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


#: The axis length from which :func:`sum_along` halves first (NumPy's own pairwise block
#: is 128 entries; 64 keeps any sequential run at most that long).
_PAIRWISE_FROM = 64


def at_least(xp: ModuleType, x: Array, low: float) -> Array:
    """``max(x, low)`` elementwise, `low` a Python float: ``xp.clip(x, min=low)`` (arithmetic
    that XLA's CPU code fuses into the reduction reading it, where it writes a `where`'s
    array out first), but ``xp.maximum`` against a 0-d array on Dask, whose
    array-api-compat ``clip`` refuses an array of unknown size (a NaN in its shape)."""
    lib = library(x)
    if lib is not None and lib.name == "dask":
        return xp.maximum(x, xp.asarray(low, dtype=x.dtype))
    return xp.clip(x, min=low)
