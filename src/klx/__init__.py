"""klx: the Kullback-Leibler divergence on every array library.

One implementation, written against the Python array API standard, serves NumPy,
PyTorch, JAX, CuPy, Dask and array-api-strict arrays on any device, eagerly or under
``jax.jit`` / ``torch.compile``. Importing klx imports no array library.

* :func:`kl_div` -- the contract of :func:`torch.nn.functional.kl_div` (its numbers to within
  one ulp), without its NaNs.
* :func:`kl_divergence` -- KL(P || Q) as the formula reads, over an explicit axis.
* :func:`js_divergence` -- the (generalized) Jensen-Shannon divergence.
* :func:`skew_kl_divergence`, :func:`tv_distance` -- skew KL and total variation.
* :func:`entropy`, :func:`cross_entropy` -- H(P), and ``-sum p log q`` against soft labels.
* :func:`divergence`, :func:`register_divergence`, :class:`Divergence` -- any divergence by
  name; new ones from one record.
* :func:`sparse_kl_divergence` -- KL(P || Q) with P known on its top k indices only.
* :func:`sparse_divergence` -- forward KL, reverse KL or JS on P's, Q's or both top k.
* :func:`kl_estimate` -- sampled KL estimators for RL (k1, k2, k3; gradient options).
* :func:`aggregate` -- RL aggregation modes ('token-mean', 'seq-mean-token-mean', ...), which
  every reducing function takes as its `reduction`.
* :func:`fused_linear_divergence` -- distillation from hidden states, without the logits.
* :func:`token_stats`, :func:`fused_linear_token_stats` -- per-token RL statistics
  (log-probability, entropy, KL to a reference, log-sum-exp), from logits or hidden states.
* :func:`validation`, :func:`set_validation` -- catch the classic mistakes loudly.
* :func:`explain`, :func:`set_accelerators` -- which fast path serves a call; turn them off.
"""

from klx import _divergences
from klx._accel.explain import Dispatch, explain
from klx._accel.registry import AcceleratorWarning
from klx._aggregation import aggregate
from klx._config import (
    accelerators_enabled,
    is_validating,
    set_accelerators,
    set_validation,
    validation,
)
from klx._divergence_table import Divergence, Option
from klx._divergences import *  # noqa: F403  (each divergence's function: its __all__)
from klx._entropy import entropy
from klx._estimators import kl_estimate
from klx._fused import fused_linear_divergence
from klx._fused.token_stats import fused_linear_token_stats
from klx._kl_div import KLDivMeanWarning, kl_div
from klx._sparse import sparse_divergence, sparse_kl_divergence
from klx._token_stats import token_stats

__version__ = "0.1.0"

__all__ = [
    "AcceleratorWarning",
    "Dispatch",
    "Divergence",
    "KLDivMeanWarning",
    "Option",
    "__version__",
    "accelerators_enabled",
    "aggregate",
    "entropy",
    "explain",
    "fused_linear_divergence",
    "fused_linear_token_stats",
    "is_validating",
    "kl_div",
    "kl_estimate",
    "set_accelerators",
    "set_validation",
    "sparse_divergence",
    "sparse_kl_divergence",
    "token_stats",
    "validation",
]
# A divergence's public function is exported by its own module's __all__ (so adding one
# touches no line here).
__all__ += _divergences.__all__
