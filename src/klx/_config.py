"""The program-wide validation switch.

``validate=None`` (the default of every public function) means "whatever the
program-wide switch says". The switch starts from the environment variable
``KLX_VALIDATE`` (``1``, ``true``, ``yes`` or ``on`` turn it on) and is changed with
:func:`klx.set_validation` or, for a block of code, :func:`klx.validation`.
It is one process-wide flag (a plain module global, which ``torch.compile`` can
read; a ``ContextVar`` would break its graph), shared by all threads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from klx._checks import check_flag

__all__ = [
    "accelerators_enabled",
    "is_validating",
    "resolve_validate",
    "set_accelerators",
    "set_validation",
    "validation",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_state = {
    "validate": os.environ.get("KLX_VALIDATE", "").strip().lower() in _TRUE,
    "accelerators": os.environ.get("KLX_ACCELERATORS", "").strip().lower() not in _FALSE,
}


def accelerators_enabled() -> bool:
    """Whether klx may use its accelerators (fast paths); the definition serves otherwise.

    On by default; ``KLX_ACCELERATORS=0`` (or ``false``, ``no``, ``off``) in the
    environment turns them off from the start, :func:`set_accelerators` at any time.
    """
    return _state["accelerators"]


def set_accelerators(enabled: bool) -> None:
    """Allow (True) or forbid (False) every accelerator, for the whole process.

    With accelerators off, every call runs the array-API definition
    (:mod:`klx._agnostic`): slower on some backends, identical in what it computes.
    :func:`klx.explain` shows which path a call takes.

    Examples
    --------
    >>> import klx
    >>> klx.set_accelerators(False)
    >>> klx.accelerators_enabled()
    False
    >>> klx.set_accelerators(True)
    """
    _state["accelerators"] = check_flag("enabled", enabled)


def is_validating() -> bool:
    """Whether validation is on for calls that leave ``validate`` unset."""
    return _state["validate"]


def set_validation(enabled: bool) -> None:
    """Switch validation on or off for calls that leave ``validate`` unset.

    Examples
    --------
    >>> import klx
    >>> klx.set_validation(True)
    >>> klx.is_validating()
    True
    >>> klx.set_validation(False)
    """
    _state["validate"] = check_flag("enabled", enabled)


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Turn validation on (or off) inside a ``with`` block.

    Examples
    --------
    >>> import klx
    >>> with klx.validation():
    ...     klx.is_validating()
    True
    >>> klx.is_validating()
    False
    """
    before = _state["validate"]
    _state["validate"] = check_flag("enabled", enabled)
    try:
        yield
    finally:
        _state["validate"] = before


def resolve_validate(validate: object) -> bool:
    if validate is None:
        return _state["validate"]
    if not isinstance(validate, bool):
        msg = (
            "`validate` must be True, False or None (None follows the program-wide "
            f"setting), got {validate!r}."
        )
        raise TypeError(msg)
    return validate
