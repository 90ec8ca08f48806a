"""``python -m benchmarks.vocab --smoke``: every masked-vocabulary and vocabulary-size case
runs, and the table and JSON name them. Tiny shapes, one timing each: no figure is
checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import vocab  # noqa: E402

CASES = (
    "masked on both sides",
    "teacher masked only",
    "intersect, teacher padded",
    "truncate, teacher larger",
)


@pytest.mark.backends("torch", reason="the benchmark times NumPy and torch on the CPU")
def test_every_vocab_case_runs(backend, tmp_path, capsys):
    assert vocab.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "vocab.json").read_text())
    assert [(r["library"], r["case"]) for r in rows] == [
        (lib, c) for lib in ("numpy", "torch") for c in CASES
    ]
    for r in rows:
        assert (r["rows"], r["vocab"]) == (16, 256)
        assert r["ms"] > 0 and r["dense_ms"] > 0
    for name in CASES:
        assert f"| numpy | {name} |" in table
