"""Every Triton kernel compiles to machine code for NVIDIA GPUs, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that
Triton's real compiler accepts them for Hopper (sm_90, the H100) and Ampere (sm_80), down
to a cubin through ptxas, and that the streaming kernels load 16 bytes at a time. Needs
TRITON_INTERPRET unset: the nox torch session runs this file in a second pytest call.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiling needs TRITON_INTERPRET unset (nox runs this file separately)",
)

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _compile(fn, signature, constexprs, arch):
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    # As Triton's launcher specialises a launch on 16-byte-aligned tensors and sizes that
    # are multiples of 16 (the usual case: 4096, 32000, 128256 columns).
    names = list(fn.arg_names)
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or kind == "i32"
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})


@pytest.mark.backends("torch", reason="compiles the Triton kernels, which take torch tensors")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kl_div_kernels_compile(backend, arch, dtype):
    from klx._accel import triton_kl as k

    t = DTYPES[dtype]
    acc = "fp64" if dtype == "float64" else "fp32"
    f64 = dtype == "float64"
    for log_target in (False, True):
        flags = {"BLOCK": k.BLOCK, "LOG_TARGET": log_target, "F64": f64}
        summed = _compile(
            k._sum_kernel,
            {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "partial_ptr": f"*{acc}", "n": "i32"},
            flags,
            arch,
        )
        terms = _compile(
            k._terms_kernel,
            {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "out_ptr": f"*{t}", "n": "i32"},
            flags,
            arch,
        )
        for compiled in (summed, terms):
            assert compiled.asm["cubin"], "no machine code"
            if dtype in ("float32", "bfloat16"):  # coalesced, 16-byte streaming loads
                assert "ld.global.v4" in compiled.asm["ptx"]
        for scalar_g in (True, False):
            _compile(
                k._backward_kernel,
                {
                    "x_ptr": f"*{t}",
                    "y_ptr": f"*{t}",
                    "g_ptr": f"*{t}",
                    "gx_ptr": f"*{t}",
                    "gy_ptr": f"*{t}",
                    "n": "i32",
                    "scale": "fp32",
                },
                {
                    "BLOCK": k.BLOCK,
                    "LOG_TARGET": log_target,
                    "G_SCALAR": scalar_g,
                    "NEED_X": True,
                    "NEED_Y": True,
                    "F64": f64,
                },
                arch,
            )


@pytest.mark.backends("torch", reason="compiles the Triton kernels, which take torch tensors")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_distillation_kernels_compile(backend, arch, dtype):
    from klx._accel import triton_distill as k

    t = DTYPES[dtype]
    acc = "fp64" if dtype == "float64" else "fp32"
    f64 = dtype == "float64"
    rows = {"t_ptr": f"*{t}", "s_ptr": f"*{t}"}
    stats = {"lse_t_ptr": f"*{acc}", "lse_s_ptr": f"*{acc}"}
    fwd = _compile(
        k._forward_kernel,
        {**rows, "kl_ptr": f"*{acc}", **stats, "vocab": "i32", "inv_t": "fp32"},
        {"BLOCK_V": k.BLOCK_V, "F64": f64},
        arch,
    )
    assert fwd.asm["cubin"]
    assert "ld.global.v4" in fwd.asm["ptx"] or dtype == "float64"
    _compile(
        k._backward_kernel,
        {
            **rows,
            "kl_ptr": f"*{acc}",
            **stats,
            "g_ptr": f"*{acc}",
            "gt_ptr": f"*{t}",
            "gs_ptr": f"*{t}",
            "vocab": "i32",
            "inv_t": "fp32",
        },
        {"BLOCK_V": k.BLOCK_V, "NEED_T": True, "NEED_S": True, "F64": f64},
        arch,
    )
    js = {"kl_pm_ptr": f"*{acc}", "kl_qm_ptr": f"*{acc}", **stats}
    betas = {"beta": "fp32", "log_beta": "fp32", "log_1mbeta": "fp32"}
    _compile(
        k._js_forward_kernel,
        {**rows, **js, "vocab": "i32", "inv_t": "fp32", **betas},
        {"BLOCK_V": k.BLOCK_V, "F64": f64},
        arch,
    )
    _compile(
        k._js_backward_kernel,
        {
            **rows,
            **js,
            "g_ptr": f"*{acc}",
            "gt_ptr": f"*{t}",
            "gs_ptr": f"*{t}",
            "vocab": "i32",
            "inv_t": "fp32",
            **betas,
        },
        {"BLOCK_V": k.BLOCK_V, "NEED_T": True, "NEED_S": True},
        arch,
    )
