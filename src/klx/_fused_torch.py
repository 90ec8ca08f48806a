"""torch autograd for :func:`klx.fused_linear_divergence`: a chunked autograd.Function.

Per chunk: the two logits blocks (one matrix product each), the per-token loss by the
definition, its gradient with respect to the logits (autograd of the chunk's
definition, local to the chunk), then the gradients with respect to the hidden states
(``dz @ W``), the weights (``W.grad += dz.T @ h``, in place) and the biases. Only the
inputs that require gradients get them.

'sum' / 'batchmean': the gradients are computed in the forward pass, for a unit
upstream gradient, and the backward scales them (as Liger Kernel's fused-linear losses
do): four matrix products per chunk in all. 'none': the forward computes the values
only and the backward walks the chunks again with the per-token upstream gradient.

KL on CPU tensors takes a closed form in about half the passes (:func:`_kl_rows_cpu`);
on CUDA each chunk's divergence goes through klx's public function, so that the registry's
Triton rows kernels (with their backward) serve KL and JS.

Under :func:`torch.compile` the call runs eagerly (``torch.compiler.disable``: a graph
break), since the walk over chunks is a Python loop around autograd.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch

from klx._agnostic import js_terms, log_softmax, log_weight
from klx._fused_chunks import (
    FusedSpec,
    _Flat,
    _is_dtensor,
    _logits,
    _rows_by_chunks,
    _safe_rows,
    chunk_rows,
    closed_form_kl,
    label_mask,
    plain_cpu_tensors,
    rows_like,
)
from klx._typing import Array

__all__ = ["torch_fused"]

_DIFFERENTIABLE = ("hp", "wp", "bp", "hq", "wq", "bq")


def _walk(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: _Flat,
    need: tuple[bool, ...],
    cot: Any,
    per_token: bool,
) -> tuple[Array, list[Array | None]]:
    """Walk the chunks: the total of ``rows * cot`` and its gradients for the `need`ed inputs.

    `cot` is a scalar (a Python float or 0-d tensor) or, with `per_token`, a tensor
    [tokens] (the upstream gradient of 'none').
    """
    hp, wp, bp, hq, wq, bq = f.hp, f.wp, f.bp, f.hq, f.wq, f.bq
    n = hq.shape[0]
    # Weight and bias gradients are accumulated in place, in float32 for 16-bit parameters
    # (cast once at the end: a bf16 sum of 512 chunks' products was 2.4e-2 off); the
    # hidden states' are made a chunk at a time and concatenated (which DTensors support,
    # unlike slice assignment).
    grads: list[Array | None] = [
        None if not want or x is None else torch.zeros_like(x, dtype=_sum_dtype(x))
        for want, x in zip(need, (None, wp, bp, None, wq, bq), strict=True)
    ]
    _, g_wp, g_bp, _, g_wq, g_bq = grads
    parts_p: list[Array] | None = [] if need[0] else None
    parts_q: list[Array] | None = [] if need[3] else None
    want_p = need[0] or need[1] or need[2]
    want_q = need[3] or need[4] or need[5]
    lean = _lean(spec, f)
    own = (wp is not None or bp is not None, wq is not None or bq is not None)
    total = None
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        keep = None if f.keep is None else f.keep[r0:r1]
        labels = None if f.labels is None else f.labels[r0:r1]
        hp_c = _safe_rows(xp, hp[r0:r1], keep)
        hq_c = _safe_rows(xp, hq[r0:r1], keep)
        with torch.no_grad():
            zp = _logits(xp, hp_c, wp, bp, acc)
            zq = _logits(xp, hq_c, wq, bq, acc)
        c = cot[r0:r1] if per_token else cot
        cuda = _on_cuda(zq)
        if lean:
            s, dz = _kl_chunk_cpu(spec, zp, zq, own, keep, c, want_p, want_q)
        elif spec.kind in ("kl", "js") and (not cuda or _is_dtensor(zq)):
            # a DTensor on any device: the closed form's all-reduces (autograd of the
            # definition on CUDA DTensors made 2 all-gathers and 6 reduce-scatters a step)
            s, dz = _closed_chunk(xp, spec, zp, zq, keep, labels, c, want_p, want_q)
        else:
            # on CUDA through klx's public function: its Triton kernels (KL, JS from
            # logits, with their backward) serve where the registry lets them
            public = _public_rows(spec) if cuda else None
            with torch.enable_grad():
                zp.requires_grad_(want_p)
                zq.requires_grad_(want_q)
                rows = chunk_rows(xp, spec, zp, zq, keep, labels, public)
                s = torch.sum(rows * c)
                wrt = [z for z, w in ((zp, want_p), (zq, want_q)) if w]
                dz = list(torch.autograd.grad(s, wrt)) if wrt else []
                del rows
        total = s.detach() if total is None else total + s.detach()
        if want_p:
            _accumulate(dz.pop(0), hp_c, wp, parts_p, g_wp, g_bp)
        if want_q:
            _accumulate(dz.pop(0), hq_c, wq, parts_q, g_wq, g_bq)
    for i, parts, h in ((0, parts_p, hp), (3, parts_q, hq)):
        if parts is not None:
            grads[i] = torch.cat(parts) if parts else torch.zeros_like(h)
    for i, x in ((1, wp), (2, bp), (4, wq), (5, bq)):
        g = grads[i]
        if g is not None and x is not None and g.dtype != x.dtype:
            grads[i] = g.to(x.dtype)
    if total is None:
        total = torch.zeros((), dtype=acc, device=hq.device)
    return total, grads


def _closed_chunk(
    xp: ModuleType,
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    keep: Array | None,
    labels: Array | None,
    c: Any,
    want_p: bool,
    want_q: bool,
) -> tuple[Array, list[Array]]:
    """KL or JS of one chunk with the logits gradients in closed form: ``sum(rows * c)``
    and d/d zp, d/d zq.

    With ``a = cap(zp) / T``, ``b = cap(zq) / T``. KL(P || Q): d/db = Q - P and d/da =
    P (log P - log Q - KL). JS with ``M = beta P + (1 - beta) Q``: d/da = beta P (log P -
    log M - KL(P || M)) and d/db = (1 - beta) Q (log Q - log M - KL(Q || M)). The hard
    term adds softmax(cap(zq)) - onehot(label); the softcap multiplies by 1 - tanh^2.
    Entries whose weight is 0 contribute 0 (as the definition says) through one guarded
    difference. KL's value is the sum of the definition's terms ``p d + q - p`` (never
    negative, exact near P = Q), not of ``p d``. Fewer passes than autograd of the
    definition; written with max / exp / sum (not ``torch.log_softmax``), so on DTensors
    sharded along the vocabulary the backward communicates by all-reduces only.
    """
    with torch.no_grad():
        if keep is not None:
            zp = torch.where(keep[:, None], zp, 0.0)
            zq = torch.where(keep[:, None], zq, 0.0)
        cap = spec.softcap
        if cap is not None:
            tp, tq = torch.tanh(zp / cap), torch.tanh(zq / cap)
            zp, zq = cap * tp, cap * tq
        t, hw = spec.temperature, spec.hard_weight
        lp = log_softmax(xp, zp / t if t != 1.0 else zp, -1)
        lq = log_softmax(xp, zq / t if t != 1.0 else zq, -1)
        p = torch.exp(lp)
        dzp = dzq = None
        if spec.kind == "kl":
            # The definition's terms p (d + expm1(-d)) = p d + q - p >= 0: the rounding of
            # the log-normalisers' difference (the whole KL near P = Q) enters squared.
            q = torch.exp(lq)
            zero = p == 0
            diff = torch.where(zero, 0.0, lp - lq)
            small = diff > -1.0
            ds = torch.where(small, diff, 0.0)
            terms = torch.where(small, p * (ds + torch.expm1(-ds)), p * diff + (q - p))
            soft = torch.sum(torch.where(zero, q, terms), -1)
            del terms, ds, small
            if want_p:
                dzp = p * (diff - soft[:, None])
            del diff
            if want_q:
                dzq = q - p
            del q
        else:  # js: the value by the definition (exactly 0 for P = Q, never negative)
            beta = dict(spec.options)["beta"]
            terms = js_terms(
                xp, zp, zq, p_form="logits", q_form="logits", axis=-1, temperature=t, beta=beta
            )
            soft = torch.sum(terms, -1)
            del terms
            q = torch.exp(lq)
            lm = torch.logaddexp(lp + log_weight(beta), lq + log_weight(1.0 - beta))
            if want_p:
                dzp = _js_side(p, lp, lm, beta)
            if want_q:
                dzq = _js_side(q, lq, lm, 1.0 - beta)
        w = torch.ones_like(soft) * c
        if keep is not None:
            w = torch.where(keep, w, 0.0)
        rows = soft if hw == 0.0 else (1.0 - hw) * soft
        if dzp is not None:
            dzp *= ((1.0 - hw) / t) * w[:, None]
            if cap is not None:
                dzp *= 1.0 - tp * tp
        if dzq is not None:
            dzq *= (1.0 - hw) / t
        del lq
        if hw > 0.0 and labels is not None:
            labels = rows_like(labels, zq)
            valid = labels != spec.ignore_index
            safe = torch.where(valid, labels, 0).long()
            log_q1 = log_softmax(xp, zq, -1)
            # a DTensor sharded along the vocabulary: a one-hot mask, which each rank
            # compares on its own slice (a gather or scatter would collect the logits)
            onehot = label_mask(xp, zq, safe) if _is_dtensor(zq) else None
            if onehot is None:
                picked = torch.gather(log_q1, 1, safe[:, None])[:, 0]
            else:
                picked = torch.sum(torch.where(onehot, log_q1, 0.0), dim=-1)
            rows = rows + hw * torch.where(valid, -picked, 0.0)
            if want_q:
                assert dzq is not None
                vw = (valid.to(zq.dtype) * hw)[:, None]  # hw in zq's dtype, not the default
                dzq += torch.exp(log_q1) * vw
                if onehot is None:
                    dzq.scatter_add_(1, safe[:, None], -vw)
                else:
                    dzq -= torch.where(onehot, vw, 0.0)
        if dzq is not None:
            dzq *= w[:, None]
            if cap is not None:
                dzq *= 1.0 - tq * tq
        s = torch.sum(torch.where(w != 0, rows, 0.0) * w)
    return s, [d for d in (dzp, dzq) if d is not None]


def _sum_dtype(x: Array) -> Any:
    """The dtype a gradient of `x` is summed in over the chunks: float32 for 16-bit `x`."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _js_side(w: Array, log_w: Array, log_m: Array, b: float) -> Array:
    """d JS / d (logits / T) of one side: ``b w (d - sum(w d))``, ``d = log w - log m``
    (0 where the weight is 0)."""
    d = torch.where(w == 0, 0.0, log_w - log_m)
    return b * w * (d - torch.sum(w * d, -1, keepdim=True))


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


def _lean(spec: FusedSpec, f: _Flat) -> bool:
    """Whether :func:`_kl_rows_cpu` serves: KL without softcap or hard term, on plain CPU
    tensors (not DTensors, whose vocabulary may be sharded; not CUDA, where its one check
    of the values would sync)."""
    arrays = (f.hp, f.wp, f.bp, f.hq, f.wq, f.bq)
    return closed_form_kl(spec) and plain_cpu_tensors(*arrays) and not _on_cuda(f.hq)


def _shifted_exp(z: Array, t: float, own: bool) -> tuple[Array, Array, Array]:
    """``s = (z - max z) / t`` per row (in place in `z` if `own`), ``exp(s)``, and
    ``log1p`` of the row's mass besides one maximum (whose ``exp(s)`` is exactly 1): the
    definition's accurate log-sum-exp (:func:`klx._agnostic.log_softmax`) in fewer passes."""
    top, at = torch.max(z, dim=-1, keepdim=True)
    s = z.sub_(top) if own else z - top
    if t != 1.0:
        s.div_(t)
    e = torch.exp(s)
    e.scatter_(-1, at, 0.0)
    rest = torch.sum(e, dim=-1)
    e.scatter_(-1, at, 1.0)
    return s, e, torch.log1p(rest)


def _kl_rows_cpu(
    spec: FusedSpec, zp: Array, zq: Array, own: tuple[bool, bool], keep: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """KL(P || Q) per token of one chunk of CPU logits, in about half the definition's
    passes: ``(kl, p, e_q, lse_q, d)`` with ``d = log P - log Q = (s_p - s_q) - (lse_p -
    lse_q)`` and ``e_q = exp(s_q)`` (``Q = e_q exp(-lse_q)``), for the gradients.

    `zp` / `zq` are overwritten where the chunk owns them (`own`: a matrix product's fresh
    output). ``P d`` is NaN where P is 0 against ``log P = -inf`` (or for a NaN logit): in
    those rows only, ``d`` is set to 0 where P is 0, as the definition's guard does, and
    their KL taken again. Dropped tokens (`keep`) get logits 0, so NaN there reaches
    nothing; their KL is 0.
    """
    t = spec.temperature
    if keep is not None:
        drop = ~keep[:, None]
        zp = zp.masked_fill_(drop, 0.0) if own[0] else zp.masked_fill(drop, 0.0)
        zq = zq.masked_fill_(drop, 0.0) if own[1] else zq.masked_fill(drop, 0.0)
        own = (True, True)
    sp, p, lse_p = _shifted_exp(zp, t, own[0])
    sq, e_q, lse_q = _shifted_exp(zq, t, own[1])
    del zp, zq
    p.mul_(torch.exp(-lse_p)[:, None])
    d = sp.sub_(sq).sub_((lse_p - lse_q)[:, None])
    del sp, sq
    # Each term p (d + expm1(-d)) = p d + q - p is >= 0 (the definition's form for logits):
    # the KL is never negative, and the rounding of lse_p - lse_q (about 1e-6 in float32,
    # the whole KL of a student within 1e-3 of its teacher) enters only squared. Where
    # expm1(-d) could overflow (-d within 8 of log(max): rare, so the extra temporaries
    # of that branch are too) the term is p d + (q - p), with q = e_q e^-lse_q.
    far = d <= 8.0 - math.log(torch.finfo(d.dtype).max)
    phi = torch.where(far, 0.0, d).neg_().expm1_().add_(d)  # d itself where far
    kl = torch.einsum("ij,ij->i", p, phi)
    if bool(far.any()):  # one flag read per chunk (a CPU tensor: no device sync)
        q = e_q * torch.exp(-lse_q)[:, None]
        kl += torch.sum(torch.where(far, q - p, 0.0), dim=-1)
    bad = torch.isnan(kl)
    if bool(bad.any()):  # one flag read per chunk (a CPU tensor: no device sync)
        rows = torch.nonzero(bad)[:, 0]
        guarded = torch.where(p[rows] == 0, 0.0, d[rows])
        d[rows] = guarded
        kl[rows] = _kl_terms_guarded(p[rows], guarded, e_q[rows], lse_q[rows]).sum(-1)
    if keep is not None:
        kl = torch.where(keep, kl, 0.0)
    return kl, p, e_q, lse_q, d


def _kl_terms_guarded(p: Array, d: Array, e_q: Array, lse_q: Array) -> Array:
    """The terms ``p d + q - p`` of rows holding P = 0 entries (whose d is set to 0 there):
    0 where P is 0 and Q too, q where only P is."""
    q = e_q * torch.exp(-lse_q)[:, None]
    small = d > -1.0
    ds = torch.where(small, d, 0.0)
    terms = torch.where(small, p * (ds + torch.expm1(-ds)), p * d + (q - p))
    return torch.where(p == 0, q, terms)


def _kl_chunk_cpu(
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    own: tuple[bool, bool],
    keep: Array | None,
    c: Any,
    want_p: bool,
    want_q: bool,
) -> tuple[Array, list[Array]]:
    """:func:`_closed_chunk` (KL) on CPU tensors by :func:`_kl_rows_cpu`: the same quantities,
    ``d/db = Q - P`` and ``d/da = P (d - KL)``, in about half the passes."""
    with torch.no_grad():
        kl, p, e_q, lse_q, d = _kl_rows_cpu(spec, zp, zq, own, keep)
        w = torch.ones_like(kl) * c
        if keep is not None:
            w = torch.where(keep, w, 0.0)
        s = torch.sum(torch.where(w != 0, kl, 0.0) * w)
        scale = (w / spec.temperature)[:, None]
        dzp = dzq = None
        if want_p:
            # P (d - KL) with the KL as the sum of P d: d's rounding of lse_p - lse_q, the
            # same in every entry of a row, cancels (in the value's p d + q - p it does not).
            kl_d = torch.einsum("ij,ij->i", p, d)
            dzp = p * (d - kl_d[:, None])
            dzp *= scale
        del d
        if want_q:
            dzq = e_q.mul_(torch.exp(-lse_q)[:, None]).sub_(p)
            dzq *= scale
    return s, [x for x in (dzp, dzq) if x is not None]


def _rows_no_grad(xp: ModuleType, spec: FusedSpec, acc: Any, chunk: int, f: _Flat) -> Array:
    """Per-token values without gradients, a chunk at a time: on CUDA through klx's
    public function (its Triton kernels), on CPU by :func:`_kl_rows_cpu` where it serves,
    else by the definition."""
    rows_of_logits = None
    if _on_cuda(f.hq):
        public = _public_rows(spec)

        def rows_of_logits(zp: Array, zq: Array, keep: Any, labels: Any) -> Array:
            return chunk_rows(xp, spec, zp, zq, keep, labels, public)

    elif _lean(spec, f):
        own = (f.wp is not None or f.bp is not None, f.wq is not None or f.bq is not None)

        def rows_of_logits(zp: Array, zq: Array, keep: Any, labels: Any) -> Array:
            return _kl_rows_cpu(spec, zp, zq, own, keep)[0]

    with torch.no_grad():
        return _rows_by_chunks(xp, spec, acc, chunk, f, rows_of_logits)


def _accumulate(
    dz: Array,
    h: Array,
    w: Array | None,
    parts_h: list[Array] | None,
    g_w: Array | None,
    g_b: Array | None,
) -> None:
    """Add one chunk's logits gradient `dz` [n, vocab] to the hidden, weight, bias grads."""
    if parts_h is not None:
        parts_h.append(dz.to(h.dtype) if w is None else dz.to(w.dtype) @ w)
    if g_w is not None:
        assert w is not None
        if g_w.dtype == w.dtype:
            g_w.addmm_(dz.to(g_w.dtype).T, h.to(g_w.dtype))
        else:  # the product in w's 16-bit dtype (tensor cores), added to float32 sums
            g_w.add_(dz.to(w.dtype).T @ h.to(w.dtype))
    if g_b is not None:
        g_b += torch.sum(dz, dim=0).to(g_b.dtype)


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
        f = _Flat(*arrays, keep, labels)  # type: ignore[call-arg]
        need = tuple(bool(x) for x in ctx.needs_input_grad[7:13])
        total, grads = _walk(xp, spec, acc, chunk, f, need, scale, per_token=False)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = tuple(g is not None for g in grads)
        return total

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        saved = iter(ctx.saved_tensors)
        out = [next(saved) * g if present else None for present in ctx.present]
        return (None,) * 7 + tuple(out)


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
        f = _Flat(*arrays, keep, labels)  # type: ignore[call-arg]
        ctx.xp, ctx.spec, ctx.acc, ctx.chunk = xp, spec, acc, chunk
        ctx.keep, ctx.labels = keep, labels
        ctx.save_for_backward(*(x for x in arrays if x is not None))
        ctx.present = tuple(x is not None for x in arrays)
        with torch.no_grad():
            return _rows_no_grad(xp, spec, acc, chunk, f)

    @staticmethod
    def backward(ctx: Any, g: Array) -> tuple[Array | None, ...]:
        saved = iter(ctx.saved_tensors)
        arrays = [next(saved) if p else None for p in ctx.present]
        f = _Flat(*arrays, ctx.keep, ctx.labels)  # type: ignore[call-arg]
        need = tuple(bool(x) for x in ctx.needs_input_grad[6:12])
        _, grads = _walk(ctx.xp, ctx.spec, ctx.acc, ctx.chunk, f, need, g, per_token=True)
        return (None,) * 6 + tuple(grads)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def torch_fused(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: _Flat,
    reduction: str,
    scale: Any,
) -> Array:
    """The reduced loss ('sum', 'batchmean': times `scale`) or the per-token values."""
    arrays = (f.hp, f.wp, f.bp, f.hq, f.wq, f.bq)
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
