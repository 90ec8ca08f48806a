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

__all__ = ["is_validating", "resolve_validate", "set_validation", "validation"]

_TRUE = {"1", "true", "yes", "on"}
_state = {"validate": os.environ.get("KLX_VALIDATE", "").strip().lower() in _TRUE}


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
