"""One chunk of tokens for :func:`klx.fused_linear_divergence`: its logits and divergences.

The per-chunk definition shared by the value path (:mod:`klx._fused.api`) and the
gradient paths (:mod:`klx._fused.torch_autograd`, :mod:`klx._fused.jax_vjp`): the call's
static part (:class:`FusedSpec`), its arrays with the tokens flattened (:class:`Flat`,
one :class:`Side` per model), the chunk budget, the logits of a chunk of hidden states,
each token's loss by the definition (:func:`klx._agnostic.record_rows` and the hard
term), and the walk over chunks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from klx._agnostic import record_rows
from klx._backends import library
from klx._divergence_table import lookup
from klx._fused.dtensor import label_mask, rows_like
from klx._typing import Array
from klx._vocab import align_vocab

#: The memory budget of one chunk when ``chunk_size=None``: the chunk's rows times the
#: vocabulary times :data:`CHUNK_TEMPORARIES` arrays of the accumulation dtype fit in it.
#: 128 MiB by default; set ``klx._fused.chunks.CHUNK_BYTES`` to change it process-wide.
CHUNK_BYTES = 1 << 27
#: How many [chunk, vocab] arrays one chunk holds at its peak (both models' logits, the
#: definition's temporaries, and their gradients): an upper estimate.
CHUNK_TEMPORARIES = 16
#: The same for torch CPU's closed-form KL chunk (:mod:`klx._fused.torch_cpu_kl`: the
#: two logits blocks, overwritten in place, and their exponentials), which is 4: at
#: V = 32,000 in float32 a chunk of 256 tokens, whose matrix products run at full speed.
LEAN_TEMPORARIES = 4
#: The same for its forward/reverse KL mixture: both probabilities, ``d``, and two arrays
#: of terms.
LEAN_MIX_TEMPORARIES = 5
#: The same for JAX's KL chunk with closed-form gradients (:mod:`klx._fused.jax_vjp`): what XLA
#: keeps of a step beyond the weight gradients it carries, about 6 arrays measured at
#: 4096 x 512 x 32,000 (102 MiB of XLA temporaries at 128 tokens per chunk); 8, so 128
#: tokens, which keeps the matrix products at full speed on a CPU.
JAX_TEMPORARIES = 8
#: The same for a chunk on CUDA whose KL or JS the Triton kernels take (no softcap): both
#: logits, both logits gradients, and the kernels' per-row statistics (a few per token).
TRITON_TEMPORARIES = 6
#: On a CUDA device a chunk may take up to this much (and at most an eighth of the free
#: memory): 128 MiB made chunks of 16 tokens at 8192 x 128256, whose matrix products read
#: the whole 1 GB weight for 16 rows of hidden states each.
CUDA_CHUNK_BYTES = 2 << 30
#: The fewest tokens per chunk on a CUDA device where half its free memory holds them:
#: matrix products of 256 rows keep an H100's tensor cores busy at H = 4096 (Liger Kernel
#: picks 256 for 8192 x 4096 x 128256, ``next_pow2(cdiv(BT, cdiv(V, H)))``).
CUDA_MIN_TOKENS = 256


class FusedSpec(NamedTuple):
    """The static (Python-valued, hashable) part of a call: the same in every chunk."""

    #: The divergence's name (klx's own kernels serve 'kl' and 'js' by it).
    kind: str
    options: tuple[tuple[str, float], ...]
    temperature: float
    softcap: float | None
    hard_weight: float
    ignore_index: int
    #: Its record (:mod:`klx._divergence_table`); None: the registered one named `kind`.
    divergence: Any = None
    #: 'same', or how two vocabulary sizes are aligned ('intersect', 'truncate': see
    #: :mod:`klx._vocab`); only where they differ, whose chunks take the definition.
    vocab: str = "same"

    @property
    def record(self) -> Any:
        """The divergence's record."""
        return lookup(self.kind) if self.divergence is None else self.divergence

    @property
    def axis(self) -> int:
        """The vocabulary's axis in a chunk's logits [tokens, vocab] (so that a spec
        serves as the call of a record's ``logits_derivatives``)."""
        return -1

    @property
    def logits_normalisers(self) -> None:
        """None: a chunk's derivatives compute its log-sum-exps (as a call of a record's
        ``logits_derivatives``, ``DivergenceCall.logits_normalisers``)."""
        return None


class Side(NamedTuple):
    """One model's output layer: its hidden states [tokens, hidden] (or, without a
    weight, its logits [tokens, vocab]), weight [vocab, hidden] and bias [vocab]; the
    same shape holds each one's gradient, or whether it is wanted."""

    hidden: Any
    weight: Any = None
    bias: Any = None


class Flat(NamedTuple):
    """The inputs with the tokens flattened to one axis: the teacher's side `p`, the
    student's side `q`, the kept tokens and the labels (one per token, or None). A pytree
    to JAX, so the custom VJPs take and return it whole."""

    p: Side
    q: Side
    keep: Array | None = None
    labels: Array | None = None

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.p, self.q

    @property
    def tokens(self) -> int:
        return int(self.q.hidden.shape[0])

    def arrays(self) -> tuple[Array | None, ...]:
        """The six differentiable arrays, the teacher's side first (the order in which
        the torch autograd Functions take them, last among their arguments)."""
        return (*self.p, *self.q)

    @classmethod
    def of(cls, arrays: Any, keep: Array | None = None, labels: Array | None = None) -> Flat:
        """The inverse of :meth:`arrays` (six values: arrays, gradients or flags)."""
        values = tuple(arrays)
        return cls(Side(*values[:3]), Side(*values[3:6]), keep, labels)


def chunk_size_for(
    n_tokens: int,
    vocab: int,
    itemsize: int,
    temporaries: int = CHUNK_TEMPORARIES,
    free_bytes: int | None = None,
) -> int:
    """Tokens per chunk so one chunk's temporaries fit in its budget.

    ``budget // (temporaries * vocab * itemsize)``, rounded down to a multiple of 8 (when
    at least 8), at least 1 and at most `n_tokens`. The budget is :data:`CHUNK_BYTES`; on
    a CUDA device with `free_bytes` free, up to an eighth of them (at most
    :data:`CUDA_CHUNK_BYTES`), and at least :data:`CUDA_MIN_TOKENS` tokens where half the
    free memory holds them.
    """
    per_token = max(1, temporaries * vocab * itemsize)
    budget = CHUNK_BYTES
    if free_bytes is not None:
        budget = max(budget, min(free_bytes // 8, CUDA_CHUNK_BYTES))
    rows = budget // per_token
    if free_bytes is not None:
        rows = max(rows, min(CUDA_MIN_TOKENS, (free_bytes // 2) // per_token))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(max(n_tokens, 1), rows))


def cuda_free_bytes(x: Array) -> int | None:
    """The free memory of `x`'s accelerator (torch's CUDA device), rounded down to a power
    of two, or None elsewhere (the CPU, JAX, a traced call, or a CUDA that cannot say)."""
    lib = library(x)
    free = None if lib is None else lib.free_device_bytes(x)
    if free is None:
        return None
    # a power of two at or below it: the chunk size (so the order of the sums, and the
    # result's last bits) changes only when the free memory halves, not from call to call
    return 1 << (free.bit_length() - 1) if free > 0 else 0


def closed_form(spec: FusedSpec) -> bool:
    """Whether the divergence has closed-form logits derivatives (its record's
    ``logits_derivatives``): its chunks' gradients come from :mod:`klx._fused.gradients`
    instead of autodiff of the definition. Not for two vocabulary sizes (``spec.vocab``)."""
    return spec.vocab == "same" and spec.record.logits_derivatives is not None


def closed_form_kl(spec: FusedSpec) -> bool:
    """KL without softcap or hard term: the chunks whose gradients torch and JAX write in
    closed form with the fewest arrays (the budgets below count them); one vocabulary."""
    return (
        spec.kind == "kl"
        and spec.softcap is None
        and spec.hard_weight == 0.0
        and spec.vocab == "same"
    )


def temporaries_for(spec: FusedSpec, q_hidden: Array, q_weight: Array) -> int:
    """How many [chunk, vocab] arrays a chunk of this call holds at its peak: what the
    library's own walk says (``temporaries`` of its adapter's ``fused_module``:
    :data:`LEAN_TEMPORARIES` for torch CPU's closed-form KL chunk, :data:`JAX_TEMPORARIES`
    for JAX's, :data:`TRITON_TEMPORARIES` where the Triton kernels take a CUDA chunk), else
    :data:`CHUNK_TEMPORARIES`."""
    walk = fused_walk(q_hidden)
    return CHUNK_TEMPORARIES if walk is None else int(walk.temporaries(spec, q_hidden, q_weight))


def fused_walk(x: Array) -> Any:
    """The module of the walk over chunks of `x`'s library (its adapter's
    ``fused_module``: ``fused(call)`` and ``temporaries(...)``), or None for the generic
    chunks. Imported only for a library whose arrays are in the call."""
    lib = library(x)
    if lib is None or not lib.fused_module:
        return None
    return importlib.import_module(lib.fused_module)


# --------------------------------------------------------------------------- one chunk


def safe_rows(xp: ModuleType, h: Array, keep: Array | None) -> Array:
    """`h` with the dropped tokens' rows set to 0 (so NaN there reaches nothing)."""
    if keep is None:
        return h
    return xp.where(keep[:, None], h, 0.0)


def masked(xp: ModuleType, f: Flat) -> Flat:
    """Chunk `f` with the dropped tokens' hidden states set to 0 (so NaN there reaches
    nothing: not the logits, not the weight gradients ``dz.T @ h``)."""
    if f.keep is None:
        return f
    p = f.p._replace(hidden=safe_rows(xp, f.p.hidden, f.keep))
    q = f.q._replace(hidden=safe_rows(xp, f.q.hidden, f.keep))
    return f._replace(p=p, q=q)


def logits(xp: ModuleType, side: Side, acc: Any) -> Array:
    """``h @ w.T + b`` of one chunk's `side` in the accumulation dtype (`h` itself if the
    side has no weight)."""
    h, w, b = side
    z = h if w is None else xp.matmul(h, w.T)
    if b is not None:
        z = z + b
    return xp.astype(z, acc, copy=False)


class Capped(NamedTuple):
    """A chunk's two logits blocks as the divergence reads them: the dropped tokens'
    logits set to 0, then the softcap; `tp` / `tq` are ``tanh(z / cap)`` (None without a
    softcap), which the chain rule through the cap reads."""

    zp: Array
    zq: Array
    tp: Array | None
    tq: Array | None


def capped(xp: ModuleType, spec: FusedSpec, zp: Array, zq: Array, keep: Array | None) -> Capped:
    """The logits of one chunk as the divergence reads them (:class:`Capped`)."""
    if keep is not None:
        zp = xp.where(keep[:, None], zp, 0.0)
        zq = xp.where(keep[:, None], zq, 0.0)
    if spec.softcap is None:
        return Capped(zp, zq, None, None)
    c = spec.softcap
    tp, tq = xp.tanh(zp / c), xp.tanh(zq / c)
    return Capped(c * tp, c * tq, tp, tq)


def soft_rows(xp: ModuleType, spec: FusedSpec, zp: Array, zq: Array) -> Array:
    """The divergence per token of two (capped) logits blocks, by its definition
    (:func:`klx._agnostic.record_rows`), after aligning two vocabulary sizes as
    ``spec.vocab`` says (:func:`klx._vocab.align_vocab`)."""
    if spec.vocab != "same":
        zp, zq = align_vocab(
            xp,
            zp,
            zq,
            axis=-1,
            p_form="logits",
            q_form="logits",
            temperature=spec.temperature,
            mode=spec.vocab,
        )
    return record_rows(
        xp,
        spec.record,
        zp,
        zq,
        p_form="logits",
        q_form="logits",
        axis=-1,
        temperature=spec.temperature,
        options=spec.options,
    )


def chunk_rows(
    xp: ModuleType,
    spec: FusedSpec,
    zp: Array,
    zq: Array,
    keep: Array | None,
    labels: Array | None,
    divergence_rows: Callable[[Array, Array], Array] | None = None,
) -> Array:
    """Per-token loss of one chunk from the raw logits [n, vocab]: 0 where `keep` drops.

    ``(1 - hard_weight) D + hard_weight CE``; a term whose weight is 0 is not computed.
    `divergence_rows(zp, zq)`, if given, computes the divergence per token from the
    (masked, softcapped) logits instead of :func:`soft_rows` (torch on CUDA: klx's
    public function, so that its Triton kernels serve). A hard weight of 1 comes with
    labels (the checks refuse it without).
    """
    zp, zq, _, _ = capped(xp, spec, zp, zq, keep)
    hw = spec.hard_weight
    if hw < 1.0:
        rows = soft_rows(xp, spec, zp, zq) if divergence_rows is None else divergence_rows(zp, zq)
        if hw > 0.0:
            rows = (1.0 - hw) * rows
    if hw > 0.0 and labels is not None:
        ce = hw * _cross_entropy(xp, zq, labels, spec.ignore_index)
        rows = ce if hw == 1.0 else rows + ce
    if keep is not None:
        rows = xp.where(keep, rows, 0.0)
    return rows


def _cross_entropy(xp: ModuleType, z: Array, labels: Array, ignore_index: int) -> Array:
    """``logsumexp(z) - z[label]`` per row; 0 where the label is `ignore_index`."""
    labels = rows_like(labels, z)
    valid = labels != ignore_index
    safe = xp.where(valid, labels, xp.zeros_like(labels))
    picked = xp.sum(xp.where(label_mask(xp, z, safe), z, 0.0), axis=-1)
    top = xp.max(z, axis=-1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(z - top), axis=-1)) + top[:, 0]
    return xp.where(valid, lse - picked, 0.0)


def chunk_from_hidden(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    f: Flat,
    rows_of_logits: RowsOfLogits | None = None,
) -> Array:
    """Per-token loss of one chunk `f` of hidden states [n, hidden]: by the definition
    (:func:`chunk_rows`), or by ``rows_of_logits(zp, zq, keep, labels)`` if given."""
    f = masked(xp, f)
    zp, zq = logits(xp, f.p, acc), logits(xp, f.q, acc)
    if rows_of_logits is not None:
        return rows_of_logits(zp, zq, f.keep, f.labels)
    return chunk_rows(xp, spec, zp, zq, f.keep, f.labels)


#: A chunk's per-token loss from its raw logits: ``(zp, zq, keep, labels) -> rows``.
RowsOfLogits = Callable[[Array, Array, "Array | None", "Array | None"], Array]


def chunk_of(f: Flat, r0: int, r1: int) -> Flat:
    """Tokens ``r0:r1`` of `f`: its hidden states, kept tokens and labels (the weights and
    biases are every chunk's)."""
    return Flat(
        f.p._replace(hidden=f.p.hidden[r0:r1, ...]),
        f.q._replace(hidden=f.q.hidden[r0:r1, ...]),
        None if f.keep is None else f.keep[r0:r1],
        None if f.labels is None else f.labels[r0:r1],
    )


def rows_by_chunks(
    xp: ModuleType,
    spec: FusedSpec,
    acc: Any,
    chunk: int,
    f: Flat,
    rows_of_logits: RowsOfLogits | None = None,
) -> Array:
    """Per-token values [tokens], a chunk at a time (any namespace; no gradients); each
    chunk by the definition or by `rows_of_logits` (see :func:`chunk_from_hidden`)."""
    n = f.tokens
    parts = []
    for r0 in range(0, n, chunk):
        parts.append(
            chunk_from_hidden(xp, spec, acc, chunk_of(f, r0, min(r0 + chunk, n)), rows_of_logits)
        )
    if not parts:
        return xp.zeros((0,), dtype=acc)
    return parts[0] if len(parts) == 1 else xp.concat(parts)


# --------------------------------------------------------------------------- public
