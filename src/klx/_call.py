"""Call objects: a public call's arguments, checked once and frozen.

Each public function turns its arguments into one of these (``parse_*``), and everything
after that (validation, the accelerator registry, the definition in
:mod:`klx._agnostic`) reads the call object, never loose arguments. The checks are in
:mod:`klx._checks`; they read shapes, dtypes and Python values only.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from klx._aggregation import AGGREGATIONS, Aggregation, split_reduction
from klx._backends import LIBRARIES
from klx._checks import (
    KL_DIV_REDUCTIONS,
    REDUCTIONS,
    broadcast_shapes,
    check_flag,
    check_float,
    check_form,
    check_reduction,
    check_temperature,
    check_temperature_range,
    check_where,
    normalize_axis,
    shape_of,
)
from klx._config import resolve_validate
from klx._divergence_table import Divergence, lookup
from klx._dtypes import accumulation_dtype
from klx._namespace import array_namespace, check_same_device, library_name
from klx._typing import Array, Shape
from klx._vocab import align_vocab, check_vocab

if TYPE_CHECKING:
    from klx._agnostic import Normalisers

__all__ = [
    "DivergenceCall",
    "KLDivCall",
    "normalizer_array",
    "parse_divergence",
    "parse_kl_div",
]


class KLDivCall(NamedTuple):
    """A checked call of :func:`klx.kl_div`."""

    xp: ModuleType
    input: Array
    target: Array
    reduction: str
    log_target: bool
    validate: bool
    #: The broadcast shape of `input` and `target`.
    shape: Shape
    #: ``input.shape[0]`` ('batchmean' divides by it), or None for 0-d input.
    first: int | None
    #: The result dtype (promoted) and the dtype terms are accumulated in.
    dtype: Any
    acc: Any


class DivergenceCall(NamedTuple):
    """A checked call of a divergence between distributions along `axis`.

    `p` and `q` are broadcast to one shape; `keep` is the `where` mask in its one internal
    form: full rank, size 1 along `axis` (None keeps every distribution).
    """

    #: The divergence's record (:mod:`klx._divergence_table`).
    divergence: Divergence
    xp: ModuleType
    p: Array
    q: Array
    axis: int
    p_form: str
    q_form: str
    #: A float, or a 0-d array of the inputs' library (a traced or learned temperature).
    temperature: Any
    #: The divergence's own parameters (e.g. ``beta`` of JS), each checked by its record,
    #: in the record's order; passed to its terms function.
    options: tuple[tuple[str, float], ...]
    keep: Array | None
    reduction: str
    validate: bool
    batch_shape: Shape
    dtype: Any
    acc: Any
    #: What 'batchmean' divides the kept distributions' sum by instead of their count:
    #: a Python float, a 0-d array of `xp`, or None (the count).
    normalizer: float | Array | None = None
    #: An aggregation mode (``reduction='seq-mean-token-mean'``, ...): the call then computes
    #: per-distribution values (`reduction` is 'none') and :func:`klx._aggregation.
    #: aggregate_rows` reduces them; None for the other reductions.
    aggregation: Aggregation | None = None
    #: Each side's maximum and log-sum-exp along `axis`, for two logits inputs
    #: (:func:`klx._agnostic.plain_normaliser`): set where the closed-form derivatives are
    #: taken inside torch.compile (:class:`klx._accel.torch_closed_form.FromLogitsRows`),
    #: None elsewhere (they are computed from the logits).
    logits_normalisers: Normalisers | None = None

    @property
    def kind(self) -> str:
        """The divergence's name (``'kl'``, ``'js'``, ...)."""
        return self.divergence.name


def parse_kl_div(
    input: Array,
    target: Array,
    reduction: object,
    log_target: object,
    validate: object,
    xp: ModuleType | None,
) -> KLDivCall:
    """Check the arguments of :func:`klx.kl_div` (raising TypeError / ValueError)."""
    named = [("input", input), ("target", target)]
    xp = array_namespace(named, xp)
    check_float(xp, "input", input)
    check_float(xp, "target", target)
    red = check_reduction(reduction, KL_DIV_REDUCTIONS)
    log_t = check_flag("log_target", log_target)
    check_same_device(named, xp)
    if input.shape == target.shape and xp.__name__ in _SIZES_KNOWN:
        shape: Shape = tuple(input.shape)
    else:
        shape = broadcast_shapes([("input", shape_of(input)), ("target", shape_of(target))])
    dtype = input.dtype if input.dtype == target.dtype else xp.result_type(input, target)
    first = input.shape[0] if input.ndim else None  # NaN: unknown to Dask until computed
    return KLDivCall(
        xp,
        input,
        target,
        red,
        log_t,
        resolve_validate(validate),
        shape,
        first,
        dtype,
        accumulation_dtype(xp, dtype),
    )


#: Namespaces whose arrays always know their sizes (Dask's may be NaN until computed).
_SIZES_KNOWN = tuple(lib.namespace_name for lib in LIBRARIES if lib.shapes_known)


def parse_divergence(
    divergence: Divergence | str,
    p: Array,
    q: Array,
    *,
    axis: object,
    p_form: object,
    q_form: object,
    temperature: object,
    where: Array | None,
    reduction: object,
    validate: object,
    xp: ModuleType | None,
    normalizer: object = None,
    options: Mapping[str, object] | None = None,
    form_names: tuple[str, str] = ("p_form", "q_form"),
    sequence_axis: object = None,
    token_budget: object = None,
    group_ids: object = None,
    vocab: object = "same",
) -> DivergenceCall:
    """Check the arguments of a divergence (raising TypeError / ValueError).

    `divergence` is a record or a name (or alias) in :data:`klx._divergence_table.
    DIVERGENCES`; `options` are its own parameters (``beta=`` of JS), each checked by the
    record (defaults for those not given). `normalizer` is checked by
    :func:`klx._checks.check_normalizer` (with 'batchmean' only). `form_names` are the
    caller's names of `p_form` and `q_form`, which the errors name (``form`` for both in
    :func:`klx.entropy`). `sequence_axis`, `token_budget` and `group_ids` go with an
    aggregation mode (:mod:`klx._aggregation`). `vocab` ('same', 'intersect', 'truncate')
    aligns sides of different sizes along `axis` first (:mod:`klx._vocab`).
    """
    record = lookup(divergence)
    opts = record.option_values(options or {})
    named = [("p", p), ("q", q), ("where", where), *normalizer_array(normalizer)]
    if group_ids is not None:
        named.append(("group_ids", group_ids))
    xp = array_namespace(named, xp)
    check_float(xp, "p", p)
    check_float(xp, "q", q)
    forms = (check_form(form_names[0], p_form), check_form(form_names[1], q_form))
    if record.measures and forms != ("probs", "probs"):
        msg = (
            f"the divergence {record.name!r} takes non-negative measures as they are, "
            f"given as probs, but p_form={forms[0]!r} and q_form={forms[1]!r}: log-probabilities "
            "and logits are normalised distributions; use the normalised divergence "
            "(normalized=True) for them."
        )
        raise ValueError(msg)
    t = check_temperature(temperature, forms, xp, form_names)
    red = check_reduction(reduction, REDUCTIONS + AGGREGATIONS)
    check_same_device(named, xp)
    p, q = align_vocab(
        xp,
        p,
        q,
        axis=axis,
        p_form=forms[0],
        q_form=forms[1],
        temperature=t,
        mode=check_vocab(vocab),
        measures=record.measures,
    )
    shape = broadcast_shapes([("p", shape_of(p)), ("q", shape_of(q))])
    ax = normalize_axis(axis, len(shape))
    batch_shape = shape[:ax] + shape[ax + 1 :]
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
        # New axes by indexing with None (leading 1s, then the distribution axis): not a
        # reshape, which needs sizes a Dask array may not know (after boolean indexing).
        keep = where[(None,) * (len(batch_shape) - where.ndim) + (...,)]
        keep = keep[(slice(None),) * ax + (None, ...)]
    if None in shape:
        # A Dask size known only when computed: broadcast (against size 1) as the
        # element-wise operations go, not by `broadcast_to`, which needs the sizes.
        if shape[ax] is None:
            msg = (
                f"the size of the distributions (axis {axis}) is unknown (Dask arrays of "
                f"shapes {shape_of(p)} and {shape_of(q)}, e.g. after boolean indexing); "
                "call `.compute_chunk_sizes()` on them first."
            )
            raise ValueError(msg)
    else:
        if tuple(p.shape) != shape:
            p = xp.broadcast_to(p, shape)
        if tuple(q.shape) != shape:
            q = xp.broadcast_to(q, shape)
    dtype = xp.result_type(p, q)
    acc = accumulation_dtype(xp, dtype)
    if "logits" in forms:
        check_temperature_range(t, xp.finfo(acc))
    return DivergenceCall(
        record,
        xp,
        p,
        q,
        ax,
        forms[0],
        forms[1],
        t,
        opts,
        keep,
        red,
        resolve_validate(validate),
        batch_shape,
        dtype,
        acc,
        norm,
        aggregation,
    )


def normalizer_array(normalizer: object) -> list[tuple[str, Array]]:
    """``[("normalizer", normalizer)]`` if it is an array (it must then share the inputs'
    library and device: add it to the arrays checked together), else ``[]``.

    With :func:`klx._checks.check_normalizer` and the `normalizer` argument of
    :func:`klx._agnostic.reduce_rows`, this is all a reducing function needs for the
    token semantics of ``normalizer=``.
    """
    if isinstance(normalizer, numbers.Real) or library_name(normalizer) is None:
        return []
    return [("normalizer", normalizer)]
