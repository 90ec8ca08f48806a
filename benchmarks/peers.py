"""What klx is timed against: on each backend, the implementations a user would pick instead.

Every entry is ``name -> make(x, y, reduction) -> zero-argument callable``, where ``x`` holds
log-probabilities and ``y`` probabilities, as in ``torch.nn.functional.kl_div(x, y)``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import klx

Maker = Callable[[Any, Any, str], Callable[[], Any]]


def _reduce(terms: Any, total: Callable[[Any], Any], reduction: str, x: Any) -> Any:
    if reduction == "none":
        return terms
    s = total(terms)
    if reduction == "sum":
        return s
    if reduction == "mean":
        return s / x.size if isinstance(x.size, int) else s / x.numel()
    return s / x.shape[0]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _klx(x: Any, y: Any, reduction: str) -> Callable[[], Any]:
    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", klx.KLDivMeanWarning)
            return klx.kl_div(x, y, reduction=reduction)

    return run


def numpy_peers() -> dict[str, Maker]:
    import numpy as np

    def formula(x: Any, y: Any, r: str) -> Callable[[], Any]:
        def run() -> Any:
            with np.errstate(all="ignore"):
                return _reduce(y * (np.log(y) - x), np.sum, r, x)

        return run

    peers: dict[str, Maker] = {"klx": _klx, "numpy formula": formula}
    if _installed("scipy"):
        from scipy import special

        def xlogy(x: Any, y: Any, r: str) -> Callable[[], Any]:
            return lambda: _reduce(special.xlogy(y, y) - y * x, np.sum, r, x)

        def rel_entr(x: Any, y: Any, r: str) -> Callable[[], Any]:
            return lambda: _reduce(special.rel_entr(y, np.exp(x)), np.sum, r, x)

        peers["numpy xlogy"] = xlogy
        peers["scipy rel_entr"] = rel_entr
    return peers


def torch_peers(compile_peers: bool) -> dict[str, Maker]:
    import torch
    import torch.nn.functional as F

    def kl_div(x: Any, y: Any, r: str) -> Callable[[], Any]:
        def run() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return F.kl_div(x, y, reduction=r)

        return run

    def formula(x: Any, y: Any, r: str) -> Callable[[], Any]:
        return lambda: _reduce(y * (y.log() - x), torch.sum, r, x)

    peers: dict[str, Maker] = {"klx": _klx, "F.kl_div": kl_div, "torch formula": formula}
    if compile_peers:
        compiled = torch.compile(F.kl_div)

        def kl_div_compiled(x: Any, y: Any, r: str) -> Callable[[], Any]:
            def run() -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return compiled(x, y, reduction=r)

            return run

        peers["torch.compile(F.kl_div)"] = kl_div_compiled
    if _installed("liger_kernel"):

        def liger(x: Any, y: Any, r: str) -> Callable[[], Any]:
            from liger_kernel.transformers import LigerKLDIVLoss

            loss = LigerKLDIVLoss(reduction=r)
            return lambda: loss(x, y)

        peers["Liger LigerKLDIVLoss"] = liger
    return peers


def jax_peers() -> dict[str, Maker]:
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import xlogy

    def jit_klx(x: Any, y: Any, r: str) -> Callable[[], Any]:
        f = jax.jit(lambda a, b: klx.kl_div(a, b, reduction=r))
        return _klx_quiet(lambda: f(x, y))

    def formula(x: Any, y: Any, r: str) -> Callable[[], Any]:
        f = jax.jit(lambda a, b: _reduce(xlogy(b, b) - b * a, jnp.sum, r, a))
        return lambda: f(x, y)

    peers: dict[str, Maker] = {"jax.jit(klx)": jit_klx, "jax.jit(xlogy formula)": formula}
    if _installed("optax"):
        import optax

        def optax_kl(x: Any, y: Any, r: str) -> Callable[[], Any]:
            # optax returns one value per row (the sum over the last axis).
            f = jax.jit(lambda a, b: _reduce(optax.kl_divergence(a, b), jnp.sum, r, a))
            return lambda: f(x, y)

        peers["jax.jit(optax.kl_divergence)"] = optax_kl
    return peers


def _klx_quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", klx.KLDivMeanWarning)
            return fn()

    return run


def cupy_peers() -> dict[str, Maker]:
    import cupy

    def formula(x: Any, y: Any, r: str) -> Callable[[], Any]:
        return lambda: _reduce(y * (cupy.log(y) - x), cupy.sum, r, x)

    return {"klx": _klx, "cupy formula": formula}


def dask_peers() -> dict[str, Maker]:
    import dask.array as da

    def formula(x: Any, y: Any, r: str) -> Callable[[], Any]:
        return lambda: _reduce(y * (da.log(y) - x), da.sum, r, x)

    return {"klx": _klx, "dask formula": formula}
