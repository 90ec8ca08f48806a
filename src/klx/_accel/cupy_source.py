"""The CUDA source of klx's CuPy kernels, apart from CuPy so that it can be compiled and
checked where CuPy is not installed (``tests/test_cupy_source.py`` builds it with nvcc)."""

from __future__ import annotations

__all__ = ["KL_TERM"]

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
