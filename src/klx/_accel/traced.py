"""Closed-form derivatives for JAX: KL between two sets of logits, traced or eager.

The value is the array-API definition's (:func:`klx._agnostic.divergence_rows`), to the
bit; only the derivative differs. Autodiff of the definition differentiates every guard
(the log-sum-exp's ``log1p``, the double ``where`` of each term, ``expm1`` of the log
ratio): XLA fuses it, but it stayed about 2x the plain formula's gradient. The derivative
of KL(softmax(t / T) || softmax(s / T)) per distribution is, in closed form,

    dKL = sum( p (log p - log q - KL) dt + (q - p) ds ) / T    (p log p read as 0 at p = 0),

one fused expression of the same softmaxes. It is registered as a ``jax.custom_jvp``:
``jax.grad`` and ``jax.vjp`` take its transpose, forward mode (``jax.jvp``, ``jacfwd``)
takes it directly, higher orders differentiate it in turn, inside and outside
``jax.jit``, and ``jax.vmap`` batches it. Distributions that ``where`` drops get a
derivative of exactly 0.
"""

from __future__ import annotations

from typing import Any

from klx._agnostic import _plain_log_softmax, divergence_rows, mask_rows

__all__ = ["jax_kl_rows"]


def jax_kl_rows(call: Any) -> Any:
    """Per-distribution KL of a JAX call from two logits inputs, with a closed-form JVP."""
    import jax
    import jax.numpy as jnp

    xp, axis, temperature = call.xp, call.axis, call.temperature
    has_keep = call.keep is not None

    def value(t: Any, s: Any, k: Any) -> Any:
        return divergence_rows(xp, call, t, s, k if has_keep else None)

    rows = jax.custom_jvp(value)  # (called, not as a decorator: typed where JAX is not)

    def rows_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
        t, s, k = primals
        dt, ds, _ = tangents
        out = rows(t, s, k)
        if has_keep:  # the definition's stand-in rows (their derivative is dropped below)
            t, s = mask_rows(xp, t, k, "logits"), mask_rows(xp, s, k, "logits")
        # the plain log-softmax, as the value's terms take it (kl_terms)
        log_p = _plain_log_softmax(xp, t, axis, temperature)
        log_q = _plain_log_softmax(xp, s, axis, temperature)
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        zero = p == 0
        d = jnp.where(zero, 0.0, log_p - jnp.where(zero, 0.0, log_q))
        a = jnp.where(zero, 0.0, p * (d - jnp.expand_dims(out, axis)))
        tangent = jnp.sum(a * dt + (q - p) * ds, axis=axis) / temperature
        if has_keep:
            tangent = jnp.where(jnp.squeeze(k, axis=axis), tangent, 0.0)
        return out, tangent

    rows.defjvp(rows_jvp)
    p = xp.astype(call.p, call.acc, copy=False)
    q = xp.astype(call.q, call.acc, copy=False)
    keep = call.keep if has_keep else jnp.zeros((), dtype=bool)
    return rows(p, q, keep)
