"""tools/conformance_report.py: the cross-backend comparison, on results made up here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))

import conformance_report as cr
from support import reference

PARAMS = {"case": "random", "dtype": "float32", "reduction": "sum", "log_target": False}


def _session(folder: Path, backend: str, value: np.ndarray, error: float = 1e-7) -> None:
    rec = cr.Recorder()
    rec.add(f"{backend}-cpu float32", "sum probs", error, 2e-6, {**PARAMS, "backend": 0}, value)
    rec.write(folder, backend)


def test_identical_results_are_bit_identical(tmp_path):
    value = np.array([0.25, 1.5, np.nan], dtype=np.float32)
    _session(tmp_path, "numpy", value)
    _session(tmp_path, "torch", value.copy())
    text, summary = cr.report(tmp_path)
    assert "bit-identical on all of them: 1" in summary
    assert (
        "| float32 | sum probs | case=random | 2e-6 | 1.0e-07 | 1.0e-07 | bit-identical |" in text
    )


def test_one_ulp_apart_is_about_one_eps(tmp_path):
    a = np.array([1.0, 0.5], dtype=np.float32)
    b = a.copy()
    b[0] = np.nextafter(b[0], np.float32(2))  # one float32 ulp above 1.0 = eps
    _session(tmp_path, "numpy", a)
    _session(tmp_path, "jax", b)
    cells, _ = cr.load(tmp_path)
    (cell,) = cells.values()
    assert cell.spread() == pytest.approx(1.0)
    assert "1.0 eps" in cr.report(tmp_path)[0]


def test_nan_in_different_places_is_reported(tmp_path):
    _session(tmp_path, "numpy", np.array([np.nan, 1.0]))
    _session(tmp_path, "dask", np.array([1.0, np.nan]))
    (cell,) = cr.load(tmp_path)[0].values()
    assert math.isinf(cell.spread())
    assert "non-finite places differ" in cr.report(tmp_path)[0]


def test_large_results_are_sampled_but_digested_whole():
    big = np.arange(3 * cr.MAX_VALUES, dtype=np.float64)
    stored, sampled = cr.sample(big)
    assert sampled and stored.size <= cr.MAX_VALUES
    other = big.copy()
    other[1] += 1  # outside the sample's stride
    assert cr.digest(other) != cr.digest(big)


def test_tolerances_print_as_the_docs_state_them():
    docs = (Path(__file__).parents[2] / "docs" / "conformance.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in docs.splitlines()
        if line.startswith("| float") or line.startswith("| bfloat")
    }
    for dtype, tol in reference.TOL.items():
        assert rows[dtype][2].strip() == cr.fmt_tol(tol), dtype
    for dtype, tol in reference.TOL_KL_DIVERGENCE.items():
        assert rows[dtype][3].strip() == cr.fmt_tol(tol), dtype
    assert cr.fmt_tol(1.6e-2) == "1.6e-2"
    assert cr.fmt_tol(2e-6) == "2e-6"
