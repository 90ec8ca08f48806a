"""The array libraries the test suite runs on, and how to move data in and out of them."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALL = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict", "mlx")


@dataclass
class Backend:
    """One array library under test, on one device."""

    name: str
    device: Any
    xp: Any
    dtypes: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}-{device_label(self.device)}"

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        """A float64 NumPy array (or nested list) onto this backend, cast to `dtype`."""
        a = np.asarray(a)
        dt = self.dtypes[dtype] if a.dtype.kind == "f" else None
        if self.name == "torch":
            import torch

            t = torch.from_numpy(np.array(a, copy=True))
            return t.to(device=self.device, dtype=dt) if dt is not None else t.to(self.device)
        if self.name == "jax":
            import jax

            if dt is None:
                return jax.device_put(a, self.device)
            # bfloat16 does not exist in NumPy: convert in JAX.
            return jax.device_put(self.xp.asarray(a).astype(dt), self.device)
        if self.name == "dask":
            import dask.array as da

            if dt is not None:
                a = a.astype(dt)
            chunks = tuple(max(1, (s + 1) // 2) for s in a.shape)  # several chunks per axis
            return da.from_array(a, chunks=chunks or ())
        if self.name == "cupy":
            import cupy

            with cupy.cuda.Device(self.device.id):
                return cupy.asarray(a.astype(dt) if dt is not None else a)
        if self.name == "array_api_strict":
            return self.xp.asarray(a, dtype=dt, device=self.device)
        if self.name == "mlx":
            import mlx.core as mx

            if dt is None:  # integers and booleans keep their dtype (int64 -> int64)
                return mx.array(a)
            # through float64 (MLX converts a float64 NumPy array to float32 otherwise)
            return mx.array(a.astype(np.float64), dtype=mx.float64).astype(dt)
        return np.asarray(a, dtype=dt)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A float64 NumPy copy of a result of this backend."""
        if self.name == "torch":
            return x.detach().to("cpu", dtype=_torch().float64).numpy()
        if self.name == "jax":
            return np.asarray(x.astype(self.xp.float64))
        if self.name == "dask":
            # Dask runs NumPy when it computes, after klx has returned; NumPy then warns
            # about the infinities klx returns on purpose (log 0), as it would for np.log(0).
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.asarray(x.compute(), dtype=np.float64)
        if self.name == "cupy":
            return x.astype("float64").get()
        if self.name == "array_api_strict":
            import array_api_strict as xps

            cpu = xps.Device("CPU_DEVICE")
            return np.asarray(xps.astype(x.to_device(cpu), xps.float64))
        if self.name == "mlx":
            import mlx.core as mx

            return np.array(x.astype(mx.float64), dtype=np.float64)
        return np.asarray(x, dtype=np.float64)

    def device_of(self, x: Any) -> Any:
        if self.name == "jax":
            return next(iter(x.devices()))
        if self.name == "mlx":
            return self.device  # unified memory: an MLX array has no device of its own
        import array_api_compat

        return array_api_compat.device(x)


def _torch() -> Any:
    import torch

    return torch


def device_label(device: Any) -> str:
    label = str(device)
    if "CPU_DEVICE" in label:  # array_api_strict.Device('CPU_DEVICE')
        return "cpu"
    return label.replace("<CUDA Device ", "cuda:").strip("<>")


def load(name: str) -> list[Backend]:
    """Import a backend and list its devices; raises ImportError if it is not installed."""
    import array_api_compat

    if name == "numpy":
        return [
            Backend(
                "numpy",
                "cpu",
                array_api_compat.array_namespace(np.ones(1)),
                {"float16": np.float16, "float32": np.float32, "float64": np.float64},
            )
        ]
    if name == "torch":
        torch = importlib.import_module("torch")
        torch.set_default_dtype(torch.float64)  # a stray default dtype shows as a dtype error
        xp = array_api_compat.array_namespace(torch.ones(1))
        dtypes = {
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
            "float64": torch.float64,
        }
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda", 0))
        return [Backend("torch", d, xp, dtypes) for d in devices]
    if name == "jax":
        jax = importlib.import_module("jax")
        jax.config.update("jax_enable_x64", True)
        jnp = importlib.import_module("jax.numpy")
        dtypes = {
            "float16": jnp.float16,
            "bfloat16": jnp.bfloat16,
            "float32": jnp.float32,
            "float64": jnp.float64,
        }
        return [Backend("jax", d, jnp, dtypes) for d in jax.devices()[:1]]
    if name == "cupy":
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover
            raise RuntimeError("no CUDA device")
        xp = array_api_compat.array_namespace(cupy.ones(1))
        dtypes = {"float16": cupy.float16, "float32": cupy.float32, "float64": cupy.float64}
        return [Backend("cupy", cupy.cuda.Device(0), xp, dtypes)]
    if name == "dask":
        da = importlib.import_module("dask.array")
        xp = array_api_compat.array_namespace(da.ones(1))
        dtypes = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
        return [Backend("dask", "cpu", xp, dtypes)]
    if name == "array_api_strict":
        xps = importlib.import_module("array_api_strict")
        dtypes = {"float32": xps.float32, "float64": xps.float64}
        return [Backend("array_api_strict", xps.Device("CPU_DEVICE"), xps, dtypes)]
    if name == "mlx":
        mx = importlib.import_module("mlx.core")
        from klx._backends import BY_NAME

        dtypes = {
            "float16": mx.float16,
            "bfloat16": mx.bfloat16,
            "float32": mx.float32,
            "float64": mx.float64,  # on the CPU only, MLX's default device on Linux
        }
        return [Backend("mlx", "cpu", BY_NAME["mlx"].namespace(), dtypes)]
    msg = f"unknown backend {name!r}; choose from {', '.join(ALL)}"
    raise ValueError(msg)


def cuda_available() -> bool:
    """Whether a CUDA device is present, without importing a framework."""
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia"))


def traced(backend: Backend, fn: Any) -> Any:
    """`fn` as the backend traces it (``jax.jit``, ``torch.compile(fullgraph=True)`` after a
    dynamo reset), or `fn` itself for a backend that does not trace."""
    if backend.name == "jax":
        import jax

        return jax.jit(fn)
    if backend.name == "torch":
        import torch

        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True)
    return fn
