"""The last lines of CI: the conformance summary, then which nox sessions passed, failed
or were skipped, and why; for a failed session, the tests that failed (from the JUnit
files its pytest runs wrote, see noxfile.py).

    python tools/ci_summary.py NOX_REPORT.json conformance/report.md SECONDS [JUNIT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import junit


def why_failed(name: str, junit_dir: Path | None) -> str:
    """A failed session's reason: its failing tests, else where to look."""
    runs = junit.for_session(junit_dir, name) if junit_dir else []
    failed = [test for run in runs for test in run.failed]
    if failed:
        return f"{len(failed)} failed: {junit.named(failed)}"
    if runs:
        return "its tests passed; a later step failed: see its log above"
    return "no test results: it failed before or outside pytest; see its log above"


def summary(report: dict, seconds: str, junit_dir: Path | None = None) -> str:
    """One line: how many sessions passed, and each one skipped or failed, with its reason."""
    passed, others = 0, {"skipped": [], "failed": [], "aborted": []}
    for s in report["sessions"]:
        name = s["signatures"][0] if s.get("signatures") else s["name"]
        if s["result"] == "success":
            passed += 1
        else:
            why = s.get("reason")
            if s["result"] == "failed":  # nox's own reason (if any) after the failing tests
                why = why_failed(name, junit_dir) + (f"; {why}" if why else "")
            others.setdefault(s["result"], []).append(f"{name} ({why or 'no reason given'})")
    line = f"CI: {passed} sessions passed"
    for result, names in others.items():
        if names:
            line += f"; {len(names)} {result}: " + "; ".join(names)
    if not any(others.values()):
        line += ", none skipped or failed"
    return line + f" (in {seconds} s)"


def main(argv: list[str]) -> int:
    report_path, conformance, seconds = Path(argv[0]), Path(argv[1]), argv[2]
    junit_dir = Path(argv[3]) if len(argv) > 3 else conformance.parent / "junit"
    if conformance.is_file():  # the summary block at the top of the report
        for line in conformance.read_text().splitlines()[1:]:
            if line.startswith("    "):
                print(line[4:])
            elif line.strip():
                break
    if not report_path.is_file():
        print(f"CI: nox wrote no report ({report_path}) in {seconds} s")
        return 0
    print(summary(json.loads(report_path.read_text()), seconds, junit_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
