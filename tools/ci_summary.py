"""The last lines of CI: the conformance summary, then which nox sessions passed, failed
or were skipped, and why.

    python tools/ci_summary.py NOX_REPORT.json conformance/report.md SECONDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(report: dict, seconds: str) -> str:
    """One line: how many sessions passed, and each one skipped or failed, with its reason."""
    passed, others = 0, {"skipped": [], "failed": [], "aborted": []}
    for s in report["sessions"]:
        name = s["signatures"][0] if s.get("signatures") else s["name"]
        if s["result"] == "success":
            passed += 1
        else:
            why = s.get("reason") or "no reason given"
            others.setdefault(s["result"], []).append(f"{name} ({why})")
    line = f"CI: {passed} sessions passed"
    for result, names in others.items():
        if names:
            line += f"; {len(names)} {result}: " + "; ".join(names)
    if not any(others.values()):
        line += ", none skipped or failed"
    return line + f" (in {seconds} s)"


def main(argv: list[str]) -> int:
    report_path, conformance, seconds = Path(argv[0]), Path(argv[1]), argv[2]
    if conformance.is_file():  # the summary block at the top of the report
        for line in conformance.read_text().splitlines()[1:]:
            if line.startswith("    "):
                print(line[4:])
            elif line.strip():
                break
    if not report_path.is_file():
        print(f"CI: nox wrote no report ({report_path}) in {seconds} s")
        return 0
    print(summary(json.loads(report_path.read_text()), seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
