"""The backends a benchmark runs on, and float32 inputs made on each (shared by the CLIs)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["available", "make_inputs"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available(requested: list[str] | None) -> list[tuple[str, str]]:
    """(backend, device) pairs to run: every installed backend and its devices."""
    names = requested or ["numpy", "torch", "jax", "cupy", "dask"]
    out = []
    for name in names:
        if not _installed(name):
            if requested:
                sys.exit(f"backend {name!r} was asked for but is not installed")
            continue
        if name == "torch":
            import torch

            out.append(("torch", "cpu"))
            if torch.cuda.is_available():
                out.append(("torch", "cuda"))
        elif name == "jax":
            import jax

            out.append(("jax", jax.devices()[0].platform))
        elif name == "cupy":
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() > 0:
                    out.append(("cupy", "cuda"))
            except Exception as exc:  # no CUDA driver
                print(f"skipping cupy: {exc}", file=sys.stderr)
        else:
            out.append((name, "cpu"))
    return out


def make_inputs(
    backend: str, device: str, shape: tuple[int, int], seed: int = 0, zeros: bool = False
) -> tuple[Any, Any]:
    """log Q and P as float32 arrays of `backend` on `device`, made on the device.

    With `zeros`, every 8th entry of P is exactly 0 (the rest renormalised).
    """
    if zeros and backend not in ("numpy", "dask"):
        import numpy as np

        x, y = make_inputs("numpy", "cpu", shape, seed, zeros=True)
        return _from_numpy(backend, device, x), _from_numpy(backend, device, y)
    if backend == "torch":
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        y = torch.rand(shape, generator=g, device=device) + 1e-3
        y /= y.sum(-1, keepdim=True)
        x = torch.log_softmax(torch.randn(shape, generator=g, device=device), -1)
        return x, y
    if backend == "jax":
        import jax

        k1, k2 = jax.random.split(jax.random.key(seed))
        y = jax.random.uniform(k1, shape) + 1e-3
        y = y / y.sum(-1, keepdims=True)
        x = jax.nn.log_softmax(jax.random.normal(k2, shape), -1)
        return x.block_until_ready(), y.block_until_ready()
    if backend == "cupy":
        import cupy

        rs = cupy.random.RandomState(seed)
        y = rs.random_sample(shape, dtype=cupy.float32) + cupy.float32(1e-3)
        y /= y.sum(-1, keepdims=True)
        z = rs.standard_normal(shape, dtype=cupy.float32)
        x = z - cupy.log(cupy.exp(z).sum(-1, keepdims=True))
        return x, y
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.random(shape, dtype=np.float32) + np.float32(1e-3)
    if zeros:
        y.reshape(-1)[::8] = 0
    y /= y.sum(-1, keepdims=True)
    z = rng.standard_normal(shape, dtype=np.float32)
    x = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if backend == "dask":
        import dask.array as da

        return da.from_array(x, chunks=(max(1, shape[0] // 4), shape[1])), da.from_array(
            y, chunks=(max(1, shape[0] // 4), shape[1])
        )
    return x, y


def _from_numpy(backend: str, device: str, a: Any) -> Any:
    if backend == "torch":
        import torch

        return torch.from_numpy(a).to(device)
    if backend == "jax":
        import jax

        return jax.device_put(a)
    import cupy

    return cupy.asarray(a)
