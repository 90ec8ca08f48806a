"""The CUDA source of klx's CuPy kernels, and how their sums are split over the GPU, apart
from CuPy so that both can be checked where CuPy is not installed
(``tests/toolchain/test_cupy_source.py`` builds the source with nvcc and runs the split
on NumPy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["KL_TERM", "PARTIAL", "partial_sums"]

#: Elements per partial sum: a reduction to one number runs on one thread block in CuPy
#: (its generic path for a scalar output), so the input is reduced as rows of PARTIAL
#: elements first (one output each, so many blocks), then the few partial sums.
PARTIAL = 1 << 16


def partial_sums(
    reduce: Callable[..., Any], x: Any, y: Any, *args: Any, concat: Callable[[list[Any]], Any]
) -> Any:
    """The partial sums of ``reduce`` over the flat arrays `x`, `y` (in order): ``reduce(x2,
    y2, *args, axis=1)`` over whole rows of :data:`PARTIAL` elements, and one more for the
    remainder. Their sum (by the caller) is the total; the split is fixed by the size, so a
    result repeats bit for bit."""
    n = x.size
    k = n // PARTIAL
    parts = []
    if k:
        whole = k * PARTIAL
        rows = (x[:whole].reshape(k, PARTIAL), y[:whole].reshape(k, PARTIAL))
        parts.append(reduce(*rows, *args, axis=1))
    if n > k * PARTIAL or not k:
        parts.append(reduce(x[k * PARTIAL :], y[k * PARTIAL :], *args).reshape(1))
    return parts[0] if len(parts) == 1 else concat(parts)


#: ``klx_term<T>(x, y, log_target)``: the definition of :mod:`klx._agnostic`, per element.
KL_TERM = r"""
template <typename T>
__device__ T klx_term(T x, T y, bool log_target) {
    T w, log_w;
    bool zero;
    if (log_target) {
        w = exp(y);
        zero = (w == (T)0);
        log_w = zero ? (T)0 : y;
    } else {
        w = y;
        zero = (y == (T)0);
        log_w = log(zero ? (T)1 : y);
    }
    T log_q = zero ? (T)0 : x;
    if (zero) {
        return isnan(x) ? x : (T)0;
    }
    return w * (log_w - log_q);
}
"""
