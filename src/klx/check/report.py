"""The report of :mod:`klx.check`: its rows, the table with a legend of its columns,
what went wrong, what was not checked, and the closing summary.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

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
