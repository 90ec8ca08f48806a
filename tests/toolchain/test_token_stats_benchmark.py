"""``python -m benchmarks.token_stats --smoke``: every case runs (klx.token_stats against
the plain recipe in eager torch, NumPy, jax.jit and torch.compile; the fused path's
memory), and the table and JSON list them. Tiny shapes, one round: no figure is checked
here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import token_stats  # noqa: E402


@pytest.mark.slow
@pytest.mark.backends("torch", reason="the benchmark compares with eager torch")
def test_every_token_stats_case_runs(backend, tmp_path, capsys):
    assert token_stats.main(["--smoke", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "token_stats.json").read_text())
    cases = [r["case"] for r in rows]
    size = "16x64"
    want = {
        "torch": [f"torch values {size}", f"torch fwd+bwd {size}"],
        "numpy": [f"numpy values {size}"],
        "jax": [f"jax.jit values {size}", f"jax.jit value+grad {size}"],
        "compile": [f"torch.compile values {size}", f"torch.compile value+grad {size}"],
    }
    timed = [c for lib in token_stats.installed(list(token_stats.LIBRARIES)) for c in want[lib]]
    assert cases == [*timed, "memory fused", "memory logits whole"]
    for r in rows[: len(timed)]:
        assert r["klx_s"] > 0 and r["plain_s"] > 0
    assert f"| torch values {size} |" in table and "| fused |" in table
