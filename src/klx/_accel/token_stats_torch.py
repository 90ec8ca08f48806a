"""torch for :func:`klx.token_stats`: the values and a closed-form gradient.

* Values without a gradient: on plain CPU tensors outside ``torch.compile`` the in-place
  passes of :mod:`klx._accel.token_stats_eager`; elsewhere (CUDA, traced) the array-API
  definition (:func:`klx._token_stats_math.stats_values`), which inductor fuses.
* With a gradient: a :class:`torch.autograd.Function` whose forward is the same values
  and whose backward is :func:`klx._token_stats_math.stats_cotangents` (one expression of
  the softmax: ``p (g_lse - g_y - g_H (log p + H) + g_KL (d - KL)) + g_y onehot``), eager
  and inside ``torch.compile`` (which traces it). It saves the inputs (no copy) and the
  per-token row parts, and recomputes the softmax in the backward: no [tokens, vocab]
  array is kept between the passes.

Autodiff of the definition serves what the Function does not: a temperature that is a
tensor (its gradient), ``torch.func`` transforms, and a backward that is itself
differentiated (``create_graph=True``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from klx._namespace import in_torch_func
from klx._token_stats_math import RowParts, StatsSpec, stats_cotangents, stats_values
from klx._typing import Array

__all__ = ["StatsRows", "rows"]


def _eager_cpu(z: Array) -> bool:
    """A plain CPU tensor outside torch.compile: the in-place passes may serve."""
    return (
        not torch.compiler.is_compiling()
        and type(z) is torch.Tensor
        and z.device.type == "cpu"
        and z.numel() > 0
    )


def _values(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    mask: bool = True,
) -> tuple[tuple[Array, ...], RowParts]:
    if isinstance(spec.temperature, float) and _eager_cpu(z):
        from klx._accel import token_stats_eager

        return token_stats_eager.values(torch, xp, spec, z, labels, reference, keep)
    return stats_values(xp, spec, z, labels, reference, keep, mask)


def rows(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[Array, ...]:
    """The statistics of torch logits (:func:`klx._token_stats.stats_rows`)."""
    ref_grad = reference is not None and reference.requires_grad
    if not (torch.is_grad_enabled() and (z.requires_grad or ref_grad)):
        return _values(xp, spec, z, labels, reference, keep, mask=False)[0]
    if not isinstance(spec.temperature, float) or in_torch_func():
        return stats_values(xp, spec, z, labels, reference, keep)[0]
    fn: Any = StatsRows.apply
    stacked = fn(z, reference, labels, keep, xp, spec)
    return tuple(stacked.unbind(0))


class StatsRows(torch.autograd.Function):
    """The statistics stacked [stats, ...]; the backward in closed form."""

    @staticmethod
    def forward(
        ctx: Any,
        z: Array,
        reference: Array | None,
        labels: Array | None,
        keep: Array | None,
        xp: ModuleType,
        spec: StatsSpec,
    ) -> Array:
        values, parts = _values(xp, spec, z, labels, reference, keep, mask=False)
        ctx.xp, ctx.spec = xp, spec
        ctx.save_for_backward(z, reference, labels, keep, *parts, *values)
        return torch.stack(values)

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        z, reference, labels, keep, m, shift_lse, ref_m, ref_lse, *values = ctx.saved_tensors
        need_ref = bool(ctx.needs_input_grad[1])
        parts = RowParts(m, shift_lse, ref_m, ref_lse)
        grads = tuple(g.unbind(0))
        if torch.is_grad_enabled():  # create_graph=True: a backward to differentiate
            return _differentiable_backward(ctx, z, reference, labels, keep, g)
        if _eager_cpu(z) and (reference is None or ctx.spec.reference_form == "logits"):
            dz, dref = cotangents(ctx.spec, z, labels, reference, keep, parts, values, grads)
            return dz, dref if need_ref else None, None, None, None, None
        dz, dref = stats_cotangents(
            ctx.xp,
            ctx.spec,
            z,
            labels,
            reference,
            keep,
            parts,
            tuple(values),
            grads,
            need_ref,
        )
        return (
            dz if ctx.needs_input_grad[0] else None,
            dref if need_ref else None,
            None,
            None,
            None,
            None,
        )


def _differentiable_backward(
    ctx: Any, z: Array, reference: Array | None, labels: Any, keep: Any, g: Array
) -> tuple[Array | None, ...]:
    """The backward by autodiff of the definition, recorded (``create_graph=True``): the
    closed form holds the row parts and statistics fixed, which a second derivative may
    not."""
    pairs = zip((z, reference), ctx.needs_input_grad[:2], strict=True)
    wanted = [x for x, need in pairs if need]
    values, _ = stats_values(ctx.xp, ctx.spec, z, labels, reference, keep)
    total = torch.sum(torch.stack(values) * g)
    got = iter(torch.autograd.grad(total, wanted, create_graph=True, allow_unused=True))
    dz = next(got) if ctx.needs_input_grad[0] else None
    dref = next(got) if ctx.needs_input_grad[1] else None
    return dz, dref, None, None, None, None


#: Where P is 0 its log is raised to this (below any log of a positive float64 or
#: float32, -745.2 and -103.3): its entries' coefficients stay finite, and p times them 0.
_LOG_FLOOR = -16384.0


def cotangents(
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
    parts: RowParts,
    values: Any,
    grads: tuple[Array, ...],
) -> tuple[Array, Array | None]:
    """:func:`klx._token_stats_math.stats_cotangents` of CPU tensors (reference logits, a
    Python float temperature), in place on three [tokens, vocab] temporaries: ``log p``
    (which becomes the gradient), ``p`` and ``log q`` (which becomes the reference's).
    The per-token factors, divided by T, are folded into two fused multiply-adds."""
    t = float(spec.temperature)
    names = spec.names
    batch, vocab = tuple(z.shape[:-1]), int(z.shape[-1])
    z2 = z.reshape(-1, vocab)
    n = z2.shape[0]
    by = {
        name: (v.reshape(n), g.reshape(n)) for name, v, g in zip(names, values, grads, strict=True)
    }
    drop = None if keep is None else ~keep.reshape(n)
    flat_labels = None if labels is None else labels.reshape(n)
    if flat_labels is not None:
        ignored = flat_labels == spec.ignore_index
        drop = ignored if drop is None else drop | ignored

    def col(x: Array) -> Array:
        return x.reshape(n, 1)

    log_p = z2 - col(parts.m)
    if drop is not None:
        log_p[drop] = 0.0
    if t != 1.0:
        log_p /= t
    log_p -= col(parts.shift_lse)
    p = torch.exp(log_p)
    log_p.clamp_(min=_LOG_FLOOR)
    zeros = torch.zeros((n, 1), dtype=z2.dtype)
    const, slope = zeros.clone(), zeros.clone()
    if "lse" in by:
        const += col(by["lse"][1])
    if "logprob" in by:
        const -= col(by["logprob"][1])
    if "entropy" in by:
        h, g_h = by["entropy"]
        const -= col(g_h * h)
        slope -= col(g_h)
    dref = None
    if "kl" in by:
        kl, g_kl = by["kl"]
        const -= col(g_kl * kl)
        slope += col(g_kl)
        log_q = reference.reshape(n, vocab) - col(parts.ref_m)  # type: ignore[union-attr]
        if drop is not None:
            log_q[drop] = 0.0
        if t != 1.0:
            log_q /= t
        log_q -= col(parts.ref_lse)
        if reference is not None and reference.requires_grad:
            dref = torch.exp(log_q).sub_(p).mul_(col(g_kl) / t)
            if drop is not None:
                dref[drop] = 0.0
            dref = dref.reshape(*batch, vocab)
        log_q.clamp_(min=_LOG_FLOOR)
    # p (const + slope log p - g_kl log q) / T, in the log p buffer
    dz = torch.addcmul(const / t, log_p, slope / t, out=log_p)
    if "kl" in by:
        dz.addcmul_(log_q, col(by["kl"][1]) / -t)
        del log_q
    dz *= p
    if "logprob" in by:
        g_y = by["logprob"][1] / t
        safe = torch.where(ignored, 0, flat_labels).to(torch.int64)  # type: ignore[arg-type, unused-ignore]
        dz.scatter_add_(-1, col(safe), col(g_y).to(dz.dtype))
    if drop is not None:
        dz[drop] = 0.0
    return dz.reshape(*batch, vocab), dref
