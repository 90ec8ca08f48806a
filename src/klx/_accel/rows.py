"""Divergences over many long distributions on the CPU, a block of rows at a time.

For [tokens, vocab] inputs (distillation: vocabularies of 32k to 256k) the array-API
definition makes several temporaries of the input's size (log-softmax, exp, products).
Here the rows are taken a block at a time, so each temporary holds about
:data:`ROW_BLOCK_ELEMENTS` elements and the extra memory is that, plus one value per
row. Each block is evaluated by the definition itself
(:func:`klx._agnostic.divergence_rows`).

Eager only (NumPy; torch on the CPU without autograd, not under ``torch.compile``).
"""

from __future__ import annotations

import math
from typing import Any

from klx._agnostic import divergence_rows

__all__ = ["ROW_BLOCK_ELEMENTS", "TORCH_ROW_BLOCK_ELEMENTS", "blocked_rows"]

#: Elements per block: 2 MiB of float32 per temporary on NumPy; torch's per-call cost is
#: higher, so it gets blocks twice as large (the definition makes about ten temporaries).
ROW_BLOCK_ELEMENTS = 1 << 19
TORCH_ROW_BLOCK_ELEMENTS = 1 << 20


def blocked_rows(call: Any) -> Any:
    """Per-distribution values of inputs whose distributions lie along the last axis."""
    xp, p, q = call.xp, call.p, call.q
    vocab = p.shape[-1]
    batch = tuple(p.shape[:-1])
    n_rows = math.prod(batch)
    p2 = xp.reshape(p, (n_rows, vocab))
    q2 = xp.reshape(q, (n_rows, vocab))
    keep2 = None
    if call.keep is not None:
        keep2 = xp.reshape(xp.broadcast_to(call.keep, (*batch, 1)), (n_rows, 1))
    block_call = call._replace(axis=1)
    per_block = ROW_BLOCK_ELEMENTS if type(p).__module__ == "numpy" else TORCH_ROW_BLOCK_ELEMENTS
    step = max(1, per_block // max(vocab, 1))
    out = xp.empty((n_rows,), dtype=call.acc, device=_device(p))
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        out[r0:r1] = divergence_rows(
            xp,
            block_call,
            xp.astype(p2[r0:r1, :], call.acc, copy=False),
            xp.astype(q2[r0:r1, :], call.acc, copy=False),
            None if keep2 is None else keep2[r0:r1, :],
        )
    return xp.reshape(out, batch)


def _device(x: Any) -> Any:
    return "cpu" if type(x).__module__ == "numpy" else x.device
