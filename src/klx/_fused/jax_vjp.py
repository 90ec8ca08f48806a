"""JAX for :func:`klx.fused_linear_divergence`: ``custom_vjp`` over ``lax.map`` / ``lax.scan``.

The tokens are padded to a whole number of chunks and reshaped to [chunks, chunk, ...].

* 'sum' / 'batchmean' (:func:`jax_total`): the plain forward maps the chunk's definition
  over the chunks (:func:`jax.lax.map`: one chunk's logits live at a time, under
  ``jax.jit`` too). Under ``jax.grad`` the forward rule scans the chunks once, taking
  each chunk's value and gradient with respect to the differentiated inputs only
  (symbolic zeros: four matrix products per chunk for the student alone), with the
  weight and bias gradients carried along; the backward only scales them.
* 'none' (:func:`jax_rows`): the forward maps; the backward scans again, recomputing
  each chunk's logits, with the per-token cotangent.

A chunk's logits gradient is the closed form of :mod:`klx._fused.gradients` (written
once for torch and JAX) where the divergence has one (KL, JS, skew KL), else the VJP of
the chunk's definition. The arrays travel as one :class:`klx._fused.chunks.Flat` pytree
(a :class:`~klx._fused.chunks.Side` per model), and so do their gradients.

Differentiating through the map alone would make XLA keep every chunk's logits for the
backward; the custom VJPs are what keep memory bounded.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from klx._fused.chunks import (
    CHUNK_TEMPORARIES,
    JAX_TEMPORARIES,
    Flat,
    FusedSpec,
    Side,
    chunk_from_hidden,
    closed_form,
    closed_form_kl,
    logits,
    masked,
)
from klx._fused.gradients import chunk_value_and_grads
from klx._fused.parse import FusedCall
from klx._typing import Array

__all__ = ["fused", "jax_rows", "jax_total", "temporaries"]


def fused(call: FusedCall) -> Array:
    """The loss of a checked call on JAX arrays: per token ('none') or summed, times the
    call's scale ('batchmean')."""
    walk = jax_rows if call.reduction == "none" else jax_total
    out = walk(call.spec, call.acc, call.chunk, call.flat)
    return out if call.scale is None else out * call.scale


def temporaries(spec: FusedSpec, q_hidden: Array, q_weight: Array) -> int:
    """How many [chunk, vocab] arrays a chunk holds at its peak: :data:`JAX_TEMPORARIES`
    for KL without softcap or hard term (measured), else :data:`CHUNK_TEMPORARIES`."""
    return JAX_TEMPORARIES if closed_form_kl(spec) else CHUNK_TEMPORARIES


def jax_rows(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> Array:
    """Per-token values [tokens], differentiable by ``jax.grad`` (bounded memory)."""
    return _rows(spec, acc, chunk, f)


def jax_total(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> Array:
    """The sum of the per-token values; under ``jax.grad`` its forward pass computes the
    gradients too (one walk, four matrix products per chunk) and the backward scales them.
    """
    return _total(spec, acc, chunk, f)


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


def _per_token(f: Flat, chunk: int, pad: int) -> Flat:
    """What differs from chunk to chunk (hidden states, kept tokens, labels), as
    [chunks, chunk, ...]; the weights and biases are left out (None): every chunk's."""
    return Flat(
        Side(_chunked(f.p.hidden, chunk, pad)),
        Side(_chunked(f.q.hidden, chunk, pad)),
        _chunked(f.keep, chunk, pad),
        _chunked(f.labels, chunk, pad),
    )


def _with_layers(part: Flat, f: Flat) -> Flat:
    """One chunk's tokens `part` with `f`'s weights and biases."""
    return part._replace(p=f.p._replace(hidden=part.p.hidden), q=f.q._replace(hidden=part.q.hidden))


def _unchunked(x: Array | None, n: int) -> Array | None:
    """[chunks, chunk, ...] -> the first `n` of [tokens, ...]."""
    return None if x is None else jnp.reshape(x, (-1, *x.shape[2:]))[:n]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rows(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> Array:
    n = f.tokens
    if n == 0:
        return jnp.zeros((0,), dtype=acc)
    chunk, pad = _layout(n, chunk)

    def one(part: Flat) -> Array:
        return chunk_from_hidden(jnp, spec, acc, _with_layers(part, f))

    return _unchunked(jax.lax.map(one, _per_token(f, chunk, pad)), n)


def _rows_fwd(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> tuple[Array, Flat]:
    return _rows(spec, acc, chunk, f), f


def _rows_bwd(spec: FusedSpec, acc: Any, chunk: int, f: Flat, g: Array) -> tuple[Flat]:
    _, grads = _walk(spec, acc, chunk, f, g)
    return (grads,)


def _walk(
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: Flat,
    g: Array | None,
    wrt: Flat | None = None,
) -> tuple[Array, Flat]:
    """Scan the chunks: the total of ``rows * g`` and its gradients, a :class:`Flat`.

    `g` is the per-token cotangent [tokens], or None for ones. Only the arrays that `wrt`
    flags (every one if None) get a gradient; the others get None (a zero cotangent), as
    do the kept tokens and the labels.
    """
    arrays = f.arrays()
    flags = (True,) * len(arrays) if wrt is None else wrt.arrays()
    need = Flat.of(bool(w) and a is not None for w, a in zip(flags, arrays, strict=True))
    n = f.tokens
    if n == 0:
        zeros = Flat.of(
            _zeros(a) if w else None for a, w in zip(arrays, need.arrays(), strict=True)
        )
        return jnp.zeros((), dtype=acc), zeros
    chunk, pad = _layout(n, chunk)
    if g is None:
        g = jnp.ones((n,), dtype=acc)
    xs = (_per_token(f, chunk, pad), _chunked(g, chunk, pad))
    # Weights and biases are carried (summed over the chunks); hidden states emitted.
    layers = [(side.weight, side.bias) for side in f.sides]
    wants = [(w.weight, w.bias) for w in need.sides]
    init_sums = tuple(
        tuple(jnp.zeros_like(x) if want else None for x, want in zip(lay, wn, strict=True))
        for lay, wn in zip(layers, wants, strict=True)
    )

    def step(carry: Any, x: Any) -> tuple[Any, tuple[Any, Any]]:
        part, g_c = x
        part = _with_layers(part, f)
        g_c = g_c.astype(acc)
        if closed_form(spec):
            rows, got = _closed_form_chunk(spec, acc, part, need, g_c)
        else:
            rows, got = _vjp_chunk(spec, acc, part, need, g_c)
        total, sums = carry
        total = total + jnp.sum(rows * g_c)
        sums = tuple(
            (_accumulate(s_w, side.weight), _accumulate(s_b, side.bias))
            for (s_w, s_b), side in zip(sums, got.sides, strict=True)
        )
        return (total, sums), (got.p.hidden, got.q.hidden)

    init: Any = (jnp.zeros((), dtype=acc), init_sums)
    (total, sums), (ghp, ghq) = jax.lax.scan(step, init, xs)
    grads = Flat(
        Side(_unchunked(ghp, n), *sums[0]),
        Side(_unchunked(ghq, n), *sums[1]),
    )
    return total, grads


def _vjp_chunk(spec: FusedSpec, acc: Any, part: Flat, need: Flat, g: Array) -> tuple[Array, Flat]:
    """One chunk's loss per token and the VJP of ``sum(rows * g)`` with respect to the
    arrays that `need` flags, by autodiff of the chunk's definition."""
    arrays = part.arrays()
    idx = [i for i, w in enumerate(need.arrays()) if w]

    def f(*diff: Array) -> Array:
        args = list(arrays)
        for i, d in zip(idx, diff, strict=True):
            args[i] = d
        return chunk_from_hidden(jnp, spec, acc, Flat.of(args, part.keep, part.labels))

    rows, vjp = jax.vjp(f, *(arrays[i] for i in idx))
    got: list[Any] = [None] * len(arrays)
    for i, d in zip(idx, vjp(g), strict=True):
        got[i] = d
    return rows, Flat.of(got)


def _closed_form_chunk(
    spec: FusedSpec, acc: Any, part: Flat, need: Flat, g: Array
) -> tuple[Array, Flat]:
    """One chunk's loss per token and the gradients of ``sum(rows * g)`` for the arrays
    that `need` flags: the logits gradients in closed form
    (:func:`klx._fused.gradients.chunk_value_and_grads`), then the chain rule through
    the linear layers. No VJP of the definition, whose residuals (about a dozen [chunk,
    vocab] arrays) would set the chunk's memory.
    """
    part = masked(jnp, part)
    zp, zq = logits(jnp, part.p, acc), logits(jnp, part.q, acc)
    want = [any(w) for w in need.sides]
    got = chunk_value_and_grads(jnp, spec, zp, zq, part.keep, part.labels, g, *want)
    grads = (
        _chain(dz, side, wants)
        for dz, side, wants in zip((got.dzp, got.dzq), part.sides, need.sides, strict=True)
    )
    return got.rows, Flat(*grads)


def _chain(dz: Array | None, side: Side, wants: Side) -> Side:
    """One side's gradients from its logits' gradient `dz`, each in its array's dtype
    (the weight's as an :class:`_Outer`, added to the carried sum by blocks)."""
    if dz is None:
        return Side(None, None, None)
    h, w, b = side
    g_h = g_b = g_w = None
    if wants.hidden:
        g_h = (dz if w is None else jnp.matmul(dz, w.astype(dz.dtype))).astype(h.dtype)
    if wants.weight:
        g_w = _Outer(dz, h.astype(dz.dtype))
    if wants.bias:
        g_b = jnp.sum(dz, axis=0).astype(b.dtype)
    return Side(g_h, g_w, g_b)


class _Outer(NamedTuple):
    """A weight gradient ``dz.T @ h`` not yet formed: :func:`_accumulate` adds it to the
    carried sum block by block."""

    dz: Array
    h: Array


def _accumulate(total: Array | None, grad: Array | _Outer | None) -> Array | None:
    """``total + grad`` (None while nothing is summed).

    A weight gradient given as :class:`_Outer` is added a block of vocabulary rows at a
    time, in a loop (``dynamic_update_slice`` on the carried sum, which XLA does in
    place), each block's product about the size of one [chunk, vocab] array: formed
    whole, the [vocab, hidden] product would be a second weight-sized buffer beside the
    sum (62.5 MiB at 32,000 x 512 float32). A loop, not unrolled blocks: XLA would
    schedule every unrolled product first and hold them all."""
    if total is None or grad is None:
        return total
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
def _total(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> Array:
    return jnp.sum(_rows(spec, acc, chunk, f))


def _total_fwd(spec: FusedSpec, acc: Any, chunk: int, f: Flat) -> tuple[Array, Flat]:
    """With ``symbolic_zeros=True`` each leaf of `f` comes as ``CustomVJPPrimal(value,
    perturbed)``: only the perturbed arrays (those ``jax.grad`` differentiates) get
    gradients, so a teacher held constant costs no gradient products."""
    leaf = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
    values = jax.tree_util.tree_map(lambda p: p.value, f, is_leaf=leaf)
    perturbed = jax.tree_util.tree_map(lambda p: p.perturbed, f, is_leaf=leaf)
    return _walk(spec, acc, chunk, values, None, perturbed)


def _total_bwd(spec: FusedSpec, acc: Any, chunk: int, res: Flat, g: Array) -> tuple[Flat | None]:
    if isinstance(g, SymbolicZero):
        return (None,)
    return (Flat.of(None if x is None else (x * g).astype(x.dtype) for x in res.arrays()),)


_total.defvjp(_total_fwd, _total_bwd, symbolic_zeros=True)
