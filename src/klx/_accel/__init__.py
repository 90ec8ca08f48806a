"""Accelerators: fast paths, one row each in the table (:mod:`.table`), chosen by the
registry (:mod:`.registry`) through the gates (:mod:`.gates`); :func:`klx.explain`
(:mod:`.explain`) says which serves a call.

Each computes what :mod:`klx._agnostic` defines, for the calls its row says it
serves; every other call runs the definition. See ``docs/accelerators.md`` for the table,
:func:`klx.explain` for which path serves a given call, and :func:`klx.set_accelerators`
(or ``KLX_ACCELERATORS=0``) to turn them all off.
"""

from __future__ import annotations

from klx._accel.registry import (
    ACCELERATORS,
    Accelerator,
    AcceleratorWarning,
    Dispatch,
    evaluate_divergence,
    evaluate_kl_div,
)

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "AcceleratorWarning",
    "Dispatch",
    "evaluate_divergence",
    "evaluate_kl_div",
]
