"""Every Triton kernel compiles to machine code for NVIDIA GPUs, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that
Triton's real compiler accepts them for Hopper (sm_90, the H100) and Ampere (sm_80), down
to a cubin through ptxas, and what the interpreter cannot show:

* addressing is 64-bit (TTIR): every pointer offset and every loop counter is i64, apart
  from the lane index 0 .. BLOCK - 1 (``tt.make_range``) added last; an i32 offset wraps
  past 2^31 elements;
* the streaming kernels load 16 bytes at a time (PTX ``ld.global.v4``) for sizes that
  are not multiples of 16 (vocabularies 32001, 50257): whole blocks without a mask.

Sizes are compiled as the launcher specialises them: pointers 16-byte aligned, sizes of
no known divisibility, row strides 0 or multiples of 16 where said. Needs TRITON_INTERPRET
unset: the nox torch session runs this file in a second pytest call.
"""

from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiling needs TRITON_INTERPRET unset (nox's torch session compiles in a 2nd call)",
)

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _compile(fn, signature, constexprs, arch, divisible=()):
    """Compile `fn` for `arch`; pointers and the int arguments in `divisible` are taken to
    be multiples of 16, as Triton's launcher specialises a launch."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(fn.arg_names)
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name in divisible
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    from klx._accel.triton_common import LAUNCH

    # the launches' own options (enable_fp_fusion given: Triton 3.9 warns where it is not)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(LAUNCH))
    assert compiled.asm["cubin"], "no machine code"
    _assert_64_bit_addressing(compiled.asm["ttir"])
    return compiled


def _assert_64_bit_addressing(ttir):
    """Pointer offsets and loop counters are i64, except the lane index (tt.make_range)
    and constants (the i-th scalar argument)."""
    lanes = set(re.findall(r"(%[\w.]+) = (?:tt\.make_range|arith\.constant)", ttir))
    adds = re.findall(r"tt\.addptr %[\w.]+, (%[\w.]+) : [^,]+, (.+?) loc", ttir)
    assert adds, "no pointer arithmetic found in the TTIR"
    for offset, kind in adds:
        assert "i64" in kind or offset in lanes, f"32-bit offset {offset}: {kind}"
    for line in re.findall(r"scf\.for .*", ttir):
        assert line.rstrip().endswith(": i64 {"), f"32-bit loop counter: {line}"


def _vector_loads(ptx):
    return "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx


@pytest.mark.backends("torch", reason="compiles the Triton kernels, which take torch tensors")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kl_div_kernels_compile(backend, arch, dtype):
    from klx._accel import triton_kl as k

    t = DTYPES[dtype]
    acc = "fp64" if dtype == "float64" else "fp32"
    f64 = dtype == "float64"
    strides = {"cols": "i32", "sx": "i32", "sy": "i32"}
    for log_target in (False, True):
        flags = {"BLOCK": k.BLOCK, "LOG_TARGET": log_target, "F64": f64}
        summed = _compile(
            k._sum_kernel,
            {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "partial_ptr": f"*{acc}", "rows": "i32"} | strides,
            flags,
            arch,
            divisible={"sx", "sy"},  # 0 for contiguous input: one row
        )
        terms = _compile(
            k._terms_kernel,
            {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "out_ptr": f"*{t}"} | strides | {"so": "i32"},
            flags,
            arch,
            divisible={"sx", "sy", "so"},
        )
        for compiled in (summed, terms):
            if dtype in ("float32", "bfloat16"):  # coalesced, 16-byte streaming loads
                assert _vector_loads(compiled.asm["ptx"])
        for scalar_g in (True, False):
            _compile(
                k._backward_kernel,
                {
                    "x_ptr": f"*{t}",
                    "y_ptr": f"*{t}",
                    "g_ptr": f"*{acc if scalar_g else t}",
                    "gx_ptr": f"*{t}",
                    "gy_ptr": f"*{t}",
                }
                | strides
                | {"so": "i32"},
                {
                    "BLOCK": k.BLOCK,
                    "LOG_TARGET": log_target,
                    "G_SCALAR": scalar_g,
                    "NEED_X": True,
                    "NEED_Y": True,
                    "F64": f64,
                },
                arch,
                divisible={"sx", "sy", "so"},
            )


def _distill_signatures(k, t, acc):
    rows = {"t_ptr": f"*{t}", "s_ptr": f"*{t}"}
    sizes = {"scal_ptr": f"*{acc}", "vocab": "i32", "st": "i32", "ss": "i32"}
    grads = {"gt_ptr": f"*{t}", "gs_ptr": f"*{t}"}
    stats = {"lse_t_ptr": f"*{acc}", "lse_s_ptr": f"*{acc}"}
    js = {"kl_pm_ptr": f"*{acc}", "kl_qm_ptr": f"*{acc}", **stats}
    return {
        k._forward_kernel: rows | {"out_ptr": f"*{acc}", "kl_ptr": f"*{acc}"} | stats | sizes,
        k._backward_kernel: rows
        | {"kl_ptr": f"*{acc}"}
        | stats
        | {"g_ptr": f"*{acc}"}
        | grads
        | sizes
        | {"sg": "i32"},
        k._js_forward_kernel: rows | {"js_ptr": f"*{acc}"} | js | sizes,
        k._js_backward_kernel: rows | js | {"g_ptr": f"*{acc}"} | grads | sizes | {"sg": "i32"},
    }


@pytest.mark.backends("torch", reason="compiles the Triton kernels, which take torch tensors")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_distillation_kernels_compile(backend, arch, dtype):
    """Vocabulary and row strides of no known divisibility (32001, 50257, slices):
    16-byte loads of t's aligned blocks all the same, and of s's in the same phase."""
    from klx._accel import triton_distill as k

    t = DTYPES[dtype]
    acc = "fp64" if dtype == "float64" else "fp32"
    vec = 16 // {"bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    for fn, signature in _distill_signatures(k, t, acc).items():
        flags = {"BLOCK_V": k.BLOCK_V, "VEC": vec, "S_PHASE": True}
        if "F64" in fn.arg_names:
            flags["F64"] = dtype == "float64"
        if "NEED_T" in fn.arg_names:
            flags |= {"G_PHASE": True, "NEED_T": True, "NEED_S": True}
        compiled = _compile(fn, signature, flags, arch)
        if dtype != "float64":
            assert _vector_loads(compiled.asm["ptx"]), fn.__name__


@pytest.mark.backends("torch", reason="compiles the Triton kernels, which take torch tensors")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_token_stats_kernel_compiles(backend, arch, dtype):
    """klx.token_stats' row kernel (float32 or float64 rows: half inputs are cast first),
    with and without labels, dropped rows and the reference's KL."""
    from klx._accel import triton_token_stats as k

    t = DTYPES[dtype]
    signature = {
        "z_ptr": f"*{t}",
        "r_ptr": f"*{t}",
        "label_ptr": "*i64",
        "drop_ptr": "*u8",
        "out_ptr": f"*{t}",
        "scal_ptr": f"*{t}",
        "n": "i32",
        "vocab": "i32",
        "sz": "i32",
        "sr": "i32",
    }
    for labels, drop, kl in ((True, True, True), (False, False, False), (True, False, True)):
        flags = {
            "BLOCK": k.BLOCK_V,
            "LABELS": labels,
            "DROP": drop,
            "KL": kl,
            "F64": dtype == "float64",
        }
        _compile(k._stats_kernel, signature, flags, arch)
