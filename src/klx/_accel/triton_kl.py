"""Fused Triton kernels for :func:`klx.kl_div` on torch CUDA tensors, forward and backward.

One pass over both inputs: each program of a persistent grid walks the inputs in tiles
of :data:`BLOCK` elements, evaluates the definition of :mod:`klx._agnostic` element-wise
in float32 (float64 for float64 input), and keeps a vector of partial sums; each program
writes one number, and those are added in a fixed order, so a result is identical from
run to run (no atomics). 'none' writes the terms instead. No array of the input's size is
allocated for a reduction. The backward pass is one element-wise kernel that writes the
gradients that are asked for.

Layouts (the registry's 'rows' layout gate): `x` and `y` of one shape, one floating
dtype (float16, bfloat16, float32, float64) and one device, and either

* both contiguous, of any shape (seen by the kernels as one row of ``numel`` elements), or
* both 2-D and row-major with a row stride of their own: ``stride(1) == 1`` and
  ``stride(0) >= shape[1]``, such as ``logits[:, :-1]``.

Outputs ('none') and gradients are new contiguous tensors of the input's shape. Rows
are walked in tiles: whole tiles are read without a mask (16-byte vector loads when the
row starts are 16-byte aligned), the last tile of a row with one. Offsets are 64-bit
throughout, so inputs of 2^31 elements and more are addressed correctly.

Launches run under ``torch.cuda.device(x.device)`` (Triton launches on the current
device). Nothing here decides *when* the kernels are used: under ``torch.func``
transforms, during CUDA-graph capture or on the CPU, the
dispatcher keeps to the generic path. The kernels run in the test suite on CPU tensors
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from klx._accel.triton_common import LAUNCH, device_guard, first_order, no_vmap
from klx._agnostic import reduction_divisor

__all__ = ["kl_div"]

BLOCK = 2048


@triton.jit
def _weight(y, LOG_TARGET: tl.constexpr):
    """The weight w of the target, where it is 0, and its log (0 there: a safe value)."""
    if LOG_TARGET:
        w = tl.exp(y)
        zero = w == 0
        log_w = tl.where(zero, 0.0, y)
    else:
        w = y
        zero = y == 0
        log_w = tl.log(tl.where(zero, 1.0, y))
    return w, zero, log_w


@triton.jit
def _terms(x, y, LOG_TARGET: tl.constexpr):
    """The definition: w (log w - x), 0 where w is 0 (NaN there if x is NaN).

    Masked-off lanes load x = y = 0, which gives 0 in both target forms.
    """
    w, zero, log_w = _weight(y, LOG_TARGET)
    log_q = tl.where(zero, 0.0, x)
    nan_or_zero = tl.where(x != x, x, 0.0)
    return tl.where(zero, nan_or_zero, w * (log_w - log_q))


@triton.jit
def _tile(tile, cols, BLOCK: tl.constexpr):
    """Row and first column (int64) of a tile; tiles run along the rows."""
    per_row = tl.cdiv(cols, BLOCK)
    r = tile // per_row
    return r, (tile - r * per_row) * BLOCK


@triton.jit
def _load(ptr, off, c0, cols, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """A tile of one row in the accumulation dtype: unmasked when whole, 0 past the row."""
    lanes = tl.arange(0, BLOCK)
    if c0 + BLOCK <= cols:
        v = tl.load(ptr + off + lanes)
    else:
        v = tl.load(ptr + off + lanes, mask=c0 + lanes < cols, other=0.0)
    return v.to(ACC)


@triton.jit
def _store(ptr, off, c0, cols, v, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    v = v.to(ptr.dtype.element_ty)
    if c0 + BLOCK <= cols:
        tl.store(ptr + off + lanes, v)
    else:
        tl.store(ptr + off + lanes, v, mask=c0 + lanes < cols)


@triton.jit(do_not_specialize=["rows", "cols"])
def _sum_kernel(
    x_ptr,
    y_ptr,
    partial_ptr,
    rows,
    cols,
    sx,
    sy,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    F64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    tiles = rows.to(tl.int64) * tl.cdiv(cols.to(tl.int64), BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for tile in range(pid, tiles, step):
        r, c0 = _tile(tile, cols, BLOCK)
        x = _load(x_ptr, r * sx + c0, c0, cols, BLOCK, ACC)
        y = _load(y_ptr, r * sy + c0, c0, cols, BLOCK, ACC)
        acc += _terms(x, y, LOG_TARGET)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["cols"])
def _terms_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    cols,
    sx,
    sy,
    so,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    F64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    r, c0 = _tile(tl.program_id(0).to(tl.int64), cols, BLOCK)
    x = _load(x_ptr, r * sx + c0, c0, cols, BLOCK, ACC)
    y = _load(y_ptr, r * sy + c0, c0, cols, BLOCK, ACC)
    _store(out_ptr, r * so + c0, c0, cols, _terms(x, y, LOG_TARGET), BLOCK)


@triton.jit(do_not_specialize=["cols"])
def _backward_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    gx_ptr,
    gy_ptr,
    cols,
    sx,
    sy,
    so,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    G_SCALAR: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    F64: tl.constexpr,
):
    """d/dx = -w, d/dy = (log w - x + 1) dw/dy; both 0 where w is 0.

    `g` is the incoming gradient already divided by the reduction's divisor: one number
    (G_SCALAR), or one per element laid out as the outputs (row stride `so`).
    """
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    r, c0 = _tile(tl.program_id(0).to(tl.int64), cols, BLOCK)
    x = _load(x_ptr, r * sx + c0, c0, cols, BLOCK, ACC)
    y = _load(y_ptr, r * sy + c0, c0, cols, BLOCK, ACC)
    if G_SCALAR:  # noqa: SIM108 - a constexpr branch, as Triton compiles it
        g = tl.load(g_ptr).to(ACC)
    else:
        g = _load(g_ptr, r * so + c0, c0, cols, BLOCK, ACC)
    w, zero, log_w = _weight(y, LOG_TARGET)
    if NEED_X:
        _store(gx_ptr, r * so + c0, c0, cols, tl.where(zero, 0.0, -w * g), BLOCK)
    if NEED_Y:
        d = log_w - tl.where(zero, 0.0, x) + 1.0
        if LOG_TARGET:
            d = d * w
        _store(gy_ptr, r * so + c0, c0, cols, tl.where(zero, 0.0, d * g), BLOCK)


def _programs(tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, 8 * sms))
    return max(1, min(tiles, 4))  # the interpreter: a few programs exercise the loop


def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int, int, int]:
    """rows, columns, the row strides of x and y, and that of outputs and gradients.

    Contiguous inputs are one row (row strides 0: a multiple of 16, as the compiler
    learns, so whole tiles stay 16-byte aligned).
    """
    if x.is_contiguous() and y.is_contiguous():
        return 1, x.numel(), 0, 0, 0
    rows, cols = x.shape
    return rows, cols, x.stride(0), y.stride(0), cols


def _divisor(reduction: str, x: torch.Tensor) -> float:
    """The rule of :func:`klx._agnostic.reduction_divisor`, for these equal-shape tensors."""
    return reduction_divisor(reduction, tuple(x.shape), x.shape[0] if x.dim() else None)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(
    x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool, acc_out: bool = False
) -> torch.Tensor:
    rows, cols, sx, sy, so = _layout(x, y)
    tiles = rows * triton.cdiv(cols, BLOCK)
    f64 = x.dtype == torch.float64
    flags = {"BLOCK": BLOCK, "LOG_TARGET": log_target, "F64": f64, **LAUNCH}
    if reduction == "none":
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if tiles:
            with device_guard(x):
                _terms_kernel[(tiles,)](x, y, out, cols, sx, sy, so, **flags)
        return out
    programs = _programs(tiles, x.device)
    partial = torch.empty(programs, device=x.device, dtype=_acc(x))
    with device_guard(x):
        _sum_kernel[(programs,)](x, y, partial, rows, cols, sx, sy, **flags)
    total = partial.sum()  # a few hundred numbers, always added in the same order
    if reduction in ("mean", "batchmean"):
        div = _divisor(reduction, x)
        total = total / div if div else total * float("nan")
    return total if acc_out else total.to(x.dtype)


def _backward(
    reduction: str, log_target: bool, need_x: bool, need_y: bool, *args: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The gradients asked for (one kernel pass), with respect to x and/or y."""
    x, y, g = args
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_y else None
    rows, cols, sx, sy, so = _layout(x, y)
    tiles = rows * triton.cdiv(cols, BLOCK)
    if tiles:
        div = _divisor(reduction, x)
        g = g.to(_acc(x)) / div if reduction != "none" else g.contiguous()
        with device_guard(x):
            _backward_kernel[(tiles,)](
                x,
                y,
                g,
                x if gx is None else gx,
                y if gy is None else gy,
                cols,
                sx,
                sy,
                so,
                BLOCK=BLOCK,
                LOG_TARGET=log_target,
                G_SCALAR=reduction != "none",
                NEED_X=need_x,
                NEED_Y=need_y,
                F64=x.dtype == torch.float64,
                **LAUNCH,
            )
    return tuple(v for v in (gx, gy) if v is not None)


class _KLDiv(torch.autograd.Function):
    """The kernels with autograd; works under ``torch.func.grad`` (setup_context form)."""

    vmap = staticmethod(no_vmap)

    @staticmethod
    def forward(
        x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool, acc_out: bool
    ) -> Any:
        return _forward(x, y, reduction, log_target, acc_out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, y, reduction, log_target, _ = inputs
        ctx.save_for_backward(x, y)
        ctx.reduction = reduction
        ctx.log_target = log_target

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, y = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        fn = functools.partial(_backward, ctx.reduction, ctx.log_target, *need)
        return *first_order(fn, need, x, y, g), None, None, None


def kl_div(
    x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool, acc_out: bool = False
) -> torch.Tensor:
    """`kl_div` of two tensors of the module's layouts, with autograd.

    A reduced result is in `x`'s dtype, or with ``acc_out=True`` in the accumulation dtype
    (float32 for float16 and bfloat16), for a caller that divides it before the cast (a
    float16 'sum' of 512 x 512 terms overflows where its mean does not).
    """
    out: torch.Tensor = _KLDiv.apply(x, y, reduction, log_target, acc_out)
    return out
