"""JAX called eagerly: run the array-API definition as one compiled XLA program.

Eagerly, each ``jax.numpy`` operation is a separate dispatch and a separate pass over
memory; under ``jax.jit`` XLA fuses the whole definition into one loop. Inside a
user's ``jax.jit`` (tracers) the registry does not choose this: the definition is then
traced into the user's program, which XLA fuses the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klx._agnostic import kl_div as definition
from klx._call import parse_kl_div

if TYPE_CHECKING:
    from klx._typing import KLDivCall

__all__ = ["kl_div"]

_COMPILED: dict[tuple[str, bool], Callable[[Any, Any], Any]] = {}


def kl_div(call: KLDivCall) -> Any:
    """`kl_div` of a checked call on concrete JAX arrays, by the jitted definition."""
    key = (call.reduction, call.log_target)
    fn = _COMPILED.get(key)
    if fn is None:
        jax = sys.modules["jax"]
        xp = call.xp

        def jitted(a: Any, b: Any) -> Any:
            # The call is rebuilt from the traced arrays: shapes and dtypes vary by call.
            return definition(xp, parse_kl_div(a, b, key[0], key[1], False, xp))

        fn = _COMPILED[key] = jax.jit(jitted)
    return fn(call.input, call.target)
