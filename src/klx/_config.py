"""The program-wide switches: validation, accelerators, and klx's CPU threads.

``validate=None`` (the default of every public function) means "whatever the
program-wide switch says". The switch starts from the environment variable
``KLX_VALIDATE`` (``1``, ``true``, ``yes`` or ``on`` turn it on) and is changed with
:func:`klx.set_validation` or, for a block of code, :func:`klx.validation`.

It is one process-wide setting, shared by all threads, on purpose: it is read inside
``torch.compile``'d code, which can read a plain module global but not a ``ContextVar``
or a thread-local (either breaks the graph), and a debugging switch that a worker
thread (a DataLoader thread, a JAX callback) silently did not see would hide the very
mistakes it is meant to catch. :func:`klx.validation` blocks are *overrides*: each
``with`` adds its own entry and removes exactly that entry when it exits, and the
innermost entry still open decides. So whatever the order in which threads enter and
leave their blocks, once all have left the setting is what :func:`klx.set_validation`
(or ``KLX_VALIDATE``) made it: no interleaving can leave it stuck.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from klx._checks import check_flag

__all__ = [
    "accelerators_enabled",
    "is_validating",
    "num_threads",
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

    Returns
    -------
    bool
        True if the accelerators may serve calls.
    """
    return _state["accelerators"]


def set_accelerators(enabled: bool) -> None:
    """Allow (True) or forbid (False) every accelerator, for the whole process.

    With accelerators off, every call runs the array-API definition
    (:mod:`klx._agnostic`): slower on some backends, identical in what it computes.
    :func:`klx.explain` shows which path a call takes.

    Parameters
    ----------
    enabled : bool
        True allows them (the default state), False forbids them.

    Examples
    --------
    >>> import klx
    >>> klx.set_accelerators(False)
    >>> klx.accelerators_enabled()
    False
    >>> klx.set_accelerators(True)
    """
    _state["accelerators"] = check_flag("enabled", enabled)


#: Open `validation()` blocks, oldest first: (a token of the block, its setting).
_OVERRIDES: list[tuple[object, bool]] = []


def is_validating() -> bool:
    """Whether validation is on for calls that leave ``validate`` unset.

    Returns
    -------
    bool
        The setting of the innermost open :func:`klx.validation` block, else that of
        :func:`klx.set_validation` (initially ``KLX_VALIDATE`` from the environment).
    """
    return _OVERRIDES[-1][1] if _OVERRIDES else _state["validate"]


def set_validation(enabled: bool) -> None:
    """Switch validation on or off for calls that leave ``validate`` unset.

    Process-wide; an open :func:`klx.validation` block takes precedence until it exits.

    Parameters
    ----------
    enabled : bool
        True checks the values of every call that leaves ``validate`` unset (or None).

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

    The setting is process-wide (all threads see it). Blocks nest; each removes only its
    own setting when it exits, so interleaved blocks in several threads cannot leave it
    stuck: after the last one exits, :func:`klx.set_validation` decides again.

    Parameters
    ----------
    enabled : bool, optional
        The setting inside the block. Default True.

    Yields
    ------
    None
        Nothing: the block runs with the setting in force.

    Examples
    --------
    >>> import klx
    >>> with klx.validation():
    ...     klx.is_validating()
    True
    >>> klx.is_validating()
    False
    """
    entry = (object(), check_flag("enabled", enabled))
    _OVERRIDES.append(entry)
    try:
        yield
    finally:
        _OVERRIDES.remove(entry)


def resolve_validate(validate: object) -> bool:
    if validate is None:
        return is_validating()
    if not isinstance(validate, bool):
        msg = (
            "`validate` must be True, False or None (None follows the program-wide "
            f"setting), got {validate!r}."
        )
        raise TypeError(msg)
    return validate


def num_threads() -> int | None:
    """``KLX_NUM_THREADS``: the most threads klx's NumPy accelerator uses (None: unset).

    Read when klx is imported; anything but a positive integer is a ValueError then,
    not on the first large array.
    """
    return _THREADS


def _parse_threads(raw: str | None) -> int | None:
    if raw is None or not raw.strip():
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        msg = (
            f"the environment variable KLX_NUM_THREADS must be a positive integer (the most "
            f"threads klx uses on the CPU), got {raw!r}; unset it to use every core."
        )
        raise ValueError(msg)
    return n


_THREADS = _parse_threads(os.environ.get("KLX_NUM_THREADS"))
