"""Dispatch: which array library the arguments come from, and where they live.

Like array-api-compat's ``is_*_array`` helpers, nothing here imports an array
library: a library is recognised only when it is already in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat as aac

from klx._backends import BY_NAME, by_name, library, loaded

__all__ = [
    "array_namespace",
    "device_of",
    "in_torch_func",
    "is_concrete",
    "library_name",
    "library_of",
    "loaded",
]


def library_name(x: Any) -> str | None:
    """A short name for the array library of `x`, or ``None`` if `x` is not an array.

    Plain ``isinstance`` checks against classes of libraries already imported
    (:func:`klx._backends.library`), so that this stays cheap and traceable by
    ``torch.compile`` (array-api-compat's helpers are ``lru_cache``-wrapped, which Dynamo
    warns about).
    """
    lib = library(x)
    return None if lib is None else lib.name


def _describe(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def array_namespace(named: Sequence[tuple[str, Any]], xp: ModuleType | None = None) -> ModuleType:
    """The array-API namespace shared by the named arguments (`xp` if given).

    Parameters
    ----------
    named
        ``(argument name, value)`` pairs; ``None`` is allowed for `where` only.
    xp
        A namespace given by the caller: the arguments are still checked to be arrays
        of one library, and `xp` is returned.

    Raises
    ------
    TypeError
        If a value is not an array, is a NumPy scalar, matrix or masked array, if the
        arrays come from two libraries, or if `xp` is not a namespace.
    """
    if xp is not None and not (
        hasattr(xp, "asarray") and isinstance(getattr(xp, "__name__", None), str)
    ):
        msg = (
            f"`xp` must be an array namespace (a module such as array_api_compat.numpy or "
            f"jax.numpy), not {_describe(xp)} {xp!r}; pass the module itself, or leave `xp` "
            "out and klx takes the arrays' own namespace."
        )
        raise TypeError(msg)
    libraries: dict[str, str] = {}
    arrays = []
    for name, value in named:
        if value is None and name == "where":
            continue
        lib = library_name(value)
        if lib is None or lib == "numpy":
            _refuse_numpy_kinds(name, value)
        if lib is None:
            msg = (
                f"`{name}` must be an array (NumPy, PyTorch, JAX, CuPy, Dask or another "
                f"array-API library), got {_describe(value)}; convert it first, "
                "e.g. with numpy.asarray or torch.as_tensor."
            )
            raise TypeError(msg)
        libraries.setdefault(lib, name)
        arrays.append(value)
    if len(libraries) > 1:
        parts = ", ".join(f"`{arg}` is a {lib} array" for lib, arg in libraries.items())
        msg = (
            f"all arrays must come from one library, but {parts}; convert them to one "
            "library first (for example with torch.as_tensor or numpy.asarray)."
        )
        raise TypeError(msg)
    if xp is not None:
        return xp
    if len(libraries) == 1:
        (only,) = libraries
        if only in BY_NAME:
            return _namespace_of(only)
    return aac.array_namespace(*arrays)


def _is_masked(value: Any) -> bool:
    cls = loaded("numpy.ma", "MaskedArray")  # not imported: no masked array exists
    return cls is not None and isinstance(value, cls)


def _refuse_numpy_kinds(name: str, value: Any) -> None:
    """NumPy scalars, matrices and masked arrays: a TypeError saying what to pass instead.

    A matrix multiplies with ``*`` and a masked array hides entries: klx would compute
    something else than asked, so it refuses both rather than guess.
    """
    np = sys.modules.get("numpy")  # `loaded`, inline: this runs on every call
    if np is None:
        return
    generic, matrix = getattr(np, "generic", None), getattr(np, "matrix", None)
    if generic is not None and isinstance(value, generic):
        fix = "wrap it with numpy.asarray(...) (0-d array) or give the whole array"
        what = "a NumPy scalar"
    elif matrix is not None and isinstance(value, matrix):
        fix = "convert it with numpy.asarray(...)"
        what = "a numpy.matrix (whose `*` is a matrix product)"
    elif _is_masked(value):
        fix = (
            "fill the masked entries (`x.filled(0.0)` for probabilities) or drop whole "
            "distributions with `where=`"
        )
        what = "a NumPy masked array (klx would ignore its mask)"
    else:
        return
    msg = f"`{name}` is {what}, {type(value).__name__}; {fix}."
    raise TypeError(msg)


#: Namespaces whose import has completed in this process, by library name. Not
#: ``sys.modules``: a module is there from the moment its import starts, so a thread that
#: took it from there while another thread still imported it got a partially initialised
#: module (``AttributeError: ... has no attribute 'isdtype'``). An import statement (in
#: each adapter's ``namespace()``) waits for the other thread's import to finish.
_READY: dict[str, ModuleType] = {}


def _namespace_of(lib: str) -> ModuleType:
    """The namespace of a library klx has an adapter for (a dict lookup once imported:
    cheap for tiny inputs and traceable by torch.compile)."""
    ready = _READY.get(lib)
    if ready is None:
        ready = _READY[lib] = BY_NAME[lib].namespace()
    return ready


def library_of(xp: ModuleType) -> str:
    """The library name (as :func:`library_name` gives it) of the arrays of namespace `xp`."""
    name = xp.__name__
    lib = _LIBRARY_OF.get(name)
    if lib is None:
        lib = _LIBRARY_OF[name] = name.split(".")[0]
    return lib


#: Namespace name -> library name, from the adapters.
_LIBRARY_OF = {lib.namespace_name: lib.name for lib in BY_NAME.values()}


def device_of(x: Any) -> Any:
    """The device of `x`, or ``None`` where the library cannot say (a JAX tracer)."""
    lib = library(x)
    return None if lib is None else lib.device(x)


def check_same_device(named: Sequence[tuple[str, Any]], xp: ModuleType | None = None) -> None:
    """Check that the named arrays live on one device (where their devices can be told).

    Given the namespace `xp`, libraries whose arrays all live in one place (their adapter's
    ``one_place``: NumPy, on the CPU; JAX, which places arrays itself; MLX, in unified
    memory) are not inspected at all.

    Raises
    ------
    ValueError
        If two arrays live on different devices.
    """
    one = None if xp is None else by_name(library_of(xp))
    if one is not None and one.one_place:
        return
    first_name, first_device = None, None
    for name, value in named:
        if value is None:
            continue
        # all arrays of one library (checked before): its adapter, without a lookup each
        dev = one.device(value) if one is not None else device_of(value)
        if dev is None:
            continue
        if first_name is None:
            first_name, first_device = name, dev
        elif dev != first_device:
            msg = (
                f"`{first_name}` is on device {first_device!r} but `{name}` is on device "
                f"{dev!r}; move both to one device first (for example `x.to(device)`)."
            )
            raise ValueError(msg)


def is_concrete(x: Any) -> bool:
    """Whether the values of `x` can be read now (not a JAX tracer, not inside
    torch.compile or a torch.func transform)."""
    lib = library(x)
    return lib is None or lib.is_concrete(x)


def in_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active."""
    functorch = loaded("torch", "_C", "_functorch")
    return functorch is not None and functorch.maybe_current_level() is not None
