"""torch DTensors in :func:`klx.fused_linear_divergence`: tokens and labels placed like
the logits, and label masks that each rank makes on its own slice of the vocabulary.

A chunk's logits are a DTensor when the output layer's weight is one (sharded along the
vocabulary by tensor parallelism). The chunk math in :mod:`klx._fused.chunks` and
:mod:`klx._fused.gradients` is written against the array API and runs on them as on
plain tensors; what needs the placements is here. Nothing here imports torch unless a
DTensor is seen.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from klx._backends import library
from klx._typing import Array

__all__ = ["is_dtensor", "label_mask", "rows_like"]


def is_dtensor(x: Array) -> bool:
    """Whether `x` is a torch DTensor (recognised without importing torch)."""
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def label_mask(xp: ModuleType, z: Array, labels: Array) -> Array:
    """``mask[i, v] = (v == labels[i])`` for logits `z` [n, vocab], laid out like `z`.

    A one-hot comparison, not a gather: on a torch DTensor sharded along the vocabulary
    each rank compares its own slice of the vocabulary (the index is made on each rank,
    without communication), where a gather would collect the logits first.
    """
    # an index type wide enough for the vocabulary (int8 labels would wrap at 128)
    wide = labels.dtype if xp.iinfo(labels.dtype).bits >= 32 else xp.int32
    vocab = xp.arange(z.shape[-1], dtype=wide, **_device_kw(z))
    if is_dtensor(z):
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        last = z.ndim - 1
        placements = [
            Shard(0) if p.is_shard() and p.dim in (last, -1) else Replicate() for p in z.placements
        ]
        vocab = distribute_tensor(vocab, z.device_mesh, placements, src_data_rank=None)
    return vocab == labels[:, None]


def rows_like(x: Array, z: Array) -> Array:
    """`x` (one value per row of `z`) as a DTensor placed like `z`'s rows when `z` is a
    DTensor and `x` is not (made on each rank from its own copy, without communication)."""
    if not is_dtensor(z) or is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = [Shard(0) if p.is_shard() and p.dim == 0 else Replicate() for p in z.placements]
    return distribute_tensor(x, z.device_mesh, placements, src_data_rank=None)


def _device_kw(x: Array) -> dict[str, Any]:
    lib = library(x)
    return {} if lib is None else lib.creation_kwargs(x)
