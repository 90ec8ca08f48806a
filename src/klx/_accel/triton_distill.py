"""KL(softmax(t / T) || softmax(s / T)) from logits in one pass: a Triton kernel for torch
on CUDA, with an online log-sum-exp over vocabulary blocks.

For each row the forward kernel reads both rows twice, in float32 (float64 for float64
input): a pass of online log-sum-exps (running maxima and sums of exp, rescaled whenever a
maximum grows), then the definition's terms (:func:`klx._agnostic.kl_terms`), with
t' = t / T, s' = s / T, d = log p - log q = (t' - s') - (lse_t - lse_s):

    KL = sum p phi(-d),   phi(y) = expm1(y) - y >= 0   (p d + q - p where d <= -1).

Each term is >= 0, so the KL is never negative, and the rounding of lse_t - lse_s (about
1e-6 of a float32 KL near P = Q, where the one-pass ``a / l_t - lse_t + lse_s`` lost every
digit) enters only squared. ``phi`` is a polynomial for |y| < 1/2 (no exp: exact whatever
the GPU's approximate ``exp`` does), ``exp(y) - 1 - y`` beyond.

It writes one KL and the two log-sum-exps per row: the extra memory is proportional to
the number of rows, never to the vocabulary. The backward kernel recomputes the
probabilities from the saved log-sum-exps and writes only the gradients asked for:

    dKL/ds = (q - p) / T,        dKL/dt = p (log p - log q - KL) / T.

Rows whose incoming gradient is 0 (masked by ``where``) get exactly 0, even if they hold
NaN. ``js_divergence`` from logits reads the rows twice the same way and takes the
definition's terms (:func:`klx._agnostic.js_terms`): with r = log q - log p,
u = log(m / p) = log1p((1 - beta) expm1(r)) and v = log(m / q) = log1p(beta expm1(-r)),
each term is the Jensen gap -(beta p u + (1 - beta) q v) >= 0 (exactly 0 at P = Q). It
keeps per row the JS, KL(P || M) = -sum p u, KL(Q || M) = -sum q v and the two
log-sum-exps; its backward kernel is one more pass:

    dJS/dt = -beta p (u + KL(P || M)) / T,  dJS/ds = -(1 - beta) q (v + KL(Q || M)) / T.

The weights are those of the definition's direct forms, [1/16, 15/16] (the dispatcher
sends others to the definition's logaddexp forms).

Layouts (the registry's 'rows' layout gate): `t` and `s` are 2-D ``[rows, vocab]``
tensors of one shape, one dtype (float16, bfloat16, float32, float64) and one device,
each row-major with a row stride of its own: ``stride(1) == 1`` and ``stride(0) >=
vocab`` (contiguous, or a slice such as ``logits[:, :-1]``). The per-row results are new
contiguous float32 (float64) tensors, not views of anything saved for backward, so
in-place operations on them are allowed; gradients are new contiguous ``[rows, vocab]``
tensors.

Each row is read in blocks aligned to 16 bytes of `t`'s memory: the first block of a row
(which starts before the row when the row is not aligned) and the last are masked, the
others are not, so they load 16 bytes at a time for any vocabulary (32001, 50257) whose
rows lie at one 16-byte phase. Offsets are 64-bit. Temperature and beta reach the kernels
in a tensor of the accumulation dtype, so float64 kernels see float64 scalars on a GPU as
in the interpreter. Launches run under ``torch.cuda.device(t.device)``. Second
derivatives raise (see :func:`klx._accel.triton_common.first_order`); ``torch.func.grad``
works; ``vmap`` raises.

The kernels run in the test suite on CPU tensors under ``TRITON_INTERPRET=1``; when they
are used is decided by the dispatcher.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl

from klx._accel.triton_common import LAUNCH, device_guard, first_order, no_vmap, scalars

__all__ = ["js_rows_from_logits", "kl_rows_from_logits"]

BLOCK_V = 2048


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
def _rescale(a, alpha):
    """a * alpha, and 0 where alpha is 0 (the terms' p underflowed), even if a is inf."""
    return tl.where(alpha == 0, 0.0, a) * alpha


@triton.jit
def _phi_small(y):
    """``(expm1(y) - y) / y^2`` for |y| <= 1/2: the Taylor series to 1/16!, whose first
    term left out is below 3e-18 of the sum (float64's rounding; float32 needs only the
    first eight, but the rest cost a few multiply-adds in a kernel that waits on memory).
    Horner's rule, one coefficient 1/n! per line (a loop would round them to float32)."""
    c = y * (1.0 / 20922789888000.0) + 1.0 / 1307674368000.0  # 1/16!, 1/15!
    c = c * y + 1.0 / 87178291200.0  # 1/14!
    c = c * y + 1.0 / 6227020800.0
    c = c * y + 1.0 / 479001600.0
    c = c * y + 1.0 / 39916800.0  # 1/11!
    c = c * y + 1.0 / 3628800.0
    c = c * y + 1.0 / 362880.0
    c = c * y + 1.0 / 40320.0  # 1/8!
    c = c * y + 1.0 / 5040.0
    c = c * y + 1.0 / 720.0
    c = c * y + 1.0 / 120.0  # 1/5!
    c = c * y + 1.0 / 24.0
    c = c * y + 1.0 / 6.0
    return c * y + 0.5  # 1/2!


@triton.jit
def _phi(y):
    """``expm1(y) - y >= 0``: the series near 0 (no cancellation, no ``exp``), else
    ``exp(y) - 1 - y``."""
    near = tl.abs(y) <= 0.5
    ys = tl.where(near, y, 0.0)
    far = tl.exp(tl.where(near, 0.0, y)) - 1.0 - y
    return tl.where(near, ys * ys * _phi_small(ys), far)


@triton.jit
def _expm1(x):
    """``expm1(x)``: ``x + phi(x)`` near 0, ``exp(x) - 1`` beyond."""
    near = tl.abs(x) <= 0.5
    xs = tl.where(near, x, 0.0)
    return tl.where(near, xs + xs * xs * _phi_small(xs), tl.exp(x) - 1.0)


@triton.jit
def _log1p(z):
    """``log1p(z)`` for z > -1 (Kahan's: ``log(w) z / (w - 1)``, w = 1 + z, exact where
    ``log`` is, as libdevice's is on the GPU); z where 1 + z rounds to 1."""
    w = 1.0 + z
    wm1 = w - 1.0
    one = wm1 == 0.0
    return tl.where(one, z, tl.log(w) * (z / tl.where(one, 1.0, wm1)))


@triton.jit
def _defined(lse_t, lse_s):
    """Whether the row holds two distributions (a row of ``-inf`` logits has none: its
    values are NaN, as the definition's), and the log-sum-exps with 0 standing in where
    not (so nothing computes ``-inf - -inf``)."""
    NEG_INF: tl.constexpr = float("-inf")
    none = (lse_t == NEG_INF) | (lse_s == NEG_INF)
    return none, tl.where(none, 0.0, lse_t), tl.where(none, 0.0, lse_s)


@triton.jit
def _zero(F64: tl.constexpr):
    """A scalar 0 of the accumulation dtype: float64 for float64 input, else float32."""
    if F64:
        return tl.zeros([1], dtype=tl.float64).sum(axis=0)
    else:
        return tl.zeros([1], dtype=tl.float32).sum(axis=0)


@triton.jit
def _row_start(row, st, VEC: tl.constexpr):
    """t's row start and the first block's start: the 16-byte boundary at or before it."""
    bt = row * st
    return bt, (bt // VEC) * VEC  # a multiple of VEC, as the compiler can see


@triton.jit
def _shift(base, bt, PHASE: tl.constexpr, VEC: tl.constexpr):
    """base - bt: from an element of t's row to the same column of another row; a
    multiple of VEC (as the compiler can see) when the rows share t's 16-byte phase."""
    if PHASE:
        return ((base - bt) // VEC) * VEC  # exact: the host checked the phase
    else:
        return base - bt


@triton.jit
def _block_load(ptr, off, rel, vocab, BLOCK_V: tl.constexpr):
    """Columns rel .. rel + BLOCK_V of a row at `off` (= its start + rel); -inf outside.

    Whole blocks load without a mask: 16 bytes at a time when the compiler can see that
    `off` is a multiple of 16 bytes (see :func:`_shift`).
    """
    NEG_INF: tl.constexpr = float("-inf")
    lanes = tl.arange(0, BLOCK_V)
    if (rel >= 0) & (rel + BLOCK_V <= vocab):
        v = tl.load(ptr + off + lanes)
    else:
        cols = rel + lanes
        v = tl.load(ptr + off + lanes, mask=(cols >= 0) & (cols < vocab), other=NEG_INF)
    return v


@triton.jit
def _block_store(ptr, off, rel, vocab, v, BLOCK_V: tl.constexpr):
    lanes = tl.arange(0, BLOCK_V)
    v = v.to(ptr.dtype.element_ty)
    if (rel >= 0) & (rel + BLOCK_V <= vocab):
        tl.store(ptr + off + lanes, v)
    else:
        cols = rel + lanes
        tl.store(ptr + off + lanes, v, mask=(cols >= 0) & (cols < vocab))


@triton.jit
def _load_block(
    t_ptr,
    s_ptr,
    start,
    bt,
    ds,
    vocab,
    inv_t,
    like,
    BLOCK_V: tl.constexpr,
):
    """One vocabulary block of both rows, scaled by 1/T, -inf outside the row.

    `start` is the block's first element in t (16-byte aligned), `start + ds` in s
    (see :func:`_shift`).
    """
    rel = start - bt
    t = _block_load(t_ptr, start, rel, vocab, BLOCK_V).to(like.dtype) * inv_t
    s = _block_load(s_ptr, start + ds, rel, vocab, BLOCK_V).to(like.dtype) * inv_t
    return t, s, rel


@triton.jit(do_not_specialize=["vocab"])
def _forward_kernel(
    t_ptr,
    s_ptr,
    out_ptr,
    kl_ptr,
    lse_t_ptr,
    lse_s_ptr,
    scal_ptr,
    vocab,
    st,
    ss,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    S_PHASE: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bt, lo = _row_start(row, st, VEC)
    ds = _shift(row * ss, bt, S_PHASE, VEC)
    zero = _zero(F64)
    inv_t = tl.load(scal_ptr).to(zero.dtype)
    lse_t, lse_s = _lse_pass(t_ptr, s_ptr, bt, lo, ds, vocab, inv_t, zero, BLOCK_V)
    none, lt, ls = _defined(lse_t, lse_s)
    delta = lt - ls
    kl = zero
    for start in range(lo, bt + vocab, BLOCK_V):
        t, s, _ = _load_block(t_ptr, s_ptr, start, bt, ds, vocab, inv_t, zero, BLOCK_V)
        kl += tl.sum(_kl_terms(t, s, lt, ls, delta), axis=0)
    kl = tl.where(none, float("nan"), kl)
    tl.store(out_ptr + row, kl)  # the caller's copy
    tl.store(kl_ptr + row, kl)  # the copy saved for backward
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(lse_s_ptr + row, lse_s)


@triton.jit
def _kl_terms(t, s, lse_t, lse_s, delta):
    """The definition's KL terms from logits: ``p phi(-d)`` where d > -1, ``p d + q - p``
    where d <= -1 (no ``exp`` of a large -d), and q where p is 0 (a ``-inf`` logit, or
    one whose p underflows). Outside the row (t = s = -inf) the term is 0."""
    NEG_INF: tl.constexpr = float("-inf")
    p = tl.exp(t - lse_t)
    q = tl.exp(s - lse_s)
    nil = (p == 0) | (t == NEG_INF)  # (a NaN row's lse makes p NaN, also outside it)
    d = tl.where(nil, 0.0, (t - tl.where(nil, 0.0, s)) - delta)  # log p - log q
    small = d > -1.0
    ds = tl.where(small, d, 0.0)
    term = tl.where(small, p * _phi(-ds), p * d + (q - p))
    return tl.where(nil, q, term)


@triton.jit(do_not_specialize=["vocab"])
def _backward_kernel(
    t_ptr,
    s_ptr,
    kl_ptr,
    lse_t_ptr,
    lse_s_ptr,
    g_ptr,
    gt_ptr,
    gs_ptr,
    scal_ptr,
    vocab,
    st,
    ss,
    sg,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    S_PHASE: tl.constexpr,
    G_PHASE: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bt, lo = _row_start(row, st, VEC)
    ds = _shift(row * ss, bt, S_PHASE, VEC)
    dg = _shift(row * sg, bt, G_PHASE, VEC)
    none, lse_t, lse_s = _defined(tl.load(lse_t_ptr + row), tl.load(lse_s_ptr + row))
    kl = tl.load(kl_ptr + row)
    inv_t = tl.load(scal_ptr).to(lse_t.dtype)
    g = tl.load(g_ptr + row).to(lse_t.dtype)
    g = tl.where(none, float("nan"), g)  # a row of -inf logits: NaN, as its value
    dead = g == 0  # a row masked out by `where`: exactly 0, even if it holds NaN
    for start in range(lo, bt + vocab, BLOCK_V):
        t, s, rel = _load_block(t_ptr, s_ptr, start, bt, ds, vocab, inv_t, lse_t, BLOCK_V)
        p = tl.exp(t - lse_t)
        q = tl.exp(s - lse_s)
        nil = (p == 0) | (t == float("-inf"))  # safe values there: never -inf - -inf
        d = (t - tl.where(nil, 0.0, s)) - (lse_t - lse_s)  # log p - log q
        if NEED_S:
            gs = tl.where(dead, 0.0, g * (q - p) * inv_t)
            _block_store(gs_ptr, start + dg, rel, vocab, gs, BLOCK_V)
        if NEED_T:
            gt = tl.where(nil, 0.0, g * p * (tl.where(nil, 0.0, d) - kl) * inv_t)
            gt = tl.where(dead, 0.0, gt)
            _block_store(gt_ptr, start + dg, rel, vocab, gt, BLOCK_V)


@triton.jit
def _lse_pass(
    t_ptr,
    s_ptr,
    bt,
    lo,
    ds,
    vocab,
    inv_t,
    zero,
    BLOCK_V: tl.constexpr,
):
    """Both rows' log-sum-exps in one online pass."""
    NEG_INF: tl.constexpr = float("-inf")
    m_t = zero + NEG_INF
    m_s = zero + NEG_INF
    l_t = zero
    l_s = zero
    for start in range(lo, bt + vocab, BLOCK_V):
        t, s, _ = _load_block(t_ptr, s_ptr, start, bt, ds, vocab, inv_t, zero, BLOCK_V)
        m_t, _, _, l_t = _online_update(t, m_t, l_t, NEG_INF)
        m_s, _, _, l_s = _online_update(s, m_s, l_s, NEG_INF)
    return m_t + tl.log(l_t), m_s + tl.log(l_s)


@triton.jit
def _js_block(t, s, lse_t, lse_s, beta):
    """Per element: p, q, the zero masks of beta p and (1 - beta) q, u = log(m / p) and
    v = log(m / q) by the definition's direct forms (0 where a weight is 0), and q as
    ``p e^r`` for the Jensen gap."""
    NEG_INF: tl.constexpr = float("-inf")
    p = tl.exp(t - lse_t)
    q = tl.exp(s - lse_s)
    zp = ((p * beta) == 0) | (t == NEG_INF)  # (a NaN row's lse makes p NaN, also outside)
    zq = ((q * (1.0 - beta)) == 0) | (s == NEG_INF)
    either = zp | zq
    r = tl.where(
        either, 0.0, (tl.where(either, 0.0, s) - tl.where(either, 0.0, t)) - (lse_s - lse_t)
    )
    # u directly where expm1(r) cannot overflow, else r + v; v likewise (the definition's).
    em = _expm1(tl.minimum(r, 30.0))
    u_direct = _log1p((1.0 - beta) * em)
    v_direct = _log1p(beta * _expm1(-tl.maximum(r, -30.0)))
    u = tl.where(r > 30.0, r + v_direct, u_direct)
    v = tl.where(r < -30.0, u_direct - r, v_direct)
    # Q's weight in the gap as p e^r: its first-order terms then cancel exactly against
    # P's; an exp of its own (the GPU's is approximate) left 1e-6 / r of each term.
    q_gap = tl.where(r > 30.0, q, p + p * em)
    return p, q, zp, zq, u, v, q_gap


@triton.jit
def _js_scalars(scal_ptr, like):
    """1/T, beta, log beta, log(1 - beta) (0 in place of -inf), in the accumulation dtype."""
    inv_t = tl.load(scal_ptr).to(like.dtype)
    beta = tl.load(scal_ptr + 1).to(like.dtype)
    log_beta = tl.load(scal_ptr + 2).to(like.dtype)
    log_1mbeta = tl.load(scal_ptr + 3).to(like.dtype)
    # 0 for the log of a weight of 0: only terms whose weight is 0 read it (never 0 * -inf)
    log_beta = tl.where(beta > 0.0, log_beta, 0.0)
    log_1mbeta = tl.where(beta < 1.0, log_1mbeta, 0.0)
    return inv_t, beta, log_beta, log_1mbeta


@triton.jit(do_not_specialize=["vocab"])
def _js_forward_kernel(
    t_ptr,
    s_ptr,
    js_ptr,
    kl_pm_ptr,
    kl_qm_ptr,
    lse_t_ptr,
    lse_s_ptr,
    scal_ptr,
    vocab,
    st,
    ss,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    S_PHASE: tl.constexpr,
    F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bt, lo = _row_start(row, st, VEC)
    ds = _shift(row * ss, bt, S_PHASE, VEC)
    zero = _zero(F64)
    inv_t, beta, log_beta, log_1mbeta = _js_scalars(scal_ptr, zero)
    lse_t, lse_s = _lse_pass(t_ptr, s_ptr, bt, lo, ds, vocab, inv_t, zero, BLOCK_V)
    none, lt, ls = _defined(lse_t, lse_s)
    js = zero
    kl_pm = zero
    kl_qm = zero
    for start in range(lo, bt + vocab, BLOCK_V):
        t, s, _ = _load_block(t_ptr, s_ptr, start, bt, ds, vocab, inv_t, zero, BLOCK_V)
        p, q, zp, zq, u, v, q_gap = _js_block(t, s, lt, ls, beta)
        a = p * beta
        b = q * (1.0 - beta)
        gap = -(a * u + (q_gap * (1.0 - beta)) * v)
        gap = tl.where(gap < 0, 0.0, gap)  # a Jensen gap: >= 0 in exact arithmetic
        # One weight 0: M is the other side alone, and the term is -b log(1 - beta) or
        # -a log beta (a finite stand-in keeps 0 * -inf out where beta is 0 or 1).
        only_q = -b * log_1mbeta
        only_p = -a * log_beta
        term = tl.where(zp, tl.where(zq, 0.0, only_q), tl.where(zq, only_p, gap))
        js += tl.sum(term, axis=0)
        # KL(P || M) = sum p log(p / m) = -sum p u (m = (1 - beta) q where beta p is 0)
        kl_pm += tl.sum(tl.where(zp, 0.0, tl.where(zq, -p * log_beta, -p * u)), axis=0)
        kl_qm += tl.sum(tl.where(zq, 0.0, tl.where(zp, -q * log_1mbeta, -q * v)), axis=0)
    tl.store(js_ptr + row, tl.where(none, float("nan"), js))
    tl.store(kl_pm_ptr + row, kl_pm)
    tl.store(kl_qm_ptr + row, kl_qm)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(lse_s_ptr + row, lse_s)


@triton.jit(do_not_specialize=["vocab"])
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
    scal_ptr,
    vocab,
    st,
    ss,
    sg,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    S_PHASE: tl.constexpr,
    G_PHASE: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_S: tl.constexpr,
):
    """dJS/dt' = -beta p (u + KL(P||M)); dJS/ds' = -(1 - beta) q (v + KL(Q||M))."""
    row = tl.program_id(0).to(tl.int64)
    bt, lo = _row_start(row, st, VEC)
    ds = _shift(row * ss, bt, S_PHASE, VEC)
    dg = _shift(row * sg, bt, G_PHASE, VEC)
    none, lse_t, lse_s = _defined(tl.load(lse_t_ptr + row), tl.load(lse_s_ptr + row))
    kl_pm = tl.load(kl_pm_ptr + row)
    kl_qm = tl.load(kl_qm_ptr + row)
    inv_t, beta, log_beta, log_1mbeta = _js_scalars(scal_ptr, lse_t)
    g = tl.load(g_ptr + row).to(lse_t.dtype)
    g = tl.where(none, float("nan"), g)  # a row of -inf logits: NaN, as its value
    dead = g == 0  # a row masked out by `where`: exactly 0, even if it holds NaN
    for start in range(lo, bt + vocab, BLOCK_V):
        t, s, rel = _load_block(t_ptr, s_ptr, start, bt, ds, vocab, inv_t, lse_t, BLOCK_V)
        p, q, zp, zq, u, v, _ = _js_block(t, s, lse_t, lse_s, beta)
        # log p - log m is -u, or -log beta where (1 - beta) q is 0; likewise for q
        lpm = tl.where(zq, -log_beta, -u)
        lqm = tl.where(zp, -log_1mbeta, -v)
        if NEED_T:
            gt = tl.where(zp, 0.0, g * beta * p * (lpm - kl_pm) * inv_t)
            gt = tl.where(dead, 0.0, gt)
            _block_store(gt_ptr, start + dg, rel, vocab, gt, BLOCK_V)
        if NEED_S:
            gs = tl.where(zq, 0.0, g * (1.0 - beta) * q * (lqm - kl_qm) * inv_t)
            gs = tl.where(dead, 0.0, gs)
            _block_store(gs_ptr, start + dg, rel, vocab, gs, BLOCK_V)


def _row_stride(a: torch.Tensor) -> int:
    return a.stride(0) if a.shape[0] > 1 else a.shape[1]


def _geometry(t: torch.Tensor, s: torch.Tensor) -> dict[str, Any]:
    """Row strides, the vector width and whether s and the gradients share t's phase.

    A block starts at a multiple of VEC elements (16 bytes) of t; the same offset is
    16-byte aligned in s's row (in the gradients' contiguous rows) when the row strides
    differ by a multiple of VEC.
    """
    vec = max(1, 16 // t.element_size())
    st, ss = _row_stride(t), _row_stride(s)
    return {
        "strides": (st, ss),
        "VEC": vec,
        "S_PHASE": (st - ss) % vec == 0,
        "G_PHASE": (st - t.shape[1]) % vec == 0,
    }


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_stats(t: torch.Tensor, count: int) -> torch.Tensor:
    """`count` per-row accumulators, float64 for float64 input, else float32."""
    return torch.empty((count, t.shape[0]), device=t.device, dtype=_acc(t))


def _log_weights(beta: float) -> tuple[float, float]:
    return (
        math.log(beta) if beta > 0 else -math.inf,
        math.log1p(-beta) if beta < 1 else -math.inf,
    )


def _launch(kernel: Any, t: torch.Tensor, s: torch.Tensor, *args: Any, **flags: Any) -> None:
    """One program per row: kernel(t, s, *args, vocab, row strides[, sg], flags)."""
    rows, vocab = t.shape
    if not rows:
        return
    geo = _geometry(t, s)
    backward = "NEED_T" in flags  # and a third row stride: the gradients' (contiguous)
    extra = {"G_PHASE": geo["G_PHASE"]} if backward else {}
    with device_guard(t):
        kernel[(rows,)](
            t,
            s,
            *args,
            vocab,
            *geo["strides"],
            *((vocab,) if backward else ()),
            BLOCK_V=BLOCK_V,
            VEC=geo["VEC"],
            S_PHASE=geo["S_PHASE"],
            **LAUNCH,
            **extra,
            **flags,
        )


def _rows_backward(
    kernel: Any, values: list[float], need_t: bool, need_s: bool, *args: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The gradients asked for (one kernel pass), with respect to t and/or s."""
    t, s, stats, g = args
    gt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_t else None
    gs = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_s else None
    _launch(
        kernel,
        t,
        s,
        *stats,
        g.contiguous(),
        t if gt is None else gt,
        s if gs is None else gs,
        scalars(values, stats.dtype, t.device),
        NEED_T=need_t,
        NEED_S=need_s,
    )
    return tuple(v for v in (gt, gs) if v is not None)


class _RowsFunction(torch.autograd.Function):
    """Shared parts: the outputs are (per-row values, per-row statistics for backward)."""

    vmap = staticmethod(no_vmap)
    BACKWARD: Any = None  # the backward kernel

    @staticmethod
    def scalar_values(params: list[Any]) -> list[float]:  # pragma: no cover - subclasses
        raise NotImplementedError

    @staticmethod
    def forward(*args: Any) -> Any:  # pragma: no cover - the subclasses define it
        raise NotImplementedError

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        t, s, *params = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(t, s, stats)
        ctx.params = params

    #: The first row of the statistics that the backward kernel reads.
    SAVED_FROM = 0

    @classmethod
    def _backward(cls, ctx: Any, g: torch.Tensor) -> list[Any]:
        t, s, stats = ctx.saved_tensors
        stats = stats[cls.SAVED_FROM :]
        need = ctx.needs_input_grad[:2]
        fn = functools.partial(_rows_backward, cls.BACKWARD, cls.scalar_values(ctx.params), *need)
        return first_order(fn, need, t, s, stats, g)


class _KLRows(_RowsFunction):
    BACKWARD = _backward_kernel

    @staticmethod
    def scalar_values(params: list[Any]) -> list[float]:
        (temperature,) = params
        return [1.0 / temperature]

    @staticmethod
    def forward(t: torch.Tensor, s: torch.Tensor, temperature: float) -> Any:
        out = torch.empty(t.shape[0], device=t.device, dtype=_acc(t))
        stats = _row_stats(t, 3)  # KL, lse_t, lse_s
        scal = scalars(_KLRows.scalar_values([temperature]), stats.dtype, t.device)
        _launch(_forward_kernel, t, s, out, *stats, scal, F64=stats.dtype == torch.float64)
        return out, stats

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _: Any) -> Any:
        return *_KLRows._backward(ctx, g), None


class _JSRows(_RowsFunction):
    BACKWARD = _js_backward_kernel
    SAVED_FROM = 1  # after the JS itself

    @staticmethod
    def scalar_values(params: list[Any]) -> list[float]:
        temperature, beta = params
        return [1.0 / temperature, beta, *_log_weights(beta)]

    @staticmethod
    def forward(t: torch.Tensor, s: torch.Tensor, temperature: float, beta: float) -> Any:
        stats = _row_stats(t, 5)  # JS, KL(P||M), KL(Q||M), lse_t, lse_s
        scal = scalars(_JSRows.scalar_values([temperature, beta]), stats.dtype, t.device)
        _launch(_js_forward_kernel, t, s, *stats, scal, F64=stats.dtype == torch.float64)
        return stats[0].clone(), stats  # the caller's copy (it may modify it in place)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _: Any) -> Any:
        return *_JSRows._backward(ctx, g), None, None


def js_rows_from_logits(
    t: torch.Tensor, s: torch.Tensor, temperature: float, beta: float
) -> torch.Tensor:
    """JS_beta(softmax(t/T), softmax(s/T)) per row: two passes (log-sum-exps, then terms)."""
    out: torch.Tensor = _JSRows.apply(t, s, temperature, beta)[0]
    return out


def kl_rows_from_logits(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row of two `[rows, vocab]` tensors of the
    module's layouts."""
    out: torch.Tensor = _KLRows.apply(t, s, temperature)[0]
    return out
