"""One adapter class per array library: all klx knows about a library, in one place.

Each :class:`Library` says how to recognise the library's arrays (without importing it:
only classes already in ``sys.modules`` are looked at, as array-api-compat's
``is_*_array`` helpers do), which array-API namespace klx computes with, where an array
lives, whether its values can be read now (not a tracer), how it stops a gradient or
attaches a derivative, and the layout facts the accelerator gates read. The rest of klx
asks :func:`library` / :data:`BY_NAME` instead of branching on a library's name.

Adding an array library is a subclass here (and, if array-api-compat does not wrap it, a
namespace module that supplies the standard's functions, as :mod:`klx._array_api_mlx`
does for MLX), plus its test support and nox session.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from klx._typing import Array

__all__ = [
    "BY_NAME",
    "LIBRARIES",
    "CheckDevice",
    "Library",
    "Trace",
    "by_name",
    "library",
    "loaded",
    "note",
]


def loaded(module: str, *path: str) -> Any:
    """``module.path...`` where that module has been imported far enough to define it, else
    ``None``; nothing is imported.

    A module is in ``sys.modules`` from the moment another thread starts importing it, and a
    class it has not defined yet has no instances: an ``isinstance`` test can skip it.
    """
    obj = _LOADED.get(module)
    if obj is None:
        obj = sys.modules.get(module)
        if obj is None:
            return None
        _LOADED[module] = obj
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


#: The modules :func:`loaded` has found (once imported, a module stays): read before
#: ``sys.modules``, whose every key a ``torch.compile`` trace that reads it guards on.
_LOADED: dict[str, Any] = {}


class Trace(NamedTuple):
    """A trace a call is inside: its kind (registry rows' `traces` name it) and why the
    arrays' values cannot be used eagerly."""

    kind: str
    why: str


@dataclass
class CheckDevice:
    """One device of a library, as :mod:`klx.check` uses it."""

    name: str
    device: str
    #: float64 NumPy array -> array of this library on this device, of the named dtype.
    put: Callable[[Any, str], Any]
    #: array of this library -> float64 NumPy array.
    get: Callable[[Any], Any]
    #: Wait for the device's queued work (timings).
    sync: Callable[[], None]
    dtypes: tuple[str, ...]
    device_type: str


def note(what: str, why: str, hint: str = "") -> str:
    """One 'not checked' line of :mod:`klx.check`: what, why, and what to do to check it."""
    return f"{what}: {why}" + (f". {hint[0].upper()}{hint[1:]}" if hint else "")


def _nop() -> None:
    return None


class Library:
    """An array library, as klx sees it. Subclasses override what differs."""

    #: The short name klx uses everywhere ('torch'; registry rows' `library`).
    name = ""
    #: (module, attribute) of its array class, looked up in ``sys.modules`` only.
    array_type: tuple[str, str] = ("", "")
    #: The name of the namespace module klx computes with.
    namespace_name = ""
    #: Whether its arrays all live in one place (no device comparison needed).
    one_place = False
    #: Whether it computes with NumPy (whose floating-point warnings klx silences).
    numpy_based = False
    #: Whether it reduces a strided axis in sequence (klx then sums pairwise itself).
    sequential_strided_sums = False
    #: Whether equal ``.shape`` of two arrays means one shape, no broadcast to check (a
    #: Dask shape may hold NaN; JAX's are checked as the standard says).
    shapes_known = False
    #: What to install to check it (:mod:`klx.check`'s 'not checked' lines).
    install = ""
    #: The module :mod:`klx.check` imports to find it.
    module = ""
    #: Whether accelerators take only its exact array class (subclasses, such as
    #: ``np.matrix`` or a tensor subclass, keep their own semantics and take the definition).
    exact_type = False
    #: Whether ``broadcast_to`` makes views that klx's fast paths read at no copy.
    broadcast_views = False
    #: The module of its own walk for :func:`klx.fused_linear_divergence` (with gradients:
    #: ``fused(call)`` and ``temporaries(spec, q_hidden, q_weight)``); "" for the generic
    #: chunks (values only, a chunk at a time).
    fused_module = ""

    def is_array(self, x: Any) -> bool:
        """Whether `x` is an array of this library (nothing imported)."""
        mod = sys.modules.get(self.array_type[0])  # `loaded`, inline: runs on every call
        cls = getattr(mod, self.array_type[1], None) if mod is not None else None
        return cls is not None and isinstance(x, cls)

    def namespace(self) -> ModuleType:
        """The array-API namespace of its arrays (imported by an import statement, which
        torch.compile can trace)."""
        raise NotImplementedError

    def device(self, x: Array) -> Any:
        """The device of `x`, or None where the library cannot say."""
        try:
            import array_api_compat as aac

            return aac.device(x)
        except Exception:  # pragma: no cover - a library whose arrays cannot say
            return None

    def device_type(self, x: Array) -> str:
        """'cpu' or 'cuda' (another type's name where it has one), for the registry."""
        return "cpu"

    def trace(self, *arrays: Array, device: str | None = None) -> Trace | None:
        """The trace a call on `arrays` is inside (None: concrete arrays); `device` is
        the device type the registry sees (after its aliases), else the arrays'."""
        return None

    def is_concrete(self, x: Array) -> bool:
        """Whether the values of `x` can be read now (not a tracer, not lazy)."""
        return self.trace(x) is None

    def values_readable(self, x: Array) -> bool:
        """Whether a check may read values of `x` now: concrete, and reading them costs no
        more than the check (not a lazy Dask graph, which a read would compute; not a
        torch meta tensor, which has no values)."""
        return self.is_concrete(x)

    def creation_kwargs(self, x: Array) -> dict[str, Any]:
        """Keywords that make a new array (``xp.arange``, ``xp.zeros``) on `x`'s device."""
        return {}

    def free_device_bytes(self, x: Array) -> int | None:
        """The free memory of `x`'s accelerator, or None (a CPU, a trace, or a library
        that cannot say)."""
        return None

    def refuses_mixed_matmul(self, a: Array, b: Array) -> bool:
        """Whether ``a @ b`` of two dtypes raises (NumPy and JAX promote)."""
        return False

    def compiling(self) -> bool:
        """Whether the call is being traced by a compiler that cannot trace a warning
        (``torch.compile(fullgraph=True)``)."""
        return False

    def base_type(self) -> type | None:
        """Its exact array class where accelerators take only that (:attr:`exact_type`;
        None otherwise, or before the library has defined it)."""
        return loaded(*self.array_type) if self.exact_type else None

    def requires_grad(self, x: Array) -> bool:
        """Whether autograd records operations on `x` (torch's ``requires_grad``)."""
        return False

    def records_gradients(self) -> bool:
        """Whether autograd records now (torch: grad mode on, not inference mode)."""
        return False

    def lazily_negated(self, x: Array) -> bool:
        """Whether `x` is a view whose memory holds the values before a negation that is
        not applied yet (torch's ``Tensor.is_neg()``): kernels would read them unnegated."""
        return False

    def memo_layout(self, a: Array, b: Array) -> tuple[Any, ...] | None:
        """What the registry's gates read of two arrays beyond shape, dtype and device
        (strides, autograd flags), for its memo of choices; None: not remembered."""
        return None

    def stop_gradient(self, x: Array) -> Array:
        """`x` with the same value and no gradient (libraries without autodiff: `x`)."""
        return x

    def with_derivative(
        self,
        xp: ModuleType,
        x: Array,
        value: Callable[[Array], Array],
        derivative: Callable[[Array], Array],
    ) -> Array:
        """``value(x)``, differentiated as ``derivative(x)`` (elementwise)."""
        return value(x)

    def contiguous(self, x: Array) -> bool:
        """Whether `x` is laid out in C order (False where it cannot say)."""
        flags = getattr(x, "flags", None)
        return bool(getattr(flags, "c_contiguous", False))

    def rows_layout(self, x: Array) -> bool:
        """Whether `x` has its last axis of stride 1 and rows at any uniform stride."""
        return self.contiguous(x)

    def inductor_cpu(self, x: Array) -> bool:
        """Whether `x` is a CPU tensor inside torch.compile (torch only)."""
        return False

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        """The devices :mod:`klx.check` checks it on (the library is importable), with a
        note for each kind of device it cannot see."""
        raise NotImplementedError

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        """The library's own way to compute ``kl_div(x, y, 'sum')`` (klx.check's timing
        column), or None."""
        return None

    def materialise(self, x: Array) -> Array:
        """`x` with its work done (a timed call must not return before it is)."""
        return x

    def take_along_axis(
        self, xp: ModuleType, x: Array, indices: Array, axis: int, spread: bool
    ) -> Array:
        """``take_along_axis`` along the non-negative `axis`; `spread`: `x` has size 1
        where `indices` is larger on another axis (the standard's function broadcasts it
        without materialising it: NumPy, JAX, CuPy, array-api-strict, MLX)."""
        return xp.take_along_axis(x, indices, axis=axis)

    def reduce_chunks(
        self, x: Array, chunk_sum: Callable[..., Array], axis: int, keepdims: bool
    ) -> Array | None:
        """A chunked library's sum along `axis` by `chunk_sum` per chunk and over the
        partial sums (Dask); None for the others."""
        return None


class _NumPy(Library):
    shapes_known = True
    name = "numpy"
    array_type = ("numpy", "ndarray")
    namespace_name = "array_api_compat.numpy"
    one_place = True
    numpy_based = True
    sequential_strided_sums = True
    exact_type = True
    broadcast_views = True
    install = "pip install numpy"
    module = "numpy"

    def memo_layout(self, a: Array, b: Array) -> tuple[Any, ...] | None:
        return (a.strides, b.strides)

    def namespace(self) -> ModuleType:
        import array_api_compat.numpy as ns

        return ns

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        return [
            CheckDevice(
                "numpy",
                "cpu",
                lambda a, d: a.astype(d),
                lambda a: np.asarray(a, dtype=np.float64),
                _nop,
                ("float32", "float64"),
                "cpu",
            )
        ]

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        import numpy as np

        return "NumPy formula", lambda x, y: np.sum(y * (np.log(y) - x))


class _Torch(Library):
    shapes_known = True
    name = "torch"
    array_type = ("torch", "Tensor")
    namespace_name = "array_api_compat.torch"
    install = "pip install torch (on Linux, PyPI's torch wheel is the CUDA build)"
    module = "torch"
    fused_module = "klx._fused.torch_autograd"
    exact_type = True
    broadcast_views = True

    def requires_grad(self, x: Array) -> bool:
        return bool(x.requires_grad)

    def records_gradients(self) -> bool:
        torch = sys.modules["torch"]
        return bool(torch.is_grad_enabled()) and not torch.is_inference_mode_enabled()

    def lazily_negated(self, x: Array) -> bool:
        return bool(x.is_neg())

    def memo_layout(self, a: Array, b: Array) -> tuple[Any, ...] | None:
        return (a.stride(), b.stride(), a.requires_grad, b.requires_grad, a.is_neg(), b.is_neg())

    def namespace(self) -> ModuleType:
        import array_api_compat.torch as ns

        return ns

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import torch

        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if len(devices) == 1:
            notes.append(torch_gpu_note(torch.__version__, torch.version.cuda))
        out = []
        for dev in devices:
            # synchronize(dev): the plain call waits for the current device only, so a
            # cuda:1 timing would stop its clock before cuda:1's kernels finished
            sync = functools.partial(torch.cuda.synchronize, dev) if dev != "cpu" else _nop

            def put(a: Any, d: str, dev: str = dev) -> Any:
                return torch.from_numpy(a.copy()).to(dev, getattr(torch, d))

            out.append(
                CheckDevice(
                    "torch",
                    dev,
                    put,
                    lambda a: a.detach().to("cpu", torch.float64).numpy(),
                    sync,
                    ("float16", "bfloat16", "float32", "float64"),
                    dev.split(":")[0],
                )
            )
        return out

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        import torch.nn.functional as F

        return "F.kl_div", lambda x, y: F.kl_div(x, y, reduction="sum")

    def device(self, x: Array) -> Any:
        return x.device

    def device_type(self, x: Array) -> str:
        # is_cpu / is_cuda are cheap flags; building x.device costs more
        return "cpu" if x.is_cpu else "cuda" if x.is_cuda else str(x.device.type)

    def trace(self, *arrays: Array, device: str | None = None) -> Trace | None:
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return Trace("torch.compile", "inside torch.compile (inductor fuses the definition)")
        if torch._C._functorch.maybe_current_level() is not None:
            return Trace("torch.func", "inside a torch.func transform")
        fwd = sys.modules.get("torch.autograd.forward_ad")
        if fwd is not None and getattr(fwd, "_current_level", -1) >= 0:
            return Trace("forward AD", "inside forward-mode AD (torch.autograd.forward_ad)")
        if device is None and arrays:
            device = self.device_type(arrays[0])
        if (
            device == "cuda"
            and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing()
        ):
            # a first launch loads the kernel's module, which capture forbids
            return Trace("CUDA graph", "during CUDA-graph capture")
        return None

    def is_concrete(self, x: Array) -> bool:
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return False
        return torch._C._functorch.maybe_current_level() is None  # torch.func: batched

    def values_readable(self, x: Array) -> bool:
        return self.is_concrete(x) and getattr(getattr(x, "device", None), "type", None) != "meta"

    def creation_kwargs(self, x: Array) -> dict[str, Any]:
        return {"device": x.device}

    def free_device_bytes(self, x: Array) -> int | None:
        torch = sys.modules["torch"]
        if not bool(getattr(x, "is_cuda", False)) or torch.compiler.is_compiling():
            return None
        try:
            return int(torch.cuda.mem_get_info(x.device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - a broken CUDA setup
            return None

    def refuses_mixed_matmul(self, a: Array, b: Array) -> bool:
        # torch's matrix product refuses two dtypes outside torch.autocast (which casts)
        torch = sys.modules["torch"]
        return a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type)

    def compiling(self) -> bool:
        return bool(sys.modules["torch"].compiler.is_compiling())

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()

    def with_derivative(
        self,
        xp: ModuleType,
        x: Array,
        value: Callable[[Array], Array],
        derivative: Callable[[Array], Array],
    ) -> Array:
        torch = sys.modules["torch"]
        if torch.is_grad_enabled() and x.requires_grad:
            from klx._torch_derivative import WithDerivative

            return WithDerivative.apply(x, value, derivative)  # type: ignore[no-untyped-call,unused-ignore]
        return value(x)

    def contiguous(self, x: Array) -> bool:
        return bool(x.is_contiguous())

    def rows_layout(self, x: Array) -> bool:
        if self.contiguous(x):
            return True
        return bool(x.ndim == 2 and x.stride(1) == 1 and x.stride(0) >= x.shape[1])

    def inductor_cpu(self, x: Array) -> bool:
        torch = sys.modules["torch"]
        return bool(torch.compiler.is_compiling()) and x.device.type == "cpu"

    def take_along_axis(
        self, xp: ModuleType, x: Array, indices: Array, axis: int, spread: bool
    ) -> Array:
        if indices.dtype != xp.int64:
            indices = xp.astype(indices, xp.int64)  # torch gathers with int64 indices only
        if not spread:
            return xp.take_along_axis(x, indices, axis=axis)
        # One ``take`` from the flattened `x` at each index's flat position (torch's own
        # gather needs `x` expanded, and its backward then fills an expanded-size gradient:
        # a (1, V) student gathered at (N, k) indices would write N x V, not V, entries).
        x = xp.moveaxis(x, axis, -1)
        idx = xp.moveaxis(indices, axis, -1)
        n = x.shape[-1]
        rows = xp.reshape(xp.arange(math.prod(x.shape[:-1]), device=x.device), (*x.shape[:-1], 1))
        flat = xp.reshape(rows * n + idx, (-1,))
        out = xp.take(xp.reshape(x, (-1,)), flat, axis=0)
        return xp.moveaxis(xp.reshape(out, idx.shape), -1, axis)


class _JAX(Library):
    name = "jax"
    array_type = ("jax", "Array")
    namespace_name = "jax.numpy"
    one_place = True
    install = 'pip install jax (on an NVIDIA GPU: pip install "jax[cuda12]")'
    module = "jax"
    fused_module = "klx._fused.jax_vjp"

    def namespace(self) -> ModuleType:
        import jax.numpy  # noqa: F401

        return sys.modules["jax.numpy"]

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import jax

        jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call,unused-ignore]
        import jax.numpy as jnp

        out = []
        kinds = {d.platform for d in jax.devices()} | {"cpu"}
        if "gpu" not in kinds and "cuda" not in kinds:
            notes.append(
                note(
                    "a GPU through JAX",
                    f"JAX sees only {', '.join(sorted(kinds))}",
                    'to check JAX on an NVIDIA GPU: pip install "jax[cuda12]"',
                )
            )
        # JAX's CPU (jax.devices() lists only the GPUs where jax[cuda] is installed) and
        # its first accelerator, if any
        accelerators = [d for d in jax.devices() if d.platform != "cpu"][:1]
        for d in jax.devices("cpu")[:1] + accelerators:

            def put(a: Any, dt: str, d: Any = d) -> Any:
                return jax.device_put(jnp.asarray(a).astype(dt), d)

            out.append(
                CheckDevice(
                    "jax",
                    str(d),
                    put,
                    lambda a: np.asarray(a.astype(jnp.float64)),
                    _nop,
                    ("float16", "bfloat16", "float32", "float64"),
                    "cpu" if d.platform == "cpu" else "cuda",
                )
            )
        return out

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, y: jnp.sum(jax.scipy.special.xlogy(y, y) - y * x))
        return "jax.jit formula", lambda x, y: f(x, y).block_until_ready()

    def materialise(self, x: Array) -> Array:
        return x.block_until_ready()

    def device(self, x: Array) -> Any:
        return None  # JAX places arrays itself; tracers and sharded arrays have no one device

    def trace(self, *arrays: Array, device: str | None = None) -> Trace | None:
        tracer = sys.modules["jax"].core.Tracer
        if any(isinstance(a, tracer) for a in arrays):
            return Trace(
                "jax", "a JAX tracer (inside jax.jit / grad / vmap: XLA fuses the definition)"
            )
        return None

    def stop_gradient(self, x: Array) -> Array:
        return sys.modules["jax"].lax.stop_gradient(x)

    def with_derivative(
        self,
        xp: ModuleType,
        x: Array,
        value: Callable[[Array], Array],
        derivative: Callable[[Array], Array],
    ) -> Array:
        jax = sys.modules["jax"]
        f = jax.custom_jvp(value)  # (called, not as a decorator: typed where JAX is not)

        def jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
            (y,), (dy,) = primals, tangents
            return f(y), derivative(y) * dy

        f.defjvp(jvp)
        return f(x)


class _CuPy(Library):
    shapes_known = True
    name = "cupy"
    array_type = ("cupy", "ndarray")
    namespace_name = "array_api_compat.cupy"
    install = "pip install cupy-cuda12x (CUDA 12; needs an NVIDIA GPU and its driver)"
    module = "cupy"
    exact_type = True

    def namespace(self) -> ModuleType:
        import array_api_compat.cupy as ns

        return ns

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
            why = "CuPy found no CUDA device"
        except Exception as exc:  # no driver
            count = 0
            why = f"CuPy found no CUDA device ({exc})"
        if count == 0:
            notes.append(
                note(
                    "a GPU through CuPy",
                    why,
                    "to check klx's CuPy kernels, check the NVIDIA driver (nvidia-smi)",
                )
            )
        out = []
        for i in range(count):

            def put(a: Any, d: str, i: int = i) -> Any:
                with cupy.cuda.Device(i):
                    return cupy.asarray(a.astype(d))

            out.append(
                CheckDevice(
                    "cupy",
                    f"cuda:{i}",
                    put,
                    lambda a: a.astype("float64").get(),
                    cupy.cuda.runtime.deviceSynchronize,
                    ("float32", "float64"),
                    "cuda",
                )
            )
        return out

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        import cupy

        return "CuPy formula", lambda x, y: cupy.sum(y * (cupy.log(y) - x))

    def device(self, x: Array) -> Any:
        return x.device

    def creation_kwargs(self, x: Array) -> dict[str, Any]:
        return {"device": x.device}

    def device_type(self, x: Array) -> str:
        return "cuda"


class _Dask(Library):
    name = "dask"
    array_type = ("dask.array", "Array")
    namespace_name = "array_api_compat.dask.array"
    numpy_based = True
    install = 'pip install "dask[array]"'
    module = "dask.array"

    def namespace(self) -> ModuleType:
        import array_api_compat.dask.array as ns

        return ns

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import dask.array as da

        return [
            CheckDevice(
                "dask",
                "cpu",
                lambda a, d: da.from_array(  # type: ignore[no-untyped-call,unused-ignore]
                    a.astype(d), chunks=(max(1, a.shape[0] // 2), -1)
                ),
                lambda a: np.asarray(a.compute(), dtype=np.float64),
                _nop,
                ("float32", "float64"),
                "cpu",
            )
        ]

    def materialise(self, x: Array) -> Array:
        return x.compute()

    def is_concrete(self, x: Array) -> bool:
        return True  # lazy, but klx's reads of it compute (validation says so)

    def values_readable(self, x: Array) -> bool:
        return False  # a check's read would compute the graph: its checks stay lazy

    def take_along_axis(
        self, xp: ModuleType, x: Array, indices: Array, axis: int, spread: bool
    ) -> Array:
        # Dask lacks it: `x` in one chunk along `axis`, each block of `indices` gathered
        # from the matching block of `x` by the chunks' own library.
        import array_api_compat
        import dask.array as da

        if spread:  # lazily: each block is a NumPy view
            shape = (*indices.shape[:axis], x.shape[axis], *indices.shape[axis + 1 :])
            x = xp.broadcast_to(x, shape)
        x = x.rechunk({axis: -1})
        chunks = tuple(c if i != axis else (indices.shape[axis],) for i, c in enumerate(x.chunks))
        indices = indices.rechunk(chunks)

        def gather(block: Array, idx: Array) -> Array:
            return array_api_compat.array_namespace(block).take_along_axis(block, idx, axis=axis)

        return da.map_blocks(gather, x, indices, dtype=x.dtype, chunks=indices.chunks)  # type: ignore[no-untyped-call,unused-ignore]

    def reduce_chunks(
        self, x: Array, chunk_sum: Callable[..., Array], axis: int, keepdims: bool
    ) -> Array | None:
        import dask.array as da

        return da.reduction(  # type: ignore[no-untyped-call,unused-ignore]
            x, chunk_sum, chunk_sum, axis=axis, keepdims=keepdims, dtype=x.dtype
        )


class _MLX(Library):
    """Apple's MLX. It is not array-API compliant, and array-api-compat does not wrap it:
    :mod:`klx._array_api_mlx` supplies the standard's functions klx uses."""

    name = "mlx"
    shapes_known = True
    array_type = ("mlx.core", "array")
    namespace_name = "klx._array_api_mlx"
    one_place = True  # unified memory: an MLX array has no device, a stream runs it
    install = 'pip install "mlx[cpu]" (Linux) or pip install mlx (macOS)'
    module = "mlx.core"

    def namespace(self) -> ModuleType:
        import klx._array_api_mlx as ns

        module: ModuleType = ns  # (Any where the library is not installed: typecheck)
        return module

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import mlx.core as mx

        kind = self.device_type(None)
        dtypes = ("float16", "bfloat16", "float32") + (("float64",) if kind == "cpu" else ())
        return [
            CheckDevice(
                "mlx",
                kind,
                # converted in NumPy (a GPU stream has no float64; NumPy has no bfloat16)
                lambda a, d: (
                    mx.array(a.astype("float32" if d == "bfloat16" else d)).astype(getattr(mx, d))
                    if d != "float64"
                    else mx.array(a, dtype=mx.float64)
                ),
                lambda a: np.array(
                    a.astype(mx.float32 if a.dtype != mx.float64 else a.dtype), dtype=np.float64
                ),
                lambda: mx.synchronize(),
                dtypes,
                kind,
            )
        ]

    def peer(self) -> tuple[str, Callable[[Any, Any], Any]] | None:
        import mlx.core as mx

        def formula(x: Any, y: Any) -> Any:
            out = mx.sum(y * (mx.log(y) - x))
            mx.eval(out)
            return out

        return "MLX formula", formula

    def materialise(self, x: Array) -> Array:
        sys.modules["mlx.core"].eval(x)
        return x

    def device(self, x: Array) -> Any:
        return None

    def device_type(self, x: Array) -> str:
        mx = sys.modules["mlx.core"]
        return "cpu" if mx.default_device().type == mx.cpu else "gpu"

    def stop_gradient(self, x: Array) -> Array:
        return sys.modules["mlx.core"].stop_gradient(x)

    def with_derivative(
        self,
        xp: ModuleType,
        x: Array,
        value: Callable[[Array], Array],
        derivative: Callable[[Array], Array],
    ) -> Array:
        mx = sys.modules["mlx.core"]
        f = mx.custom_function(value)

        def one(a: Any) -> Any:  # a function of one array gets arrays, not tuples
            return a[0] if isinstance(a, (tuple, list)) else a

        @f.jvp  # type: ignore[untyped-decorator,unused-ignore]
        def jvp(primals: Any, tangents: Any) -> Any:
            return derivative(one(primals)) * one(tangents)

        @f.vjp  # type: ignore[untyped-decorator,unused-ignore]
        def vjp(primals: Any, cotangent: Any, output: Any) -> Any:
            return derivative(one(primals)) * one(cotangent)

        return f(x)

    def contiguous(self, x: Array) -> bool:
        return False  # no strides to read: the row paths (NumPy's, torch's) do not serve it


class _ArrayAPIStrict(Library):
    """array-api-strict: the standard and nothing else (array-api-compat passes it
    through)."""

    name = "array_api_strict"
    array_type = ("array_api_strict._array_object", "Array")
    namespace_name = "array_api_strict"
    numpy_based = True
    sequential_strided_sums = True
    install = "pip install array-api-strict"
    module = "array_api_strict"

    def namespace(self) -> ModuleType:
        import array_api_strict as ns

        module: ModuleType = ns  # (Any where the library is not installed: typecheck)
        return module

    def check_devices(self, np: Any, notes: list[str]) -> list[CheckDevice]:
        import array_api_strict as xps

        cpu = xps.Device("CPU_DEVICE")
        return [
            CheckDevice(
                "array_api_strict",
                "cpu",
                lambda a, d: xps.asarray(a, dtype=getattr(xps, d), device=cpu),
                lambda a: np.asarray(xps.astype(a, xps.float64)),
                _nop,
                ("float32", "float64"),
                "cpu",
            )
        ]


def torch_gpu_note(version: str, cuda: str | None) -> str:
    """Why torch sees no GPU, and what to do about it."""
    if cuda is None:
        return note(
            "a GPU through torch",
            f"torch {version} is a CPU-only build",
            "to check klx's Triton kernels on an NVIDIA GPU, install a CUDA build of torch "
            "(on Linux, PyPI's torch wheel is one: pip install --force-reinstall torch; "
            "others: https://pytorch.org/get-started/locally/)",
        )
    return note(
        "a GPU through torch",
        f"torch {version} (built for CUDA {cuda}) sees no GPU",
        "to check klx's Triton kernels, check the NVIDIA driver (nvidia-smi) and "
        "CUDA_VISIBLE_DEVICES",
    )


#: Every array library klx has an adapter for, in the order :func:`library` tries them
#: and :mod:`klx.check` lists them.
LIBRARIES: tuple[Library, ...] = (
    _Torch(),  # first: the library of most calls (and of every torch.compile trace)
    _NumPy(),
    _JAX(),
    _CuPy(),
    _Dask(),
    _ArrayAPIStrict(),
    _MLX(),
)
#: The same, by name.
BY_NAME: dict[str, Library] = {lib.name: lib for lib in LIBRARIES}
_ARRAY_TYPES = tuple((lib, *lib.array_type) for lib in LIBRARIES)
#: The adapter of each type :func:`library` has met (an ``isinstance`` test depends on the
#: type alone), None for a type that is not an array.
_BY_TYPE: dict[type, Library | None] = {}


class _Other(Library):
    """Any other array-API library: its own namespace, through array-api-compat; named
    after its top-level package."""

    def __init__(self, name: str) -> None:
        self.name = name

    def namespace(self) -> ModuleType:  # pragma: no cover - array_namespace asks aac
        raise NotImplementedError


_OTHERS: dict[str, Library] = {}


def library(x: Any) -> Library | None:
    """The adapter of `x`'s library, or None if `x` is not an array.

    Each array type met is remembered (:data:`_BY_TYPE`), so that a call traced by
    ``torch.compile`` reads a small dict, not ``sys.modules``: dynamo guards the compiled
    code on every key of a dict it reads (about 2800 for ``sys.modules``), which cost each
    compiled klx call about 1 ms, and recompiled it whenever a module was imported."""
    kind = type(x)
    if kind in _BY_TYPE:
        return _BY_TYPE[kind]
    for lib, module, attr in _ARRAY_TYPES:  # is_array, inline: this runs on every call
        mod = sys.modules.get(module)
        cls = getattr(mod, attr, None) if mod is not None else None
        if cls is not None and isinstance(x, cls):
            _BY_TYPE[kind] = lib
            return lib
    if isinstance(x, (bool, int, float, complex)) or not hasattr(x, "__array_namespace__"):
        _BY_TYPE[kind] = None  # (a type whose instances may differ is not met in practice)
        return None
    return by_name(kind.__module__.split(".")[0])


def by_name(name: str) -> Library:
    """The adapter called `name` (a generic one for other array-API libraries)."""
    lib = BY_NAME.get(name) or _OTHERS.get(name)
    if lib is None:
        lib = _OTHERS[name] = _Other(name)
    return lib
