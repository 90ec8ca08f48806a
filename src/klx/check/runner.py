"""The run of :mod:`klx.check`: each library asked for, each of its devices, each path
that serves that device (the definition first) in each dtype it serves.

A library that is missing, or sees no GPU, is a note with what to install; a path that
raises, or that another path stands in for, is a failed row, never an exception.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from klx import _backends
from klx._backends import CheckDevice, note
from klx.check.cases import _kl_div_cases, _rows_cases
from klx.check.reference import TOLERANCE
from klx.check.report import Row
from klx.check.timing import _time

#: The array libraries it looks for: every one klx has an adapter for (klx._backends).
LIBRARIES = tuple(lib.name for lib in _backends.LIBRARIES)


def _find(np: Any, name: str, notes: list[str]) -> list[CheckDevice]:
    """The devices of library `name`; [] with a note saying how to check it if missing."""
    adapter = _backends.BY_NAME[name]
    try:
        importlib.import_module(adapter.module)
    except ImportError as exc:
        missing = (exc.name or name).split(".")[0]
        why = (
            "not installed"
            if missing == adapter.module.split(".")[0]
            else (f"cannot be imported ({exc})")
        )
        notes.append(note(name, why, f"to check it: {adapter.install}"))
        return []
    except Exception as exc:  # a broken install: reported, the other libraries still checked
        notes.append(note(name, f"failed to import ({type(exc).__name__}: {exc})"))
        return []
    try:
        return adapter.check_devices(np, notes)
    except Exception as exc:
        notes.append(note(name, f"its devices could not be listed ({type(exc).__name__}: {exc})"))
        return []


def run(
    libraries: Sequence[str] = LIBRARIES,
    repeat: int = 10,
    size: tuple[int, int] = (1024, 4096),
    progress: TextIO | None = None,
) -> tuple[list[Row], list[str]]:
    """Check every accelerator on every library and device found.

    Parameters
    ----------
    libraries : sequence of str
        The array libraries to look for (names of :data:`LIBRARIES`).
    repeat : int
        Timed calls per figure (the median is reported).
    size : tuple of int
        The float32 input shape of the timings.
    progress : text stream, optional
        Where to write a line per library and device as it is checked (e.g. ``sys.stderr``).

    Returns
    -------
    rows : list of Row
        One per path and dtype.
    notes : list of str
        The libraries and devices not checked, each with why and what to install to check it.
    """
    import numpy as np

    import klx
    from klx._accel import registry

    notes: list[str] = []
    report: list[Row] = []
    accelerators_on = klx.accelerators_enabled()
    if not accelerators_on:
        notes.append(
            note(
                "klx's accelerators",
                "off in this process (KLX_ACCELERATORS=0 or klx.set_accelerators(False)): only "
                "the definition was checked",
                "to check them, run this again without KLX_ACCELERATORS=0",
            )
        )
    for name in libraries:
        start = time.perf_counter()  # the first device's time includes the import
        for lib in _find(np, name, notes):
            if progress is not None:
                progress.write(f"klx.check: checking {lib.name} on {lib.device} ... ")
                progress.flush()
            serving = _serving(registry, lib, notes) if accelerators_on else []
            paths: list[Any] = [None, *serving]  # None: the definition
            timings: dict[str, float] = {}  # the definition's and the peer's, once each
            rows: list[Row] = []
            for row in paths:
                for dtype in lib.dtypes:
                    if row is not None and dtype not in row.dtypes:
                        continue
                    # Validation off: the check's inputs hold the special values it refuses.
                    with klx.validation(False):
                        rows.append(
                            _check(np, klx, registry, lib, row, dtype, repeat, size, timings)
                        )
            report += rows
            if progress is not None:
                failed = sum(r.status != "ok" for r in rows)
                verdict = f"{failed} FAILED" if failed else "all ok"
                took = time.perf_counter() - start
                progress.write(f"{len(rows)} checks, {verdict} ({took:.1f} s)\n")
                progress.flush()
            start = time.perf_counter()
    return report, notes


def _serving(registry: Any, lib: CheckDevice, notes: list[str]) -> list[Any]:
    """The accelerators that serve `lib`'s arrays on its device. One that needs a library
    that is not installed (Triton for CUDA torch on Windows) is not available: a note says
    so, with what to install, instead of a failed row."""
    from klx._accel import gates

    rows = []
    for r in registry.ACCELERATORS:
        if r.library != lib.name or (r.devices and lib.device_type not in r.devices):
            continue
        missing = [m for m in r.requires if not gates._importable(m)]
        if missing:
            line = note(
                f"{r.name} on {lib.device}",
                f"not available: needs {', '.join(missing)}, which is not installed",
                f"to check it: pip install {' '.join(missing)}",
            )
            if line not in notes:
                notes.append(line)
            continue
        rows.append(r)
    return rows


def _check(
    np: Any,
    klx: Any,
    registry: Any,
    lib: CheckDevice,
    row: Any,
    dtype: str,
    repeat: int,
    size: tuple[int, int],
    timings: dict[str, float],
) -> Row:
    name = "definition" if row is None else row.name
    out = Row(lib.name, lib.device, name, dtype, tolerance=TOLERANCE[dtype])
    forced = registry.only(row)
    with _own_warnings(out.detail):
        try:
            with forced:
                if row is None or row.operation == "kl_div":
                    cases, worst, bad = _kl_div_cases(np, klx, lib, dtype, name)
                else:
                    cases, worst, bad = 0, 0.0, []
                if row is None or row.operation == "divergence":
                    # the kinds it serves that the references here know (all, if its
                    # row names none)
                    kinds = ("kl", "js") if row is None or not row.kinds else row.kinds
                    kinds = [k for k in kinds if k in ("kl", "js")]
                    c2, w2, b2 = _rows_cases(np, klx, lib, dtype, kinds, name)
                    cases, worst, bad = cases + c2, max(worst, w2), bad + b2
            out.cases, out.max_error = cases, worst
            out.detail += bad
            out.status = "MISMATCH" if bad else "ok"
            if dtype == "float32":
                _time(np, klx, lib, row, out, repeat, size, timings)
        except Exception as exc:  # a crash is a failure of the path, reported, not raised
            out.status = "ERROR"
            out.detail.append(f"{type(exc).__name__}: {exc}")
    return out


#: Other libraries' warnings passed on so far (category, message, file, line).
_FOREIGN_SEEN: set[tuple[Any, str, str, int]] = set()


@contextmanager
def _own_warnings(detail: list[str]) -> Iterator[None]:
    """Keep klx's own warnings out of the check's output.

    The check asks for ``reduction='mean'`` on purpose (no :class:`klx.KLDivMeanWarning`);
    an :class:`klx.AcceleratorWarning` (a path failed its first-use check) goes to the
    row's `detail`, where the report shows it. Other libraries' warnings pass on as usual.
    """
    from klx import AcceleratorWarning, KLDivMeanWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", KLDivMeanWarning)
        warnings.simplefilter("always", AcceleratorWarning)
        yield
    for w in caught:
        if issubclass(w.category, AcceleratorWarning):
            detail.append(f"{w.category.__name__}: {w.message}")
        elif (key := (w.category, str(w.message), w.filename, w.lineno)) not in _FOREIGN_SEEN:
            _FOREIGN_SEEN.add(key)  # once, as Python's default (each path would repeat it)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
