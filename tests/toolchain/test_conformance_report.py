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


def _junit(folder: Path, session: str, failed: list[str]) -> None:
    """A JUnit file as pytest writes it, with one passing test and the named failures."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = ['<testcase classname="tests.api.test_ok" name="test_ok" time="0.1"/>']
    for name in failed:
        cases.append(
            f'<testcase classname="tests.scale.test_distributed" name="{name}">'
            '<failure message="ImportError">boom</failure></testcase>'
        )
    body = "".join(cases)
    (folder / f"{session}.xml").write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'
    )


def test_a_failed_or_missing_backend_is_named_in_the_summary(tmp_path):
    """The break of 2026-12-06: dask's session failed, and the summary read as green."""
    value = np.array([0.25, 1.5], dtype=np.float32)
    _session(tmp_path, "numpy", value)
    _session(tmp_path, "dask", value.copy())
    junits = tmp_path / "junit"
    _junit(junits, "tests-backend-numpy", [])
    _junit(junits, "tests-backend-dask", ["test_cluster_start"])
    _, summary = cr.report(tmp_path, ["numpy", "dask", "cupy"], junits)
    assert "over tolerance: 0" in summary
    assert (
        "FAILED: dask: 1 test(s) failed or errored "
        "(tests/scale/test_distributed.py::test_cluster_start)" in summary
    )
    assert "MISSING: cupy: no results" in summary
    assert "numpy" not in summary.split("FAILED")[1]  # numpy ran and passed: not listed


def test_every_expected_backend_passing_is_said(tmp_path):
    _session(tmp_path, "numpy", np.array([1.0]))
    _junit(tmp_path / "junit", "tests-backend-numpy", [])
    _, summary = cr.report(tmp_path, ["numpy"], tmp_path / "junit")
    assert "every expected backend ran and passed: numpy" in summary


def test_ci_summary_names_the_failing_tests(tmp_path):
    import ci_summary

    _junit(tmp_path, "tests-backend-dask", ["test_a", "test_b"])
    _junit(tmp_path, "docs", [])
    report = {
        "sessions": [
            {"name": "lint", "signatures": ["lint"], "result": "success"},
            {"name": "tests", "signatures": ["tests(backend='dask')"], "result": "failed"},
            {
                "name": "tests",
                "signatures": ["tests(backend='cupy')"],
                "result": "skipped",
                "reason": "cupy needs a CUDA device",
            },
            {"name": "typecheck", "signatures": ["typecheck"], "result": "failed"},
            {"name": "docs", "signatures": ["docs"], "result": "failed"},
        ]
    }
    line = ci_summary.summary(report, "12", tmp_path)
    assert line.startswith("CI: 1 sessions passed; 1 skipped: tests(backend='cupy') (cupy needs")
    assert (
        "tests(backend='dask') (2 failed: tests/scale/test_distributed.py::test_a, "
        "tests/scale/test_distributed.py::test_b)" in line
    )
    assert "typecheck (no test results: it failed before or outside pytest" in line
    assert "docs (its tests passed; a later step failed" in line


def test_an_unreadable_junit_file_counts_as_a_failure(tmp_path):
    import junit

    (tmp_path / "tests-backend-jax.xml").write_text("<testsuites><testsuite>")
    (run,) = junit.for_session(tmp_path, "tests(backend='jax')")
    assert not run.ok and "could not be read" in run.failed[0]


def test_cells_left_by_an_earlier_run_do_not_count_as_this_run(tmp_path):
    """A session that failed before pytest wrote no JUnit file: its old cells are no result."""
    _session(tmp_path, "numpy", np.array([1.0]))
    _session(tmp_path, "torch", np.array([1.0]))  # stale: no JUnit file this run
    _junit(tmp_path / "junit", "tests-backend-numpy", [])
    _, summary = cr.report(tmp_path, ["numpy", "torch"], tmp_path / "junit")
    assert "MISSING: torch: no results" in summary
    assert "every expected backend ran and passed" not in summary


def test_ci_summary_keeps_nox_reason_for_a_failed_session(tmp_path):
    import ci_summary

    report = {
        "sessions": [
            {"name": "t", "signatures": ["typecheck"], "result": "failed", "reason": "why"}
        ]
    }
    assert (
        "typecheck (no test results: it failed before or outside pytest; see its log "
        "above; why)" in ci_summary.summary(report, "1", tmp_path)
    )
