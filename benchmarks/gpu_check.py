"""Everything a GPU can show about klx, in one command and one report (issue 22, item 12).

    python -m benchmarks.gpu_check              # on a machine with one NVIDIA GPU (~10-15 min)
    python -m benchmarks.gpu_check --smoke      # CPU smoke mode: tiny sizes, Triton interpreted

Run from the checkout (this package puts its ``src`` first on ``sys.path``). It needs
torch with CUDA, Triton and NumPy, and uses JAX and CuPy where they are installed; it
installs nothing, so it runs on a GPU machine that cannot reach the network (bring
array-api-compat as a wheel: ``pip install --no-index --no-deps array_api_compat-*.whl``).

Each check is measured and recorded, never raised: a check that fails or cannot run says
why in the report, and the others go on. The report is written as JSON and Markdown to
``--out`` (default benchmarks/out/gpu_check.{json,md}); the exit status is 1 if a check
failed, else 0. Checks:

* ``tests``: the GPU test files on the GPU (torch, and CuPy and JAX where installed) and
  the 2^31-element ``kl_div`` (marked slow, 26 GB);
* ``klx_check``: ``python -m klx.check --json`` (every path on every device);
* ``near_equal``: KL and JS from logits at a 128256 vocabulary, student = teacher + 1e-3
  noise (shifted), float32 and bfloat16, against float64: never negative, relative error;
* ``float16_mean``: ``kl_div`` 'mean' / 'batchmean' of float16 whose 'sum' passes 65504;
* ``determinism``: five repeats of each Triton path, bit for bit;
* ``first_use``: what a path's first-use check (its probe) adds to the first call;
* ``cuda_graph``: ``kl_div`` captured in a CUDA graph through klx's gate (the definition
  serves during capture) and with the kernel forced inside the capture, then replayed;
* ``fused_linear``: 8192 x 4096 x 128256 bf16, forward and backward: time, peak memory, the
  weight gradient's error against float64, for the default chunk size and others;
* ``cupy``: the CuPy ``kl_div`` reduction at 8192 x 128256 float32: time against the
  read bound, and its value against float64;
* ``traced``: every row of ``python -m benchmarks.traced`` on the GPU (klx inside
  ``torch.compile(fullgraph=True)`` and ``jax.jit`` against the plain formula traced the
  same way, values and gradients; issue 24's targets, 1.15 and 1.2): each ratio, and the
  rows over their target;
* ``jax_tf32``: JAX's fused-linear KL in float32 under the default matmul precision and
  under 'highest', against float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import benchmarks

#: GPU test files, run on the GPU by pytest (TRITON_INTERPRET unset).
GPU_TESTS = (
    "tests/accelerators/test_gpu_kernels.py",
    "tests/accelerators/test_accelerators.py",
    "tests/accelerators/test_dispatch.py",
    "tests/scale/test_distillation.py",
    "tests/api/test_fused_linear.py",
)


@dataclass
class Context:
    """What every check needs: the mode, the device, and the sizes to use."""

    smoke: bool
    device: str  # 'cuda' or, in smoke mode without a GPU, 'cpu' (Triton interpreted)
    vocab: int
    rows: int
    fused: tuple[int, int, int]  # tokens, hidden, vocab
    repeat: int
    out: Path  # the report's folder


def _torch() -> Any:
    import torch

    return torch


def _sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        _torch().cuda.synchronize()


def _timed(ctx: Context, fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """The median time of `fn` in milliseconds, after one warm-up call; `sync` waits for
    the device (default: torch's, on CUDA)."""
    wait = sync if sync is not None else lambda: _sync(ctx)
    fn()
    wait()
    times = []
    for _ in range(ctx.repeat):
        start = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


# --------------------------------------------------------------------------- checks


def check_environment(ctx: Context) -> dict[str, Any]:
    """Versions and the device: what the figures below were measured on."""
    torch = _torch()
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": ctx.device,
        "smoke": ctx.smoke,
    }
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        )
    for name in ("triton", "jax", "cupy", "numpy", "array_api_compat"):
        if importlib.util.find_spec(name) is not None:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
    return out


def check_tests(ctx: Context) -> dict[str, Any]:
    """The GPU test files on the GPU (and the 2^31-element case), by pytest."""
    root = benchmarks.ROOT
    if not (root / "tests").is_dir():
        return {"status": "skipped", "reason": "no tests/ folder (run from the checkout)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    backends = ["torch"] + [b for b in ("cupy", "jax") if importlib.util.find_spec(b)]
    runs = []
    plans = [("gpu tests", [*GPU_TESTS], [])]
    if not ctx.smoke:
        plans.append(
            (
                "2^31 elements",
                ["tests/accelerators/test_gpu_kernels.py"],
                ["-m", "slow", "-k", "past_2_to_the_31"],
            )
        )
    else:  # the smoke mode: the near-equal kernel tests, interpreted
        env["TRITON_INTERPRET"] = "1"
        plans = [
            (
                "interpreted kernels",
                ["tests/accelerators/test_gpu_kernels.py"],
                ["-k", "near_p_equal"],
            )
        ]
        backends = ["torch"]
    for name, files, extra in plans:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--conformance-out="]
        cmd += [f"--backend={b}" for b in backends] + extra + files
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        tail = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
        runs.append(
            {
                "name": name,
                "command": " ".join(cmd[1:]),
                "exit_status": proc.returncode,
                "summary": tail[0] if tail else "",
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    failed = any(r["exit_status"] not in (0, 5) for r in runs)
    return {"status": "failed" if failed else "ok", "runs": runs}


def check_klx_check(ctx: Context) -> dict[str, Any]:
    """``python -m klx.check --json``: its exit status and a count of its rows."""
    out_file = ctx.out / "klx_check.json"
    libs = ["numpy", "torch"] if ctx.smoke else ["numpy", "torch", "jax", "cupy"]
    cmd = [
        sys.executable,
        "-m",
        "klx.check",
        "--quiet",
        "--json",
        str(out_file),
        "--libraries",
        *libs,
    ]
    if ctx.smoke:
        cmd += ["--repeat", "1", "--size", "64", "256"]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(benchmarks.ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {"exit_status": proc.returncode}
    if out_file.exists():
        report = json.loads(out_file.read_text())
        rows = report["rows"]
        result["rows"] = len(rows)
        result["not_ok"] = [
            f"{r['library']} {r['device']} {r['path']} {r['dtype']}: {r['status']}"
            for r in rows
            if r["status"] != "ok"
        ]
        result["not_checked"] = report["not_checked"]
    else:
        result["stderr"] = proc.stderr[-2000:]
    result["status"] = "ok" if proc.returncode == 0 else "failed"
    return result


def _near_pair(ctx: Context, dtype: Any) -> tuple[Any, Any, Any, Any]:
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(0)
    t = 3.0 * torch.randn(ctx.rows, ctx.vocab, generator=g, dtype=torch.float64)
    s = t + 1e-3 * torch.randn(ctx.rows, ctx.vocab, generator=g, dtype=torch.float64) + 1.5
    tt, ss = t.to(dtype).to(ctx.device), s.to(dtype).to(ctx.device)
    return tt, ss, tt.double().cpu(), ss.double().cpu()


def _reference_rows(kind: str, t: Any, s: Any, beta: float = 0.5) -> Any:
    """float64 KL(P || Q) or JS per row of two logits tensors (CPU, float64)."""
    torch = _torch()
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "kl":
        return (p * (lp - lq)).sum(-1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)


def check_near_equal(ctx: Context) -> dict[str, Any]:
    """KL and JS from logits with a student within 1e-3 of its teacher."""
    import klx

    torch = _torch()
    cells = []
    for dtype in (torch.float32, torch.bfloat16):
        t, s, t64, s64 = _near_pair(ctx, dtype)
        for kind, fn in (("kl", klx.kl_divergence), ("js", klx.js_divergence)):
            report = klx.explain(fn, t, s, p_form="logits", q_form="logits", reduction="none")
            got = report.result.double().cpu()
            want = _reference_rows(kind, t64, s64)
            err = float(((got - want).abs() / want.abs()).max())
            cells.append(
                {
                    "kind": kind,
                    "dtype": str(dtype).split(".")[-1],
                    "path": report.chosen,
                    "min": float(got.min()),
                    "max_rel_error": err,
                    "mean_value": float(want.mean()),
                }
            )
    negative = any(c["min"] < 0 for c in cells)
    # float32: the kernels' own error (the float32 definition is about 1e-4 off); bfloat16:
    # the result is rounded to bfloat16 (2^-8 relative at most)
    ok = not negative and all(
        c["max_rel_error"] < (1e-4 if c["dtype"] == "float32" else 2**-8) for c in cells
    )
    return {"status": "ok" if ok else "failed", "shape": [ctx.rows, ctx.vocab], "cells": cells}


def check_float16_mean(ctx: Context) -> dict[str, Any]:
    """float16 'mean' and 'batchmean' whose float16 'sum' would overflow."""
    import klx

    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (-500.0 * torch.rand(512, 512, generator=g, dtype=torch.float64)).half()
    y = torch.distributions.Dirichlet(torch.ones(512, dtype=torch.float64)).sample((512,)).half()
    cells = []
    ok = True
    for reduction in ("mean", "batchmean"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = klx.explain(
                klx.kl_div, x.to(ctx.device), y.to(ctx.device), reduction=reduction
            )
        x64, y64 = x.double(), y.double()
        total = float(torch.special.xlogy(y64, y64).sum() - (y64 * x64).sum())
        want = total / (512 * 512 if reduction == "mean" else 512)
        got = float(report.result)
        err = abs(got - want) / want
        ok = ok and err < 2e-3
        cells.append(
            {
                "reduction": reduction,
                "path": report.chosen,
                "got": got,
                "want": want,
                "rel_error": err,
            }
        )
    return {"status": "ok" if ok else "failed", "cells": cells}


def check_determinism(ctx: Context) -> dict[str, Any]:
    """Five repeats of each path give the same bits."""
    import klx

    torch = _torch()
    t, s, _, _ = _near_pair(ctx, torch.float32)
    x = torch.log_softmax(s, -1)
    y = torch.softmax(t, -1)
    calls = {
        "kl_div sum": lambda: klx.kl_div(x, y, reduction="sum"),
        "kl_div none": lambda: klx.kl_div(x, y, reduction="none"),
        "kl rows": lambda: klx.kl_divergence(
            t, s, p_form="logits", q_form="logits", reduction="none"
        ),
        "js rows": lambda: klx.js_divergence(
            t, s, p_form="logits", q_form="logits", reduction="none"
        ),
    }
    cells = {}
    for name, fn in calls.items():
        first = fn()
        cells[name] = all(torch.equal(first, fn()) for _ in range(4))
    return {"status": "ok" if all(cells.values()) else "failed", "bit_identical": cells}


def check_first_use(ctx: Context) -> dict[str, Any]:
    """What a path's first-use check costs: the first call after the checks are
    forgotten (the probe runs; the kernels are compiled already) against the next one."""
    import klx
    from klx._accel import registry

    torch = _torch()
    t, s, _, _ = _near_pair(ctx, torch.float32)
    x, y = torch.log_softmax(s, -1), torch.softmax(t, -1)
    calls = {
        "kl rows": lambda: klx.kl_divergence(
            t, s, p_form="logits", q_form="logits", reduction="none"
        ),
        "kl_div sum": lambda: klx.kl_div(x, y, reduction="sum"),
    }
    out = {}
    for name, fn in calls.items():
        fn()  # compiled
        registry.reset_checks()
        start = time.perf_counter()
        fn()
        _sync(ctx)
        first = time.perf_counter() - start
        start = time.perf_counter()
        fn()
        _sync(ctx)
        out[name] = {"first_ms": 1e3 * first, "next_ms": 1e3 * (time.perf_counter() - start)}
    return {"status": "ok", **out}


def check_cuda_graph(ctx: Context) -> dict[str, Any]:
    """A real CUDA-graph capture of ``kl_div``: through klx's gate, and with the kernel
    forced inside the capture."""
    if ctx.device != "cuda":
        return {"status": "skipped", "reason": "needs a CUDA device"}
    import klx
    from klx._accel import triton_kl

    torch = _torch()
    x = torch.log_softmax(torch.randn(1024, 4096, device="cuda"), -1)
    y = torch.softmax(torch.randn(1024, 4096, device="cuda"), -1)
    eager = klx.kl_div(x, y, reduction="sum")
    out: dict[str, Any] = {}
    for name, fn in (
        ("through the gate", lambda: klx.kl_div(x, y, reduction="sum")),
        ("kernel forced", lambda: triton_kl.kl_div(x, y, "sum", False)),
    ):
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up outside the capture (Triton loads its module here)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = fn()
            graph.replay()
            torch.cuda.synchronize()
            err = float((captured - eager).abs() / eager.abs())
            out[name] = {"captured": True, "rel_error_after_replay": err}
        except Exception as exc:
            out[name] = {"captured": False, "error": f"{type(exc).__name__}: {exc}"}
    ok = out["through the gate"].get("captured", False)
    return {"status": "ok" if ok else "failed", **out}


def _fused_reference_dw(h: Any, wt: Any, w: Any, chunk: int) -> tuple[float, Any]:
    """KL 'batchmean' and its gradient w.r.t. the student weight `w`, in float64, by
    chunks of tokens on the tensors' device."""
    torch = _torch()
    n = h.shape[0]
    total = 0.0
    dw = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    w64, wt64 = w.double(), wt.double()
    for r0 in range(0, n, chunk):
        hc = h[r0 : r0 + chunk].double()
        lp = torch.log_softmax(hc @ wt64.T, -1)
        lq = torch.log_softmax(hc @ w64.T, -1)
        p = lp.exp()
        total += float((p * (lp - lq)).sum())
        dw += (lq.exp() - p).T @ hc
        del lp, lq, p
    return total / n, dw / n


def check_fused_linear(ctx: Context) -> dict[str, Any]:
    """Fused-linear KL forward and backward at distillation scale, for several chunk sizes."""
    import klx

    torch = _torch()
    n, hid, vocab = ctx.fused
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(2)
    h = torch.randn(n, hid, generator=g).to(dtype).to(ctx.device)
    wt = (torch.randn(vocab, hid, generator=g) / hid**0.5).to(dtype).to(ctx.device)
    w0 = (torch.randn(vocab, hid, generator=g) / hid**0.5).to(dtype).to(ctx.device)
    value64, dw64 = _fused_reference_dw(h, wt, w0, 256)
    cells = []
    for chunk in (None, 256, 1024) if not ctx.smoke else (None, 16):
        w = w0.clone().requires_grad_(True)

        def step(w: Any = w, chunk: int | None = chunk) -> Any:
            w.grad = None
            loss = klx.fused_linear_divergence(h, wt, h, w, reduction="batchmean", chunk_size=chunk)
            loss.backward()
            return loss

        try:
            if ctx.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            ms = _timed(ctx, step)
            peak = (
                (torch.cuda.max_memory_allocated() - before) / 2**20
                if ctx.device == "cuda"
                else None
            )
            loss = step().detach()
            err = float((w.grad.double() - dw64).norm() / dw64.norm())
            cells.append(
                {
                    "chunk_size": chunk if chunk is not None else "default",
                    "ms": round(ms, 2),
                    "extra_peak_mib": None if peak is None else round(peak),
                    "value_rel_error": abs(float(loss) - value64) / abs(value64),
                    "dw_rel_error": err,
                }
            )
        except Exception as exc:
            cells.append({"chunk_size": chunk, "error": f"{type(exc).__name__}: {exc}"})
    ok = all("error" not in c and c["dw_rel_error"] < 1e-2 for c in cells)
    return {
        "status": "ok" if ok else "failed",
        "shape": [n, hid, vocab],
        "dtype": str(dtype),
        "cells": cells,
    }


def check_cupy(ctx: Context) -> dict[str, Any]:
    """The CuPy ``kl_div`` reduction: time against reading both inputs once, and value."""
    if ctx.device != "cuda" or importlib.util.find_spec("cupy") is None:
        return {"status": "skipped", "reason": "needs CuPy and a CUDA device"}
    import cupy

    import klx

    rows, vocab = (8192, 128256)
    rng = cupy.random.default_rng(3)
    logits = rng.standard_normal((rows, vocab), dtype=cupy.float32)
    x = logits - cupy.log(cupy.exp(logits).sum(-1, keepdims=True))
    y = cupy.exp(rng.standard_normal((rows, vocab), dtype=cupy.float32))
    y /= y.sum(-1, keepdims=True)
    report = klx.explain(klx.kl_div, x, y, reduction="sum")
    x64, y64 = x.astype(cupy.float64), y.astype(cupy.float64)
    want = float((y64 * (cupy.log(y64) - x64)).sum())
    err = abs(float(report.result) - want) / abs(want)

    def call() -> Any:
        return klx.kl_div(x, y, reduction="sum")

    def read() -> Any:
        return cupy.sum(x) + cupy.sum(y)

    def sync() -> None:
        cupy.cuda.Device().synchronize()

    ms, bound = _timed(ctx, call, sync), _timed(ctx, read, sync)
    return {
        "status": "ok" if err < 1e-5 else "failed",
        "path": report.chosen,
        "ms": ms,
        "read_bound_ms": bound,
        "x_bound": ms / bound,
        "rel_error": err,
    }


#: The rows the smoke run times: one of ``kl_div`` and one between logits (the plumbing);
#: on a GPU, every row.
TRACED_SMOKE_ROWS = ("kl_div batchmean", "KL from logits (")


def check_traced(ctx: Context) -> dict[str, Any]:
    """klx traced against the plain formula traced the same way, on the device: the
    table of ``python -m benchmarks.traced --device cuda`` (issue 24's GPU targets)."""
    from benchmarks import traced

    installed = [b for b in traced.CASES if importlib.util.find_spec(b) is not None]
    skipped = {b: why for b in installed if (why := traced.unavailable(b, ctx.device))}
    backends = [b for b in installed if b not in skipped]
    if not backends:
        return {"status": "skipped", "reason": "; ".join(skipped.values()) or "no tracer"}
    rows = traced.measure(
        backends,
        "smoke" if ctx.smoke else "default",
        list(TRACED_SMOKE_ROWS) if ctx.smoke else None,
        ctx.device,
    )
    return {
        "status": "ok",
        "device": ctx.device,
        "backends": backends,
        "skipped": skipped,
        "met": sum(r["met"] for r in rows),
        "rows": len(rows),
        "over": [f"{r['backend']} {r['case']}: {r['ratio']:.2f}" for r in rows if not r["met"]],
        "table": traced.table(rows),
        "cells": rows,
    }


def check_jax_tf32(ctx: Context) -> dict[str, Any]:
    """JAX's fused-linear KL in float32 under the default and 'highest' matmul precision."""
    if importlib.util.find_spec("jax") is None:
        return {"status": "skipped", "reason": "JAX is not installed"}
    import jax
    import jax.numpy as jnp
    import numpy as np

    import klx

    gpus = [d for d in jax.devices() if d.platform != "cpu"]
    if not gpus and not ctx.smoke:
        return {"status": "skipped", "reason": "JAX sees no GPU"}
    n, hid, vocab = (2048, 1024, 32000) if not ctx.smoke else (16, 8, 100)
    rng = np.random.default_rng(4)
    h = rng.normal(size=(n, hid)).astype(np.float32)
    wt = (rng.normal(size=(vocab, hid)) / hid**0.5).astype(np.float32)
    w = wt + (1e-2 * rng.normal(size=(vocab, hid))).astype(np.float32)
    lp = h.astype(np.float64) @ wt.T.astype(np.float64)
    lq = h.astype(np.float64) @ w.T.astype(np.float64)
    lp -= np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(
        -1, keepdims=True
    )
    lq -= np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lq.max(
        -1, keepdims=True
    )
    want = float((np.exp(lp) * (lp - lq)).sum() / n)
    args = [jnp.asarray(a) for a in (h, wt, h, w)]
    cells = {}
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(precision):
            got = float(klx.fused_linear_divergence(*args, reduction="batchmean"))
        cells[precision] = {"value": got, "rel_error": abs(got - want) / want}
    return {
        "status": "ok",
        "device": str((gpus or jax.devices())[0]),
        "float64": want,
        "cells": cells,
    }


CHECKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": check_environment,
    "tests": check_tests,
    "klx_check": check_klx_check,
    "near_equal": check_near_equal,
    "float16_mean": check_float16_mean,
    "determinism": check_determinism,
    "first_use": check_first_use,
    "cuda_graph": check_cuda_graph,
    "fused_linear": check_fused_linear,
    "cupy": check_cupy,
    "traced": check_traced,
    "jax_tf32": check_jax_tf32,
}


# --------------------------------------------------------------------------- running


def run(ctx: Context, names: list[str]) -> dict[str, Any]:
    """Every check named, each recorded (a check that raises is 'failed', with the error)."""
    report: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            result = CHECKS[name](ctx)
        except Exception as exc:
            result = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result.setdefault("status", "ok")
        result["seconds"] = round(time.perf_counter() - start, 1)
        report[name] = result
        _release(ctx)
    return report


def _release(ctx: Context) -> None:
    """Give back what a check's library keeps cached, so the next one has the GPU's memory
    (torch's caching allocator, CuPy's pool)."""
    import gc

    gc.collect()
    if ctx.device == "cuda":
        _torch().cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary table, then each check's JSON."""
    lines = ["# klx GPU check", "", "| check | status | seconds |", "|---|---|---|"]
    for name, result in report.items():
        lines.append(f"| {name} | {result['status']} | {result['seconds']} |")
    for name, result in report.items():
        lines += ["", f"## {name}", ""]
        if "table" in result:  # a Markdown table of its own (the traced check's)
            lines += [result["table"], ""]
            result = {k: v for k, v in result.items() if k != "table"}
        lines += ["```json", json.dumps(result, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes; without a GPU, the kernels interpreted (for CI)",
    )
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for gpu_check.json and .md")
    args = ap.parse_args(argv)
    # JAX would take 75% of the GPU's memory when it starts (its check runs last)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    torch = _torch()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu_check: torch sees no CUDA device; use --smoke for the CPU smoke mode",
            file=sys.stderr,
        )
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before klx imports Triton
        from klx._accel import gates

        # CPU tensors take klx's CUDA paths (the Triton kernels, interpreted), as the tests do
        gates.DEVICE_ALIASES["cpu"] = "cuda"
    ctx = Context(
        smoke=args.smoke,
        device="cuda" if cuda else "cpu",
        vocab=4096 if args.smoke else 128256,
        rows=4 if args.smoke else 64,
        fused=(64, 32, 1000) if args.smoke else (8192, 4096, 128256),
        repeat=1 if args.smoke else 5,
        out=Path(args.out),
    )
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(CHECKS)
    if "environment" not in names:
        names.insert(0, "environment")
    report = run(ctx, names)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report).split("\n## ")[0])
    print(f"gpu_check: report in {out / 'gpu_check.md'}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in report.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
