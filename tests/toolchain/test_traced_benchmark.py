"""``python -m benchmarks.traced --smoke``: every row of the traced benchmark traces
(``jax.jit``; ``torch.compile(fullgraph=True)``), and the table and JSON say what the
issue's targets are. Tiny shapes, one timing each: no figure is checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import traced  # noqa: E402

#: Rows of the table per backend: every case, value and gradient.
ROWS = 32


#: The marks of a test that traces: slow, on the libraries that trace, and without torch
#: 2.13's own DeprecationWarning (its Dynamo instantiates the Function class while tracing
#: any autograd.Function; filterwarnings = error would raise it): not klx's.
TRACES = (
    pytest.mark.slow,
    pytest.mark.backends("jax", "torch", reason="the libraries that trace: jax.jit, torch.compile"),
    pytest.mark.filterwarnings(
        "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
        ":DeprecationWarning"
    ),
)


def traces(test):
    """`test` with the :data:`TRACES` marks."""
    for mark in TRACES:
        test = mark(test)
    return test


@traces
def test_every_traced_row_runs(backend, tmp_path, capsys):
    if backend.name == "torch":
        import torch

        torch._dynamo.reset()
    assert traced.main(["--smoke", "--backends", backend.name, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "traced.json").read_text())
    assert len(rows) == ROWS
    label = "jax.jit" if backend.name == "jax" else "torch.compile"
    assert {r["backend"] for r in rows} == {label}
    cases = [r["case"] for r in rows]
    kinds = (
        "kl_div",
        "KL of probabilities",
        "KL from logits",
        "JS",
        "skew KL",
        "TV",
        "k3",
        "sparse",
        "fused",
    )
    family = ("mixture", "alpha-divergence", "Rényi", "cross-entropy", "entropy from")
    for kind in kinds + family:
        assert sum(kind in c for c in cases) >= 2, kind  # its value and its gradient
    for r in rows:
        assert r["target"] == traced.TARGETS["grad" if r["case"].endswith("grad") else "value"]
        assert r["klx_ms"] > 0 and r["formula_ms"] > 0
        assert r["device"] == "cpu"
        assert r["met"] == (r["ratio"] <= r["target"])
    assert table.count("\n| " + label) == ROWS


@traces
def test_device_cuda_times_on_the_gpu_or_says_why_not(backend, tmp_path, capsys):
    """``--device cuda``: the calls on the first CUDA device; without one, exit status 2
    and the reason, and no table."""
    why = traced.unavailable(backend.name, "cuda")
    args = ["--smoke", "--device", "cuda", "--backends", backend.name, "--out", str(tmp_path)]
    code = traced.main([*args, "--rows", "kl_div batchmean"])
    err = capsys.readouterr().err
    if why is not None:
        assert code == 2
        assert f"{backend.name} skipped: {why}" in err
        assert "no backend can run on cuda here" in err
        assert not (tmp_path / "traced.json").exists()
        return
    assert code == 0
    rows = json.loads((tmp_path / "traced.json").read_text())
    assert [r["case"].split()[-1] for r in rows] == ["value", "grad"]
    assert {r["device"] for r in rows} == {"cuda"}


def test_measure_refuses_an_unknown_device():
    with pytest.raises(ValueError, match=r"`device` must be one of cpu, cuda, not 'tpu'"):
        traced.measure(["torch"], "smoke", device="tpu")
