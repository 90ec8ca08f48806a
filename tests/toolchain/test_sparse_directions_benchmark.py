"""``python -m benchmarks.sparse_directions --smoke``: every case of the top-k benchmark
runs forward and backward, and the table and JSON name them. Tiny shapes, one timing
each: no figure is checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import sparse_directions  # noqa: E402

CASES = (
    "dense KL (definition)",
    "sparse forward, teacher top k (vLLM)",
    "sparse reverse, student top k",
    "sparse JS, union",
)


@pytest.mark.backends("torch", reason="the benchmark times torch on the CPU")
def test_every_sparse_case_runs(backend, tmp_path, capsys):
    assert sparse_directions.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "sparse_directions.json").read_text())
    assert [r["case"] for r in rows] == list(CASES)
    for r in rows:
        assert (r["rows"], r["vocab"], r["k"]) == (16, 512, 8)
        assert r["ms"] > 0
    assert rows[0]["ratio_to_dense"] == 1.0
    for name in CASES:
        assert f"| {name} |" in table
