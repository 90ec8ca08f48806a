"""GPU entry points: a call object in, the kernels' own arguments out.

The kernel modules (:mod:`.triton_kl`, :mod:`.triton_distill`, :mod:`.cupy_kl`) take
plain tensors; the reductions' divisors come from :func:`klx._agnostic.reduction_divisor`
here, so the rule is written once. Imported only when the registry first picks one of
these rows, so torch, triton and cupy are imported only then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klx._agnostic import divide, reduction_divisor

if TYPE_CHECKING:
    from klx._typing import DivergenceCall, KLDivCall

__all__ = ["cupy_kl_div", "triton_kl_div", "triton_rows"]


def _reduce(call: KLDivCall, total: Any) -> Any:
    """The sum `total` divided as the reduction says, in `total`'s dtype (the accumulation
    dtype), then cast to the result's."""
    div = reduction_divisor(call.reduction, call.shape, call.first)
    out = total if div == 1.0 else divide(total, div)
    return call.xp.astype(out, call.dtype, copy=False)


def triton_kl_div(call: KLDivCall) -> Any:
    """`kl_div` on torch CUDA tensors by the fused Triton kernels (with autograd)."""
    from klx._accel import triton_kl

    if call.reduction == "none":
        return triton_kl.kl_div(call.input, call.target, "none", call.log_target)
    total = triton_kl.kl_div(call.input, call.target, "sum", call.log_target, acc_out=True)
    return _reduce(call, total)


def cupy_kl_div(call: KLDivCall) -> Any:
    """`kl_div` on CuPy arrays by CuPy's reduction / element-wise kernels."""
    from klx._accel import cupy_kl

    with call.input.device:
        if call.reduction == "none":
            return cupy_kl.kl_div(call.input, call.target, "none", call.log_target)
        return _reduce(call, cupy_kl.kl_div(call.input, call.target, "sum", call.log_target))


def triton_rows(call: DivergenceCall) -> Any:
    """KL or JS per row, from logits, by the online log-sum-exp Triton kernels."""
    from klx._accel import triton_distill

    p, q = call.p, call.q
    vocab = p.shape[-1]
    p2 = p if p.ndim == 2 else p.reshape(-1, vocab)
    q2 = q if q.ndim == 2 else q.reshape(-1, vocab)
    if call.kind == "kl":
        flat = triton_distill.kl_rows_from_logits(p2, q2, call.temperature)
    else:
        beta = dict(call.options)["beta"]
        flat = triton_distill.js_rows_from_logits(p2, q2, call.temperature, beta)
    return flat.reshape(p.shape[:-1])
