"""A ``torch.autograd.Function`` for :func:`klx._backend_ops.with_derivative`.

Imported (by an import statement, which ``torch.compile`` traces) only for torch
tensors: it imports torch, and nothing of klx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["WithDerivative"]


class WithDerivative(torch.autograd.Function):
    """``value(x)``, whose derivative is ``derivative(x)`` (elementwise): the backward
    saves `x` alone and is one expression of it, where autodiff of `value` would keep the
    masks of its branches (inductor's CPU code stores a bool tensor at 1/30 of a float's
    speed)."""

    @staticmethod
    def forward(x: Any, value: Callable[[Any], Any], derivative: Callable[[Any], Any]) -> Any:
        return value(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, _, derivative = inputs
        ctx.save_for_backward(x)
        ctx.derivative = derivative

    @staticmethod
    def backward(ctx: Any, g: Any) -> tuple[Any, None, None]:
        (x,) = ctx.saved_tensors
        return g * ctx.derivative(x), None, None
