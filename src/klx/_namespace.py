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

__all__ = [
    "array_namespace",
    "device_of",
    "in_torch_func",
    "is_concrete",
    "library_name",
    "library_of",
    "loaded",
]


def loaded(module: str, *path: str) -> Any:
    """``module.path...`` where that module has been imported far enough to define it, else
    ``None``; nothing is imported.

    A module is in ``sys.modules`` from the moment another thread starts importing it, and a
    class it has not defined yet has no instances: an ``isinstance`` test can skip it.
    """
    obj = sys.modules.get(module)
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def library_name(x: Any) -> str | None:
    """A short name for the array library of `x`, or ``None`` if `x` is not an array.

    Plain ``isinstance`` checks against classes of libraries already imported, so that
    this stays cheap and traceable by ``torch.compile`` (array-api-compat's helpers
    are ``lru_cache``-wrapped, which Dynamo warns about).
    """
    for name, module, attr in _ARRAY_TYPES:
        mod = sys.modules.get(module)  # `loaded`, inline: this runs on every call
        cls = getattr(mod, attr, None) if mod is not None else None
        if cls is not None and isinstance(x, cls):
            return name
    if isinstance(x, (bool, int, float, complex)):
        return None
    if hasattr(x, "__array_namespace__"):
        return type(x).__module__.split(".")[0]
    return None


_ARRAY_TYPES = (
    ("torch", "torch", "Tensor"),
    ("numpy", "numpy", "ndarray"),
    ("jax", "jax", "Array"),
    ("cupy", "cupy", "ndarray"),
    ("dask", "dask.array", "Array"),
)


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
        if only in _COMPAT:
            return _compat_namespace(only)
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


#: Namespaces of the libraries array-api-compat wraps, by library name; looked up
#: directly (a dict, not array-api-compat's cached dispatch), which keeps dispatch
#: cheap for tiny inputs and traceable by torch.compile.
_COMPAT = {
    "numpy": "array_api_compat.numpy",
    "torch": "array_api_compat.torch",
    "cupy": "array_api_compat.cupy",
    "dask": "array_api_compat.dask.array",
    "jax": "jax.numpy",
}


#: Namespaces whose import has completed in this process, by library name. Not
#: ``sys.modules``: a module is there from the moment its import starts, so a thread that
#: took it from there while another thread still imported it got a partially initialised
#: module (``AttributeError: ... has no attribute 'isdtype'``). An import statement waits
#: for the other thread's import to finish.
_READY: dict[str, ModuleType] = {}


def _compat_namespace(lib: str) -> ModuleType:
    ready = _READY.get(lib)
    if ready is not None:
        return ready
    # Import statements (not importlib), which torch.compile can trace.
    ns: ModuleType
    if lib == "torch":
        import array_api_compat.torch as torch_xp

        ns = torch_xp
    elif lib == "numpy":
        import array_api_compat.numpy as numpy_xp

        ns = numpy_xp
    elif lib == "cupy":
        import array_api_compat.cupy as cupy_xp

        ns = cupy_xp
    elif lib == "dask":
        import array_api_compat.dask.array as dask_xp

        ns = dask_xp
    else:
        import jax.numpy  # noqa: F401

        ns = sys.modules["jax.numpy"]
    _READY[lib] = ns
    return ns


def library_of(xp: ModuleType) -> str:
    """The library name (as :func:`library_name` gives it) of the arrays of namespace `xp`."""
    name = xp.__name__
    lib = _LIBRARY_OF.get(name)
    if lib is None:
        lib = _LIBRARY_OF[name] = name.split(".")[0]
    return lib


#: Namespace name -> library name; the wrapped libraries' entries are the reverse of _COMPAT.
_LIBRARY_OF = {ns: lib for lib, ns in _COMPAT.items()}


def device_of(x: Any) -> Any:
    """The device of `x`, or ``None`` where the library cannot say (a JAX tracer)."""
    lib = library_name(x)
    if lib == "torch" or lib == "cupy":
        return x.device
    if lib == "jax":
        return None  # JAX places arrays itself; tracers and sharded arrays have no one device
    try:
        return aac.device(x)
    except Exception:  # pragma: no cover - a library whose arrays cannot say
        return None


def check_same_device(named: Sequence[tuple[str, Any]], xp: ModuleType | None = None) -> Any:
    """Return the common device of the named arrays (``None`` where it cannot be told).

    Given the namespace `xp`, libraries whose arrays all live in one place (NumPy, Dask's
    NumPy chunks: the CPU; JAX, which places arrays itself) are not inspected at all.

    Raises
    ------
    ValueError
        If two arrays live on different devices.
    """
    if xp is not None and xp.__name__ in _ONE_PLACE:
        return None
    # torch and CuPy arrays say their device directly (no per-array library lookup)
    direct = xp is not None and library_of(xp) in ("torch", "cupy")
    first_name, first_device = None, None
    for name, value in named:
        if value is None:
            continue
        dev = value.device if direct else device_of(value)
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
    return first_device


#: Namespaces whose arrays need no device comparison.
_ONE_PLACE = ("array_api_compat.numpy", "jax.numpy")


def is_concrete(x: Any) -> bool:
    """Whether the values of `x` can be read now (not a JAX tracer, not a lazy array)."""
    tracer = loaded("jax", "core", "Tracer")
    if tracer is not None and isinstance(x, tracer):
        return False
    tensor = loaded("torch", "Tensor")
    if tensor is not None and isinstance(x, tensor):
        compiler = loaded("torch", "compiler")
        if compiler is not None and compiler.is_compiling():
            return False
        if in_torch_func():  # torch.func.grad / vmap: batched or traced tensors
            return False
    return True


def in_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active."""
    functorch = loaded("torch", "_C", "_functorch")
    return functorch is not None and functorch.maybe_current_level() is not None
