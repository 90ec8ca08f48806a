"""The chunks of :func:`klx.fused_linear_token_stats`: the token arrays flattened to one
axis (:class:`TokenArrays`) and the statistics of one chunk of tokens from its logits
(:func:`chunk_stats`), shared by the value walk and the torch and JAX gradients."""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

from klx._fused.chunks import Side, logits, safe_rows
from klx._token_stats import stats_rows
from klx._token_stats_math import StatsSpec
from klx._typing import Array

__all__ = ["TokenArrays", "chunk_stats"]


class TokenArrays(NamedTuple):
    """The policy's and the reference's output layers, the tokens flattened to one axis
    (the reference's fields None without a reference; its weight None where its hidden
    states are its logits), and the kept tokens and labels [tokens] (or None)."""

    hidden: Array
    weight: Array
    bias: Array | None
    ref_hidden: Array | None
    ref_weight: Array | None
    ref_bias: Array | None
    keep: Array | None
    labels: Array | None

    def differentiable(self) -> tuple[Array | None, ...]:
        """The six arrays that may carry a gradient."""
        return self[:6]

    def rows(self, r0: int, r1: int) -> TokenArrays:
        """Tokens ``r0:r1`` (the weights and biases are every chunk's)."""

        def cut(x: Array | None) -> Array | None:
            return None if x is None else x[r0:r1, ...]

        return self._replace(
            hidden=cut(self.hidden),
            ref_hidden=cut(self.ref_hidden),
            keep=cut(self.keep),
            labels=cut(self.labels),
        )


def chunk_stats(xp: ModuleType, spec: StatsSpec, acc: Any, a: TokenArrays) -> tuple[Array, ...]:
    """The statistics of one chunk `a` of tokens, in `spec`'s order: its logits (the
    dropped tokens' hidden states set to 0 first), then :func:`stats_rows`."""
    z = logits(xp, Side(safe_rows(xp, a.hidden, a.keep), a.weight, a.bias), acc)
    zr = None
    if a.ref_hidden is not None:
        side = Side(safe_rows(xp, a.ref_hidden, a.keep), a.ref_weight, a.ref_bias)
        zr = logits(xp, side, acc)
    return stats_rows(xp, spec, z, a.labels, zr, a.keep)
