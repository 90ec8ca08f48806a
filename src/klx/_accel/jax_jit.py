"""JAX called eagerly: run the array-API definition as one compiled XLA program.

Eagerly, each ``jax.numpy`` operation is a separate dispatch and a separate pass over
memory; under ``jax.jit`` XLA fuses the whole definition into one loop. Inside a
user's ``jax.jit`` (tracers) this returns ``None``: the definition is then traced
into the user's program, which XLA fuses the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["kl_div"]

_COMPILED: dict[tuple[str, bool], Callable[[Any, Any], Any]] = {}


def kl_div(xp: ModuleType, input: Any, target: Any, *, reduction: str, log_target: bool) -> Any:
    jax = sys.modules["jax"]
    if isinstance(input, jax.core.Tracer) or isinstance(target, jax.core.Tracer):
        return None
    key = (reduction, log_target)
    fn = _COMPILED.get(key)
    if fn is None:
        from klx._kl_div import generic

        def definition(a: Any, b: Any) -> Any:
            return generic(xp, a, b, reduction=reduction, log_target=log_target)

        fn = _COMPILED[key] = jax.jit(definition)
    return fn(input, target)
