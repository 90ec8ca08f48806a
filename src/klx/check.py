"""``python -m klx.check``: check klx's accelerators on this machine's own hardware.

For every installed array library and every device it can see (CUDA through torch,
CuPy and JAX included), each accelerator of the registry that serves that library and
device runs on test inputs (zero targets, ``-inf`` log-probabilities, logits, masked
rows) and is compared with an independent float64 NumPy computation, as is klx's
array-API definition itself (the reference row). Each float32 path is timed once against
the definition and against the library's own way (``F.kl_div``, the hand-written
formula, ...). While it runs it prints a line per library and device on stderr; then one
table with a legend of its columns, the libraries and devices it did not find with what
to install to check them, and a summary::

    python -m klx.check
    python -m klx.check --libraries numpy torch      # only these libraries
    python -m klx.check --json klx-check.json --repeat 20
    python -m klx.check --json -                     # only the JSON, on stdout

Exit status: 0 when every check passed, 1 when one failed, 2 when nothing could be
checked (or on bad arguments). Needs NumPy (for the reference).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from klx import _backends
from klx._backends import CheckDevice, note

__all__ = ["Row", "main", "run"]

#: The array libraries it looks for: every one klx has an adapter for (klx._backends).
LIBRARIES = tuple(lib.name for lib in _backends.LIBRARIES)
#: Allowed error relative to the scale of the terms, by dtype (the conformance tolerances).
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}
#: float16 results below its smallest subnormal's half are off by up to this, at any scale.
ATOL = {"float16": 2.0**-25}
#: The definition's name in the table: it is the reference, not a path users pick.
REFERENCE = "definition (reference)"


@dataclass
class Row:
    """One line of the report: one path on one library, device and dtype."""

    library: str
    device: str
    #: An accelerator's name, or 'definition' (klx's array-API definition, the reference).
    path: str
    dtype: str
    #: Input cases compared with the float64 NumPy computation.
    cases: int = 0
    #: The worst error of those cases, relative to the size of their terms.
    max_error: float = 0.0
    tolerance: float = 0.0
    #: 'ok', 'MISMATCH' (an error above the tolerance) or 'ERROR' (raised, or not served).
    status: str = "ok"
    #: Median milliseconds per float32 call by this path (None for the definition's own
    #: row: its time is `ms_definition`).
    ms_path: float | None = None
    #: The same call by the definition, every accelerator off.
    ms_definition: float | None = None
    #: The same sum computed the library's own way (`peer`), without klx.
    ms_peer: float | None = None
    peer: str = ""
    detail: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reference


def _ref_kl_div(np: Any, x: Any, y: Any, reduction: str, log_target: bool) -> tuple[Any, float]:
    """float64 terms of torch's kl_div with klx's conventions; returns (value, scale)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    with np.errstate(all="ignore"):
        w = np.exp(y) if log_target else y
        log_w = y if log_target else np.log(np.where(w > 0, w, 1.0))
        nan = np.isnan(x) | np.isnan(y)
        terms = np.where(w > 0, w * (log_w - x), 0.0)
        terms = np.where(nan, np.nan, terms)
        # each term is rounded from w log w and w x: its error scales with both
        scale = np.where(w > 0, np.abs(w * log_w) + np.abs(w * x), 0.0)
        scale = np.where(np.isfinite(scale), scale, 0.0)
    if reduction == "none":
        return terms, scale
    div = {"sum": 1, "mean": terms.size, "batchmean": x.shape[0]}[reduction]
    return np.sum(terms) / div, np.sum(scale) / div


def _ref_log_softmax(np: Any, x: Any, temperature: float) -> Any:
    x = x.astype(np.float64) / temperature
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _ref_rows(np: Any, kind: str, t: Any, s: Any, temperature: float, beta: float) -> Any:
    """float64 KL or JS per row, from logits."""
    with np.errstate(all="ignore"):
        lp, lq = _ref_log_softmax(np, t, temperature), _ref_log_softmax(np, s, temperature)
        p, q = np.exp(lp), np.exp(lq)
        if kind == "kl":
            return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)
        m = beta * p + (1 - beta) * q
        lm = np.log(np.where(m > 0, m, 1.0))
        a = np.where(p > 0, p * (lp - lm), 0.0)
        b = np.where(q > 0, q * (lq - lm), 0.0)
        return np.sum(beta * a + (1 - beta) * b, axis=-1)


def _cases(np: Any, rows: int, cols: int, seed: int = 0) -> dict[str, Any]:
    """Inputs in float64: probabilities with exact zeros, -inf log-probabilities, logits."""
    rng = np.random.default_rng(seed)
    p = rng.random((rows, cols)) ** 3
    p[:, ::8] = 0.0  # one target entry in eight is exactly 0
    p /= p.sum(axis=-1, keepdims=True)
    q = rng.random((rows, cols)) + 0.05
    q /= q.sum(axis=-1, keepdims=True)
    log_q = np.log(q)
    log_q[0, 0] = -np.inf  # -inf where the target is 0: torch gives NaN, klx 0
    t = rng.normal(size=(rows, cols)) * 3
    s = rng.normal(size=(rows, cols)) * 3
    t[1, 2] = -np.inf
    return {"p": p, "log_q": log_q, "t": t, "s": s}


# --------------------------------------------------------------------------- libraries


_Library = CheckDevice


def _find(np: Any, name: str, notes: list[str]) -> list[_Library]:
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


# --------------------------------------------------------------------------- the check


def _error(np: Any, got: Any, want: Any, scale: Any, atol: float = 0.0) -> float:
    """Worst (|got - want| - atol) / scale; inf where NaN or infinities disagree."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    same_nan = np.isnan(got) == np.isnan(want)
    same_inf = np.where(np.isinf(want), got == want, ~np.isinf(got))
    if not (np.all(same_nan) and np.all(same_inf)):
        return math.inf
    finite = np.isfinite(want)
    if not np.any(finite):
        return 0.0
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), want.shape)[finite]
    diff = np.maximum(np.abs(got[finite] - want[finite]) - atol, 0.0)
    return float(np.max(diff / np.maximum(scale, 1e-300)))


def _timed(fn: Callable[[], Any], sync: Callable[[], None], repeat: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _served(klx: Any, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising if the path `expected` did not serve it."""
    report = klx.explain(fn, *args, **kwargs)
    if report.chosen != expected:
        msg = f"served by {report.chosen}, not {expected}: " + "; ".join(
            f"{name}: {why}" for name, why in report.refused
        )
        raise RuntimeError(msg)
    return report.result


def _kl_div_cases(
    np: Any, klx: Any, lib: _Library, dtype: str, expected: str
) -> tuple[int, float, list[str]]:
    """Every reduction x log_target of kl_div by the path `expected`, against the reference."""
    case = _cases(np, 6, 40)
    cells, worst, bad = 0, 0.0, []
    for log_target in (False, True):
        with np.errstate(divide="ignore"):
            y64 = np.log(case["p"]) if log_target else case["p"]
        x = lib.put(case["log_q"], dtype)
        y = lib.put(y64, dtype)
        xs, ys = lib.get(x), lib.get(y)  # the values in `dtype`, for the reference
        for reduction in ("none", "sum", "mean", "batchmean"):
            ref, scale = _ref_kl_div(np, xs, ys, reduction, log_target)
            out = _served(
                klx, expected, klx.kl_div, x, y, reduction=reduction, log_target=log_target
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale, ATOL.get(dtype, 0.0))
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"kl_div {reduction} log_target={log_target}: error {err:.3g}")
    return cells, worst, bad


def _rows_cases(
    np: Any, klx: Any, lib: _Library, dtype: str, kinds: Sequence[str], expected: str
) -> tuple[int, float, list[str]]:
    case = _cases(np, 6, 40, seed=1)
    t, s = lib.put(case["t"], dtype), lib.put(case["s"], dtype)
    ts, ss = lib.get(t), lib.get(s)
    cells, worst, bad = 0, 0.0, []
    for kind in kinds:
        for temperature in (1.0, 2.0):
            ref = _ref_rows(np, kind, ts, ss, temperature, 0.5)
            scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)) or 1.0
            fn = klx.kl_divergence if kind == "kl" else klx.js_divergence
            out = _served(
                klx, expected, fn, t, s, p_form="logits", q_form="logits", temperature=temperature
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale)
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"{kind} from logits T={temperature}: error {err:.3g}")
    return cells, worst, bad


def _peer(lib: _Library) -> tuple[str, Callable[[Any, Any], Any]] | None:
    """The library's native way to compute kl_div 'sum', for the timing column."""
    return _backends.BY_NAME[lib.name].peer()


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


def _serving(registry: Any, lib: _Library, notes: list[str]) -> list[Any]:
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
    lib: _Library,
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


def _time(
    np: Any,
    klx: Any,
    lib: _Library,
    row: Any,
    out: Row,
    repeat: int,
    size: tuple[int, int],
    timings: dict[str, float],
) -> None:
    """Fill `out`'s timings; the definition's and the peer's are taken once per device."""
    adapter = _backends.BY_NAME[lib.name]
    rng = np.random.default_rng(2)
    y64 = rng.random(size) + 0.01
    y64 /= y64.sum(axis=-1, keepdims=True)
    x64 = np.log(rng.random(size) + 0.01)
    x, y = lib.put(x64, "float32"), lib.put(y64, "float32")
    if row is None or row.operation == "kl_div":
        operation = "kl_div"

        def path() -> Any:
            return klx.kl_div(x, y, reduction="sum")

    else:
        fn = klx.kl_divergence if not row.kinds or "kl" in row.kinds else klx.js_divergence
        operation = fn.__name__

        def path() -> Any:
            return fn(x, y, p_form="logits", q_form="logits", reduction="sum")

    from klx._accel import registry

    def force(r: Any) -> Any:
        return registry.only(r)

    if row is not None:
        with force(row):
            out.ms_path = _timed(lambda: adapter.materialise(path()), lib.sync, repeat)
    if operation not in timings:
        with force(None):
            timings[operation] = _timed(lambda: adapter.materialise(path()), lib.sync, repeat)
    out.ms_definition = timings[operation]
    peer = _peer(lib) if row is not None and row.operation == "kl_div" else None
    if peer is not None:
        out.peer = peer[0]
        if "peer" not in timings:
            timings["peer"] = _timed(lambda: peer[1](x, y), lib.sync, repeat)
        out.ms_peer = timings["peer"]


# --------------------------------------------------------------------------- the report

_COLUMNS = (
    "library",
    "device",
    "path",
    "dtype",
    "cases",
    "max error",
    "tolerance",
    "status",
    "ms path",
    "ms definition",
    "ms peer",
)


def _legend(repeat: int, size: tuple[int, int]) -> list[tuple[str, str]]:
    """(column, what it means), in plain words."""
    shape = f"[{size[0]}, {size[1]}]"
    return [
        (
            "path",
            f"what computed the result. '{REFERENCE}' is klx's array-API definition with "
            "every accelerator off: the exact, general code that the accelerators are "
            "checked against, not what your calls run where an accelerator serves them "
            "(klx.explain(f, *args) says which path serves a call); its time is under 'ms "
            "definition'. Every other name is an accelerator, a fast path "
            "(docs/accelerators.md).",
        ),
        ("dtype", "the dtype of the inputs; each path is checked in every dtype it serves."),
        (
            "cases",
            "input cases compared with an independent float64 NumPy computation, each with "
            "exact zeros and -inf: kl_div with every reduction, with and without log_target "
            "(8); KL and JS from logits at two temperatures (4).",
        ),
        ("max error", "the worst error of those cases, relative to the size of their terms."),
        ("tolerance", "the largest error allowed in this dtype."),
        (
            "status",
            "ok; MISMATCH: an error above the tolerance; ERROR: the path raised, or another "
            "path served the call (see 'What went wrong').",
        ),
        (
            "ms path",
            f"milliseconds per call by this path (median of {repeat}) on float32 {shape} "
            "inputs: kl_div(reduction='sum'), or for a divergence path kl_divergence (or "
            "js_divergence) from logits. Timed in float32 only ('-' for the other dtypes).",
        ),
        (
            "ms definition",
            "the same call by the definition (the reference): the accelerator saves the "
            "difference.",
        ),
        (
            "ms peer",
            "the same sum computed the library's own way, without klx (named in brackets): "
            "compare it with 'ms path'.",
        ),
    ]


def _wrap(text: str, first: str, indent: int, width: int = 96) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=" " * indent
    ) or [first]


def _report(rows: Sequence[Row], notes: Sequence[str], repeat: int, size: tuple[int, int]) -> str:
    """The table, what went wrong, the legend, and what was not checked and how to check it."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    sections: list[list[str]] = []
    if rows:
        table = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        for r in rows:
            path = REFERENCE if r.path == "definition" else r.path
            peer = f"{ms(r.ms_peer)} ({r.peer})" if r.peer else ms(r.ms_peer)
            table.append(
                f"| {r.library} | {r.device} | {path} | {r.dtype} | {r.cases} | "
                f"{r.max_error:.2g} | {r.tolerance:.1e} | {r.status} | {ms(r.ms_path)} | "
                f"{ms(r.ms_definition)} | {peer} |"
            )
        sections.append(table)
    problems = [f"{r.library} {r.device} {r.path} {r.dtype}: {d}" for r in rows for d in r.detail]
    if problems:
        sections.append(["What went wrong:"] + [w for p in problems for w in _wrap(p, "  ", 4)])
    if rows:
        legend = ["Columns:"]
        for column, meaning in _legend(repeat, size):
            legend += _wrap(meaning, f"  {column:<14} ", 17)
        sections.append(legend)
    if notes:
        hints = ["Not checked here, and how to check it:"]
        hints += [w for n in notes for w in _wrap(n, "  - ", 4)]
        sections.append(hints)
    return "\n\n".join("\n".join(lines) for lines in sections)


def _summary(rows: Sequence[Row], notes: Sequence[str]) -> str:
    """The closing lines: the verdict, and what to do next."""
    failed = [r for r in rows if r.status != "ok"]
    if not rows:
        return "\n".join(
            _wrap(
                "klx.check: nothing was checked: no library asked for is installed with a "
                "device to check it on (see 'Not checked here' above for what to install).",
                "",
                0,
            )
        )
    lines = [f"klx.check: {len(rows)} checks (a path on a dtype), {len(failed)} failed"]
    if failed:
        lines[0] += ": " + ", ".join(f"{r.library}/{r.device}/{r.path}/{r.dtype}" for r in failed)
        lines += _wrap(
            "Please report the failures to the klx developers with this output "
            "(python -m klx.check --json klx-check.json writes it as JSON too).",
            "",
            0,
        )
    if any("cpu" not in r.device.lower() for r in rows):  # cuda:0, TFRT_CPU_0, ...
        lines += _wrap(
            "Next, on this GPU: the conformance matrix, from a clone of klx with "
            'pip install ".[test]": pytest --backend torch --backend cupy --backend jax '
            "(docs/getting-started.md, 'Checking klx on a GPU').",
            "",
            0,
        )
    else:
        lines += _wrap(
            "No GPU was checked: klx's Triton and CuPy kernels have not run here. On a "
            "machine with an NVIDIA GPU, install what the lines above say and run this again.",
            "",
            0,
        )
    return "\n".join(lines)


_DESCRIPTION = """\
Check klx's accelerators on this machine's own hardware.

For every installed array library (NumPy, torch, JAX, CuPy, Dask,
array-api-strict) and every device it sees, each of klx's fast paths runs on
test inputs (zero targets, -inf log-probabilities, logits) and is compared
with an independent float64 NumPy computation, as is klx's definition (the
reference). Each path is also timed against the definition and against the
library's own way of computing the same sum. A line per library and device
goes to stderr as it runs; then a table with a legend of its columns, and what
to install to check the libraries and GPUs not found."""

_EPILOG = """\
examples:
  python -m klx.check
  python -m klx.check --libraries numpy torch
  python -m klx.check --json klx-check.json --repeat 20
  python -m klx.check --json -        (only the JSON, on stdout)

exit status: 0 when every check passed, 1 when one failed, 2 when nothing
could be checked or the arguments are wrong."""


def _jax_shares_the_gpu() -> None:
    """JAX takes 75% of a GPU's memory when it starts, which would leave torch and CuPy
    too little to be checked after it: the check's process asks it not to (unless the
    caller set XLA_PYTHON_CLIENT_PREALLOCATE, or JAX is already running)."""
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``); ``--help`` lists them.

    Returns
    -------
    int
        The exit status: 0 when every check passed, 1 when one failed, 2 when nothing
        could be checked.
    """
    parser = argparse.ArgumentParser(
        prog="python -m klx.check",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON to PATH; '-': write only the JSON, to stdout",
    )
    parser.add_argument(
        "--libraries",
        nargs="+",
        default=list(LIBRARIES),
        choices=LIBRARIES,
        metavar="LIBRARY",
        help=f"array libraries to check, of {', '.join(LIBRARIES)} (default: all; those "
        "not installed are listed with what to install)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=10,
        help="timed runs per figure, of which the median is shown (default: 10)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[1024, 4096],
        metavar=("ROWS", "COLS"),
        help="float32 input shape of the timings (default: 1024 4096)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines on stderr while it runs"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.size) < 1:
        parser.error("--repeat and --size take positive numbers")
    if importlib.util.find_spec("numpy") is None:
        print(
            "klx.check needs NumPy for its reference computation: pip install numpy",
            file=sys.stderr,
        )
        return 2
    size = (args.size[0], args.size[1])
    _jax_shares_the_gpu()
    rows, notes = run(args.libraries, args.repeat, size, None if args.quiet else sys.stderr)
    failed = [r for r in rows if r.status != "ok"]
    status = 2 if not rows else 1 if failed else 0
    report = {
        "rows": [asdict(r) for r in rows],
        "not_checked": notes,
        "repeat": args.repeat,
        "size": list(size),
        "exit_status": status,
    }
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        print(_summary(rows, notes).split("\n")[0], file=sys.stderr)
        return status
    print(_report(rows, notes, args.repeat, size))
    print()
    print(_summary(rows, notes))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"klx.check: the report is also in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
