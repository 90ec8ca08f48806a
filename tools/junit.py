"""What a pytest run's JUnit XML file says: how many tests ran, and which failed.

nox's sessions write one file per pytest run (``--junitxml``, see noxfile.py); CI's
summary and the conformance report read them to name failing tests.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    """One pytest run: counts, and the ids of the tests that failed or errored."""

    path: Path
    tests: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def read(path: Path) -> Run:
    """Parse one JUnit file; an unreadable file is one failure that says so."""
    run = Run(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        run.failed.append(f"{path.name} could not be read ({exc})")
        return run
    for case in root.iter("testcase"):
        run.tests += 1
        if case.find("skipped") is not None:
            run.skipped += 1
        if case.find("failure") is not None or case.find("error") is not None:
            # classname is the module's dotted path (for a test class, its path plus the
            # class: klx's suite has none), name the test with its parameters.
            module, name = case.get("classname", "").replace(".", "/"), case.get("name", "?")
            run.failed.append(f"{module}.py::{name}" if module else name)
    return run


def slug(session_name: str) -> str:
    """A session's JUnit file stem: tests(backend='dask') -> tests-backend-dask (noxfile.py)."""
    return re.sub(r"[^\w]+", "-", session_name).strip("-")


def for_session(folder: Path, session_name: str) -> list[Run]:
    """Every JUnit file one nox session wrote (its main run and any -part runs)."""
    stem = slug(session_name)
    paths = sorted(folder.glob(f"{stem}.xml")) + sorted(folder.glob(f"{stem}-*.xml"))
    return [read(p) for p in paths]


def named(failed: list[str], most: int = 5) -> str:
    """At most `most` test ids, then how many more."""
    shown = ", ".join(failed[:most])
    return shown + (f" and {len(failed) - most} more" if len(failed) > most else "")
