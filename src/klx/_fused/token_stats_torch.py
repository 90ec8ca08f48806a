"""torch autograd for :func:`klx.fused_linear_token_stats`: the forward pass computes the
statistics a chunk at a time and keeps no graph; the backward walks the chunks again,
recomputing each chunk's logits and taking the gradients of ``sum(stats * upstream)``
with respect to the chunk's hidden states and the weights and biases by autograd of
that chunk alone (the weight and bias gradients summed over the chunks, in float32 for
16-bit parameters). One chunk's graph lives at a time.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from klx._fused.token_stats_chunks import TokenArrays, chunk_stats
from klx._token_stats_math import StatsSpec
from klx._typing import Array

__all__ = ["walk"]

#: The autograd Function takes the six arrays of :meth:`TokenArrays.differentiable` last.
_ARRAYS = 6


@torch.compiler.disable  # type: ignore[untyped-decorator]
def walk(
    xp: ModuleType, spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays
) -> tuple[Array, ...]:
    """Every statistic [tokens]; differentiable where an input requires grad."""
    arrays = a.differentiable()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in arrays)
    if not grad:
        with torch.no_grad():
            return _values(xp, spec, acc, chunk, a)
    stacked = _apply(xp, spec, acc, chunk, a.keep, a.labels, *arrays)
    return tuple(stacked.unbind(0))


def _values(
    xp: ModuleType, spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays
) -> tuple[Array, ...]:
    n = int(a.hidden.shape[0])
    parts = [
        chunk_stats(xp, spec, acc, a.rows(r0, min(r0 + chunk, n))) for r0 in range(0, n, chunk)
    ]
    if not parts:
        return tuple(torch.zeros((0,), dtype=acc, device=a.hidden.device) for _ in spec.names)
    return tuple(torch.cat(list(col)) for col in zip(*parts, strict=True))


class _Stats(torch.autograd.Function):
    """The statistics stacked [stats, tokens]; the backward recomputes chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: ModuleType,
        spec: StatsSpec,
        acc: Any,
        chunk: int,
        keep: Array | None,
        labels: Array | None,
        *arrays: Array | None,
    ) -> Array:
        ctx.xp, ctx.spec, ctx.acc, ctx.chunk = xp, spec, acc, chunk
        ctx.keep, ctx.labels = keep, labels
        ctx.save_for_backward(*(x for x in arrays if x is not None))
        ctx.present = tuple(x is not None for x in arrays)
        a = TokenArrays._make((*arrays, keep, labels))
        with torch.no_grad():
            return torch.stack(_values(xp, spec, acc, chunk, a))

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        saved = iter(ctx.saved_tensors)
        arrays = [next(saved) if p else None for p in ctx.present]
        need = ctx.needs_input_grad[-_ARRAYS:]
        grads = _backward_walk(
            ctx.xp, ctx.spec, ctx.acc, ctx.chunk, arrays, need, ctx.keep, ctx.labels, g
        )
        before: tuple[None, ...] = (None,) * (len(ctx.needs_input_grad) - _ARRAYS)
        return before + grads


def _backward_walk(
    xp: ModuleType,
    spec: StatsSpec,
    acc: Any,
    chunk: int,
    arrays: list[Array | None],
    need: tuple[bool, ...],
    keep: Array | None,
    labels: Array | None,
    g: Array,
) -> tuple[Array | None, ...]:
    """The gradients of ``sum(stats * g)`` for the arrays that `need` flags."""
    h, rh = arrays[0], arrays[3]
    # the layers as leaves of each chunk's graph (whose gradients are summed over chunks)
    layers = {
        i: arrays[i].detach().requires_grad_(bool(need[i]))  # type: ignore[union-attr]
        for i in (1, 2, 4, 5)
        if arrays[i] is not None
    }
    sums: dict[int, Array] = {
        i: torch.zeros_like(x, dtype=_sum_dtype(x)) for i, x in layers.items() if need[i]
    }
    h_parts: dict[int, list[Array]] = {i: [] for i in (0, 3) if need[i] and arrays[i] is not None}
    n = int(h.shape[0])  # type: ignore[union-attr]
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        with torch.enable_grad():
            hc = h[r0:r1].detach().requires_grad_(bool(need[0]))  # type: ignore[index]
            rhc = None if rh is None else rh[r0:r1].detach().requires_grad_(bool(need[3]))
            part = TokenArrays(
                hc,
                layers[1],
                layers.get(2),
                rhc,
                layers.get(4),
                layers.get(5),
                None if keep is None else keep[r0:r1],
                None if labels is None else labels[r0:r1],
            )
            rows = torch.stack(chunk_stats(xp, spec, acc, part))
            total = torch.sum(rows * g[:, r0:r1].to(rows.dtype))
            inputs = {0: hc, 3: rhc, **layers}
            wanted = [i for i in range(_ARRAYS) if need[i] and inputs.get(i) is not None]
            got = torch.autograd.grad(total, [inputs[i] for i in wanted], allow_unused=True)
        for i, d in zip(wanted, got, strict=True):
            x = inputs[i]
            d = torch.zeros_like(x) if d is None else d
            if i in h_parts:
                h_parts[i].append(d)
            else:
                sums[i] += d.to(sums[i].dtype)
        del rows, total, got
    out: list[Array | None] = [None] * _ARRAYS
    for i, parts in h_parts.items():
        x = arrays[i]
        out[i] = torch.cat(parts) if parts else torch.zeros_like(x)  # type: ignore[arg-type, unused-ignore]
    for i, s in sums.items():
        out[i] = s.to(arrays[i].dtype)  # type: ignore[union-attr]
    return tuple(out)


def _apply(*args: Any) -> Array:
    fn: Any = _Stats.apply
    return fn(*args)


def _sum_dtype(x: Array) -> Any:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
