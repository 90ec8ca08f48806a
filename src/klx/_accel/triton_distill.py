"""KL(softmax(t / T) || softmax(s / T)) from logits in one pass: a Triton kernel for torch
on CUDA, with an online log-sum-exp over vocabulary blocks.

For each row the forward kernel reads both rows once and keeps, in float32 (float64 for
float64 input), the running maxima, the running sums of exp, and the running sum of
exp(t' - m) (t' - s'), with t' = t / T, s' = s / T, rescaled whenever a maximum grows. Then

    KL = a / l_t - lse_t + lse_s,   a = sum e^(t'-m_t) (t' - s'),  l_t = sum e^(t'-m_t).

It writes one KL and the two log-sum-exps per row: the extra memory is proportional to
the number of rows, never to the vocabulary. The backward kernel recomputes the
probabilities from the saved log-sum-exps and writes only the gradients asked for:

    dKL/ds = (q - p) / T,        dKL/dt = p (log p - log q - KL) / T.

Rows whose incoming gradient is 0 (masked by ``where``) get exactly 0, even if they hold
NaN. ``js_divergence`` from logits needs both log-sum-exps before its mixture M, so its kernel
reads the rows twice (a pass of online log-sum-exps, then the terms) and keeps per row
KL(P || M), KL(Q || M) and the two log-sum-exps; its backward kernel is one more pass:

    dJS/dt = beta p (log p - log m - KL(P || M)) / T,  likewise for s with (1 - beta), q.

The kernels run in the test suite on CPU tensors under ``TRITON_INTERPRET=1``;
the dispatcher sends only CUDA tensors here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["js_rows_from_logits", "kl_rows_from_logits"]

BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _online_update(x, m, lse_sum, NEG_INF: tl.constexpr):
    """One block of an online log-sum-exp: new maximum, rescale factor, block's exps."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    none_yet = new_m == NEG_INF
    shift = tl.where(none_yet, 0.0, new_m)  # never -inf - -inf
    alpha = tl.where(none_yet, 1.0, tl.exp(m - shift))
    e = tl.exp(x - shift)
    return new_m, alpha, e, lse_sum * alpha + tl.sum(e, axis=0)


@triton.jit
def _zero(F64: tl.constexpr):
    """A scalar 0 of the accumulation dtype: float64 for float64 input, else float32."""
    if F64:
        return tl.zeros([1], dtype=tl.float64).sum(axis=0)
    else:
        return tl.zeros([1], dtype=tl.float32).sum(axis=0)


@triton.jit
def _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, like, BLOCK_V: tl.constexpr):
    """One vocabulary block of both rows, scaled by 1/T, -inf past the row's end."""
    NEG_INF: tl.constexpr = float("-inf")
    offs = start + tl.arange(0, BLOCK_V)
    mask = offs < vocab
    t = tl.load(t_ptr + base + offs, mask=mask, other=NEG_INF).to(like.dtype) * inv_t
    s = tl.load(s_ptr + base + offs, mask=mask, other=NEG_INF).to(like.dtype) * inv_t
    return t, s, offs, mask


@triton.jit
def _forward_kernel(
    t_ptr,
    s_ptr,
    kl_ptr,
    lse_t_ptr,
    lse_s_ptr,
    vocab,
    inv_t,
    BLOCK_V: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * vocab
    NEG_INF: tl.constexpr = float("-inf")
    zero = _zero(F64)
    m_t = zero + NEG_INF
    m_s = zero + NEG_INF
    l_t = zero
    l_s = zero
    a = zero
    for start in range(0, vocab, BLOCK_V):
        t, s, _, _ = _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, zero, BLOCK_V)
        m_t, alpha, e, l_t = _online_update(t, m_t, l_t, NEG_INF)
        nil = e == 0  # a zero p contributes 0, whatever s is
        diff = tl.where(nil, 0.0, t - tl.where(nil, 0.0, s))
        a = a * alpha + tl.sum(e * diff, axis=0)
        m_s, _, _, l_s = _online_update(s, m_s, l_s, NEG_INF)
    lse_t = m_t + tl.log(l_t)
    lse_s = m_s + tl.log(l_s)
    tl.store(kl_ptr + row, a / l_t - lse_t + lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(lse_s_ptr + row, lse_s)


@triton.jit
def _backward_kernel(
    t_ptr,
    s_ptr,
    kl_ptr,
    lse_t_ptr,
    lse_s_ptr,
    g_ptr,
    gt_ptr,
    gs_ptr,
    vocab,
    inv_t,
    BLOCK_V: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_S: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * vocab
    lse_t = tl.load(lse_t_ptr + row)
    lse_s = tl.load(lse_s_ptr + row)
    kl = tl.load(kl_ptr + row)
    g = tl.load(g_ptr + row).to(lse_t.dtype)
    dead = g == 0  # a row masked out by `where`: exactly 0, even if it holds NaN
    for start in range(0, vocab, BLOCK_V):
        t, s, offs, mask = _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, lse_t, BLOCK_V)
        p = tl.exp(t - lse_t)
        q = tl.exp(s - lse_s)
        nil = p == 0  # safe values there: never -inf - -inf
        log_p = tl.where(nil, 0.0, t - lse_t)
        log_q = tl.where(nil, 0.0, s) - lse_s
        if NEED_S:
            gs = tl.where(dead, 0.0, g * (q - p) * inv_t)
            tl.store(gs_ptr + base + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T:
            gt = tl.where(nil, 0.0, g * p * (log_p - log_q - kl) * inv_t)
            gt = tl.where(dead, 0.0, gt)
            tl.store(gt_ptr + base + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lse_pass(t_ptr, s_ptr, base, vocab, inv_t, zero, BLOCK_V: tl.constexpr):
    """Both rows' log-sum-exps in one online pass."""
    NEG_INF: tl.constexpr = float("-inf")
    m_t = zero + NEG_INF
    m_s = zero + NEG_INF
    l_t = zero
    l_s = zero
    for start in range(0, vocab, BLOCK_V):
        t, s, _, _ = _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, zero, BLOCK_V)
        m_t, _, _, l_t = _online_update(t, m_t, l_t, NEG_INF)
        m_s, _, _, l_s = _online_update(s, m_s, l_s, NEG_INF)
    return m_t + tl.log(l_t), m_s + tl.log(l_s)


@triton.jit
def _js_block(t, s, lse_t, lse_s, log_beta, log_1mbeta, beta):
    """Per element: p, q, safe log p, log q, log m, and the zero masks of beta p, (1-beta) q."""
    NEG_INF: tl.constexpr = float("-inf")
    p = tl.exp(t - lse_t)
    q = tl.exp(s - lse_s)
    zp = (p * beta) == 0
    zq = (q * (1.0 - beta)) == 0
    log_p = tl.where(zp, 0.0, t - lse_t)
    log_q = tl.where(zq, 0.0, s - lse_s)
    a = tl.where(zp, NEG_INF, log_p + log_beta)
    b = tl.where(zq, NEG_INF, log_q + log_1mbeta)
    both = zp & zq
    a = tl.where(both, 0.0, a)
    b = tl.where(both, 0.0, b)
    mx = tl.maximum(a, b)
    log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
    return p, q, zp, zq, log_p, log_q, log_m


@triton.jit
def _js_forward_kernel(
    t_ptr,
    s_ptr,
    kl_pm_ptr,
    kl_qm_ptr,
    lse_t_ptr,
    lse_s_ptr,
    vocab,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    BLOCK_V: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * vocab
    zero = _zero(F64)
    lse_t, lse_s = _lse_pass(t_ptr, s_ptr, base, vocab, inv_t, zero, BLOCK_V)
    kl_pm = zero
    kl_qm = zero
    for start in range(0, vocab, BLOCK_V):
        t, s, _, _ = _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, zero, BLOCK_V)
        p, q, zp, zq, log_p, log_q, log_m = _js_block(
            t, s, lse_t, lse_s, log_beta, log_1mbeta, beta
        )
        kl_pm += tl.sum(tl.where(zp, 0.0, p * (log_p - log_m)), axis=0)
        kl_qm += tl.sum(tl.where(zq, 0.0, q * (log_q - log_m)), axis=0)
    tl.store(kl_pm_ptr + row, kl_pm)
    tl.store(kl_qm_ptr + row, kl_qm)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(lse_s_ptr + row, lse_s)


@triton.jit
def _js_backward_kernel(
    t_ptr,
    s_ptr,
    kl_pm_ptr,
    kl_qm_ptr,
    lse_t_ptr,
    lse_s_ptr,
    g_ptr,
    gt_ptr,
    gs_ptr,
    vocab,
    inv_t,
    beta,
    log_beta,
    log_1mbeta,
    BLOCK_V: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_S: tl.constexpr,
):
    """dJS/dt' = beta p (log p - log m - KL(P||M)); dJS/ds' likewise with (1 - beta), q."""
    row = tl.program_id(0).to(tl.int64)
    base = row * vocab
    lse_t = tl.load(lse_t_ptr + row)
    lse_s = tl.load(lse_s_ptr + row)
    kl_pm = tl.load(kl_pm_ptr + row)
    kl_qm = tl.load(kl_qm_ptr + row)
    g = tl.load(g_ptr + row).to(lse_t.dtype)
    dead = g == 0  # a row masked out by `where`: exactly 0, even if it holds NaN
    for start in range(0, vocab, BLOCK_V):
        t, s, offs, mask = _load_block(t_ptr, s_ptr, base, start, vocab, inv_t, lse_t, BLOCK_V)
        p, q, zp, zq, log_p, log_q, log_m = _js_block(
            t, s, lse_t, lse_s, log_beta, log_1mbeta, beta
        )
        if NEED_T:
            gt = tl.where(zp, 0.0, g * beta * p * (log_p - log_m - kl_pm) * inv_t)
            gt = tl.where(dead, 0.0, gt)
            tl.store(gt_ptr + base + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)
        if NEED_S:
            gs = tl.where(zq, 0.0, g * (1.0 - beta) * q * (log_q - log_m - kl_qm) * inv_t)
            gs = tl.where(dead, 0.0, gs)
            tl.store(gs_ptr + base + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)


class _JSRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, s: torch.Tensor, temperature: float, beta: float) -> Any:
        rows, vocab = t.shape
        kl_pm, kl_qm, lse_t, lse_s = _row_stats(t, 4)
        logs = _log_weights(beta)
        if rows:
            _js_forward_kernel[(rows,)](
                t,
                s,
                kl_pm,
                kl_qm,
                lse_t,
                lse_s,
                vocab,
                1.0 / temperature,
                beta,
                *logs,
                BLOCK_V=BLOCK_V,
                F64=kl_pm.dtype == torch.float64,
                num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(t, s, kl_pm, kl_qm, lse_t, lse_s)
        ctx.temperature, ctx.beta = temperature, beta
        return beta * kl_pm + (1.0 - beta) * kl_qm

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        t, s, kl_pm, kl_qm, lse_t, lse_s = ctx.saved_tensors
        gt, gs = _gradient_buffers(ctx, t, s)
        need_t, need_s = gt is not None, gs is not None
        rows, vocab = t.shape
        if rows and (need_t or need_s):
            _js_backward_kernel[(rows,)](
                t,
                s,
                kl_pm,
                kl_qm,
                lse_t,
                lse_s,
                g.contiguous(),
                gt if need_t else t,
                gs if need_s else s,
                vocab,
                1.0 / ctx.temperature,
                ctx.beta,
                *_log_weights(ctx.beta),
                BLOCK_V=BLOCK_V,
                NEED_T=need_t,
                NEED_S=need_s,
                num_warps=NUM_WARPS,
            )
        return gt, gs, None, None


def _row_stats(t: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` per-row accumulators, float64 for float64 input, else float32."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return [torch.empty(t.shape[0], device=t.device, dtype=acc) for _ in range(count)]


def _gradient_buffers(ctx: Any, t: torch.Tensor, s: torch.Tensor) -> tuple[Any, Any]:
    """Gradient tensors for the inputs that need one (None for the others)."""
    gt = torch.empty_like(t) if ctx.needs_input_grad[0] else None
    gs = torch.empty_like(s) if ctx.needs_input_grad[1] else None
    return gt, gs


def _log_weights(beta: float) -> tuple[float, float]:
    return (
        math.log(beta) if beta > 0 else -math.inf,
        math.log1p(-beta) if beta < 1 else -math.inf,
    )


class _KLRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, s: torch.Tensor, temperature: float) -> Any:
        rows, vocab = t.shape
        kl, lse_t, lse_s = _row_stats(t, 3)
        if rows:
            _forward_kernel[(rows,)](
                t,
                s,
                kl,
                lse_t,
                lse_s,
                vocab,
                1.0 / temperature,
                BLOCK_V=BLOCK_V,
                F64=kl.dtype == torch.float64,
                num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(t, s, kl, lse_t, lse_s)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        t, s, kl, lse_t, lse_s = ctx.saved_tensors
        gt, gs = _gradient_buffers(ctx, t, s)
        need_t, need_s = gt is not None, gs is not None
        rows, vocab = t.shape
        if rows and (need_t or need_s):
            _backward_kernel[(rows,)](
                t,
                s,
                kl,
                lse_t,
                lse_s,
                g.contiguous(),
                gt if need_t else t,
                gs if need_s else s,
                vocab,
                1.0 / ctx.temperature,
                BLOCK_V=BLOCK_V,
                NEED_T=need_t,
                NEED_S=need_s,
                F64=kl.dtype == torch.float64,
                num_warps=NUM_WARPS,
            )
        return gt, gs, None


def js_rows_from_logits(
    t: torch.Tensor, s: torch.Tensor, temperature: float, beta: float
) -> torch.Tensor:
    """JS_beta(softmax(t/T), softmax(s/T)) per row: two passes (log-sum-exps, then terms)."""
    return _JSRows.apply(t, s, temperature, beta)


def kl_rows_from_logits(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row of two contiguous [rows, vocab] tensors."""
    return _KLRows.apply(t, s, temperature)
