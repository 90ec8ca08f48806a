"""The checked call of the sparse divergences: what each argument of
:func:`klx.sparse_divergence` / :func:`klx.sparse_kl_divergence` may be, read from shapes,
dtypes and Python values only (:func:`parse_sparse`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

from klx._aggregation import AGGREGATIONS, Aggregation, split_reduction
from klx._call import normalizer_array
from klx._checks import (
    REDUCTIONS,
    broadcast_shapes,
    check_flag,
    check_float,
    check_reduction,
    check_temperature,
    check_temperature_range,
    check_where,
    normalize_axis,
)
from klx._config import resolve_validate
from klx._dtypes import accumulation_dtype
from klx._namespace import array_namespace, check_same_device
from klx._typing import Array, Shape
from klx._vocab import align_vocab, check_vocab

__all__ = [
    "DIRECTIONS",
    "FULL_FORMS",
    "SUPPORTS",
    "TOP_K",
    "Masses",
    "Side",
    "SparseCall",
    "parse_sparse",
]

#: What :func:`sparse_divergence` computes on the bins.
DIRECTIONS = ("forward", "reverse", "js")
#: Whose indices make the support S.
SUPPORTS = ("p", "q", "union")
#: The forms of a side given over the whole vocabulary, and that of a top-k side.
FULL_FORMS = ("logits", "log_probs", "probs")
TOP_K = "top_k"

#: The masses :func:`sparse_divergence` returns with ``return_mass=True``.
Masses = dict[str, Array]


class Side(NamedTuple):
    """One distribution of a checked sparse call.

    `x` is the distribution over the vocabulary at `axis` (`form` 'logits', 'log_probs'
    or 'probs'; its other axes the batch shape's or 1, never expanded), or with
    ``form='top_k'`` its log-probabilities at `indices` only (broadcast to the batch
    shape, k at `axis`). `indices` is the index set the caller gave (broadcast likewise),
    or None; `size` is the size of the side's index set where the support uses it (None
    where it does not): klx takes the top `size` of `x` itself where `indices` is None.
    `name` and `indices_name` are the arguments' names, for messages.
    """

    x: Array
    form: str
    indices: Array | None
    size: int | None
    name: str
    indices_name: str


class SparseCall(NamedTuple):
    """A checked call of :func:`klx.sparse_divergence` (or :func:`klx.sparse_kl_divergence`).

    `keep` is full rank with size 1 at `axis`, or None; `vocab` the vocabulary size (None
    where a Dask array does not know it), read from the side named `vocab_name`.
    """

    xp: ModuleType
    p: Side
    q: Side
    direction: str
    support: str
    axis: int
    tail: bool
    temperature: float
    keep: Array | None
    reduction: str
    normalizer: float | Array | None
    return_mass: bool
    validate: bool
    batch_shape: Shape
    vocab: int | None
    vocab_name: str
    dtype: Any
    acc: Any
    #: 'same', or how an index outside the full side's vocabulary counts ('intersect': in
    #: the tail bin; 'truncate': nowhere, the support renormalised without it).
    vocab_mode: str = "same"
    #: An aggregation mode: `reduction` is then 'none' and this reduces the rows.
    aggregation: Aggregation | None = None


def parse_sparse(
    p: Array,
    q: Array,
    *,
    p_indices: Array | None,
    q_indices: Array | None,
    p_form: object,
    q_form: object,
    direction: object,
    support: object,
    k: object,
    tail: object,
    axis: object,
    temperature: object,
    where: Array | None,
    reduction: object,
    normalizer: object,
    validate: object,
    xp: ModuleType | None,
    return_mass: object,
    names: tuple[str, str] = ("p", "q"),
    vocab: object = "same",
    sequence_axis: object = None,
    token_budget: object = None,
    group_ids: object = None,
) -> SparseCall:
    """Check the arguments of a sparse call (shapes, dtypes, options); `names` are those
    of the arguments that give P's and Q's values."""
    p_name, q_name = names
    given = [(p_name, p), (q_name, q), ("p_indices", p_indices), ("q_indices", q_indices)]
    named = [(n, a) for n, a in given if a is not None] + [("where", where)]
    named += normalizer_array(normalizer)
    if group_ids is not None:
        named.append(("group_ids", group_ids))
    xp = array_namespace(named, xp)
    vocab_mode = check_vocab(vocab)
    for name, idx in (("p_indices", p_indices), ("q_indices", q_indices)):
        if idx is not None and not xp.isdtype(idx.dtype, "integral"):
            msg = (
                f"`{name}` must have an integer dtype (the vocabulary indices of "
                f"{name[0].upper()}'s k entries), got {idx.dtype}; convert it with `astype` "
                "to an integer dtype."
            )
            raise TypeError(msg)
    check_float(xp, p_name, p)
    check_float(xp, q_name, q)
    pf = _choice("p_form", p_form, (*FULL_FORMS, TOP_K))
    qf = _choice("q_form", q_form, (*FULL_FORMS, TOP_K))
    dirn = _choice("direction", direction, DIRECTIONS)
    sup = _choice("support", support, SUPPORTS)
    forms: tuple[str, ...] = (qf,)  # a top-k P is given as it is
    form_names: tuple[str, ...] = ("q_form",)
    if pf != TOP_K:
        forms, form_names = (pf, qf), ("p_form", "q_form")
    t = check_temperature(temperature, forms, form_names=form_names)
    has_tail = check_flag("tail", tail)
    with_mass = check_flag("return_mass", return_mass)
    red = check_reduction(reduction, REDUCTIONS + AGGREGATIONS)
    check_same_device(named, xp)
    if vocab_mode == "truncate" and has_tail:
        msg = (
            "vocab='truncate' renormalises each side over the shared ids, which a top-k "
            "support can do only without the tail bin (P's mass on the shared ids outside S "
            "is not known); pass tail=False, or vocab='intersect' (indices beyond the "
            "other side's vocabulary join the tail bin)."
        )
        raise ValueError(msg)
    if vocab_mode != "same" and TOP_K not in (pf, qf) and len(p.shape) == len(q.shape):
        # two full sides of different sizes: aligned as kl_divergence aligns them
        p, q = align_vocab(
            xp, p, q, axis=axis, p_form=pf, q_form=qf, temperature=t, mode=vocab_mode
        )
        given[0], given[1] = (p_name, p), (q_name, q)
    sides = (("p", p_name, p, pf, p_indices), ("q", q_name, q, qf, q_indices))
    _check_sides(sup, sides, k)
    ndims = {len(a.shape) for _, a in given if a is not None}
    if len(ndims) > 1:
        shapes = " but ".join(
            f"`{n}` has shape {tuple(a.shape)}" for n, a in given if a is not None
        )
        msg = (
            f"{shapes}; they must have the same number of dimensions (k indices along "
            "`axis` in an index array, the vocabulary along `axis` in a full one)."
        )
        raise ValueError(msg)
    ax = normalize_axis(axis, len(p.shape))
    vocab, vocab_name = _vocabulary(sides, ax)
    counts = {}
    for letter, name, x, form, idx in sides:
        uses = sup in (letter, "union")
        if idx is not None:
            if form == TOP_K and tuple(idx.shape) != tuple(x.shape):
                msg = (
                    f"`{letter}_indices` has shape {tuple(idx.shape)} but `{name}` has shape "
                    f"{tuple(x.shape)}; give one log-probability per index (the same shape)."
                )
                raise ValueError(msg)
            counts[letter] = _index_count(f"{letter}_indices", idx.shape[ax], ax, vocab, vocab_name)
        elif uses:
            counts[letter] = _index_count("k", k, ax, vocab, vocab_name)
    rest = [(n, tuple(a.shape)) for n, a in given if a is not None]
    batch_shape = broadcast_shapes([(n, s[:ax] + s[ax + 1 :]) for n, s in rest])
    red, norm, aggregation = split_reduction(
        xp,
        red,
        batch_shape,
        sequence_axis=sequence_axis,
        normalizer=normalizer,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    keep = None
    if where is not None:
        check_where(xp, where, batch_shape)
        keep = xp.expand_dims(xp.broadcast_to(where, batch_shape), axis=ax)
    made = []
    for letter, name, x, form, idx in sides:
        count = counts.get(letter)
        if idx is not None:
            shape = (*batch_shape[:ax], idx.shape[ax], *batch_shape[ax:])
            if tuple(idx.shape) != shape:
                idx = xp.broadcast_to(idx, shape)
                x = xp.broadcast_to(x, shape) if form == TOP_K else x
        made.append(Side(x, form, idx, count, name, f"{letter}_indices"))
    dtype = xp.result_type(p, q)
    check_temperature_range(t, xp.finfo(accumulation_dtype(xp, dtype)))
    return SparseCall(
        xp,
        made[0],
        made[1],
        dirn,
        sup,
        ax,
        has_tail,
        t,
        keep,
        red,
        norm,
        with_mass,
        resolve_validate(validate),
        batch_shape,
        vocab,
        vocab_name,
        dtype,
        accumulation_dtype(xp, dtype),
        vocab_mode,
        aggregation,
    )


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else a ValueError naming them."""
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        msg = f"`{name}` must be one of {options}, got {value!r}."
        raise ValueError(msg)
    return value


def _check_sides(support: str, sides: Any, k: object) -> None:
    """Each side the support uses has an index set (given, or its top `k`); a 'top_k'
    side is the support's; `k` is given exactly when klx takes a top k itself."""
    takes = []
    for letter, name, _, form, idx in sides:
        uses = support in (letter, "union")
        big = letter.upper()
        if form == TOP_K and idx is None:
            msg = (
                f"{letter}_form='top_k' says `{name}` holds {big}'s log-probabilities at "
                f"`{letter}_indices` only, but `{letter}_indices` is None; give {big}'s "
                f"indices, or {big} over the whole vocabulary with {letter}_form='logits' "
                "(or 'log_probs', 'probs')."
            )
            raise ValueError(msg)
        if form == TOP_K and support != letter:
            other = "q" if letter == "p" else "p"
            msg = (
                f"support={support!r} needs {big}'s log-probabilities at "
                f"{other.upper()}'s indices, but {letter}_form='top_k' gives {big} at its own "
                f"`{letter}_indices` only (as vLLM returns a top k); use support={letter!r}, "
                f"or give {big} over the whole vocabulary ({letter}_form='logits' or "
                "'log_probs')."
            )
            raise ValueError(msg)
        if idx is not None and not uses:
            msg = (
                f"`{letter}_indices` is given, but support={support!r} does not use "
                f"{big}'s indices; pass support={letter!r} or 'union', or leave "
                f"{letter}_indices=None."
            )
            raise ValueError(msg)
        if uses and idx is None:
            takes.append(letter)
    if takes and k is None:
        msg = (
            f"support={support!r} needs {' and '.join(t.upper() for t in takes)}'s index "
            f"set: give `{takes[0]}_indices`, or `k` for klx to take the top k of "
            f"`{next(s[1] for s in sides if s[0] == takes[0])}`."
        )
        raise ValueError(msg)
    if not takes and k is not None:
        msg = (
            f"`k`={k!r} sets how many indices klx takes from a full side, but every index "
            f"set support={support!r} uses is given; leave k=None."
        )
        raise ValueError(msg)


def _vocabulary(sides: Any, ax: int) -> tuple[int | None, str]:
    """The vocabulary size of the full sides (which must agree), and the name of one."""
    full = [(name, x.shape[ax]) for _, name, x, form, _ in sides if form != TOP_K]
    sizes = {None if v is None or v != v else v for _, v in full}
    if len(sizes - {None}) > 1:
        (a, va), (b, vb) = full
        msg = (
            f"`{a}` has {va} entries along axis {ax} but `{b}` has {vb}; P and Q given over "
            "the vocabulary must have the same vocabulary size (check `axis`)."
        )
        raise ValueError(msg)
    name, v = full[-1]
    return (None if v is None or v != v else v), name


def _index_count(name: str, k: object, ax: int, vocab: int | None, vocab_name: str) -> int:
    """The size of an index set: at least 1, at most the vocabulary size."""
    if name == "k" and (isinstance(k, bool) or not isinstance(k, int)):
        msg = f"`k` must be a positive integer (how many indices to take), got {k!r}."
        raise TypeError(msg)
    if k == 0 or (isinstance(k, int) and k < 0):
        msg = f"`{name}` has no index along `axis` (k = {k}); give a top k with k >= 1."
        raise ValueError(msg)
    if isinstance(k, int) and vocab is not None and k > vocab:
        msg = (
            f"`{name}` has k = {k} indices along axis {ax}, more than the vocabulary size "
            f"{vocab} of `{vocab_name}`; k must be at most the vocabulary size (check that "
            f"`axis` is the vocabulary axis of `{vocab_name}`)."
        )
        raise ValueError(msg)
    return k  # type: ignore[return-value]  # an int, or None for a Dask size not known
