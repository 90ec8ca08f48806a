"""Values and gradients by the backend's own autodiff (torch autograd, jax.grad), as
float64 NumPy, for the tests that compare gradients on torch and JAX."""

from __future__ import annotations

import numpy as np


def value_and_grad(backend, f, x):
    """f(x) (a scalar) and its gradient w.r.t. the float64 NumPy array x."""
    if backend.name == "torch":
        t = backend.asarray(x).requires_grad_(True)
        v = f(t)
        v.backward()
        return float(v.detach()), backend.to_numpy(t.grad)
    import jax

    v, g = jax.jit(jax.value_and_grad(f))(backend.asarray(x))
    return float(v), np.asarray(g)
