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

The modules, by idea: :mod:`~klx.check.reference` (the float64 NumPy reference and the
tolerances), :mod:`~klx.check.cases` (the inputs and the cases run on them),
:mod:`~klx.check.timing`, :mod:`~klx.check.runner` (each library, device, path and
dtype), :mod:`~klx.check.report` (the rows, the table and the summary) and
:mod:`~klx.check.cli` (the command line).
"""

from __future__ import annotations

from klx._backends import CheckDevice
from klx.check.cli import _jax_shares_the_gpu as _jax_shares_the_gpu
from klx.check.cli import main
from klx.check.reference import ATOL as ATOL
from klx.check.reference import TOLERANCE as TOLERANCE
from klx.check.report import _COLUMNS as _COLUMNS
from klx.check.report import REFERENCE as REFERENCE
from klx.check.report import Row
from klx.check.runner import LIBRARIES as LIBRARIES
from klx.check.runner import _find as _find
from klx.check.runner import _own_warnings as _own_warnings
from klx.check.runner import _serving as _serving
from klx.check.runner import run

__all__ = ["Row", "main", "run"]

#: One device of a library as the check uses it (the name it had in the one-module check).
_Library = CheckDevice
