"""Accelerators: fused or blocked evaluations chosen by backend and device.

Each one computes what :mod:`klx._agnostic` defines, is checked against the float64
reference in the conformance cells, and returns ``None`` when it does not apply, so
the caller falls back to the array-API definition:

========================  ===========================================================
arrays                    accelerator
========================  ===========================================================
NumPy                     :mod:`.blocked`: cache-sized blocks, the definition as fallback
torch, CPU, no autograd   :mod:`.blocked`
torch, CUDA               :mod:`.triton_kl`: fused Triton kernels, forward and backward
JAX                       :mod:`.jax_jit`: the definition under ``jax.jit`` (XLA fuses it)
CuPy                      :mod:`.cupy_kl`: a ReductionKernel / ElementwiseKernel
anything else             none: the generic array-API path
========================  ===========================================================

and, for :func:`klx.kl_divergence` / :func:`klx.js_divergence` over the last axis
(:func:`divergence_rows`):

========================  ===========================================================
NumPy; torch, CPU         :mod:`.rows`: blocks of rows, each by the definition
torch, CUDA, logits       :mod:`.triton_distill`: online log-sum-exp kernels
========================  ===========================================================

A NumPy or torch subclass (a masked array, a tensor subclass) keeps its own semantics:
it always takes the generic path.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, NamedTuple

from klx._accel import blocked, jax_jit, rows

__all__ = ["RowsSpec", "divergence_rows", "kl_div"]


class RowsSpec(NamedTuple):
    """What to compute per distribution (see :func:`klx._agnostic.divergence_rows`)."""

    kind: str
    p_form: str
    q_form: str
    axis: int
    temperature: float
    beta: float
    acc: Any  # the accumulation dtype


def _same_layout(input: Any, target: Any) -> bool:
    return bool(input.dtype == target.dtype and input.shape == target.shape)


def kl_div(xp: ModuleType, input: Any, target: Any, *, reduction: str, log_target: bool) -> Any:
    """A fast evaluation of :func:`klx.kl_div`, or ``None`` to use the generic path."""
    lib = xp.__name__
    if lib == "array_api_compat.numpy":
        import numpy as np

        if (
            type(input) is np.ndarray
            and type(target) is np.ndarray
            and _same_layout(input, target)
            and input.dtype in (np.float32, np.float64)
            and input.flags.c_contiguous
            and target.flags.c_contiguous
        ):
            return blocked.kl_div_numpy(xp, input, target, reduction, log_target)
        return None
    if lib == "array_api_compat.torch":
        return _torch(xp, input, target, reduction, log_target)
    if lib == "array_api_compat.cupy":
        return _cupy(input, target, reduction, log_target)
    if lib == "jax.numpy":
        return jax_jit.kl_div(xp, input, target, reduction=reduction, log_target=log_target)
    return None


def _torch(xp: ModuleType, input: Any, target: Any, reduction: str, log_target: bool) -> Any:
    torch = sys.modules["torch"]
    if (
        torch.compiler.is_compiling()  # inductor fuses the definition itself
        or not _same_layout(input, target)
        or type(input) is not torch.Tensor  # subclasses keep their own semantics
        or type(target) is not torch.Tensor
        or not input.is_contiguous()
        or not target.is_contiguous()
    ):
        return None
    if input.is_cuda:
        try:
            from klx._accel import triton_kl
        except ImportError:  # no triton: the generic path
            return None
        return triton_kl.kl_div(input, target, reduction, log_target)
    if (
        input.is_cpu
        and input.dtype in (torch.float32, torch.float64)
        and not (input.requires_grad or target.requires_grad)
    ):
        return blocked.kl_div_torch(xp, input, target, reduction, log_target)
    return None


def _cupy(input: Any, target: Any, reduction: str, log_target: bool) -> Any:
    cupy = sys.modules["cupy"]
    if (
        _same_layout(input, target)
        and input.dtype in (cupy.float32, cupy.float64)
        and input.flags.c_contiguous
        and target.flags.c_contiguous
        and input.device == target.device
    ):
        from klx._accel import cupy_kl

        with input.device:
            return cupy_kl.kl_div(input, target, reduction, log_target)
    return None


def divergence_rows(xp: ModuleType, spec: RowsSpec, p: Any, q: Any, keep_full: Any) -> Any:
    """Per-distribution values by an accelerator, or ``None`` for the generic path.

    `p` and `q` have the full (broadcast) shape and their original dtypes.
    """
    if spec.axis != p.ndim - 1 or p.shape != q.shape:
        return None
    lib = xp.__name__
    if lib == "array_api_compat.numpy":
        np = sys.modules["numpy"]
        if (
            type(p) is np.ndarray
            and type(q) is np.ndarray
            and p.size >= ROWS_MIN
            and p.flags.c_contiguous
            and q.flags.c_contiguous
        ):
            return rows.blocked_rows(xp, spec, p, q, keep_full)
        return None
    if lib != "array_api_compat.torch":
        return None
    torch = sys.modules["torch"]
    if (
        torch.compiler.is_compiling()
        or type(p) is not torch.Tensor
        or type(q) is not torch.Tensor
        or not p.is_contiguous()
        or not q.is_contiguous()
    ):
        return None
    if p.is_cuda:
        if (spec.kind, spec.p_form, spec.q_form) != (
            "kl",
            "logits",
            "logits",
        ) or p.dtype != q.dtype:
            return None
        try:
            from klx._accel import triton_distill
        except ImportError:  # no triton: the generic path
            return None
        vocab = p.shape[-1]
        p2, q2 = p.reshape(-1, vocab), q.reshape(-1, vocab)
        if spec.kind == "kl":
            flat = triton_distill.kl_rows_from_logits(p2, q2, spec.temperature)
        else:
            flat = triton_distill.js_rows_from_logits(p2, q2, spec.temperature, spec.beta)
        return flat.reshape(p.shape[:-1])
    if p.is_cpu and p.numel() >= ROWS_MIN and not (p.requires_grad or q.requires_grad):
        return rows.blocked_rows(xp, spec, p, q, keep_full)
    return None


#: Below this many elements the definition runs in one piece.
ROWS_MIN = 1 << 20
