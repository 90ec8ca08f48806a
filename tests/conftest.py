"""Test configuration: the backend matrix, and the conformance table written at the end.

Choose backends with ``--backend NAME`` (repeatable, or comma-separated) or the
environment variable ``KLX_BACKENDS``. A backend that was asked for and cannot be
imported fails the run. With none asked for, every installed backend runs and the
missing ones are listed in the header. CuPy without a CUDA device is skipped, with
the reason, whether asked for or not.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from support import backends as bk
from support.gpu_math import approximate_exp, fp32_float_arguments

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import conformance_report

# CI draws the same examples every run (a red run must be reproducible); locally each run
# explores new ones and keeps failures in the .hypothesis database.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_LOADED: list[bk.Backend] = []
_SKIPPED: dict[str, str] = {}
#: (row, column) -> worst error, filled by the `conformance` fixture.
_TABLE: dict[tuple[str, str], float] = defaultdict(float)
_TOL: dict[str, float] = {}
#: Every cell's error and result, for tools/conformance_report.py to compare backends.
_CELLS = conformance_report.Recorder()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        help=f"array library to test (repeatable or comma-separated): {', '.join(bk.ALL)}",
    )
    parser.addoption(
        "--conformance-out",
        default="conformance",
        help="folder for the conformance table (markdown); '' to write none",
    )


def pytest_configure(config: pytest.Config) -> None:
    asked = [b for opt in config.getoption("--backend") for b in opt.split(",") if b]
    if not asked and os.environ.get("KLX_BACKENDS"):
        asked = [b for b in os.environ["KLX_BACKENDS"].split(",") if b]
    for name in asked:
        if name not in bk.ALL:
            msg = f"unknown backend {name!r}; choose from {', '.join(bk.ALL)}"
            raise pytest.UsageError(msg)
    for name in asked or bk.ALL:
        if name == "cupy" and not bk.cuda_available():
            _SKIPPED[name] = "no CUDA device on this machine"
            continue
        try:
            _LOADED.extend(bk.load(name))
        except ImportError as exc:
            if asked:
                msg = f"backend {name!r} was asked for but cannot be imported: {exc}"
                raise pytest.UsageError(msg) from exc
            _SKIPPED[name] = f"not installed ({exc.name}); ask with --backend={name} to require it"


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = ["klx backends: " + ", ".join(b.id for b in _LOADED)]
    lines += [f"klx backend skipped: {n}: {why}" for n, why in _SKIPPED.items()]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    wanted = None
    why = ""
    if marker is not None:
        if not marker.kwargs.get("reason"):
            msg = f"{metafunc.definition.nodeid}: @pytest.mark.backends(...) needs a reason="
            raise pytest.UsageError(msg)
        wanted, why = marker.args, marker.kwargs["reason"]
    params = [pytest.param(b, id=b.id) for b in _LOADED if wanted is None or b.name in wanted]
    if not params:
        if wanted is not None:
            loaded = ", ".join(sorted({b.name for b in _LOADED})) or "none"
            reason = f"runs on {', '.join(wanted)} only ({why}); this run tests {loaded}"
        else:
            reason = "; ".join(f"{n}: {w}" for n, w in _SKIPPED.items()) or "no backend loaded"
        params = [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
    metafunc.parametrize("backend", params, scope="session")


@pytest.fixture(autouse=True)
def _gpu_arithmetic_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TRITON_INTERPRET=1 every kernel meets the GPU's approximate float32 ``exp``
    and receives Python floats as float32 (support/gpu_math.py), as a compiled kernel
    does, not NumPy's correctly rounded exp and Python's float64."""
    if os.environ.get("TRITON_INTERPRET") == "1" and _TRITON:
        approximate_exp(monkeypatch)
        fp32_float_arguments(monkeypatch)


_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="session")
def xp(backend: bk.Backend) -> Any:
    return backend.xp


@pytest.fixture
def conformance(request: pytest.FixtureRequest) -> Any:
    """Record a cell's worst error: conformance(row, column, error, tolerance, value=result).

    With `value` (the result as a NumPy array) the cell also goes to the JSON that
    tools/conformance_report.py reads to compare the backends with each other.
    """
    params = getattr(request.node, "callspec", None)

    def record(row: str, column: str, error: float, tol: float, value: Any = None) -> None:
        key = (row, column)
        _TABLE[key] = max(_TABLE[key], error)
        _TOL[row] = tol
        if value is not None:
            _CELLS.add(row, column, error, tol, params.params if params else {}, value)

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _TABLE:
        return
    rows = sorted({r for r, _ in _TABLE})
    cols = sorted({c for _, c in _TABLE}, key=_column_order)
    lines = [
        "| backend / device / dtype | tol | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{_TABLE[(r, c)]:.1e}" if (r, c) in _TABLE else "-" for c in cols]
        lines.append(f"| {r} | {conformance_report.fmt_tol(_TOL[r])} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "klx conformance: worst error per cell (relative to scale)")
    terminalreporter.write_line(text)
    out = config.getoption("--conformance-out")
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted({b.name for b in _LOADED}) or ["none"]
        path = folder / f"conformance-{'-'.join(names)}.md"
        path.write_text(
            "# klx conformance matrix\n\nWorst error of each cell: |klx - reference| "
            "divided by the scale of the terms (see docs/conformance.md, Tolerances).\n\n"
            + text
            + "\n"
        )
        terminalreporter.write_line(f"written to {path}")
        if _CELLS.cells:
            cells = _CELLS.write(folder, "-".join(names))
            terminalreporter.write_line(f"every cell's error and result: {cells}")


def _column_order(col: str) -> tuple[int, str]:
    order = ["none", "sum", "mean", "batchmean"]
    head = col.split()[0]
    return (order.index(head) if head in order else len(order), col)
