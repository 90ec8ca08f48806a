"""Divergences from hidden states and output-layer weights, never holding the logits.

:func:`fused_linear_divergence` walks the tokens a chunk at a time: per chunk it computes
the two models' logits (``hidden @ weight.T + bias``), the divergence of each token by
the definition (:func:`klx._agnostic.record_rows`), and, where gradients are asked
for, its gradient with respect to the chunk's logits and from there with respect to the
hidden states, weights and biases. Nothing of size [tokens, vocab] is allocated: the
extra memory is that of one chunk's logits and temporaries, plus the gradients.

Per backend:

* torch: a :class:`torch.autograd.Function`. For 'sum' and 'batchmean' the gradients are
  computed in the forward pass (four matrix products per chunk, as many as eager
  autograd makes in all) and scaled in the backward; for 'none' the backward walks the
  chunks again. Under :func:`torch.compile` it runs eagerly (a graph break).
* JAX: :func:`jax.custom_vjp` over :func:`jax.lax.map` / :func:`jax.lax.scan` of the
  chunks, so memory stays bounded under ``jax.jit``; for 'sum' / 'batchmean' the
  forward rule computes the gradients as on torch, for 'none' the backward recomputes
  each chunk's logits. Works under ``jax.grad``, ``jax.jit`` and ``jax.vmap``.
* NumPy, CuPy, Dask, array-api-strict: the value, a chunk at a time.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from klx._aggregation import AGGREGATIONS, aggregate_rows, parse_aggregation
from klx._backends import library
from klx._dtypes import as_array, numpy_quiet
from klx._fused.chunks import Flat, fused_walk, rows_by_chunks
from klx._fused.parse import FusedCall, parse_fused
from klx._typing import Array

__all__ = ["fused_linear_divergence"]


def fused_linear_divergence(
    p_hidden: Array,
    p_weight: Array | None,
    q_hidden: Array,
    q_weight: Array,
    *,
    p_bias: Array | None = None,
    q_bias: Array | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    softcap: float | None = None,
    where: Array | None = None,
    reduction: str = "batchmean",
    normalizer: Any = None,
    chunk_size: int | None = None,
    labels: Array | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    xp: ModuleType | None = None,
    vocab: str = "same",
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
    **options: float,
) -> Array:
    r"""A divergence between two models' output distributions, from their last hidden states.

    P (the teacher) and Q (the student) are, per token,

    .. math::

        P = \mathrm{softmax}\big(\mathrm{cap}(h_P W_P^\top + b_P) / T\big), \qquad
        Q = \mathrm{softmax}\big(\mathrm{cap}(h_Q W_Q^\top + b_Q) / T\big),

    with :math:`\mathrm{cap}(x) = c \tanh(x / c)` when `softcap` is given (Gemma-style,
    applied before the temperature). The [tokens, vocab] logits are never materialised:
    tokens are taken `chunk_size` at a time, and per chunk klx computes the logits, the
    divergence by its definition, and (torch, JAX) the gradients with respect to the
    hidden states, weights and biases. The per-token loss is

    .. math::

        \ell = (1 - w_h) \, D(P, Q) + w_h \, \mathrm{CE}(Q_1, y)

    where :math:`w_h` is `hard_weight`, and :math:`\mathrm{CE}(Q_1, y)` the cross-entropy
    of the student's (capped) logits at temperature 1 with the label :math:`y`, as in
    Liger Kernel's distillation losses.

    Parameters
    ----------
    p_hidden : array
        The teacher's hidden states [..., hidden_p], or, with ``p_weight=None``, the
        teacher's logits [..., vocab] (computed offline).
    p_weight : array or None
        The teacher's output layer [vocab, hidden_p], laid out as
        :attr:`torch.nn.Linear.weight` (a Flax ``Dense`` kernel is ``kernel.T``).
    q_hidden : array
        The student's hidden states [..., hidden_q]; the leading (token) shape is that
        of `p_hidden`. The hidden sizes may differ.
    q_weight : array
        The student's output layer [vocab, hidden_q].
    p_bias, q_bias : array, optional
        Output-layer biases [vocab].
    divergence : str, optional
        Any divergence klx knows (``docs/divergences.md``; one added by
        :func:`klx.register_divergence` too), by its name or an alias. 'kl': KL(P || Q),
        the forward KL of distillation (for the reverse KL swap the sides). 'js': the
        generalized Jensen-Shannon divergence with weight `beta` on P, as
        :func:`klx.js_divergence` (TRL's GKD loss with ``beta`` is this with
        ``beta_trl = 1 - beta``). 'skew_kl': KL(P || alpha P + (1 - alpha) Q) (DistiLLM).
        'tv' or 'tvd': the total variation, 0.5 sum ``|p - q|``. Default 'kl'.
    temperature : float, optional
        Both models' logits are divided by it. Default 1.
    softcap : float, optional
        ``softcap * tanh(logits / softcap)`` first. Default None (no cap).
    where : bool array, optional
        Which tokens count, broadcastable to the token shape. Dropped tokens contribute
        nothing, and get exactly zero gradient even if their hidden states hold NaN.
    reduction : str, optional
        'none': one value per token (the token shape); 'sum': their sum; 'batchmean':
        the sum divided by the number of kept tokens (or by `normalizer`). Default
        'batchmean'. Or an RL aggregation mode over the token shape ('token-mean',
        'seq-mean-token-mean', ...: :func:`klx.aggregate`; the per-token values are
        computed chunk by chunk, then aggregated).
    normalizer : number or 0-d array, optional
        With 'batchmean', divide the sum by this instead of the count of kept tokens
        (gradient accumulation over micro-batches needs the global count). As in the
        plain functions, a divisor of 0 (nothing kept) gives 0, not NaN. With an
        aggregation mode, its divisor over the whole step.
    chunk_size : int, optional
        Tokens per chunk. By default the largest whose temporaries fit in
        ``klx._fused_chunks.CHUNK_BYTES`` (128 MiB): ``CHUNK_BYTES // (k * vocab *
        itemsize)``, rounded down to a multiple of 8, with ``k = 4`` arrays for KL on
        torch CPU tensors without softcap or hard term (a closed form that overwrites
        the logits in place: 256 tokens at V = 32,000 in float32), ``k = 8`` for KL on
        JAX (closed-form gradients: 128 tokens), ``k = 6`` where the Triton kernels take
        a CUDA chunk (KL, or JS with beta in [1/16, 15/16], without softcap or hard term)
        and ``k = 16`` otherwise. On a CUDA device the budget is up to an eighth of its
        free memory (``torch.cuda.mem_get_info`` rounded down to a power of two, so the
        chunking repeats from call to call; at most 2 GiB), with
        at least 256 tokens where half the free memory holds them (8192 x 128256 float32
        with 60 GB free: 696 tokens per chunk, where 128 MiB gave 16).
    labels : array of int, optional
        The tokens' labels (the token shape), for the hard term.
    hard_weight : float, optional
        The weight :math:`w_h` in [0, 1] of the cross-entropy with `labels`. Tokens
        whose label is `ignore_index` have no hard term (their soft term stays unless
        `where` drops them). Default 0. With a positive `hard_weight`, a label outside
        ``[0, vocab)`` other than `ignore_index` raises a ValueError (read eagerly: a
        device sync on a GPU); under ``jax.jit`` or ``torch.compile``, on a lazy Dask
        array or a meta tensor, it is taken as `ignore_index`.
    ignore_index : int, optional
        The label of tokens without a hard term. Default -100.
    xp : namespace, optional
        The array namespace; by default that of the arrays.
    vocab : {'same', 'intersect', 'truncate'}, optional
        Where `p_weight` has more or fewer rows than `q_weight` (one tokenizer, embedding
        tables padded to different sizes: 151,936 and 152,064, TRL #2215): how each
        chunk's logits are compared over the shared ids ``0 .. V-1``, as in
        :func:`klx.kl_divergence`. 'intersect': each model's mass on its ids ``>= V`` as
        one tail bin (exact; ``+inf`` where only the teacher has such mass); 'truncate':
        both softmaxes renormalised over the shared ids. 'same' (the default): different
        row counts are a ValueError. Such chunks take the definition's gradients (autodiff
        of the chunk), not the closed forms or the Triton and CPU fast paths.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`klx.kl_divergence` (`sequence_axis` is an
        axis of the token shape).
    **options : float
        The divergence's own parameters: `beta` of 'js' (the weight of P in the mixture,
        in [0, 1]; default 0.5), `alpha` of 'skew_kl' (the weight of P in the mixture,
        in [0, 1]; default 0.1). A keyword the divergence does not take is a TypeError.

    Returns
    -------
    array
        A 0-d array ('sum', 'batchmean') or the token shape ('none'), of the inputs'
        library and promoted dtype (computed in float32 for float16 / bfloat16 inputs).

    See Also
    --------
    kl_divergence, js_divergence : The same divergences from arrays of logits.
    liger_kernel.chunked_loss.LigerFusedLinearJSDLoss : The torch/Triton analogue (JSD).

    Notes
    -----
    Extra memory: one chunk's ``16 * chunk * vocab`` accumulation-dtype elements at
    most, plus the gradients (the size of the inputs that require them). On torch the
    gradients of the teacher's inputs are computed only if they require grad.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> rng = np.random.default_rng(0)
    >>> h_t, w_t = rng.normal(size=(6, 4)), rng.normal(size=(10, 4))  # teacher
    >>> h_s, w_s = rng.normal(size=(6, 3)), rng.normal(size=(10, 3))  # student
    >>> loss = klx.fused_linear_divergence(h_t, w_t, h_s, w_s, temperature=2.0, chunk_size=4)
    >>> bool(np.isclose(loss, klx.kl_divergence(h_t @ w_t.T, h_s @ w_s.T, p_form="logits",
    ...      q_form="logits", temperature=2.0, reduction="batchmean")))
    True
    """
    mode = reduction if reduction in AGGREGATIONS else None
    call = parse_fused(
        p_hidden,
        p_weight,
        q_hidden,
        q_weight,
        p_bias=p_bias,
        q_bias=q_bias,
        divergence=divergence,
        temperature=temperature,
        softcap=softcap,
        where=where,
        reduction="none" if mode else reduction,
        normalizer=None if mode else normalizer,
        chunk_size=chunk_size,
        labels=labels,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        xp=xp,
        options=options,
        vocab=vocab,
    )
    agg = parse_aggregation(
        call.xp,
        reduction,
        call.token_shape,
        sequence_axis=sequence_axis,
        normalizer=normalizer if mode else None,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    if agg is None:
        return run(call)
    with numpy_quiet(call.flat.q.hidden):
        return as_array(aggregate_rows(call.xp, run(call), where, agg))


def run(call: FusedCall) -> Array:
    """The loss of a checked call: the library's own walk where its adapter names one
    (torch's autograd Function, JAX's custom VJPs: :func:`klx._fused.chunks.fused_walk`),
    else the values a chunk at a time (any array-API library; also inside
    ``torch.compile`` when no gradient is wanted, :func:`_compiled_values`)."""
    xp, spec, acc, chunk, flat, red, scale, token_shape, dtype = call
    walk = None if _compiled_values(flat) else fused_walk(flat.q.hidden)
    with numpy_quiet(flat.q.hidden):
        out = None if walk is None else walk.fused(call)
        if out is None:
            out = rows_by_chunks(xp, spec, acc, chunk, flat)
            if red != "none":
                out = xp.sum(out)
            if scale is not None:
                out = out * scale
        if red == "none":
            out = xp.reshape(out, token_shape)
        return as_array(xp.astype(out, dtype, copy=False))


def _compiled_values(flat: Flat) -> bool:
    """Whether a compiler that cannot trace the library's walk (``torch.compile``; the
    walk is a graph break, run eagerly) traces the call, and no gradient is wanted: then
    the generic chunks serve, which it traces (two matrix products and the definition a
    chunk) and fuses into a few passes a chunk, where the eager walk took about twenty
    (values at 512 x 512 x 8192: 1.46x the compiled plain formula, see
    benchmarks/RESULTS.md)."""
    lib = library(flat.q.hidden)
    if lib is None or not lib.compiling():
        return False
    # (requires_grad alone: torch.compile cannot trace the inference-mode check, and under
    # no_grad the eager walk is still right, only slower)
    return not any(x is not None and lib.requires_grad(x) for x in flat.arrays())
