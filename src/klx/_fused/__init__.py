"""Divergences from hidden states and output-layer weights, never holding the logits:
:func:`klx.fused_linear_divergence`, by idea:

* :mod:`~klx._fused.api`: the public function, and :func:`~klx._fused.api.run`, which
  hands a checked call to the library's walk over the chunks;
* :mod:`~klx._fused.parse`: the checks, into a :class:`~klx._fused.parse.FusedCall`;
* :mod:`~klx._fused.chunks`: the call's static part, its arrays flattened to tokens (a
  :class:`~klx._fused.chunks.Side` per model), the chunk budget and one chunk's loss by
  the definition;
* :mod:`~klx._fused.gradients`: one chunk's logits gradients in closed form, written
  once against the array API for torch and JAX;
* :mod:`~klx._fused.torch_autograd` and :mod:`~klx._fused.jax_vjp`: the walks with
  their autograd Function and custom VJPs; :mod:`~klx._fused.torch_cpu_kl`, torch
  CPU's fast path for KL;
* :mod:`~klx._fused.dtensor`: what torch DTensors sharded along the vocabulary need.

Only :mod:`~klx._fused.torch_autograd`, :mod:`~klx._fused.torch_cpu_kl` and
:mod:`~klx._fused.jax_vjp` import their library, and only when a call holds its arrays.
"""

from klx._fused.api import fused_linear_divergence

__all__ = ["fused_linear_divergence"]
