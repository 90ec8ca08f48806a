"""torch autograd for :func:`klx.fused_linear_divergence`: a chunked autograd.Function.

Per chunk: the two logits blocks (one matrix product each), the per-token loss, its
gradient with respect to the logits, then the gradients with respect to the hidden
states (``dz @ W``), the weights (``W.grad += dz.T @ h``, in place) and the biases. Only
the inputs that require gradients get them.

'sum' / 'batchmean': the gradients are computed in the forward pass, for a unit
upstream gradient, and the backward scales them (as Liger Kernel's fused-linear losses
do): four matrix products per chunk in all. 'none': the forward computes the values
only and the backward walks the chunks again with the per-token upstream gradient.

A chunk's logits gradient comes from, in order:

* KL on plain CPU tensors (no softcap or hard term): :mod:`klx._fused.torch_cpu_kl`, the
  closed form in about half the passes;
* on CUDA, plain tensors: autograd of klx's public function, so that the registry's
  Triton rows kernels (with their backward) serve KL and JS;
* a divergence with a closed form (KL, JS, skew KL), elsewhere (DTensors on any device
  included): :mod:`klx._fused.gradients`, written once for torch and JAX;
* any other divergence: autograd of the chunk's definition.

Under :func:`torch.compile` the call runs eagerly (``torch.compiler.disable``: a graph
break), since the walk over chunks is a Python loop around autograd; without gradients
it is not called there (:func:`klx._fused.api.run` traces the generic chunks).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from klx._fused import torch_cpu_kl
from klx._fused.chunks import (
    CHUNK_TEMPORARIES,
    LEAN_MIX_TEMPORARIES,
    LEAN_TEMPORARIES,
    TRITON_TEMPORARIES,
    Flat,
    FusedSpec,
    Side,
    chunk_of,
    chunk_rows,
    closed_form,
    closed_form_kl,
    logits,
    masked,
    rows_by_chunks,
)
from klx._fused.dtensor import is_dtensor
from klx._fused.gradients import ChunkGrads, chunk_value_and_grads
from klx._fused.parse import FusedCall
from klx._namespace import in_torch_func
from klx._typing import Array

__all__ = ["fused", "temporaries", "torch_fused"]

#: The autograd Functions take the six arrays of :meth:`Flat.arrays` last.
_ARRAYS = 6


def fused(call: FusedCall) -> Array | None:
    """The loss of a checked call on torch tensors, or None inside ``torch.func.grad`` /
    ``vmap``: there the generic chunks serve (plain torch ops the transforms trace; the
    closed-form backward's autograd.Function has no setup_context, and its value checks
    cannot read batched tensors), and memory grows as autodiff keeps each chunk.
    ``torch.compile`` runs the call eagerly where a gradient is wanted (without, it traces
    the generic chunks: :func:`klx._fused.api.run`)."""
    if in_torch_func():
        return None
    return torch_fused(
        call.xp, call.spec, call.acc, call.chunk, call.flat, call.reduction, call.scale
    )


def temporaries(spec: FusedSpec, q_hidden: Array, q_weight: Array) -> int:
    """How many [chunk, vocab] arrays a chunk holds at its peak: :data:`TRITON_TEMPORARIES`
    where the Triton kernels take it, :data:`LEAN_TEMPORARIES` (KL) or
    :data:`LEAN_MIX_TEMPORARIES` (the mixture) where :mod:`klx._fused.torch_cpu_kl` does,
    else :data:`CHUNK_TEMPORARIES`."""
    if _triton_serves(spec, q_hidden):
        return TRITON_TEMPORARIES
    lean = closed_form_kl(spec) or torch_cpu_kl.takes_mix(spec)
    if lean and torch_cpu_kl.plain_cpu_tensors(q_hidden, q_weight):
        return LEAN_TEMPORARIES if spec.kind == "kl" else LEAN_MIX_TEMPORARIES
    return CHUNK_TEMPORARIES


def _triton_serves(spec: FusedSpec, q_hidden: Array) -> bool:
    """Whether the Triton rows kernels take this call's CUDA chunks: KL, or JS with a
    weight of their direct forms, with no softcap or hard term, on plain CUDA tensors (a
    DTensor takes the closed form; other chunks autograd of the definition)."""
    beta = dict(spec.options).get("beta", 0.5)
    return (
        (spec.kind == "kl" or (spec.kind == "js" and 1.0 / 16.0 <= beta <= 15.0 / 16.0))
        and spec.softcap is None
        and spec.hard_weight == 0.0
        and spec.vocab == "same"
        and type(q_hidden).__module__ == "torch"
        and type(q_hidden).__name__ == "Tensor"
        and bool(getattr(q_hidden, "is_cuda", False))
    )


def _walk(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: Flat,
    need: Flat,
    cot: Any,
    per_token: bool,
) -> tuple[Array, Flat]:
    """Walk the chunks: the total of ``rows * cot`` and its gradients, a :class:`Flat`
    whose arrays are the gradients of those that `need` flags (None elsewhere).

    `cot` is a scalar (a Python float or 0-d tensor) or, with `per_token`, a tensor
    [tokens] (the upstream gradient of 'none').
    """
    n = f.tokens
    sums_p, sums_q = (_Sums(s, wants) for s, wants in zip(f.sides, need.sides, strict=True))
    cuda = _on_cuda(f.q.hidden)
    lean = torch_cpu_kl.serves(spec, f, cuda)
    own = torch_cpu_kl.owned(f)
    total = None
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        part = masked(xp, chunk_of(f, r0, r1))
        keep = part.keep
        with torch.no_grad():
            zp, zq = logits(xp, part.p, acc), logits(xp, part.q, acc)
        c = cot[r0:r1] if per_token else cot
        want_p, want_q = sums_p.wanted, sums_q.wanted
        if lean and spec.kind == "mix":
            got = torch_cpu_kl.mix_chunk(spec, zp, zq, own, keep, c, want_p, want_q, xp)
        elif lean:
            got = torch_cpu_kl.kl_chunk(spec, zp, zq, own, keep, c, want_p, want_q)
        elif closed_form(spec) and (not cuda or is_dtensor(zq)):
            # a DTensor on any device: the closed form's all-reduces (autograd of the
            # definition on CUDA DTensors made 2 all-gathers and 6 reduce-scatters a step)
            with torch.no_grad():
                got = chunk_value_and_grads(xp, spec, zp, zq, keep, part.labels, c, want_p, want_q)
        else:
            got = _autograd_chunk(xp, spec, zp, zq, part, c, want_p, want_q, cuda)
        total = got.total.detach() if total is None else total + got.total.detach()
        sums_p.add(got.dzp, part.p.hidden)
        sums_q.add(got.dzq, part.q.hidden)
        # (the chunk's logits gradients go now, not when the next chunk's are made: one
        # [chunk, vocab] array less at the peak, 31 MiB at 256 x 32,000 float32)
        del got, zp, zq
    if total is None:
        total = torch.zeros((), dtype=acc, device=f.q.hidden.device)
    return total, Flat(sums_p.result(), sums_q.result())


def _autograd_chunk(
    xp: ModuleType,
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    part: Flat,
    c: Any,
    want_p: bool,
    want_q: bool,
    cuda: bool,
) -> ChunkGrads:
    """One chunk's ``sum(rows * c)`` and its logits gradients by autograd of the chunk's
    definition (on CUDA through klx's public function, whose Triton kernels, with their
    backward, serve KL and JS where the registry lets them)."""
    public = _public_rows(spec) if cuda and spec.vocab == "same" else None
    with torch.enable_grad():
        zp.requires_grad_(want_p)
        zq.requires_grad_(want_q)
        rows = chunk_rows(xp, spec, zp, zq, part.keep, part.labels, public)
        s = torch.sum(rows * c)
        wrt = [z for z, w in ((zp, want_p), (zq, want_q)) if w]
        dz = list(torch.autograd.grad(s, wrt)) if wrt else []
    return ChunkGrads(
        rows.detach(), s, dz.pop(0) if want_p else None, dz.pop(0) if want_q else None
    )


class _Sums:
    """One side's gradients over the chunks. The weight and bias gradients are summed in
    place, in float32 for 16-bit parameters (cast once at the end: a bf16 sum of 512
    chunks' products was 2.4e-2 off); the hidden states' are made a chunk at a time and
    concatenated (which DTensors support, unlike slice assignment)."""

    def __init__(self, side: Side, wants: Side) -> None:
        self.side = side
        _, w, b = side
        self.parts: list[Array] | None = [] if wants.hidden else None
        self.g_w = _zeros_for_sum(w) if wants.weight else None
        self.g_b = _zeros_for_sum(b) if wants.bias else None
        #: Whether any of the side's gradients is wanted (its logits gradient is needed).
        self.wanted = bool(wants.hidden or wants.weight or wants.bias)

    def add(self, dz: Array | None, h: Array) -> None:
        """Add one chunk's logits gradient `dz` [n, vocab]; `h` are the chunk's hidden
        states (dropped tokens' set to 0)."""
        if dz is None:
            return
        w = self.side.weight
        if self.parts is not None:
            self.parts.append(dz.to(h.dtype) if w is None else dz.to(w.dtype) @ w)
        if self.g_w is not None:
            assert w is not None
            if self.g_w.dtype == w.dtype:
                self.g_w.addmm_(dz.to(self.g_w.dtype).T, h.to(self.g_w.dtype))
            else:  # the product in w's 16-bit dtype (tensor cores), added to float32 sums
                self.g_w.add_(dz.to(w.dtype).T @ h.to(w.dtype))
        if self.g_b is not None:
            self.g_b += torch.sum(dz, dim=0).to(self.g_b.dtype)

    def result(self) -> Side:
        """The side's gradients, each in its array's dtype (None where not wanted)."""
        h, w, b = self.side
        g_h = None
        if self.parts is not None:
            g_h = torch.cat(self.parts) if self.parts else torch.zeros_like(h)
        return Side(g_h, _cast(self.g_w, w), _cast(self.g_b, b))


def _zeros_for_sum(x: Array | None) -> Array | None:
    """Zeros to sum `x`'s gradient in: float32 for 16-bit `x` (None if `x` is)."""
    if x is None:
        return None
    wide = x.dtype in (torch.float16, torch.bfloat16)
    return torch.zeros_like(x, dtype=torch.float32 if wide else x.dtype)


def _cast(g: Array | None, x: Array | None) -> Array | None:
    return g if g is None or x is None or g.dtype == x.dtype else g.to(x.dtype)


def _on_cuda(z: Array) -> bool:
    """Whether the registry sees `z` as a CUDA tensor (its test alias included)."""
    from klx._accel import gates

    return gates.device_type("torch", z) == "cuda"


def _public_rows(spec: FusedSpec) -> Any:
    """The divergence per token of two logits blocks by klx's public function (dispatched:
    the Triton rows kernels on CUDA for KL and JS, the definition elsewhere)."""
    from klx._divergences import divergence

    opts = dict(spec.options)

    def rows(zp: Array, zq: Array) -> Array:
        return divergence(
            zp,
            zq,
            spec.record,
            p_form="logits",
            q_form="logits",
            temperature=spec.temperature,
            reduction="none",
            validate=False,
            **opts,  # type: ignore[arg-type]
        )

    return rows


def _rows_no_grad(xp: ModuleType, spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> Array:
    """Per-token values without gradients, a chunk at a time: on CUDA through klx's
    public function (its Triton kernels), on CPU by :func:`torch_cpu_kl.kl_rows` where it
    serves, else by the definition."""
    rows_of_logits = None
    cuda = _on_cuda(f.q.hidden)
    if cuda and spec.vocab == "same":
        public = _public_rows(spec)

        def rows_of_logits(zp: Array, zq: Array, keep: Any, labels: Any) -> Array:
            return chunk_rows(xp, spec, zp, zq, keep, labels, public)

    elif torch_cpu_kl.serves(spec, f, cuda):
        own = torch_cpu_kl.owned(f)

        def rows_of_logits(zp: Array, zq: Array, keep: Any, labels: Any) -> Array:
            if spec.kind == "mix":
                return torch_cpu_kl.mix_chunk(spec, zp, zq, own, keep, 1.0, False, False, xp).rows
            return torch_cpu_kl.kl_rows(spec, zp, zq, own, keep)[0]

    with torch.no_grad():
        return rows_by_chunks(xp, spec, acc, chunk, f, rows_of_logits)


def _needs(ctx: Any) -> Flat:
    """Which of the six arrays (the Function's last arguments) need a gradient."""
    return Flat.of(bool(x) for x in ctx.needs_input_grad[-_ARRAYS:])


class _Reduced(torch.autograd.Function):
    """'sum' / 'batchmean': the gradients come out of the forward pass."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: ModuleType,
        spec: FusedSpec,
        acc: Any,
        chunk: int,
        scale: Any,
        keep: Array | None,
        labels: Array | None,
        *arrays: Array | None,
    ) -> Array:
        f = Flat.of(arrays, keep, labels)
        total, grads = _walk(xp, spec, acc, chunk, f, _needs(ctx), scale, per_token=False)
        present = grads.arrays()
        ctx.save_for_backward(*(g for g in present if g is not None))
        ctx.present = tuple(g is not None for g in present)
        return total

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        saved = iter(ctx.saved_tensors)
        out = [next(saved) * g if present else None for present in ctx.present]
        before: tuple[Array | None, ...] = (None,) * (len(ctx.needs_input_grad) - _ARRAYS)
        return before + tuple(out)


class _Rows(torch.autograd.Function):
    """'none': values in the forward, a second walk in the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        xp: ModuleType,
        spec: FusedSpec,
        acc: Any,
        chunk: int,
        keep: Array | None,
        labels: Array | None,
        *arrays: Array | None,
    ) -> Array:
        f = Flat.of(arrays, keep, labels)
        ctx.xp, ctx.spec, ctx.acc, ctx.chunk = xp, spec, acc, chunk
        ctx.keep, ctx.labels = keep, labels
        ctx.save_for_backward(*(x for x in arrays if x is not None))
        ctx.present = tuple(x is not None for x in arrays)
        with torch.no_grad():
            return _rows_no_grad(xp, spec, acc, chunk, f)

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        saved = iter(ctx.saved_tensors)
        f = Flat.of((next(saved) if p else None for p in ctx.present), ctx.keep, ctx.labels)
        _, grads = _walk(ctx.xp, ctx.spec, ctx.acc, ctx.chunk, f, _needs(ctx), g, per_token=True)
        before: tuple[Array | None, ...] = (None,) * (len(ctx.needs_input_grad) - _ARRAYS)
        return before + grads.arrays()


@torch.compiler.disable  # type: ignore[untyped-decorator]
def torch_fused(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: Flat,
    reduction: str,
    scale: Any,
) -> Array:
    """The reduced loss ('sum', 'batchmean': times `scale`) or the per-token values."""
    arrays = f.arrays()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in arrays)
    if reduction == "none":
        if not grad:
            return _rows_no_grad(xp, spec, acc, chunk, f)
        return _apply(_Rows, xp, spec, acc, chunk, f.keep, f.labels, *arrays)
    if not grad:
        total = torch.sum(_rows_no_grad(xp, spec, acc, chunk, f))
        return total if scale is None else total * scale
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        # A normalizer that is learned or carries a graph: its gradient, -loss / n, by
        # autograd outside the chunks (which take a constant scale).
        return _apply(_Reduced, xp, spec, acc, chunk, 1.0, f.keep, f.labels, *arrays) * scale
    return _apply(
        _Reduced, xp, spec, acc, chunk, 1.0 if scale is None else scale, f.keep, f.labels, *arrays
    )


def _apply(fn: Any, *args: Any) -> Array:
    return fn.apply(*args)
