"""Fused Triton kernels for :func:`klx.kl_div` on torch CUDA tensors, forward and backward.

One pass over both inputs: each program of a persistent grid walks the flattened arrays
in blocks, evaluates the definition of :mod:`klx._agnostic` element-wise in float32
(float64 for float64 input), and keeps a vector of partial sums; each program writes
one number, and those are added in a fixed order, so a result is identical from run to
run (no atomics). 'none' writes the terms instead. No array of the input's size is
allocated for a reduction. The backward pass is one element-wise kernel that writes the
gradients that are asked for.

The kernels run in the test suite on CPU tensors under ``TRITON_INTERPRET=1``; the
dispatcher sends only CUDA tensors here.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["kl_div"]

BLOCK = 2048
NUM_WARPS = 8
_REDUCTION = {"none": 0, "sum": 1, "mean": 1, "batchmean": 1}


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
    """The definition: w (log w - x), 0 where w is 0 (NaN there if x is NaN)."""
    w, zero, log_w = _weight(y, LOG_TARGET)
    log_q = tl.where(zero, 0.0, x)
    nan_or_zero = tl.where(x != x, x, 0.0)
    return tl.where(zero, nan_or_zero, w * (log_w - log_q))


@triton.jit
def _sum_kernel(
    x_ptr,
    y_ptr,
    partial_ptr,
    n,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    F64: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    if F64:  # noqa: SIM108 - a constexpr branch, as Triton compiles it
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        x = x.to(acc.dtype)
        y = y.to(acc.dtype)
        acc += tl.where(mask, _terms(x, y, LOG_TARGET), 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _terms_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    n,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    F64: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    if F64:
        t = _terms(x.to(tl.float64), y.to(tl.float64), LOG_TARGET)
    else:
        t = _terms(x.to(tl.float32), y.to(tl.float32), LOG_TARGET)
    tl.store(out_ptr + offs, t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    gx_ptr,
    gy_ptr,
    n,
    scale,
    BLOCK: tl.constexpr,
    LOG_TARGET: tl.constexpr,
    G_SCALAR: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    F64: tl.constexpr,
):
    """d/dx = -w, d/dy = (log w - x + 1) dw/dy; both 0 where w is 0."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if F64:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if G_SCALAR:
        g = tl.load(g_ptr).to(x.dtype) * scale
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(x.dtype) * scale
    w, zero, log_w = _weight(y, LOG_TARGET)
    if NEED_X:
        gx = tl.where(zero, 0.0, -w * g)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_Y:
        d = log_w - tl.where(zero, 0.0, x) + 1.0
        if LOG_TARGET:
            d = d * w
        gy = tl.where(zero, 0.0, d * g)
        tl.store(gy_ptr + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)


def _programs(n: int, device: torch.device) -> int:
    blocks = triton.cdiv(max(n, 1), BLOCK)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, 8 * sms))
    return max(1, min(blocks, 4))  # the interpreter: a few programs exercise the loop


def _divisor(reduction: str, x: torch.Tensor) -> float:
    if reduction == "mean":
        return float(x.numel())
    if reduction == "batchmean" and x.dim():
        return float(x.shape[0])
    return 1.0


def _forward(x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool) -> torch.Tensor:
    n = x.numel()
    f64 = x.dtype == torch.float64
    if reduction == "none":
        out = torch.empty_like(x)
        if n:
            _terms_kernel[(triton.cdiv(n, BLOCK),)](
                x, y, out, n, BLOCK=BLOCK, LOG_TARGET=log_target, F64=f64, num_warps=NUM_WARPS
            )
        return out
    programs = _programs(n, x.device)
    partial = torch.empty(programs, device=x.device, dtype=torch.float64 if f64 else torch.float32)
    _sum_kernel[(programs,)](
        x, y, partial, n, BLOCK=BLOCK, LOG_TARGET=log_target, F64=f64, num_warps=NUM_WARPS
    )
    total = partial.sum()  # a few hundred numbers, always added in the same order
    div = _divisor(reduction, x)
    if div != 1.0:
        total = total / div if div else total * float("nan")
    return total.to(x.dtype)


class _KLDiv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool
    ) -> Any:
        ctx.save_for_backward(x, y)
        ctx.reduction = reduction
        ctx.log_target = log_target
        return _forward(x, y, reduction, log_target)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_x else None
        gy = torch.empty_like(y) if need_y else None
        n = x.numel()
        if n and (need_x or need_y):
            div = _divisor(ctx.reduction, x)
            scale = 1.0 / div if div else float("nan")
            g = g.contiguous()
            _backward_kernel[(triton.cdiv(n, BLOCK),)](
                x,
                y,
                g,
                gx if need_x else x,
                gy if need_y else y,
                n,
                scale,
                BLOCK=BLOCK,
                LOG_TARGET=ctx.log_target,
                G_SCALAR=ctx.reduction != "none",
                NEED_X=need_x,
                NEED_Y=need_y,
                F64=x.dtype == torch.float64,
                num_warps=NUM_WARPS,
            )
        return gx, gy, None, None


def kl_div(x: torch.Tensor, y: torch.Tensor, reduction: str, log_target: bool) -> torch.Tensor:
    """`kl_div` of two contiguous tensors of one shape and floating dtype, with autograd."""
    return _KLDiv.apply(x, y, reduction, log_target)
