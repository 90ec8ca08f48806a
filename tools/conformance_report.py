"""One conformance report from every tests session: each backend against the others.

Each ``nox`` tests session runs the conformance matrix on one backend and, through
``tests/conftest.py``, writes ``cells-<backend>.json`` (every cell's error against the
float64 reference, its tolerance and a digest of its result) and ``values-<backend>.npz``
(the result itself, or an evenly strided sample of at most ``MAX_VALUES`` elements of a
larger one). This script reads them all and writes one markdown report: per cell
(function, dtype, reduction, input case), each backend's error and the largest difference
between any two backends, "bit-identical" where every backend gave the same bits, else
in units of the dtype's eps (max |a - b| over the cell, divided by eps(dtype) times the
cell's largest |value|)::

    python tools/conformance_report.py conformance --out conformance/report.md

With ``--expect`` (the backends whose sessions were asked for) and ``--junit`` (the folder
of the sessions' JUnit files), the summary also names each backend whose results are
missing (its session was skipped or did not run) or whose tests failed, so a red session
never reads as green here.

It needs only NumPy. The recording half (``Recorder``) is what conftest.py uses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import junit

#: Results up to this many elements are stored whole; larger ones as a strided sample.
MAX_VALUES = 4096
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
#: Test parameters that name the backend or the table's row and column, not the input case.
NOT_CASE = {"backend", "dtype", "reduction", "log_target"}


def fmt_tol(tol: float) -> str:
    """A tolerance as the docs write it: 1.6e-2, 2e-6, 1e-12."""
    mantissa, exponent = f"{tol:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def digest(values: np.ndarray) -> str:
    """sha256 of the values in float64 (exact for every float dtype) and the shape."""
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    a = np.where(np.isnan(a), np.nan, a)  # one NaN bit pattern
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def sample(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """The values to store (float64, flat): all of them, or an evenly strided sample."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size <= MAX_VALUES:
        return flat, False
    return flat[:: math.ceil(flat.size / MAX_VALUES)], True


@dataclass
class Recorder:
    """The cells one pytest run recorded, to write as JSON + NPZ for the report."""

    cells: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def add(
        self, row: str, column: str, error: float, tol: float, params: dict[str, Any], value: Any
    ) -> None:
        """One cell: row 'backend-device dtype [function]', column 'reduction [form]'."""
        words = row.split()
        key = f"c{len(self.cells)}"
        stored, sampled = sample(value)
        self.values[key] = stored
        self.cells.append(
            {
                "backend": words[0],
                "dtype": words[1],
                "function": words[2] if len(words) > 2 else "kl_div",
                "column": column,
                "case": ",".join(
                    f"{k}={v}" for k, v in sorted(params.items()) if k not in NOT_CASE
                ),
                "error": float(error),
                "tol": float(tol),
                "digest": digest(value),
                "shape": list(np.shape(value)),
                "sampled": sampled,
                "values": key,
            }
        )

    def write(self, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / f"values-{name}.npz", **self.values)
        path = folder / f"cells-{name}.json"
        path.write_text(json.dumps({"session": name, "cells": self.cells}, indent=0))
        return path


@dataclass
class Cell:
    """One cell of the matrix across every backend that ran it."""

    function: str
    dtype: str
    column: str
    case: str
    errors: dict[str, float] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    sampled: bool = False
    tol: float = 0.0

    def spread(self) -> float | None:
        """None: bit-identical. Else the largest difference of two backends, in eps."""
        if len(set(self.digests.values())) <= 1:
            return None
        arrays = list(self.values.values())
        worst = 0.0
        for i, a in enumerate(arrays):
            for b in arrays[i + 1 :]:
                worst = max(worst, _difference(a, b, EPS[self.dtype]))
        return worst


def _difference(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    """max |a - b| / (eps * max |value|); inf where NaN or inf sit in different places."""
    if a.shape != b.shape:
        return math.inf
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.inf
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(a[~finite & ~np.isnan(a)], b[~finite & ~np.isnan(b)]):
        return math.inf  # +-inf in different places or of different signs
    if not finite.any():
        return 0.0
    diff = float(np.max(np.abs(a[finite] - b[finite])))
    size = float(max(np.max(np.abs(a[finite])), np.max(np.abs(b[finite]))))
    if diff == 0.0:
        return 0.0
    return diff / (eps * size) if size > 0 else math.inf


def load(folder: Path) -> tuple[dict[tuple[str, str, str, str], Cell], list[str]]:
    """Every cells-*.json in the folder, merged into cells keyed by (function, dtype, ...)."""
    cells: dict[tuple[str, str, str, str], Cell] = {}
    sessions = []
    for path in sorted(folder.glob("cells-*.json")):
        data = json.loads(path.read_text())
        sessions.append(data["session"])
        npz_path = path.with_name(path.name.replace("cells-", "values-").replace(".json", ".npz"))
        with np.load(npz_path) as npz:
            for c in data["cells"]:
                key = (c["function"], c["dtype"], c["column"], c["case"])
                cell = cells.setdefault(key, Cell(*key))
                cell.errors[c["backend"]] = c["error"]
                cell.digests[c["backend"]] = c["digest"]
                cell.values[c["backend"]] = npz[c["values"]]
                cell.sampled |= c["sampled"]
                cell.tol = c["tol"]
    return cells, sessions


def _fmt_spread(s: float | None) -> str:
    if s is None:
        return "bit-identical"
    if math.isinf(s):
        return "non-finite places differ"
    # Digests differ but the stored values do not: signed zeros, or outside the sample.
    return f"{s:.1f} eps" if s > 0 else "0 eps (bits differ)"


def session_lines(expect: list[str], junit_dir: Path | None, sessions: list[str]) -> list[str]:
    """One line per expected backend that has no results or whose tests failed."""
    lines = []
    for name in expect:
        runs = junit.for_session(junit_dir, f"tests(backend='{name}')") if junit_dir else []
        failed = [test for run in runs for test in run.failed]
        # With JUnit files, only this run's count (a session deletes its old ones first).
        ran = bool(runs) if junit_dir else any(name in s.split("-") for s in sessions)
        if failed:
            lines.append(
                f"  FAILED: {name}: {len(failed)} test(s) failed or errored "
                f"({junit.named(failed)}); its cells below are incomplete"
            )
        elif not ran:
            lines.append(
                f"  MISSING: {name}: no results (its tests session was skipped or did not run; "
                "see nox's session list)"
            )
    return lines


def report(
    folder: Path, expect: list[str] | None = None, junit_dir: Path | None = None
) -> tuple[str, str]:
    """(markdown report, a few summary lines for the end of nox)."""
    cells, sessions = load(folder)
    if not cells:
        msg = f"no cells-*.json in {folder}: run the tests sessions first"
        raise SystemExit(msg)
    backends = sorted({b for c in cells.values() for b in c.errors})
    compared = [c for c in cells.values() if len(c.errors) > 1]
    identical = [c for c in compared if c.spread() is None]
    worst: dict[str, tuple[float, Cell]] = {}
    for c in compared:
        s = c.spread()
        if s is not None and (c.dtype not in worst or s > worst[c.dtype][0]):
            worst[c.dtype] = (s, c)
    failing = [c for c in cells.values() if max(c.errors.values()) > c.tol]

    summary = [
        f"conformance report: {len(cells)} cells from sessions {', '.join(sessions)} "
        f"(backends: {', '.join(backends)})",
        f"  {len(compared)} cells ran on two or more backends; bit-identical on all of them: "
        f"{len(identical)}; over tolerance: {len(failing)}",
    ]
    problems = session_lines(expect or [], junit_dir, sessions)
    if expect and not problems:
        problems = [f"  every expected backend ran and passed: {', '.join(expect)}"]
    summary += problems
    for dtype in EPS:
        if dtype in worst:
            s, c = worst[dtype]
            summary.append(
                f"  {dtype}: largest difference between backends {_fmt_spread(s)} "
                f"({c.function} {c.column} {c.case})"
            )

    lines = [
        "# klx conformance report: every backend against the reference and each other",
        "",
        *[f"    {line}" for line in summary],
        "",
        "Error: |klx - reference| / scale, as in each session's table (tolerance `tol`). "
        "Spread: the largest difference between any two backends' results in the cell, "
        "'bit-identical' where all are, else max |a - b| / (eps(dtype) max |value|). "
        "Cells marked * compare a strided sample of at most "
        f"{MAX_VALUES} elements (their digests compare all of them). "
        "'-': the backend did not run the cell (e.g. no such dtype).",
        "",
    ]
    for function in sorted({c.function for c in cells.values()}):
        lines += [f"## {function}", ""]
        lines.append("| dtype | reduction | case | tol | " + " | ".join(backends) + " | spread |")
        lines.append("|---|---|---|---|" + "---|" * len(backends) + "---|")
        rows = sorted(
            (c for c in cells.values() if c.function == function),
            key=lambda c: (list(EPS).index(c.dtype), c.column, c.case),
        )
        for c in rows:
            errs = [f"{c.errors[b]:.1e}" if b in c.errors else "-" for b in backends]
            spread = _fmt_spread(c.spread()) if len(c.errors) > 1 else "one backend"
            mark = " *" if c.sampled else ""
            lines.append(
                f"| {c.dtype} | {c.column} | {c.case}{mark} | {fmt_tol(c.tol)} | "
                + " | ".join(errs)
                + f" | {spread} |"
            )
        lines.append("")
    return "\n".join(lines), "\n".join(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the tests sessions wrote cells-*.json")
    parser.add_argument("--out", type=Path, help="markdown report (default: FOLDER/report.md)")
    parser.add_argument(
        "--expect", nargs="*", default=[], help="backends whose tests sessions were asked for"
    )
    parser.add_argument("--junit", type=Path, help="folder of the sessions' JUnit files")
    args = parser.parse_args(argv)
    text, summary = report(args.folder, args.expect, args.junit)
    out = args.out or args.folder / "report.md"
    out.write_text(text + "\n")
    print(summary)
    print(f"  written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
