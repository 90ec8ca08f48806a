"""What :func:`klx.explain` reports (which path served a call, and why not the others),
and the accelerator table of ``docs/accelerators.md`` (:func:`markdown_table`, kept equal
to it by a test).

:func:`klx._accel.registry.select` adds each refusal to the innermost :class:`Dispatch`
open in its thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klx._accel.table import ACCELERATORS

__all__ = ["Dispatch", "explain", "markdown_table", "open_record"]


@dataclass
class Dispatch:
    """Which path served a call, and why the others were refused (see :func:`klx.explain`).

    Parameters
    ----------
    function : str
        The klx function called (``'kl_div'``, ...).
    chosen : str
        The accelerator's name, or 'definition' (the array-API definition).
    refused : list of (str, str)
        (accelerator name, reason) for every row of the call's library that was refused.
    result : object
        What the call returned.
    """

    function: str
    chosen: str = "definition"
    refused: list[tuple[str, str]] = field(default_factory=list)
    result: Any = None

    def __str__(self) -> str:
        lines = [f"klx.{self.function}: served by {self.chosen}"]
        lines += [f"  not {name}: {why}" for name, why in self.refused]
        return "\n".join(lines)


#: How many explain() calls are open, in all threads: select() reads the per-thread records
#: only then (a plain int read, which torch.compile traces; a thread-local would not).
_EXPLAINING = 0
_EXPLAINING_LOCK = threading.Lock()
#: Each thread's open explain() records (innermost last), in ``.records``.
_RECORDS = threading.local()


def open_record() -> Dispatch | None:
    """The innermost explain() record open in this thread, if any."""
    if not _EXPLAINING:
        return None
    records: list[Dispatch] = getattr(_RECORDS, "records", [])
    return records[-1] if records else None


def explain(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Dispatch:
    """Call ``func(*args, **kwargs)`` and report which path served it, and why not the others.

    Parameters
    ----------
    func : callable
        A klx function (:func:`klx.kl_div`, :func:`klx.kl_divergence`, ...).
    *args, **kwargs
        Its arguments.

    Returns
    -------
    Dispatch
        ``chosen`` (an accelerator's name, or 'definition'), ``refused`` (each other
        accelerator of the arrays' library with the reason) and ``result`` (the value).
        ``print()`` it for a readable summary.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> report = klx.explain(klx.kl_div, np.log(np.full((2, 4), 0.25)),
    ...                      np.full((2, 4), 0.25), reduction="sum")
    >>> report.chosen
    'numpy-blocked'
    >>> print(klx.explain(klx.kl_divergence, np.ones(3) / 3, np.ones(3) / 3))
    klx.kl_divergence: served by definition
      not numpy-rows: fewer than 1048576 elements (the definition is as fast)
    """
    global _EXPLAINING
    record = Dispatch(getattr(func, "__name__", repr(func)))
    records: list[Dispatch] = _RECORDS.__dict__.setdefault("records", [])
    records.append(record)
    with _EXPLAINING_LOCK:
        _EXPLAINING += 1
    try:
        record.result = func(*args, **kwargs)
    finally:
        with _EXPLAINING_LOCK:
            _EXPLAINING -= 1
        records.pop()  # this thread's innermost: its own (never another equal record)
    return record


# --------------------------------------------------------------------------- docs


def markdown_table() -> str:
    """The accelerator table of ``docs/accelerators.md``, generated from the registry."""
    head = (
        "| accelerator | function | arrays | device | dtypes | layout | serves | "
        "gradients | first-use check | what it does |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in ACCELERATORS:
        fn = "kl_div" if row.operation == "kl_div" else "the divergences"
        serves = []
        if row.kinds:
            serves.append("/".join(row.kinds))
        elif row.closed_form:
            serves.append("the divergences with a closed-form derivative")
        elif row.operation == "divergence":
            serves.append("every divergence")
        if row.forms:
            serves.append(", ".join(f"{p}+{q}" for p, q in row.forms))
        if row.min_size:
            serves.append(f">= 2^{int(math.log2(row.min_size))} elements")
        if row.operation == "divergence":
            serves.append("any axis" if row.layout == "any" else "last axis")
        if row.traces:
            inside = " / ".join("JAX tracers" if t == "jax" else t for t in row.traces)
            serves.append(f"inside {inside} too")
        lines.append(
            f"| `{row.name}` | {fn} | {row.library} | {'/'.join(row.devices) or 'any'} | "
            f"{', '.join(_short(d) for d in row.dtypes)} | {row.layout} | "
            f"{'; '.join(serves) or 'all'} | {'yes' if row.autograd else 'no'} | "
            f"{'yes' if row.probe else 'no'} | {row.summary} |"
        )
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return dtype.replace("float", "f")
