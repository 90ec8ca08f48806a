"""`python -m benchmarks.gpu_check`, the one command that settles klx on a GPU, in its CPU
smoke mode (tiny sizes, the Triton kernels interpreted): so it cannot rot where CI has no
GPU. On a GPU host the full mode is run by hand (benchmarks/RESULTS.md, GPU readiness)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.backends("torch", reason="the GPU check runs torch's CUDA paths")
def test_gpu_check_smoke_mode_runs_every_check(backend, tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the nox torch session installs it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    from benchmarks.gpu_check import CHECKS

    assert list(report) == list(CHECKS)
    assert {r["status"] for r in report.values()} <= {"ok", "skipped"}
    gpu_only = {"cuda_graph", "cupy"}
    for name, result in report.items():
        if result["status"] == "skipped":
            assert name in gpu_only or "reason" in result, (name, result)
    # the kernels served the smoke run (CPU tensors on the CUDA paths, interpreted)
    assert {c["path"] for c in report["near_equal"]["cells"]} == {"triton-rows-from-logits"}
    # klx traced against the plain formula (issue 24): the smoke rows, on the CPU here
    traced = report["traced"]
    assert traced["device"] == "cpu" and "torch" in traced["backends"]
    assert traced["rows"] == len(traced["cells"]) == 4 * len(traced["backends"])
    assert traced["met"] == sum(c["met"] for c in traced["cells"])
    assert len(traced["over"]) == traced["rows"] - traced["met"]
    assert {c["device"] for c in traced["cells"]} == {"cpu"}
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith("# klx GPU check")
    assert "\n| traced call | case | klx ms | formula ms | ratio | target |\n" in text
