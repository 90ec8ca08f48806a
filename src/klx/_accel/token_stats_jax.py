"""JAX for :func:`klx.token_stats`: the array-API definition's values
(:func:`klx._token_stats_math.stats_values`) with their derivative in closed form
(:func:`klx._token_stats_math.stats_tangents`), a ``jax.custom_jvp``: ``jax.grad`` takes its
transpose (one expression of the softmax per statistic, instead of autodiff of every
guard), forward mode (``jax.jvp``, ``jacfwd``) takes it directly, inside ``jax.jit`` and
outside; ``jax.vmap`` batches it. The softmax is recomputed from the logits in the
derivative.

A temperature given as an array (whose derivative the closed form does not give) takes
autodiff of the definition.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from klx._token_stats_math import StatsSpec, stats_tangents, stats_values
from klx._typing import Array

__all__ = ["rows"]


def rows(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[Array, ...]:
    """The statistics of JAX logits (:func:`klx._token_stats.stats_rows`)."""
    if not isinstance(spec.temperature, float):
        return stats_values(xp, spec, z, labels, reference, keep)[0]
    import jax

    def value(z_: Array, ref_: Array | None, labels_: Any, keep_: Any) -> tuple[Array, ...]:
        # dropped rows are not set to 0 first (nothing differentiates this): results 0
        return stats_values(xp, spec, z_, labels_, ref_, keep_, mask=False)[0]

    fn = jax.custom_jvp(value)  # (called, not as a decorator: typed where JAX is not)

    def jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
        z_, ref_, labels_, keep_ = primals
        dz, dref = tangents[0], tangents[1]
        # (dropped rows set to 0 first: their softmax, which the derivative reads, is finite)
        out, parts = stats_values(xp, spec, z_, labels_, ref_, keep_)
        d = stats_tangents(xp, spec, z_, labels_, ref_, keep_, parts, out, dz, dref)
        return tuple(out), d

    fn.defjvp(jvp)
    return tuple(fn(z, reference, labels, keep))
