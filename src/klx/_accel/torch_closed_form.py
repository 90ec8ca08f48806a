"""The ``torch.autograd.Function`` behind the ``torch-closed-form`` row
(:func:`klx._accel.traced.torch_rows`).

Imported (by an import statement, which ``torch.compile`` traces) only for torch
tensors: it imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from klx._agnostic import divergence_rows, mask_rows

if TYPE_CHECKING:
    from klx._typing import DivergenceCall

__all__ = ["FromLogitsRows"]


class FromLogitsRows(torch.autograd.Function):
    """A divergence between two sets of logits, per distribution: the definition's value,
    and its derivative in closed form (:mod:`klx._closed_forms`).

    The forward saves the two inputs and the values; the backward recomputes the
    log-softmaxes (where autodiff of the definition read every guard's mask saved) and
    gives distributions that `keep` drops exactly 0. Its ops are differentiable, so a
    second derivative is autograd's of this one.
    """

    @staticmethod
    def forward(t: Any, s: Any, keep: Any, xp: Any, call: DivergenceCall) -> Any:
        return divergence_rows(xp, call, t, s, keep)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        t, s, keep, xp, call = inputs
        ctx.save_for_backward(t, s, output, keep)
        ctx.xp, ctx.call = xp, call

    @staticmethod
    def backward(ctx: Any, g: Any) -> tuple[Any, ...]:
        t, s, rows, keep = ctx.saved_tensors
        xp, call = ctx.xp, ctx.call
        if keep is not None:  # the definition's stand-in rows; their derivative is 0 below
            t, s = mask_rows(xp, t, keep, call.p_form), mask_rows(xp, s, keep, call.p_form)
        derivatives = call.divergence.derivatives_from(call.p_form, call.q_form)
        c_t, c_s = derivatives(
            xp, call, t, s, rows, need_t=ctx.needs_input_grad[0], need_s=ctx.needs_input_grad[1]
        )
        scale = torch.unsqueeze(g, call.axis) / call.temperature
        if keep is not None:
            scale = torch.where(keep, scale, 0.0)
        return (
            None if c_t is None else c_t * scale,
            None if c_s is None else c_s * scale,
            None,
            None,
            None,
        )
