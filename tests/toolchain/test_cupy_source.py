"""The CUDA source of the CuPy kernels compiles (with nvcc, for sm_90 and sm_80), where no
GPU or CuPy is needed. What it computes is checked by the conformance matrix wherever a
CUDA device and CuPy exist (the nox cupy session).

The harness below calls ``klx_term`` as CuPy's generated kernels do past 2^31 elements:
CuPy picks a 64-bit index type (``IndexT``/``_index_t`` = ``long long``, ``ptrdiff_t``
loop counters) when a reduction's size exceeds 0x7fffffff, and passes a Python bool to
the declared ``bool log_target`` parameter as a C ``bool`` (``CScalar`` of the declared
type). ``klx_term`` takes values, never indices, so it is index-width agnostic; its float
instantiation must stay in single precision (``exp``/``log`` resolving to the float
overloads, not to double), which the PTX shows."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from klx._accel.cupy_source import KL_TERM

KERNELS = r"""
typedef long long IndexT;  // CuPy's index type for sizes past 0x7fffffff
template <typename T>
__device__ void terms(const T* x, const T* y, T* out, IndexT n, bool log_target) {
    for (ptrdiff_t i = (ptrdiff_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (ptrdiff_t)gridDim.x * blockDim.x) {
        out[i] = klx_term<T>(x[i], y[i], log_target);
    }
}
extern "C" __global__ void terms_f32(const float* x, const float* y, float* out, IndexT n,
                                     bool log_target) {
    terms<float>(x, y, out, n, log_target);
}
extern "C" __global__ void terms_f64(const double* x, const double* y, double* out, IndexT n,
                                     bool log_target) {
    terms<double>(x, y, out, n, log_target);
}
"""


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source cannot be compiled here")
    return nvcc


@pytest.mark.backends("numpy", reason="nvcc only; runs once, in NumPy runs")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cupy_kernel_source_compiles(backend, arch, tmp_path):
    nvcc = _nvcc()
    src = tmp_path / "klx_cupy.cu"
    src.write_text(KL_TERM + KERNELS)
    out = subprocess.run(
        [
            nvcc,
            f"-arch={arch}",
            "-Werror",
            "all-warnings",
            "-c",
            str(src),
            "-o",
            str(tmp_path / "klx_cupy.o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.backends("numpy", reason="nvcc only; runs once, in NumPy runs")
def test_cupy_float_kernel_stays_in_single_precision(backend, tmp_path):
    """The float instantiation has no float64 instruction; the double one has them."""
    src = tmp_path / "klx_cupy.cu"
    src.write_text(KL_TERM + KERNELS)
    ptx = tmp_path / "klx_cupy.ptx"
    out = subprocess.run(
        [_nvcc(), "-arch=sm_90", "-ptx", str(src), "-o", str(ptx)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    bodies = dict(re.findall(r"\.entry (terms_f\d\d)\((.*?)\n\}", ptx.read_text(), re.S))
    assert set(bodies) == {"terms_f32", "terms_f64"}
    assert ".f64" not in bodies["terms_f32"]
    assert ".f64" in bodies["terms_f64"]
    assert ".u64" in bodies["terms_f32"] or ".s64" in bodies["terms_f32"]  # 64-bit index


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 65537, 3 * 65536 + 5])
def test_cupy_sums_are_split_into_partials_covering_every_element_once(n):
    """Issue 22 item 5: CuPy reduces to one number on one thread block; klx reduces rows
    of 65536 elements (one block each) and then the partials. Run on NumPy with a stand-in
    for the ReductionKernel: every element counted once, in a fixed order."""
    import numpy as np

    from klx._accel.cupy_source import PARTIAL, partial_sums

    calls = []

    def reduce(x, y, flag, axis=None):
        calls.append((x.shape, axis))
        assert flag is True
        return np.sum(x * y, axis=axis)

    x = np.arange(n, dtype=np.float64)
    y = np.ones(n)
    parts = partial_sums(reduce, x, y, True, concat=np.concatenate)
    assert float(np.sum(parts)) == float(np.sum(x))
    whole = n // PARTIAL
    assert parts.shape == (whole + (n % PARTIAL != 0 or whole == 0),)
    if whole:
        assert calls[0] == ((whole, PARTIAL), 1)
