"""The command line of :mod:`klx.check` (``python -m klx.check``): its arguments, the
report on stdout (or only JSON), and the exit status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from klx.check.report import _report, _summary
from klx.check.runner import LIBRARIES, run

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
