"""What klx's two Triton kernel modules share: launch options, the device guard, float
arguments as tensors, and the autograd pieces (first derivatives only, no ``vmap``).

:mod:`klx._accel.triton_kl` (``kl_div``) and :mod:`klx._accel.triton_distill` (KL and
JS from logits) import these; no kernel lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["LAUNCH", "NUM_WARPS", "device_guard", "first_order", "no_vmap", "scalars"]

NUM_WARPS = 8
#: Compile options of every launch. ``enable_fp_fusion`` (a * b + c as one FMA, rounded
#: once) is given, not left to TRITON_DEFAULT_FP_FUSION: Triton 3.9 warns at every compile
#: where it is unset (an error under pytest's ``filterwarnings = error``), and a later
#: Triton changes its default, which would move results silently.
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}


def device_guard(x: torch.Tensor) -> Any:
    """Make `x`'s GPU current for a launch (Triton launches on the current device).

    ``torch.cuda.device(-1)`` changes nothing: CPU tensors (the interpreter) pass through.
    """
    return torch.cuda.device(x.device if x.is_cuda else -1)


def scalars(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Float arguments as a tensor of the accumulation dtype, to be loaded by a kernel.

    A Python float argument reaches a compiled kernel as fp32 but the interpreter as a
    float64, so float64 kernels would lose precision on a GPU only. Through a tensor both
    see the same value. On CUDA the copy is asynchronous (pinned host memory).
    """
    host = torch.tensor(list(values), dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def no_vmap(*_: Any) -> Any:
    """The ``vmap`` rule of klx's kernel Functions: a clear error."""
    msg = (
        "klx's Triton kernels do not support torch.func.vmap; call klx.kl_div / "
        "klx.kl_divergence / klx.js_divergence, which take the generic path under transforms"
    )
    raise NotImplementedError(msg)


class _FirstOrder(torch.autograd.Function):
    """A backward kernel as a Function of its own, ``fn(*tensors) -> gradients``.

    Under ``torch.func.grad`` its inputs reach ``fn`` unwrapped (plain tensors that a
    kernel can read), and under ``create_graph=True`` its outputs have a graph whose
    backward raises: a second derivative through the kernels is an error, never a
    silently missing term.
    """

    vmap = staticmethod(no_vmap)

    @staticmethod
    def forward(fn: Any, *tensors: torch.Tensor) -> Any:
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        msg = (
            "klx's Triton kernels give first derivatives only: a second derivative "
            "(create_graph=True, then the gradient of a gradient) is not supported through "
            "them; differentiate twice through the generic array-API path instead"
        )
        raise RuntimeError(msg)


def first_order(fn: Any, need: Sequence[bool], *tensors: torch.Tensor) -> list[Any]:
    """The gradients that `need` asks for, ``fn(*tensors)`` (a tuple of those), through
    :class:`_FirstOrder`; None for the others."""
    if not any(need):
        return [None] * len(need)
    apply: Any = _FirstOrder.apply  # untyped in torch
    grads = iter(apply(fn, *tensors))
    return [next(grads) if n else None for n in need]
