"""JAX for :func:`klx.fused_linear_divergence`: ``custom_vjp`` over ``lax.map`` / ``lax.scan``.

The tokens are padded to a whole number of chunks and reshaped to [chunks, chunk, ...].

* 'sum' / 'batchmean' (:func:`jax_total`): the plain forward maps the chunk's definition
  over the chunks (:func:`jax.lax.map`: one chunk's logits live at a time, under
  ``jax.jit`` too). Under ``jax.grad`` the forward rule scans the chunks once, taking
  each chunk's value and VJP with respect to the differentiated inputs only (symbolic
  zeros: four matrix products per chunk for the student alone), with the weight and
  bias gradients carried along; the backward only scales them.
* 'none' (:func:`jax_rows`): the forward maps; the backward scans again, recomputing
  each chunk's logits, with the per-token cotangent.

Differentiating through the map alone would make XLA keep every chunk's logits for the
backward; the custom VJPs are what keep memory bounded.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from klx._agnostic import log_softmax
from klx._fused_chunks import (
    FusedSpec,
    _Flat,
    _logits,
    _safe_rows,
    chunk_from_hidden,
    chunk_rows,
    closed_form_kl,
)
from klx._typing import Array

__all__ = ["jax_rows", "jax_total"]


def jax_rows(spec: FusedSpec, acc: Any, chunk: int, f: _Flat) -> Array:
    """Per-token values [tokens], differentiable by ``jax.grad`` (bounded memory)."""
    return _rows(spec, acc, chunk, f.hp, f.wp, f.bp, f.hq, f.wq, f.bq, f.keep, f.labels)


def jax_total(spec: FusedSpec, acc: Any, chunk: int, f: _Flat) -> Array:
    """The sum of the per-token values; under ``jax.grad`` its forward pass computes the
    gradients too (one walk, four matrix products per chunk) and the backward scales them.
    """
    return _total(spec, acc, chunk, f.hp, f.wp, f.bp, f.hq, f.wq, f.bq, f.keep, f.labels)


def _chunked(x: Array | None, chunk: int, pad: int) -> Array | None:
    """[tokens, ...] -> [chunks, chunk, ...], padded with zeros (False) at the end."""
    if x is None:
        return None
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return jnp.reshape(x, (-1, chunk, *x.shape[1:]))


def _layout(n: int, chunk: int) -> tuple[int, int]:
    chunk = max(1, min(chunk, n))
    return chunk, (-n) % chunk


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rows(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    hp: Array,
    wp: Array | None,
    bp: Array | None,
    hq: Array,
    wq: Array,
    bq: Array | None,
    keep: Array | None,
    labels: Array | None,
) -> Array:
    n = hq.shape[0]
    if n == 0:
        return jnp.zeros((0,), dtype=acc)
    chunk, pad = _layout(n, chunk)
    xs = (
        _chunked(hp, chunk, pad),
        _chunked(hq, chunk, pad),
        _chunked(keep, chunk, pad),
        _chunked(labels, chunk, pad),
    )

    def one(x: tuple[Array, ...]) -> Array:
        hp_c, hq_c, k, lab = x
        return chunk_from_hidden(jnp, spec, acc, hp_c, wp, bp, hq_c, wq, bq, k, lab)

    rows = jax.lax.map(one, xs)
    return jnp.reshape(rows, (-1,))[:n]


def _rows_fwd(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    hp: Array,
    wp: Array | None,
    bp: Array | None,
    hq: Array,
    wq: Array,
    bq: Array | None,
    keep: Array | None,
    labels: Array | None,
) -> tuple[Array, tuple[Array | None, ...]]:
    out = _rows(spec, acc, chunk, hp, wp, bp, hq, wq, bq, keep, labels)
    return out, (hp, wp, bp, hq, wq, bq, keep, labels)


def _rows_bwd(spec: FusedSpec, acc: Any, chunk: int, res: Any, g: Array) -> tuple[Any, ...]:
    _, grads = _walk(spec, acc, chunk, res, g)
    return (*grads, None, None)


def _walk(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    res: Any,
    g: Array | None,
    wrt: tuple[bool, ...] = (True,) * 6,
) -> tuple[Array, tuple[Any, ...]]:
    """Scan the chunks: the total of ``rows * g`` and its gradients for the six arrays.

    `g` is the per-token cotangent [tokens], or None for ones. Only the arrays flagged in
    `wrt` (and not None) get a gradient; the others get None (a zero cotangent).
    """
    hp, wp, bp, hq, wq, bq, keep, labels = res
    arrays = (hp, wp, bp, hq, wq, bq)
    idx = tuple(i for i in range(6) if wrt[i] and arrays[i] is not None)
    n = hq.shape[0]
    if n == 0:
        zeros = tuple(_zeros(a) if i in idx else None for i, a in enumerate(arrays))
        return jnp.zeros((), dtype=acc), zeros
    chunk, pad = _layout(n, chunk)
    if g is None:
        g = jnp.ones((n,), dtype=acc)
    xs = (
        _chunked(hp, chunk, pad),
        _chunked(hq, chunk, pad),
        _chunked(keep, chunk, pad),
        _chunked(labels, chunk, pad),
        _chunked(g, chunk, pad),
    )
    # Weights and biases (slots 1, 2, 4, 5) are carried; hidden states (0, 3) emitted.
    carried = tuple(i for i in (1, 2, 4, 5) if i in idx)

    def step(carry: Any, x: Any) -> tuple[Any, tuple[Any, Any]]:
        hp_c, hq_c, k, lab, g_c = x
        full = [hp_c, wp, bp, hq_c, wq, bq]

        def f(*diff: Array) -> Array:
            args = list(full)
            for i, d in zip(idx, diff, strict=True):
                args[i] = d
            a_hp, a_wp, a_bp, a_hq, a_wq, a_bq = args
            return chunk_from_hidden(jnp, spec, acc, a_hp, a_wp, a_bp, a_hq, a_wq, a_bq, k, lab)

        g_c = g_c.astype(acc)
        if closed_form_kl(spec):  # gradients in closed form (_kl_chunk_grads)
            rows, got = _kl_chunk_grads(spec, acc, full, idx, k, lab, g_c)
        else:
            rows, vjp = jax.vjp(f, *(full[i] for i in idx))
            got = dict(zip(idx, vjp(g_c), strict=True))
        total, sums = carry
        total = total + jnp.sum(rows * g_c)
        sums = tuple(_accumulate(a, got[i]) for a, i in zip(sums, carried, strict=True))
        return (total, sums), (got.get(0), got.get(3))

    init: Any = (jnp.zeros((), dtype=acc), tuple(jnp.zeros_like(arrays[i]) for i in carried))
    (total, sums), (ghp, ghq) = jax.lax.scan(step, init, xs)
    grads: list[Any] = [None] * 6
    for i, a in zip(carried, sums, strict=True):
        grads[i] = a
    if ghp is not None:
        grads[0] = jnp.reshape(ghp, (-1, *hp.shape[1:]))[:n]
    if ghq is not None:
        grads[3] = jnp.reshape(ghq, (-1, *hq.shape[1:]))[:n]
    return total, tuple(grads)


def _kl_chunk_grads(
    spec: FusedSpec,
    acc: Any,
    full: list[Array | None],
    idx: tuple[int, ...],
    keep: Array | None,
    labels: Array | None,
    g: Array,
) -> tuple[Array, dict[int, Array]]:
    """One chunk's KL(P || Q) per token (by the definition) and the gradients of
    ``sum(rows * g)`` for the arrays in `idx`, in closed form: with ``a = zp / T``,
    ``b = zq / T``, d/db = Q - P and d/da = P (log P - log Q - KL), 0 where P is 0; then
    the chain rule through the linear layers. No VJP of the definition, whose residuals
    (about a dozen [chunk, vocab] arrays) would set the chunk's memory.
    """
    hp, wp, bp, hq, wq, bq = full
    t = spec.temperature
    hp = _safe_rows(jnp, hp, keep)
    hq = _safe_rows(jnp, hq, keep)
    zp = _logits(jnp, hp, wp, bp, acc)
    zq = _logits(jnp, hq, wq, bq, acc)
    rows = chunk_rows(jnp, spec, zp, zq, keep, labels)
    if keep is not None:
        zp = jnp.where(keep[:, None], zp, 0.0)
        zq = jnp.where(keep[:, None], zq, 0.0)
        g = jnp.where(keep, g, 0.0)
    lp = log_softmax(jnp, zp, -1, t)
    lq = log_softmax(jnp, zq, -1, t)
    p = jnp.exp(lp)
    scale = (g / t)[:, None]
    got: dict[int, Array] = {}
    if any(i in idx for i in (0, 1, 2)):
        diff = jnp.where(p == 0, 0.0, lp - lq)
        kl = jnp.sum(p * diff, axis=-1, keepdims=True)
        _chain(got, idx, 0, p * (diff - kl) * scale, hp, wp, full)
    if any(i in idx for i in (3, 4, 5)):
        _chain(got, idx, 3, (jnp.exp(lq) - p) * scale, hq, wq, full)
    return rows, got


def _chain(
    got: dict[int, Array],
    idx: tuple[int, ...],
    base: int,
    dz: Array,
    h: Array,
    w: Array | None,
    full: list[Array | None],
) -> None:
    """Gradients of one side (slots base, base + 1, base + 2: hidden, weight, bias) from
    the logits' gradient `dz`, each in its array's dtype."""
    wants = {base: full[base], base + 1: full[base + 1], base + 2: full[base + 2]}
    for i, x in wants.items():
        if i not in idx or x is None:
            continue
        if i == base:
            g = dz if w is None else jnp.matmul(dz, w.astype(dz.dtype))
        elif i == base + 1:
            got[i] = _Outer(dz, h.astype(dz.dtype))  # added to the carried sum by blocks
            continue
        else:
            g = jnp.sum(dz, axis=0)
        got[i] = g.astype(x.dtype)


class _Outer(NamedTuple):
    """A weight gradient ``dz.T @ h`` not yet formed: :func:`_accumulate` adds it to the
    carried sum block by block."""

    dz: Array
    h: Array


def _accumulate(total: Array, grad: Array | _Outer) -> Array:
    """``total + grad``. A weight gradient given as :class:`_Outer` is added a block of
    vocabulary rows at a time, in a loop (``dynamic_update_slice`` on the carried sum,
    which XLA does in place), each block's product about the size of one [chunk, vocab]
    array: formed whole, the [vocab, hidden] product would be a second weight-sized
    buffer beside the sum (62.5 MiB at 32,000 x 512 float32). A loop, not unrolled
    blocks: XLA would schedule every unrolled product first and hold them all."""
    if not isinstance(grad, _Outer):
        return total + grad
    dz, h = grad
    vocab, hidden = total.shape[0], total.shape[-1]
    rows = max(1, min(vocab, dz.shape[0] * vocab // max(1, hidden)))
    blocks, tail = divmod(vocab, rows)
    if blocks < 2:  # the product is at most about twice a block: formed whole
        return total + jnp.matmul(dz.T, h).astype(total.dtype)

    def add(start: Any, size: int, total: Array) -> Array:
        block = jax.lax.dynamic_slice_in_dim(dz, start, size, axis=1)
        part = jnp.matmul(block.T, h).astype(total.dtype)
        old = jax.lax.dynamic_slice_in_dim(total, start, size, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(total, old + part, start, 0)

    total = jax.lax.fori_loop(0, blocks, lambda b, t: add(b * rows, rows, t), total)
    if tail:
        total = add(blocks * rows, tail, total)
    return total


def _zeros(x: Array | None) -> Array | None:
    return None if x is None else jnp.zeros_like(x)


_rows.defvjp(_rows_fwd, _rows_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _total(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    hp: Array,
    wp: Array | None,
    bp: Array | None,
    hq: Array,
    wq: Array,
    bq: Array | None,
    keep: Array | None,
    labels: Array | None,
) -> Array:
    return jnp.sum(_rows(spec, acc, chunk, hp, wp, bp, hq, wq, bq, keep, labels))


def _total_fwd(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    *primals: Any,
) -> tuple[Array, tuple[Any, ...]]:
    """With ``symbolic_zeros=True`` each primal comes as ``CustomVJPPrimal(value, perturbed)``:
    only the perturbed inputs (those ``jax.grad`` differentiates) get gradients, so a
    teacher held constant costs no gradient products."""
    leaf = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
    values = jax.tree_util.tree_map(lambda p: p.value, primals, is_leaf=leaf)
    wrt = tuple(
        any(p.perturbed for p in jax.tree_util.tree_leaves(arg, is_leaf=leaf))
        for arg in primals[:6]
    )
    return _walk(spec, acc, chunk, values, None, wrt)


def _total_bwd(spec: FusedSpec, acc: Any, chunk: int, res: Any, g: Array) -> tuple[Any, ...]:
    if isinstance(g, SymbolicZero):
        return (None,) * 8
    grads = tuple(None if x is None else (x * g).astype(x.dtype) for x in res)
    return (*grads, None, None)


_total.defvjp(_total_fwd, _total_bwd, symbolic_zeros=True)
