"""Per-token RL statistics from hidden states and the output layer, never holding the
logits: :func:`klx.fused_linear_token_stats`.

The tokens are walked a chunk at a time: per chunk the logits ``h @ W.T + b`` (and the
reference model's), then :func:`klx._token_stats.stats_rows`, the math of
:func:`klx.token_stats`. Per library:

* torch: a :class:`torch.autograd.Function` whose forward keeps no graph (the values a
  chunk at a time) and whose backward walks the chunks again, recomputing each chunk's
  logits and taking its gradients by autograd of that chunk alone (the weight and bias
  gradients summed over the chunks). Under :func:`torch.compile` it runs eagerly (a
  graph break); inside ``torch.func`` transforms the plain chunks serve (memory then
  grows as autodiff keeps each chunk).
* JAX: :func:`jax.lax.map` of a :func:`jax.checkpoint`-ed chunk, so that ``jax.grad``
  keeps only each chunk's inputs and recomputes its logits in the backward pass; works
  under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
* NumPy, CuPy, Dask, array-api-strict: the values, a chunk at a time.

Extra memory: one chunk's logits and temporaries (a few [chunk, vocab] arrays) plus the
per-token results: O(tokens + chunk x vocab), not O(tokens x vocab).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from klx._backends import library
from klx._checks import check_float, check_temperature, check_temperature_range, check_where
from klx._dtypes import accumulation_dtype, numpy_quiet
from klx._fused.chunks import (
    CHUNK_TEMPORARIES,
    chunk_size_for,
    cuda_free_bytes,
)
from klx._fused.parse import _check_chunk_size, _matmul_refuses, _number_temperature
from klx._fused.token_stats_chunks import TokenArrays, chunk_stats
from klx._namespace import array_namespace, check_same_device, in_torch_func
from klx._token_stats import (
    check_ignore_index,
    check_labels,
    check_stats,
)
from klx._token_stats_math import StatsSpec
from klx._typing import Array

__all__ = ["fused_linear_token_stats"]


def fused_linear_token_stats(
    hidden: Array,
    weight: Array,
    labels: Array | None = None,
    *,
    reference_hidden: Array | None = None,
    reference_weight: Array | None = None,
    bias: Array | None = None,
    reference_bias: Array | None = None,
    stats: Sequence[str] | str | None = None,
    temperature: float = 1.0,
    where: Array | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    xp: ModuleType | None = None,
) -> dict[str, Array]:
    r"""Per-token RL statistics from hidden states and the output layer, without logits.

    :func:`token_stats` of ``hidden @ weight.T + bias``, whose [tokens, vocab] logits are
    never formed whole.

    The logits are :math:`z = h W^\top + b` (and the reference's
    :math:`z_r = h_r W_r^\top + b_r`), formed `chunk_size` tokens at a time; each chunk's
    statistics are those of :func:`token_stats` on its logits:

    .. math::

        \mathrm{lse} = \log \sum_v e^{z_v / T}, \quad
        \mathrm{logprob} = z_y / T - \mathrm{lse}, \quad
        H = \mathrm{lse} - \sum_v p_v z_v / T, \quad
        \mathrm{KL}(P \,\|\, Q) = \sum_v p_v \log (p_v / q_v).

    Memory beyond the inputs and results is one chunk's logits and temporaries, also for
    the gradients (torch and JAX recompute each chunk's logits in the backward pass):
    O(tokens + chunk x vocab), where the logits take tokens x vocab.

    Parameters
    ----------
    hidden : array
        The policy's last hidden states [..., hidden].
    weight : array
        The policy's output layer [vocab, hidden], laid out as
        :attr:`torch.nn.Linear.weight` (a Flax ``Dense`` kernel is ``kernel.T``).
    labels : array of int, optional
        The sampled tokens, the token shape (``hidden.shape[:-1]``); tokens whose label is
        `ignore_index` are dropped.
    reference_hidden : array, optional
        The reference model's hidden states [..., hidden_r] (for 'kl'); with
        ``reference_weight=None``, the reference's logits [..., vocab].
    reference_weight : array, optional
        The reference model's output layer [vocab, hidden_r].
    bias, reference_bias : array, optional
        Output-layer biases [vocab].
    stats : sequence of str, optional
        As in :func:`token_stats`: by default 'entropy' and 'lse', 'logprob' with
        `labels`, 'kl' with a reference.
    temperature : float, optional
        Both models' logits are divided by it. Default 1.
    where : bool array, optional
        Which tokens to keep (broadcastable to the token shape); dropped tokens are 0 in
        value and gradient even where their hidden states hold NaN.
    ignore_index : int, optional
        The label of tokens to drop. Default -100.
    chunk_size : int, optional
        Tokens per chunk. By default the largest whose temporaries (16 arrays of
        [chunk, vocab] in the accumulation dtype) fit in
        ``klx._fused.chunks.CHUNK_BYTES`` (128 MiB; more on a CUDA device with free
        memory), as :func:`fused_linear_divergence` chooses it.
    xp : namespace, optional
        The array namespace; by default that of the arrays.

    Returns
    -------
    dict of str to array
        One array of the token shape per statistic, keyed as :func:`token_stats` keys
        them, in the accumulation dtype (float32 for float16 / bfloat16 inputs).

    Raises
    ------
    TypeError, ValueError
        For shapes, dtypes and options that do not fit, and labels out of range (read
        where their values can be read).

    See Also
    --------
    token_stats : The same statistics from logits.
    fused_linear_divergence : Distillation losses from hidden states.

    Notes
    -----
    Gradients with respect to `hidden`, `weight`, `bias` and the reference's arrays on
    torch (an autograd Function; eagerly, a graph break under ``torch.compile``) and JAX
    (``jax.checkpoint`` over ``lax.map``). The analogue of Apple's Cut Cross-Entropy
    (the labels' log-probabilities from hidden states) and of Liger Kernel's fused linear
    cross-entropy with ``return_entropy`` / torchtitan's, for every statistic at once.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> rng = np.random.default_rng(0)
    >>> h, w = rng.normal(size=(6, 4)), rng.normal(size=(10, 4))
    >>> y = np.array([1, 2, 3, 4, 5, -100])
    >>> out = klx.fused_linear_token_stats(h, w, y, chunk_size=4)
    >>> full = klx.token_stats(h @ w.T, y)
    >>> all(bool(np.allclose(out[k], full[k])) for k in full)
    True
    """
    named: list[tuple[str, Any]] = [
        ("hidden", hidden),
        ("weight", weight),
        ("bias", bias),
        ("reference_hidden", reference_hidden),
        ("reference_weight", reference_weight),
        ("reference_bias", reference_bias),
        ("where", where),
        ("labels", labels),
    ]
    present = [(n, a) for n, a in named if a is not None]
    xp = array_namespace(present, xp)
    floats = [a for n, a in present if n not in ("where", "labels")]
    for name, a in present:
        if name not in ("where", "labels"):
            check_float(xp, name, a)
    check_same_device(present, xp)
    names = check_stats(stats, labels is not None, reference_hidden is not None)
    t = check_temperature(_number_temperature(temperature), ("logits",))
    ignore = check_ignore_index(ignore_index)
    token_shape, vocab = _check_shapes(
        hidden, weight, bias, reference_hidden, reference_weight, reference_bias
    )
    n = math.prod(token_shape)
    acc = accumulation_dtype(xp, xp.result_type(*floats))
    check_temperature_range(t, xp.finfo(acc))
    chunk = (
        chunk_size_for(
            n, vocab, int(xp.finfo(acc).bits) // 8, CHUNK_TEMPORARIES, cuda_free_bytes(hidden)
        )
        if chunk_size is None
        else _check_chunk_size(chunk_size)
    )
    keep = None
    if where is not None:
        check_where(xp, where, token_shape)
        keep = xp.reshape(xp.broadcast_to(where, token_shape), (n,))
    flat_labels = None
    if labels is not None:
        check_labels(xp, labels, token_shape, vocab, ignore, "hidden")
        flat_labels = xp.reshape(labels, (n,))
    ref_h = None
    if reference_hidden is not None:
        ref_h = xp.reshape(reference_hidden, (n, int(reference_hidden.shape[-1])))
    arrays = TokenArrays(
        xp.reshape(hidden, (n, int(hidden.shape[-1]))),
        weight,
        bias,
        ref_h,
        reference_weight,
        reference_bias,
        keep,
        flat_labels,
    )
    spec = StatsSpec(names, t, "logits", ignore)
    with numpy_quiet(hidden):
        rows = _walk(xp, spec, acc, chunk, arrays)
        return {name: xp.reshape(r, token_shape) for name, r in zip(names, rows, strict=True)}


def _check_shapes(
    hidden: Array,
    weight: Array,
    bias: Array | None,
    ref_hidden: Array | None,
    ref_weight: Array | None,
    ref_bias: Array | None,
) -> tuple[tuple[int, ...], int]:
    """The token shape and the vocabulary size; a ValueError naming what does not fit."""
    if weight.ndim != 2:
        msg = f"`weight` must be a 2-d array [vocab, hidden], got shape {tuple(weight.shape)}."
        raise ValueError(msg)
    vocab = int(weight.shape[0])
    if vocab == 0:
        msg = "`weight` has no rows: give the output layer [vocab, hidden] with vocab >= 1."
        raise ValueError(msg)
    if hidden.ndim < 1 or int(hidden.shape[-1]) != int(weight.shape[1]):
        msg = (
            f"`hidden` has shape {tuple(hidden.shape)} and `weight` {tuple(weight.shape)}; the "
            "hidden states' last axis must equal the weight's second (weights are [vocab, "
            "hidden] as torch.nn.Linear.weight; for a Flax kernel pass kernel.T)."
        )
        raise ValueError(msg)
    token_shape = tuple(int(s) for s in hidden.shape[:-1])
    for name, h, w in (("", hidden, weight), ("reference_", ref_hidden, ref_weight)):
        if h is not None and w is not None and _matmul_refuses(h, w):
            msg = (
                f"`{name}hidden` is {h.dtype} but `{name}weight` is {w.dtype}; a linear layer "
                "needs one dtype: cast the hidden states to the weight's first."
            )
            raise TypeError(msg)
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        msg = (
            "`reference_weight` / `reference_bias` are given without `reference_hidden`; "
            "pass the reference model's hidden states too (or leave the reference out)."
        )
        raise ValueError(msg)
    if ref_hidden is not None:
        if ref_weight is None:
            if ref_bias is not None:
                msg = (
                    "`reference_bias` is given but `reference_weight` is None (so "
                    "`reference_hidden` holds the reference's logits); add the bias to them "
                    "yourself, or pass reference_weight."
                )
                raise ValueError(msg)
            want = (*token_shape, vocab)
            if tuple(int(s) for s in ref_hidden.shape) != want:
                msg = (
                    f"`reference_weight` is None, so `reference_hidden` must hold the "
                    f"reference's logits of shape {want}, got {tuple(ref_hidden.shape)}."
                )
                raise ValueError(msg)
        else:
            ok = (
                ref_weight.ndim == 2
                and int(ref_weight.shape[0]) == vocab
                and tuple(int(s) for s in ref_hidden.shape[:-1]) == token_shape
                and int(ref_hidden.shape[-1]) == int(ref_weight.shape[1])
            )
            if not ok:
                msg = (
                    f"`reference_hidden` has shape {tuple(ref_hidden.shape)} and "
                    f"`reference_weight` {tuple(ref_weight.shape)}, with `hidden` "
                    f"{tuple(hidden.shape)} and `weight` {tuple(weight.shape)}; the reference "
                    "needs the policy's token shape, the same vocabulary (rows of its "
                    "weight), and its weight's hidden size as its last axis."
                )
                raise ValueError(msg)
    for name, b in (("bias", bias), ("reference_bias", ref_bias)):
        if b is not None and tuple(int(s) for s in b.shape) != (vocab,):
            msg = (
                f"`{name}` must have shape ({vocab},) (one per vocabulary entry), got "
                f"{tuple(b.shape)}."
            )
            raise ValueError(msg)
    return token_shape, vocab


def _walk(
    xp: ModuleType, spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays
) -> tuple[Array, ...]:
    """Every statistic [tokens], by the library's own walk where it has one."""
    lib = library(a.hidden)
    name = None if lib is None else lib.name
    if name == "jax":
        return _jax_walk(spec, acc, chunk, a)
    if name == "torch" and not in_torch_func():
        return _torch_walk(xp, spec, acc, chunk, a)
    return _value_walk(xp, spec, acc, chunk, a)


def _value_walk(
    xp: ModuleType, spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays
) -> tuple[Array, ...]:
    """The statistics a chunk at a time (any namespace; autodiff keeps every chunk)."""
    n = int(a.hidden.shape[0])
    parts = [
        chunk_stats(xp, spec, acc, a.rows(r0, min(r0 + chunk, n))) for r0 in range(0, n, chunk)
    ]
    if not parts:
        return tuple(xp.zeros((0,), dtype=acc) for _ in spec.names)
    if len(parts) == 1:
        return parts[0]
    return tuple(xp.concat(list(col)) for col in zip(*parts, strict=True))


# --------------------------------------------------------------------------- torch


def _torch_walk(
    xp: ModuleType, spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays
) -> tuple[Array, ...]:
    from klx._fused import token_stats_torch

    rows: tuple[Array, ...] = token_stats_torch.walk(xp, spec, acc, chunk, a)
    return rows


# --------------------------------------------------------------------------- JAX


def _jax_walk(spec: StatsSpec, acc: Any, chunk: int, a: TokenArrays) -> tuple[Array, ...]:
    """``lax.map`` over chunks of a ``jax.checkpoint``-ed chunk: under ``jax.grad`` only
    each chunk's inputs are kept, and its logits are recomputed in the backward pass."""
    import jax
    import jax.numpy as jnp

    n = int(a.hidden.shape[0])
    if n == 0:
        return tuple(jnp.zeros((0,), dtype=acc) for _ in spec.names)
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk

    def split(x: Array | None) -> Array | None:
        if x is None:
            return None
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return jnp.reshape(x, (-1, chunk, *x.shape[1:]))

    per_token = (split(a.hidden), split(a.ref_hidden), split(a.keep), split(a.labels))

    @jax.checkpoint  # type: ignore[untyped-decorator,unused-ignore]
    def one(xs: tuple[Array | None, ...]) -> tuple[Array, ...]:
        h, rh, keep, labels = xs
        part = a._replace(hidden=h, ref_hidden=rh, keep=keep, labels=labels)
        return chunk_stats(jnp, spec, acc, part)

    out = jax.lax.map(one, per_token)
    return tuple(jnp.reshape(o, (-1,))[:n] for o in out)
