"""The array API namespace klx computes with on MLX arrays (:mod:`mlx.core`).

MLX is close to the array API standard but not compliant, and array-api-compat does not
wrap it. This module supplies the functions klx's definitions use, with the standard's
signatures: most are MLX's own; the others adapt a keyword or a missing argument
(``astype(..., copy=)``, ``sum(..., dtype=)``, ``clip(min=, max=)``, ``sort(descending=)``,
``device=`` everywhere). It is imported only when an MLX array reaches klx
(:class:`klx._backends._MLX`), never by ``import klx``.

MLX computes float64 on the CPU only (its GPU refuses it). Its ``exp`` is 8 ulps off in
float32 and float32-accurate in float64 (5e-8 relative, MLX 0.32), and its float32 ``log``
up to 0.62 ulp: :func:`exp`, :func:`log`, :func:`log1p` and :func:`expm1` are computed
more accurately (through float64 on the CPU), which klx's near-P = Q forms need. float16
and bfloat16 are accumulated in float32 as on every library.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from klx._typing import Array

__all__: list[str] = []  # a namespace: klx reads its attributes, never star-imports it

# Dtypes.
bool = mx.bool_
int8, int16, int32, int64 = mx.int8, mx.int16, mx.int32, mx.int64
uint8, uint16, uint32, uint64 = mx.uint8, mx.uint16, mx.uint32, mx.uint64
float16, bfloat16, float32, float64 = mx.float16, mx.bfloat16, mx.float32, mx.float64
finfo, isdtype, result_type = mx.finfo, mx.isdtype, mx.result_type

# Elementwise functions and manipulation with the standard's signatures already.
abs, sqrt, tanh, floor = (
    mx.abs,
    mx.sqrt,
    mx.tanh,
    mx.floor,
)
isnan, isinf, isfinite, logaddexp = mx.isnan, mx.isinf, mx.isfinite, mx.logaddexp
maximum, minimum, where, matmul = mx.maximum, mx.minimum, mx.where, mx.matmul
broadcast_to, expand_dims, squeeze, moveaxis = (
    mx.broadcast_to,
    mx.expand_dims,
    mx.squeeze,
    mx.moveaxis,
)
stack, concat, take_along_axis = mx.stack, mx.concatenate, mx.take_along_axis
any, all, max, min, argmax = mx.any, mx.all, mx.max, mx.min, mx.argmax


class iinfo:
    """``mx.iinfo`` with the standard's ``bits`` (MLX's has ``min`` and ``max`` only)."""

    def __init__(self, dtype: Any, /) -> None:
        info = mx.iinfo(dtype)
        self.min, self.max, self.dtype = info.min, info.max, dtype
        self.bits = dtype.size * 8


def astype(x: Array, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> Array:
    if not copy and x.dtype == dtype:
        return x
    return x.astype(dtype)


def asarray(
    obj: Any, /, *, dtype: Any = None, device: Any = None, copy: builtins.bool | None = None
) -> Array:
    if isinstance(obj, mx.array) and (dtype is None or obj.dtype == dtype) and not copy:
        return obj
    return mx.array(obj, dtype=dtype) if dtype is not None else mx.array(obj)


def sum(
    x: Array,
    /,
    *,
    axis: int | Sequence[int] | None = None,
    dtype: Any = None,
    keepdims: builtins.bool = False,
) -> Array:
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if x.dtype in (mx.float32, mx.float16, mx.bfloat16) and _on_cpu():
        # MLX adds float32 in sequence: KL near P = Q (terms of both signs, 2000 times
        # the sum) came out 7e-4 of itself off at 32000 entries (NumPy's pairwise: 1.1e-4)
        return mx.sum(x.astype(mx.float64), axis=axis, keepdims=keepdims).astype(x.dtype)
    return mx.sum(x, axis=axis, keepdims=keepdims)


def reshape(x: Array, /, shape: Sequence[int], *, copy: builtins.bool | None = None) -> Array:
    return mx.reshape(x, tuple(shape))


def zeros(shape: int | Sequence[int], *, dtype: Any = None, device: Any = None) -> Array:
    return mx.zeros(shape, dtype=dtype or mx.float32)


def ones(shape: int | Sequence[int], *, dtype: Any = None, device: Any = None) -> Array:
    return mx.ones(shape, dtype=dtype or mx.float32)


def zeros_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    return mx.zeros_like(x) if dtype is None else mx.zeros(x.shape, dtype=dtype)


def ones_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    return mx.ones_like(x) if dtype is None else mx.ones(x.shape, dtype=dtype)


def full(
    shape: int | Sequence[int], fill_value: Any, *, dtype: Any = None, device: Any = None
) -> Array:
    return mx.full(shape, fill_value, dtype=dtype)


def full_like(x: Array, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Array:
    return mx.full(x.shape, fill_value, dtype=x.dtype if dtype is None else dtype)


def arange(
    start: Any, /, stop: Any = None, step: Any = 1, *, dtype: Any = None, device: Any = None
) -> Array:
    if stop is None:
        start, stop = 0, start
    return mx.arange(start, stop, step, dtype=dtype) if dtype else mx.arange(start, stop, step)


def clip(x: Array, /, min: Any = None, max: Any = None) -> Array:
    return mx.clip(x, min, max)


def permute_dims(x: Array, /, axes: tuple[int, ...]) -> Array:
    return mx.transpose(x, axes)


def argsort(
    x: Array, /, *, axis: int = -1, descending: builtins.bool = False, stable: builtins.bool = True
) -> Array:
    out = mx.argsort(x, axis=axis)
    if descending:  # ties in reverse order of index: as good for a top k
        ax = axis % x.ndim
        out = out[(slice(None),) * ax + (slice(None, None, -1),)]
    return out


def take(x: Array, indices: Array, /, *, axis: int | None = None) -> Array:
    return mx.take(x, indices, axis=axis)


def sort(
    x: Array, /, *, axis: int = -1, descending: builtins.bool = False, stable: builtins.bool = True
) -> Array:
    out = mx.sort(x, axis=axis)
    if descending:
        ax = axis % x.ndim
        out = out[(slice(None),) * ax + (slice(None, None, -1),)]
    return out


_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00


def _on_cpu() -> builtins.bool:
    return builtins.bool(mx.default_device() == mx.cpu)


def _wide(f: Any, x: Array) -> Array:
    """``f(x)``, on the CPU through float64 for narrower floats: correctly rounded but
    for double rounding, where MLX's own float32 functions are 0.5-1 ulp off."""
    if x.dtype == mx.float64 or not _on_cpu():
        return f(x)
    return f(x.astype(mx.float64)).astype(x.dtype)


def log(x: Array, /) -> Array:
    """``log(x)`` (see :func:`_wide`): MLX's float32 ``log`` is up to 0.62 ulp off."""
    return _wide(mx.log, x)


def log1p(x: Array, /) -> Array:
    """``log1p(x)`` (see :func:`_wide`)."""
    return _wide(mx.log1p, x)


def expm1(x: Array, /) -> Array:
    """``expm1(x)`` (see :func:`_wide`): near P = Q, KL's terms ``p (d + expm1(-d))``
    cancel to ``p d^2 / 2``, so MLX's 1-ulp float32 ``expm1`` made KL 7e-4 of itself off
    at 32000 entries within 1e-3 (NumPy's: 1.1e-4)."""
    return _wide(mx.expm1, x)


def exp(x: Array, /) -> Array:
    """``e ** x``, within about an ulp: MLX's own is 8 ulps off in float32 and float32-
    accurate in float64. In float64 as ``2**k * (1 + expm1(r))`` with ``x = k ln 2 + r``,
    ``|r| <= ln 2 / 2`` (MLX's ``expm1`` is accurate); on the CPU, float32 and below
    through float64."""
    if x.dtype != mx.float64:
        return _wide(exp, x) if _on_cpu() else mx.exp(x)
    finite = mx.isfinite(x)
    xs = mx.where(finite, x, 0.0)  # the untaken branch at a safe value
    k = mx.stop_gradient(mx.clip(mx.round(xs * _INV_LN2), -2100.0, 2100.0))
    r = (xs - k * _LN2_HI) - k * _LN2_LO
    half = mx.floor(k * 0.5)  # 2**k as two factors, each a normal float64
    # one factor at a time: e**r * 2**half stays finite where 2**k alone would overflow
    value = (mx.expm1(r) + 1.0) * mx.stop_gradient(_pow2(half))
    value = value * mx.stop_gradient(_pow2(k - half))
    edge = mx.where(x > 0, mx.array(float("inf"), dtype=x.dtype), 0.0)
    return mx.where(finite, value, mx.where(mx.isnan(x), x, edge))


def _pow2(k: Array) -> Array:
    """``2.0 ** k`` exactly, for integer-valued float64 `k` in [-1050, 1050] (clipped to
    the normal exponents: the product of two factors over- or underflows as it should)."""
    e = mx.clip(k, -1022.0, 1023.0).astype(mx.int64) + 1023
    return mx.view(mx.left_shift(e, 52), mx.float64)
