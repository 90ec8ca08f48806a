"""The CUDA source of the CuPy kernels compiles (with nvcc, for sm_90 and sm_80), where no
GPU or CuPy is needed. What it computes is checked by the conformance matrix wherever a
CUDA device and CuPy exist (the nox cupy session)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from klx._accel.cupy_source import KL_TERM

KERNELS = r"""
template <typename T>
__global__ void terms(const T* x, const T* y, T* out, int n, bool log_target) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = klx_term<T>(x[i], y[i], log_target);
}
template __global__ void terms<float>(const float*, const float*, float*, int, bool);
template __global__ void terms<double>(const double*, const double*, double*, int, bool);
"""


@pytest.mark.backends(
    "numpy", reason="nvcc compiles CUDA source; no array library: once, in NumPy runs"
)
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cupy_kernel_source_compiles(backend, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source cannot be compiled here")
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
