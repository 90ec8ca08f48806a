"""The GPU's float32 ``exp`` and float arguments in Triton's interpreter.

On an NVIDIA GPU, Triton compiles a float32 ``tl.exp(x)`` to ``ex2.approx.f32`` of the
float32 product ``x * log2(e)`` (see the PTX in tests/toolchain/test_triton_compile.py):
the product's rounding alone moves ``exp(-20)`` by up to 1.2e-6 of itself, and
``ex2.approx`` adds up to 2^-22 of its own. The interpreter computes ``numpy.exp`` exactly
rounded. :func:`approximate_exp` makes the interpreter do what the GPU does, with the
approximation error's sign and size drawn from the input's bits (the same input always
gets the same value), so kernels are tested against the arithmetic they will meet.
float64 ``tl.exp`` (libdevice's ``__nv_exp``) and ``tl.log`` (``__nv_logf``, correctly
rounded to within an ulp) are left as they are.
"""

from __future__ import annotations

import numpy as np

__all__ = ["approximate_exp", "exp_like_a_gpu", "fp32_float_arguments"]

_LOG2E = np.float32(1.4426950408889634)
#: ex2.approx.f32's largest relative error (PTX ISA: "maximum relative error 2^-22").
_EX2_ERROR = 2.0**-22


def exp_like_a_gpu(x: np.ndarray) -> np.ndarray:
    """float32 ``exp(x)`` as ``ex2.approx.f32(fp32(x * log2 e))``, errors included."""
    y = (x.astype(np.float32) * _LOG2E).astype(np.float32)
    exact = np.exp2(y.astype(np.float64))
    bits = y.view(np.uint32).astype(np.uint64)
    wobble = ((bits * 2654435761) >> np.uint64(8)) % np.uint64(2001)  # 0 .. 2000
    scale = 1.0 + (wobble.astype(np.float64) / 1000.0 - 1.0) * _EX2_ERROR
    with np.errstate(invalid="ignore"):
        scale = np.where(y == np.round(y), 1.0, scale)  # 2^k itself is exact
    with np.errstate(over="ignore", invalid="ignore"):
        return (exact * scale).astype(np.float32)


def approximate_exp(monkeypatch) -> None:
    """Make Triton's interpreter compute float32 ``tl.exp`` as a GPU does."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_exp

    def create_exp(self, arg):
        if arg.data.dtype != np.float32:
            return original(self, arg)
        return interpreter.TensorHandle(exp_like_a_gpu(arg.data), arg.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp", create_exp)


def fp32_float_arguments(monkeypatch) -> None:
    """Make Triton's interpreter pass a Python float argument to a kernel as float32, as a
    compiled kernel receives it (the interpreter keeps Python's float64)."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._implicit_cvt

    def as_fp32(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", as_fp32)
