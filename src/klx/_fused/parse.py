"""The checks of :func:`klx.fused_linear_divergence`: its arguments into a
:class:`FusedCall` (the static :class:`~klx._fused.chunks.FusedSpec`, the chunk size, the
arrays flattened to tokens as a :class:`~klx._fused.chunks.Flat`, and the reduction), as
:func:`klx._call.parse_divergence` does for the plain functions. Every problem is a
TypeError or ValueError that names the argument and the fix.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from klx._backends import library
from klx._call import normalizer_array
from klx._checks import (
    REDUCTIONS,
    check_float,
    check_normalizer,
    check_reduction,
    check_temperature,
    check_temperature_range,
    check_where,
)
from klx._divergence_table import lookup
from klx._dtypes import accumulation_dtype
from klx._fused.chunks import (
    Flat,
    FusedSpec,
    Side,
    chunk_size_for,
    cuda_free_bytes,
    temporaries_for,
)
from klx._namespace import array_namespace, check_same_device, is_concrete
from klx._typing import Array, Shape
from klx._vocab import check_vocab, mismatch_message

__all__ = ["FusedCall", "parse_fused"]


class FusedCall(NamedTuple):
    """A checked call of :func:`klx.fused_linear_divergence`."""

    xp: ModuleType
    #: The static part, the same in every chunk (hashable: JAX's static arguments).
    spec: FusedSpec
    #: The accumulation dtype (float32 for 16-bit inputs).
    acc: Any
    #: Tokens per chunk.
    chunk: int
    #: The arrays, the tokens flattened to one axis.
    flat: Flat
    reduction: str
    #: What the 'batchmean' sum is multiplied by (None: 'sum' or 'none').
    scale: Any
    #: The tokens' shape ('none' returns it).
    token_shape: Shape
    #: The result's dtype (the inputs' promoted one).
    dtype: Any


def parse_fused(
    p_hidden: Array,
    p_weight: Array | None,
    q_hidden: Array,
    q_weight: Array,
    *,
    p_bias: Array | None,
    q_bias: Array | None,
    divergence: Any,
    temperature: Any,
    softcap: float | None,
    where: Array | None,
    reduction: str,
    normalizer: Any,
    chunk_size: int | None,
    labels: Array | None,
    hard_weight: float,
    ignore_index: int,
    xp: ModuleType | None,
    options: Mapping[str, object],
    vocab: object = "same",
) -> FusedCall:
    """Check the arguments of :func:`klx.fused_linear_divergence` (see there)."""
    named = [
        ("p_hidden", p_hidden),
        ("p_weight", p_weight),
        ("q_hidden", q_hidden),
        ("q_weight", q_weight),
        ("p_bias", p_bias),
        ("q_bias", q_bias),
        ("where", where),
        ("labels", labels),
    ]
    present = [(n, a) for n, a in named if a is not None]
    xp = array_namespace(present + normalizer_array(normalizer), xp)
    for name, a in present:
        if name not in ("where", "labels"):
            check_float(xp, name, a)
    check_same_device(present, xp)
    spec, token_shape = _check(
        xp,
        p_hidden,
        p_weight,
        q_hidden,
        q_weight,
        p_bias,
        q_bias,
        divergence,
        options,
        temperature,
        softcap,
        labels,
        hard_weight,
        ignore_index,
        check_vocab(vocab),
    )
    red = check_reduction(reduction, REDUCTIONS)
    norm = check_normalizer(xp, normalizer, red)
    vocab = int(q_weight.shape[0])
    n_tokens = math.prod(token_shape)  # ints already (and no generator: Dynamo traces it)
    dtypes = [a for n, a in present if n not in ("where", "labels")]
    dtype = xp.result_type(*dtypes)
    acc = accumulation_dtype(xp, dtype)
    check_temperature_range(spec.temperature, xp.finfo(acc))
    if chunk_size is None:
        temps = temporaries_for(spec, q_hidden, q_weight)
        free = cuda_free_bytes(q_hidden)
        widest = max(vocab, _teacher_vocab(p_hidden, p_weight))
        chunk = chunk_size_for(n_tokens, widest, _itemsize(xp, acc), temps, free)
    else:
        chunk = _check_chunk_size(chunk_size)
    keep = None
    if where is not None:
        check_where(xp, where, token_shape)
        keep = xp.reshape(xp.broadcast_to(where, token_shape), (n_tokens,))
    flat = Flat(
        Side(xp.reshape(p_hidden, (n_tokens, int(p_hidden.shape[-1]))), p_weight, p_bias),
        Side(xp.reshape(q_hidden, (n_tokens, int(q_hidden.shape[-1]))), q_weight, q_bias),
        keep,
        None
        if labels is None
        else _checked_labels(xp, labels, vocab, ignore_index, n_tokens, spec.hard_weight > 0),
    )
    scale = None
    if red == "batchmean":
        scale = _batchmean_scale(xp, norm, keep, n_tokens, acc)
    return FusedCall(xp, spec, acc, chunk, flat, red, scale, token_shape, dtype)


def _batchmean_scale(
    xp: ModuleType, normalizer: Any, keep: Array | None, n_tokens: int, acc: Any
) -> Any:
    """What the 'batchmean' sum is multiplied by: 1 / normalizer, or 1 / the kept count.

    As in :func:`klx._agnostic.reduce_rows`, a divisor of 0 (nothing kept, no tokens, or
    a normalizer of 0: the whole batch holds no tokens) gives a loss and gradient of 0.
    """
    if isinstance(normalizer, float):
        return 1.0 / normalizer if normalizer != 0 else 0.0
    if normalizer is not None:
        n = xp.astype(normalizer, acc)
    elif keep is None:
        return 1.0 / n_tokens if n_tokens else 1.0
    else:
        n = xp.sum(xp.astype(keep, acc))
    zero = n == 0
    return xp.where(zero, 0.0, 1.0 / xp.where(zero, 1.0, n))


def _itemsize(xp: ModuleType, dtype: Any) -> int:
    return int(xp.finfo(dtype).bits) // 8


def _check(
    xp: ModuleType,
    p_hidden: Array,
    p_weight: Array | None,
    q_hidden: Array,
    q_weight: Array,
    p_bias: Array | None,
    q_bias: Array | None,
    divergence: object,
    options: Mapping[str, object],
    temperature: object,
    softcap: object,
    labels: Array | None,
    hard_weight: object,
    ignore_index: object,
    vocab_mode: str = "same",
) -> tuple[FusedSpec, tuple[int, ...]]:
    """Check shapes and Python options; return the static spec and the token shape.

    The teacher's vocabulary may differ in size from the student's (`q_weight`'s rows)
    with `vocab_mode` 'intersect' or 'truncate'; the spec then carries the mode."""
    record = lookup(divergence)
    opts = record.option_values(options)
    t = check_temperature(_number_temperature(temperature), ("logits",))
    cap = None
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            msg = f"`softcap` must be a positive number or None, got {softcap!r}."
            raise TypeError(msg)
        if not (softcap > 0 and math.isfinite(softcap)):
            msg = f"`softcap` must be positive and finite (e.g. 30.0), got {softcap!r}."
            raise ValueError(msg)
        cap = float(softcap)
    hw = _check_hard_weight(hard_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        msg = f"`ignore_index` must be an int, got {ignore_index!r}."
        raise TypeError(msg)
    if hw > 0 and labels is None:
        msg = (
            f"`hard_weight`={hard_weight!r} weights a cross-entropy with `labels`, but no "
            "labels were given; pass labels=... or leave hard_weight at 0."
        )
        raise ValueError(msg)

    _check_2d("q_weight", q_weight, "[vocab, hidden]")
    vocab = int(q_weight.shape[0])
    if vocab == 0:
        msg = (
            f"`q_weight` has no rows (shape {tuple(q_weight.shape)}): a divergence needs a "
            "vocabulary of at least one entry (rows are vocabulary entries)."
        )
        raise ValueError(msg)
    for side, hidden, weight in (("p", p_hidden, p_weight), ("q", q_hidden, q_weight)):
        if weight is not None and _matmul_refuses(hidden, weight):
            msg = (
                f"`{side}_hidden` is {hidden.dtype} but `{side}_weight` is {weight.dtype}; a "
                "linear layer needs one dtype: cast the hidden states to the weight's (as "
                "the model's own output head computes) before the call."
            )
            raise TypeError(msg)
    token_shape = tuple(int(s) for s in q_hidden.shape[:-1])
    if q_hidden.ndim < 1 or int(q_hidden.shape[-1]) != int(q_weight.shape[1]):
        msg = (
            f"`q_hidden` has shape {tuple(q_hidden.shape)} and `q_weight` {tuple(q_weight.shape)}"
            "; the hidden states' last axis must equal the weight's second (weights are "
            "[vocab, hidden] as torch.nn.Linear.weight; for a Flax kernel pass kernel.T)."
        )
        raise ValueError(msg)
    if p_weight is None:
        if p_bias is not None:
            msg = (
                "`p_bias` is given but `p_weight` is None (p_hidden holds the teacher's "
                "logits); add the bias to the logits yourself or pass p_weight."
            )
            raise ValueError(msg)
        want = (*token_shape, vocab)
        shape = tuple(int(s) for s in p_hidden.shape)
        if len(shape) == len(want) and shape[:-1] == token_shape and shape != want:
            if vocab_mode == "same":
                what = (
                    f"`p_hidden` (the teacher's logits, p_weight=None) has {shape[-1]} "
                    f"entries along its last axis and `q_weight` {vocab} rows"
                )
                raise ValueError(mismatch_message(what, shape[-1], vocab))
        elif shape != want:
            msg = (
                f"`p_weight` is None, so `p_hidden` must hold the teacher's logits of shape "
                f"{want} (the student's tokens by the vocabulary), got {tuple(p_hidden.shape)}."
            )
            raise ValueError(msg)
    else:
        _check_2d("p_weight", p_weight, "[vocab, hidden]")
        if int(p_weight.shape[0]) != vocab and vocab_mode == "same":
            what = f"`p_weight` has {int(p_weight.shape[0])} rows and `q_weight` {vocab}"
            raise ValueError(mismatch_message(what, int(p_weight.shape[0]), vocab))
        if tuple(int(s) for s in p_hidden.shape[:-1]) != token_shape or int(
            p_hidden.shape[-1]
        ) != int(p_weight.shape[1]):
            msg = (
                f"`p_hidden` has shape {tuple(p_hidden.shape)}, `p_weight` "
                f"{tuple(p_weight.shape)} and `q_hidden` {tuple(q_hidden.shape)}; p_hidden "
                "must have q_hidden's token shape and p_weight's hidden size as its last axis."
            )
            raise ValueError(msg)
    p_vocab = _teacher_vocab(p_hidden, p_weight)
    for name, b, size in (("p_bias", p_bias, p_vocab), ("q_bias", q_bias, vocab)):
        if b is not None and tuple(int(s) for s in b.shape) != (size,):
            msg = (
                f"`{name}` must have shape ({size},) (one per vocabulary entry), got "
                f"{tuple(b.shape)}."
            )
            raise ValueError(msg)
    if labels is not None:
        if not xp.isdtype(labels.dtype, "integral"):
            msg = f"`labels` must be an integer array, got dtype {labels.dtype}."
            raise TypeError(msg)
        if tuple(int(s) for s in labels.shape) != token_shape:
            msg = f"`labels` must have the token shape {token_shape}, got {tuple(labels.shape)}."
            raise ValueError(msg)
    mode = vocab_mode if p_vocab != vocab else "same"
    spec = FusedSpec(record.name, opts, t, cap, hw, int(ignore_index), record, mode)
    return spec, token_shape


def _teacher_vocab(p_hidden: Array, p_weight: Array | None) -> int:
    """The teacher's vocabulary size: its weight's rows, or its logits' last axis."""
    return int(p_weight.shape[0] if p_weight is not None else p_hidden.shape[-1])


def _matmul_refuses(hidden: Array, weight: Array) -> bool:
    """Whether the library's matrix product would refuse the two dtypes (torch's, outside
    ``torch.autocast``; NumPy and JAX promote)."""
    lib = library(hidden)
    return (
        hidden.dtype != weight.dtype
        and lib is not None
        and lib.refuses_mixed_matmul(hidden, weight)
    )


def _readable(x: Array) -> bool:
    """Whether a check may read `x`'s values now: not traced, not a lazy Dask array (whose
    graph a read would compute), not a torch meta tensor (which has no values)."""
    lib = library(x)
    return is_concrete(x) and (lib is None or lib.values_readable(x))


def _checked_labels(
    xp: ModuleType, labels: Array, vocab: int, ignore_index: int, n_tokens: int, used: bool
) -> Array:
    """The labels, flat: a label outside [0, vocab) other than `ignore_index` is a
    ValueError when the values can be read now (as ``F.cross_entropy``'s "Target 5 is out
    of bounds"); under tracing (``jax.jit``, ``torch.compile``) such a label is taken as
    `ignore_index`: its token gets no hard term."""
    flat = xp.reshape(labels, (n_tokens,))
    # Compared at 32 bits at least: vocab = 300 against int8 labels would wrap to 44.
    wide = flat if xp.iinfo(flat.dtype).bits >= 32 else xp.astype(flat, xp.int32)
    outside = (wide != ignore_index) & ((wide < 0) | (wide >= vocab))
    if used and _readable(outside):  # (a concrete `labels` inside a jit function is traced)
        if bool(xp.any(outside)):  # reads a value: a device sync, as cross_entropy's check
            where = int(xp.argmax(xp.astype(outside, xp.int8)))
            msg = (
                f"`labels` holds {int(wide[where])} at token {where} (flat index): outside "
                f"the vocabulary [0, {vocab}); use ignore_index={ignore_index} for tokens "
                "without a label, or check the labels against the output head."
            )
            raise ValueError(msg)
        return flat
    return xp.where(outside, xp.asarray(ignore_index, dtype=wide.dtype), wide)


def _check_chunk_size(chunk_size: object) -> int:
    """A positive integer (a Python or NumPy int) of tokens per chunk."""
    try:
        chunk = operator.index(chunk_size)  # type: ignore[arg-type]
    except TypeError:
        chunk = 0
    if isinstance(chunk_size, bool) or chunk < 1:
        msg = f"`chunk_size` must be a positive int (tokens per chunk), got {chunk_size!r}."
        raise ValueError(msg)
    return chunk


def _number_temperature(temperature: object) -> object:
    """A concrete 0-d array temperature as the number it holds (the fused path's temperature
    is static: one value for every chunk and kernel); a traced one is refused clearly."""
    if isinstance(temperature, numbers.Real) or not hasattr(temperature, "shape"):
        return temperature
    if getattr(temperature, "ndim", None) != 0:
        return temperature  # check_temperature says what is wrong
    if not is_concrete(temperature) or getattr(temperature, "requires_grad", False):
        msg = (
            "`temperature` of fused_linear_divergence must be a number known when it is "
            "called (one value for every chunk, without a gradient), got a traced array or "
            "one that requires grad; pass a Python float, or use klx.kl_divergence on the "
            "logits for a learned or traced temperature."
        )
        raise TypeError(msg)
    return float(temperature)  # type: ignore[arg-type]  # a 0-d array


def _check_2d(name: str, w: Array, layout: str) -> None:
    if w.ndim != 2:
        msg = f"`{name}` must be a 2-d array {layout}, got shape {tuple(w.shape)}."
        raise ValueError(msg)


def _check_hard_weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"`hard_weight` must be a real number in [0, 1], got {value!r}."
        raise TypeError(msg)
    v = float(value)
    if not 0.0 <= v <= 1.0:
        msg = (
            f"`hard_weight` must lie in [0, 1] (the weight of the cross-entropy with the "
            f"labels; the divergence gets 1 - hard_weight), got {value!r}."
        )
        raise ValueError(msg)
    return v
