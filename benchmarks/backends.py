"""The backends a benchmark runs on, and float32 inputs made on each (shared by the CLIs)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from typing import Any

__all__ = ["BACKENDS", "available", "make_inputs", "unknown_backend_error"]

#: Every backend a benchmark knows, in the order they run.
BACKENDS = ("numpy", "torch", "jax", "cupy", "dask")


def unknown_backend_error(names: list[str]) -> str | None:
    """The error to print for names that are no backend (None if every name is one): each
    unknown name, the backend it is closest to ('pytorch': did you mean 'torch'?), and the
    list of backends."""
    unknown = [name for name in names if name not in BACKENDS]
    if not unknown:
        return None
    said = []
    for name in unknown:
        close = difflib.get_close_matches(name.lower(), BACKENDS, n=1, cutoff=0.6)
        said.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "backend" if len(unknown) == 1 else "backends"
    return f"unknown {noun} {', '.join(said)}: the backends are {', '.join(BACKENDS)}"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available(requested: list[str] | None) -> list[tuple[str, str]]:
    """(backend, device) pairs to run: every installed backend and its devices.

    A name that is no backend, or a backend asked for that is not installed, ends the
    program with a message that says which, and what there is.
    """
    names = requested or list(BACKENDS)
    error = unknown_backend_error(names)
    if error:
        sys.exit(error)
    out = []
    for name in names:
        if not _installed(name):
            if requested:
                have = [b for b in BACKENDS if _installed(b)]
                how = (
                    "pip install cupy-cuda12x, on a machine with a CUDA GPU"
                    if name == "cupy"
                    else "pip install -r benchmarks/requirements.txt installs it"
                )
                sys.exit(
                    f"backend {name!r} was asked for but is not installed "
                    f"(installed: {', '.join(have) or 'none'}; {how})"
                )
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
