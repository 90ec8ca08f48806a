"""Values and gradients by the backend's own autodiff (torch autograd, jax.grad), as
float64 NumPy, for the tests that compare gradients on torch and JAX."""

from __future__ import annotations

import numpy as np


def value_and_grads(backend, f, *arrays):
    """``f(*arrays)`` (a scalar) and its gradient w.r.t. each of the float64 NumPy `arrays`:
    ``(value, gradient, ...)``, by the backend's autodiff (JAX's under jax.jit)."""
    if backend.name == "torch":
        xs = [backend.asarray(a).requires_grad_(True) for a in arrays]
        value = f(*xs)
        value.backward()
        return (float(value.detach()), *(backend.to_numpy(x.grad) for x in xs))
    import jax

    argnums = tuple(range(len(arrays)))
    value, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(
        *(backend.asarray(a) for a in arrays)
    )
    return (float(value), *(np.asarray(g) for g in grads))
