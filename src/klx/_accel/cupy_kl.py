"""CuPy kernels for :func:`klx.kl_div`: one ReductionKernel pass for the reductions, one
ElementwiseKernel for 'none'. Both evaluate the definition of :mod:`klx._agnostic`
element-wise; CuPy's reduction is a tree (no atomics), so results repeat bit for bit. A
reduction to one number runs on one CuPy thread block, so the sum is taken as partial
sums of 65536 elements each (many blocks), then the partials (``cupy.sum``).

Status: written to CuPy's kernel types only, and **not yet run on a GPU** (no device was
lent to the session that wrote it). The conformance suite runs it whenever a CUDA
device is present (the nox 'cupy' session); until then benchmarks/RESULTS.md lists it
as unverified.
"""

from __future__ import annotations

from typing import Any

import cupy

from klx._accel.cupy_source import KL_TERM, partial_sums

__all__ = ["kl_div"]


_SUM = cupy.ReductionKernel(
    "T x, T y, bool log_target",
    "T out",
    "klx_term<T>(x, y, log_target)",
    "a + b",
    "out = a",
    "0",
    "klx_kl_div_sum",
    preamble=KL_TERM,
)

_TERMS = cupy.ElementwiseKernel(
    "T x, T y, bool log_target",
    "T out",
    "out = klx_term<T>(x, y, log_target)",
    "klx_kl_div_terms",
    preamble=KL_TERM,
)


def kl_div(x: Any, y: Any, reduction: str, log_target: bool) -> Any:
    """`kl_div` of two C-contiguous float32/float64 CuPy arrays of one shape and dtype.

    `reduction` is 'none' (the terms) or 'sum': :func:`klx._accel.gpu.cupy_kl_div` divides
    the sum for 'mean' and 'batchmean'.
    """
    if reduction == "none":
        return _TERMS(x, y, log_target)
    parts = partial_sums(_SUM, x.ravel(), y.ravel(), log_target, concat=cupy.concatenate)
    return cupy.sum(parts)
