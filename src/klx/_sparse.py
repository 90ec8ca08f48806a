"""Divergences between distributions known on a few indices per position (top k).

:func:`sparse_divergence` compares P and Q on an index set S (P's top k, Q's top k or
their union) plus one tail bin each: forward KL, reverse KL or Jensen-Shannon. Either
side may be a full distribution over the vocabulary or, on the side that gives S, its
log-probabilities at its own top k only (as vLLM returns them).
:func:`sparse_kl_divergence` is its forward KL with P's top k given.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Literal, NamedTuple, overload

from klx._aggregation import AGGREGATIONS, Aggregation, aggregate_rows, split_reduction
from klx._agnostic import js_terms, kl_terms, mask_rows, reduce_rows, shape_size
from klx._backend_ops import expm1, stop_gradient, take_along_axis, top_k_indices
from klx._backends import library
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
from klx._dtypes import accumulation_dtype, as_array, numpy_quiet
from klx._namespace import array_namespace, check_same_device, is_concrete
from klx._typing import Array, Shape
from klx._validation import (
    _count,
    _require_concrete,
    check_distribution,
    check_normalizer_value,
    tolerance,
)
from klx._vocab import align_vocab, check_vocab

__all__ = [
    "DIRECTIONS",
    "SUPPORTS",
    "Side",
    "SparseCall",
    "log1mexp",
    "sparse_divergence",
    "sparse_kl_divergence",
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


@overload
def sparse_divergence(
    p: Array,
    q: Array,
    *,
    p_indices: Array | None = ...,
    q_indices: Array | None = ...,
    p_form: str = ...,
    q_form: str = ...,
    direction: str = ...,
    support: str = ...,
    k: int | None = ...,
    tail: bool = ...,
    axis: int = ...,
    temperature: float = ...,
    where: Array | None = ...,
    reduction: str = ...,
    normalizer: float | Array | None = ...,
    validate: bool | None = ...,
    xp: ModuleType | None = ...,
    return_mass: Literal[False] = ...,
    vocab: str = ...,
    sequence_axis: int | None = ...,
    token_budget: float | None = ...,
    group_ids: Array | None = ...,
) -> Array: ...


@overload
def sparse_divergence(
    p: Array,
    q: Array,
    *,
    p_indices: Array | None = ...,
    q_indices: Array | None = ...,
    p_form: str = ...,
    q_form: str = ...,
    direction: str = ...,
    support: str = ...,
    k: int | None = ...,
    tail: bool = ...,
    axis: int = ...,
    temperature: float = ...,
    where: Array | None = ...,
    reduction: str = ...,
    normalizer: float | Array | None = ...,
    validate: bool | None = ...,
    xp: ModuleType | None = ...,
    return_mass: Literal[True],
    vocab: str = ...,
    sequence_axis: int | None = ...,
    token_budget: float | None = ...,
    group_ids: Array | None = ...,
) -> tuple[Array, Masses]: ...


def sparse_divergence(
    p: Array,
    q: Array,
    *,
    p_indices: Array | None = None,
    q_indices: Array | None = None,
    p_form: str = "logits",
    q_form: str = "logits",
    direction: str = "forward",
    support: str = "p",
    k: int | None = None,
    tail: bool = True,
    axis: int = -1,
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    validate: bool | None = None,
    xp: ModuleType | None = None,
    return_mass: bool = False,
    vocab: str = "same",
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array | tuple[Array, Masses]:
    r"""A divergence between P and Q on a top-k support S and one tail bin each.

    S holds, per distribution, P's top k (``support='p'``), Q's top k (``'q'``) or both
    (``'union'``, an index in both counted once). P and Q are each given over the whole
    vocabulary (logits, log-probabilities or probabilities), or, on the side whose indices
    make S, as log-probabilities at its own k indices only (``p_form='top_k'``: a teacher
    served by vLLM with ``logprobs=k``, or stored offline). An index set is the one given
    (`p_indices` / `q_indices`) or, where none is, klx takes the top `k` of that side's
    full array (no gradient flows through the choice). With ``tail=True`` (default) the
    rest of each distribution's mass is one more bin:

    .. math::

        p_T = 1 - \sum_{i \in S} p_i, \qquad q_T = 1 - \sum_{i \in S} q_i,

    and the result is, over the |S| + 1 bins B,

    .. math::

        \mathrm{forward}: \sum_{b \in B} p_b \log \frac{p_b}{q_b}, \qquad
        \mathrm{reverse}: \sum_{b \in B} q_b \log \frac{q_b}{p_b}, \qquad
        \mathrm{js}: \tfrac12 \sum_{b \in B} \Bigl(p_b \log \frac{p_b}{m_b}
        + q_b \log \frac{q_b}{m_b}\Bigr),\ m_b = \tfrac{p_b + q_b}{2},

    the divergence of P and Q coarsened to those bins: ``>= 0``, at most the full
    divergence (the data-processing inequality), equal to it when S is the whole
    vocabulary. With ``tail=False`` both are renormalised over S instead.

    The tail bins are taken in log space, never as ``1 - sum``: ``log p_T =
    log1mexp(logsumexp(log p_S))`` (:func:`log1mexp`: ``log(-expm1(a))`` near 0,
    ``log1p(-exp(a))`` elsewhere), with each log-sum-exp as the log of its largest entry
    plus ``log1p`` of the rest, so a top-k mass within 1e-7 of 1 keeps its tail (1e-8 in
    float64 to about 1e-8 relative, not 1 - 0.99999999 = 1.00000001e-8 - 6e-17 from a
    sum). A top-k mass that rounds to 1 or above gives a tail of exactly 0. The terms are
    ``w (d + expm1(-d))`` of the log-ratio ``d`` (``w d`` plus the other side's weight
    minus this one's, which sums to 0), each ``>= 0``: the result is never negative, and
    nothing is clamped. Conventions as in :func:`kl_divergence` (0 log 0 = 0; a bin
    where the compared-against side is 0 gives ``inf``; NaN propagates). Gradients are
    finite wherever the value is, also through ``-inf`` logits and exact zeros.

    Parameters
    ----------
    p, q : array
        P and Q: over the vocabulary along `axis`, in the form `p_form` / `q_form`; or
        with form 'top_k', the log-probabilities at `p_indices` / `q_indices` (the same
        shape). Their other axes broadcast against each other; a distribution shared by
        many (shape ``(1, V)``) is not expanded.
    p_indices, q_indices : array of int, optional
        The index sets along `axis` (distinct, in ``[0, vocabulary size)``, any order):
        required with form 'top_k'; with a full side, the set the support uses instead of
        its top `k`. Give them only for a side the support uses.
    p_form, q_form : {'logits', 'log_probs', 'probs', 'top_k'}, optional
        How `p` and `q` are given. Default 'logits'. A 'top_k' side is known on its own
        indices only, so the support must be that side's ('union' needs both sides full).
    direction : {'forward', 'reverse', 'js'}, optional
        KL(P || Q) (default), KL(Q || P), or the Jensen-Shannon divergence (base e).
    support : {'p', 'q', 'union'}, optional
        Whose indices make S. Default 'p'.
    k : int, optional
        How many indices klx takes from a full side whose index set is not given.
    tail : bool, optional
        True: the mass outside S is one more bin on each side (see above). False:
        renormalise both over S. Default True.
    axis : int, optional
        The axis of the vocabulary (full sides) and of the k indices. Default -1.
    temperature : float, optional
        Divides the logits of each side given as logits (a 'top_k' side is as given).
    where, reduction, normalizer, validate, xp : optional
        As in :func:`kl_divergence` ('batchmean' of nothing kept is 0; `normalizer`
        divides the sum instead of the count of kept distributions). Validation also
        checks that given indices are in range and distinct and that a 'top_k' side's
        probabilities sum to at most 1.
    return_mass : bool, optional
        Also return the coverage masses (see Returns). Default False.
    vocab : {'same', 'intersect', 'truncate'}, optional
        A teacher and a student whose vocabularies differ in size (sharing the ids
        ``0 .. V-1``, :func:`kl_divergence`'s `vocab`). Two full sides are aligned as
        there. An index of a 'top_k' side beyond the full side's vocabulary is an error
        with 'same' (the default); with 'intersect' it is an id the other model lacks:
        not in S, its mass in the tail bin (the coarsening of the 'intersect' bins);
        with 'truncate' (``tail=False`` only) it is left out and S renormalised.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode (``reduction='seq-mean-token-mean'``, ...), as in
        :func:`kl_divergence`.

    Returns
    -------
    value : array
        One value per distribution (the batch shape) or their reduction, in the library,
        device and promoted dtype of `p` and `q` (float16 and bfloat16 are computed in
        float32).
    masses : dict of str to array
        Only with ``return_mass=True``: ``'p_mass'`` and ``'q_mass'``, the mass of P and
        of Q on S per distribution (the batch shape, never reduced; 0 where `where`
        drops a distribution), without gradient: the coverage metrics trainers log.

    Raises
    ------
    TypeError, ValueError
        For shapes, dtypes and options always (an index set the support needs and
        nobody gives, a 'top_k' side whose values the support does not have, k larger
        than the vocabulary); for indices out of range or repeated, or a 'top_k' mass
        above 1, in validation mode. Given indices outside the vocabulary are a
        ValueError whenever their values can be read; under ``jax.jit`` or
        ``torch.compile`` such an entry carries no mass of P nor of Q.

    See Also
    --------
    sparse_kl_divergence : Its forward KL with P's top k given (the same numbers).
    kl_divergence : The dense KL; with S the whole vocabulary, ``direction='forward'``
        equals it.
    js_divergence : The dense Jensen-Shannon divergence.

    Notes
    -----
    Which to use. The forward KL on the teacher's top k (``support='p'``) is offline
    distillation from stored or vLLM log-probabilities (DistillKit's ``sparse_kl_div``,
    the MaxText KD fork). The reverse KL on the student's own top k (``support='q'``,
    ``direction='reverse'``) is on-policy distillation with the teacher's full logits
    (verl's top-k distillation losses); with ``tail=False`` or no tail bin the student
    can put its k indices where the teacher is small and still score 0 after
    renormalising, a collapse the tail bin prevents (it carries the teacher's mass the
    student left out). ``'union'`` covers both modes at once. ``return_mass`` gives the
    coverage (how much of each distribution S holds) that trainers log next to the loss.
    Hinton's distillation loss multiplies by ``temperature ** 2``; do that yourself.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> teacher = np.array([[3.0, 1.0, 0.5, -1.0, 0.0]])  # logits over 5 tokens
    >>> student = np.array([[0.5, 2.0, 1.0, -1.0, 0.0]])
    >>> klx.sparse_divergence(teacher, student, direction="reverse", support="q", k=2)
    array([0.8923...])
    >>> value, masses = klx.sparse_divergence(
    ...     teacher, student, support="union", k=2, return_mass=True
    ... )
    >>> value, masses["p_mass"], masses["q_mass"]  # S = {0, 1, 2}
    (array([1.1308...]), array([0.9470...]), array([0.8957...]))
    """
    return evaluate_sparse(
        parse_sparse(
            p,
            q,
            p_indices=p_indices,
            q_indices=q_indices,
            p_form=p_form,
            q_form=q_form,
            direction=direction,
            support=support,
            k=k,
            tail=tail,
            axis=axis,
            temperature=temperature,
            where=where,
            reduction=reduction,
            normalizer=normalizer,
            return_mass=return_mass,
            validate=validate,
            xp=xp,
            vocab=vocab,
            sequence_axis=sequence_axis,
            token_budget=token_budget,
            group_ids=group_ids,
        )
    )


@overload
def sparse_kl_divergence(
    p_indices: Array,
    p_log_probs: Array,
    q: Array,
    *,
    q_form: str = ...,
    tail: bool = ...,
    axis: int = ...,
    temperature: float = ...,
    where: Array | None = ...,
    reduction: str = ...,
    normalizer: float | Array | None = ...,
    validate: bool | None = ...,
    xp: ModuleType | None = ...,
    return_mass: Literal[False] = ...,
    vocab: str = ...,
    sequence_axis: int | None = ...,
    token_budget: float | None = ...,
    group_ids: Array | None = ...,
) -> Array: ...


@overload
def sparse_kl_divergence(
    p_indices: Array,
    p_log_probs: Array,
    q: Array,
    *,
    q_form: str = ...,
    tail: bool = ...,
    axis: int = ...,
    temperature: float = ...,
    where: Array | None = ...,
    reduction: str = ...,
    normalizer: float | Array | None = ...,
    validate: bool | None = ...,
    xp: ModuleType | None = ...,
    return_mass: Literal[True],
    vocab: str = ...,
    sequence_axis: int | None = ...,
    token_budget: float | None = ...,
    group_ids: Array | None = ...,
) -> tuple[Array, Masses]: ...


def sparse_kl_divergence(
    p_indices: Array,
    p_log_probs: Array,
    q: Array,
    *,
    q_form: str = "logits",
    tail: bool = True,
    axis: int = -1,
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    validate: bool | None = None,
    xp: ModuleType | None = None,
    return_mass: bool = False,
    vocab: str = "same",
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array | tuple[Array, Masses]:
    r"""KL(P || Q) where P is known only on k indices per distribution (a top-k teacher).

    P is given by the log-probabilities :math:`\log p_i` of its k indices :math:`i \in S`
    (as vLLM returns them, or as stored for offline distillation); Q is a full
    distribution over the vocabulary (the student). With ``tail=True`` (default) the
    rest of P's mass is one extra bin, compared with Q's mass outside S:

    .. math::

        \sum_{i \in S} p_i (\log p_i - \log q_i) + p_T (\log p_T - \log q_T),
        \qquad p_T = 1 - \sum_{i \in S} p_i, \quad q_T = 1 - \sum_{i \in S} q_i,

    the exact KL between P and Q coarsened to k + 1 bins (a lower bound on the full KL,
    equal to it when k is the vocabulary size). With ``tail=False`` both are renormalised
    over S, :math:`\tilde p_i = p_i / \sum_S p`, :math:`\tilde q_i = q_i / \sum_S q`, and
    the result is :math:`\mathrm{KL}(\tilde P \| \tilde Q)` over the k indices.

    The tail masses are computed in log space: :math:`\log p_T` =
    ``log1mexp(logsumexp(log p_S))`` and :math:`\log q_T` = the log-sum-exp of Q over S
    subtracted from Q's total (``log(1 - e^a)`` by ``log(-expm1(a))`` or
    ``log1p(-exp(a))``, whichever is exact), so nothing is formed as ``1 - sum``. Its
    accuracy is that of the log-sum-exps: :math:`q_T` has an absolute error of a few ulps
    of the accumulation dtype, so where Q puts nearly all its mass on S its relative error
    grows like eps / :math:`q_T` (summing Q outside S directly would need a scatter, which
    the array API lacks). A top-k mass that rounding puts at or above 1 gives
    :math:`p_T = 0`. Conventions as in
    :func:`kl_divergence` (0 log 0 = 0; :math:`p > 0` where :math:`q = 0` gives ``inf``;
    NaN propagates). Gradients with respect to `q` are finite wherever the value is.

    Parameters
    ----------
    p_indices : array of int
        The k indices of each distribution of P along `axis` (distinct, in
        ``[0, vocabulary size)``, in any order).
    p_log_probs : array
        P's log-probabilities at `p_indices`, the same shape. They are used as given
        (`temperature` does not apply to them).
    q : array
        Q over the whole vocabulary along `axis`, as logits (default), log-probabilities
        or probabilities; its other axes broadcast against those of `p_indices`. A
        student shared by many distributions (shape ``(1, V)``) is not expanded: its
        normaliser is taken once, and its entries are gathered where P has them.
    q_form : {'logits', 'log_probs', 'probs'}, optional
        How `q` is given. Default 'logits'.
    tail : bool, optional
        True: P's missing mass is one more bin (see above). False: renormalise both over
        the k indices. Default True.
    axis : int, optional
        The axis of the k indices in `p_indices` / `p_log_probs` and of the vocabulary in
        `q`. Default -1.
    temperature : float, optional
        Divides Q's logits (only with ``q_form='logits'``).
    where, reduction, normalizer, validate, xp : optional
        As in :func:`kl_divergence` ('batchmean' of nothing kept is 0; `normalizer`
        divides the sum instead of the count of kept distributions). Validation also
        checks that the indices are in range and distinct and that P's k probabilities
        sum to at most 1.
    return_mass : bool, optional
        Also return P's and Q's mass on the k indices, as :func:`sparse_divergence`
        does. Default False.
    vocab : {'same', 'intersect', 'truncate'}, optional
        A teacher whose vocabulary is larger than the student's: with 'intersect' an index
        ``>= q.shape[axis]`` is an id the student lacks, whose mass goes to P's tail bin;
        with 'truncate' (``tail=False`` only) it is left out. 'same' (the default): such
        an index is a ValueError. See :func:`sparse_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        One value per distribution (the batch shape) or their reduction, in the library,
        device and promoted dtype of `p_log_probs` and `q` (float16 and bfloat16 are
        computed in float32).

    Raises
    ------
    TypeError, ValueError
        For shapes and dtypes always (`p_indices` not integer, shapes that disagree, k
        larger than the vocabulary or 0); for indices out of range or repeated, or P's
        mass above 1, in validation mode (it reads values). Indices outside the
        vocabulary are a ValueError whenever their values can be read (a device sync on
        a GPU); under ``jax.jit`` or ``torch.compile`` such an entry carries no mass of
        P nor of Q.

    See Also
    --------
    sparse_divergence : The reverse KL and JS, on P's, Q's or both top k.
    kl_divergence : The dense KL; with all indices (k = vocabulary size, any order) this
        function equals ``kl_divergence(p, q, p_form='log_probs', q_form=...)``.

    Notes
    -----
    Which one to use: ``tail=True`` keeps the KL of the coarsened distributions, so the
    student is also taught how much mass to leave outside the teacher's top k (DistillKit's
    ``sparse_kl_div(missing=SYMMETRIC_UNIFORM)``, the "other bucket" truncation of the
    MaxText KD fork); ``tail=False`` matches the student's shape within the top k only and
    ignores how much mass it puts there (MaxText KD's ``truncation_strategy='renormalize'``).
    DistillKit's default ``missing=ZERO`` (sum over the top k, unrenormalised, no tail
    bin) is neither: it is not a divergence (it can be negative).
    Hinton's distillation loss multiplies by ``temperature ** 2``; do that yourself.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> student = np.array([[2.0, 1.0, 0.5, -1.0, 0.0]])  # logits over 5 tokens
    >>> idx = np.array([[0, 2]])  # the teacher's top 2
    >>> lp = np.log(np.array([[0.6, 0.3]]))  # their log-probabilities (tail mass 0.1)
    >>> klx.sparse_kl_divergence(idx, lp, student)
    array([0.1857...])
    >>> klx.sparse_kl_divergence(idx, lp, student, tail=False)
    array([0.0648...])
    """
    return evaluate_sparse(
        parse_sparse(
            p_log_probs,
            q,
            p_indices=p_indices,
            q_indices=None,
            p_form=TOP_K,
            q_form=q_form,
            direction="forward",
            support="p",
            k=None,
            tail=tail,
            axis=axis,
            temperature=temperature,
            where=where,
            reduction=reduction,
            normalizer=normalizer,
            return_mass=return_mass,
            validate=validate,
            xp=xp,
            vocab=vocab,
            sequence_axis=sequence_axis,
            token_budget=token_budget,
            group_ids=group_ids,
            names=("p_log_probs", "q"),
        )
    )


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


def evaluate_sparse(call: SparseCall) -> Array | tuple[Array, Masses]:
    """Validate (if asked), then compute a checked call by the array-API definition."""
    with numpy_quiet(call.q.x):
        if call.validate:
            validate_sparse(call)
        value, masses = sparse_values(call.xp, call)
        if masses is None:
            return as_array(value)
        return as_array(value), {n: as_array(m) for n, m in masses.items()}


class _Prepared(NamedTuple):
    """A side at the last axis: its values (dropped rows made safe), its index set (or
    None) and where an index is dead (traced, out of range; or None)."""

    x: Array
    indices: Array | None
    dead: Array | None


def sparse_values(xp: ModuleType, call: SparseCall) -> tuple[Array, Masses | None]:
    """The reduced divergence of `call` in the result dtype, and the masses (or None)."""
    last = len(call.batch_shape)

    def to_last(a: Array) -> Array:
        return a if call.axis == last else xp.moveaxis(a, call.axis, -1)

    keep = None if call.keep is None else to_last(call.keep)
    p = _prepare(xp, call.p, call, keep, to_last)
    q = _prepare(xp, call.q, call, keep, to_last)
    idx, dead = _support(xp, call, p, q)
    totals = call.tail or call.return_mass
    log_p, total_p = _on_support(xp, call.p, p.x, idx, call.temperature, keep, totals)
    log_q, total_q = _on_support(xp, call.q, q.x, idx, call.temperature, keep, totals)
    if dead is not None:
        log_p = xp.where(dead, -math.inf, log_p)
        log_q = xp.where(dead, -math.inf, log_q)
    # S is the whole vocabulary (every index known): no tail bin, exactly. (Traced, an
    # index out of range is not seen: k = V indices with one of them dead have no tail
    # either.)
    counts = (call.p.size, call.q.size)
    whole = call.vocab is not None and call.vocab in counts
    mass_p = mass_q = None
    if totals and not whole:
        mass_p = logsumexp(xp, log_p) - total_p  # the log of P's mass on S
        mass_q = logsumexp(xp, log_q) - total_q
    p_bins, q_bins = log_p, log_q
    if call.tail and mass_p is not None and mass_q is not None:
        tail_p = total_p + log1mexp(xp, mass_p)
        tail_q = total_q + log1mexp(xp, mass_q)
        if dead is not None and call.vocab is not None:
            # A union (or, traced, a set with dead entries) that holds every index: no
            # tail, exactly (its computed tails would be rounding noise, and one of them
            # 0 beside the other's noise is an infinite term).
            live = xp.sum(xp.astype(~dead, call.acc), axis=-1)
            covered = live >= float(call.vocab)
            tail_p = xp.where(covered, -math.inf, tail_p)
            tail_q = xp.where(covered, -math.inf, tail_q)
        p_bins = xp.concat([log_p, xp.expand_dims(tail_p, axis=-1)], axis=-1)
        q_bins = xp.concat([log_q, xp.expand_dims(tail_q, axis=-1)], axis=-1)
    if keep is not None:  # dropped distributions: equal stand-ins (no inf, no NaN gradient)
        p_bins = xp.where(keep, p_bins, 0.0)
        q_bins = xp.where(keep, q_bins, 0.0)
    # Each side is normalised over its bins again (to rounding, it is already), and the
    # terms are w (d + expm1(-d)): >= 0 one by one.
    if call.direction == "forward":
        terms = kl_terms(xp, p_bins, q_bins, p_form="logits", q_form="logits", axis=-1)
    elif call.direction == "reverse":
        terms = kl_terms(xp, q_bins, p_bins, p_form="logits", q_form="logits", axis=-1)
    else:
        terms = js_terms(xp, p_bins, q_bins, p_form="logits", q_form="logits", axis=-1)
    rows = xp.sum(terms, axis=-1)
    keep_rows = None if call.keep is None else xp.squeeze(call.keep, axis=call.axis)
    count = shape_size(call.batch_shape)
    out = reduce_rows(xp, rows, call.reduction, keep_rows, count, call.normalizer)
    if call.aggregation is not None:
        out = aggregate_rows(xp, out, keep_rows, call.aggregation)
    out = xp.astype(out, call.dtype, copy=False)
    if not call.return_mass:
        return out, None
    masses = {}
    for name, log_mass in (("p_mass", mass_p), ("q_mass", mass_q)):
        m = xp.ones_like(rows) if log_mass is None else stop_gradient(xp.exp(log_mass))
        if keep_rows is not None:
            m = xp.where(keep_rows, m, 0.0)
        masses[name] = xp.astype(m, call.dtype, copy=False)
    return out, masses


def _prepare(
    xp: ModuleType, side: Side, call: SparseCall, keep: Array | None, to_last: Any
) -> _Prepared:
    """A side's values and index set at the last axis, dropped rows made safe."""
    x = to_last(xp.astype(side.x, call.acc, copy=False))  # a shared row is not expanded
    if side.form == TOP_K:
        if keep is not None:
            x = xp.where(keep, x, 0.0)
    elif keep is not None:
        # A row that no kept distribution uses is replaced (its log-sum-exp and its
        # gradient stay finite); the values gathered for dropped ones are masked later.
        x = mask_rows(xp, x, _used(xp, keep, x.shape), side.form)
    if side.size is None:
        return _Prepared(x, None, None)
    if side.indices is None:  # klx takes the top k: the largest entries, no gradient
        idx = top_k_indices(xp, x, side.size)
        shape = (*call.batch_shape, side.size)
        if tuple(idx.shape) != shape and None not in shape:
            idx = xp.broadcast_to(idx, shape)
        return _Prepared(x, idx, None)
    idx = side.indices
    if call.keep is not None:  # dropped distributions: safe, in-range stand-ins
        idx = xp.where(call.keep, idx, 0)
    idx, dead = _indices_in_range(
        xp, idx, call.vocab, side.indices_name, call.vocab_name, beyond=call.vocab_mode != "same"
    )
    return _Prepared(x, to_last(idx), None if dead is None else to_last(dead))


def _support(
    xp: ModuleType, call: SparseCall, p: _Prepared, q: _Prepared
) -> tuple[Array, Array | None]:
    """The support's indices, and where an entry is dead (carries no mass: a repeat in a
    union, or an index out of range under tracing), or None."""
    if call.support == "p":
        return p.indices, p.dead
    if call.support == "q":
        return q.indices, q.dead
    ip: Array = p.indices  # both sides' sets: a union
    iq: Array = q.indices
    # Q's indices that P's hold already: a (k_q, k_p) comparison per distribution.
    same = xp.expand_dims(iq, axis=-1) == xp.expand_dims(ip, axis=-2)
    if p.dead is not None:
        same = same & ~xp.expand_dims(p.dead, axis=-2)
    repeat = xp.any(same, axis=-1)
    if ip.dtype != iq.dtype:
        wide = xp.int64 if call.vocab is None or call.vocab >= 2**31 else xp.int32
        ip, iq = xp.astype(ip, wide), xp.astype(iq, wide)
    idx = xp.concat([ip, iq], axis=-1)
    dead_p = xp.zeros_like(ip, dtype=xp.bool) if p.dead is None else p.dead
    dead_q = repeat if q.dead is None else repeat | q.dead
    dead = xp.concat([dead_p, dead_q], axis=-1)
    return idx, dead


def _on_support(
    xp: ModuleType,
    side: Side,
    x: Array,
    idx: Array,
    temperature: Any,
    keep: Array | None,
    total: bool,
) -> tuple[Array, Array | float]:
    """A side's log-probabilities on S, and the log of its total mass (0 where they are
    normalised already): a 'top_k' side's as given (S is its own index set)."""
    if side.form == TOP_K:
        return x, 0.0
    return _on_indices(xp, idx, x, side.form, temperature, keep, total)


def _indices_in_range(
    xp: ModuleType,
    idx: Array,
    vocab: int | None,
    name: str = "p_indices",
    vocab_name: str = "q",
    beyond: bool = False,
) -> tuple[Array, Array | None]:
    """`idx`, and where an index lies outside [0, vocab) (None when none can).

    With `beyond` (``vocab='intersect'`` or ``'truncate'``), an index >= vocab is an id of
    the other model's larger vocabulary: dead (it carries no mass on S: with the tail bin,
    P's mass there is in P's tail, which is 1 minus its mass on S), never an error.

    Read now where the values can be read: an index outside is a ValueError (torch took
    index V as 0 and -1 as the last entry; JAX gave NaN). Under tracing (``jax.jit``,
    ``torch.compile``) such an entry is dead: index 0 stands in, and it carries no mass
    of P nor of Q (a -100 padding id with any log-probability adds nothing).
    """
    if vocab is None:  # a Dask vocabulary of unknown size: the gather itself decides
        return idx, None
    wide = idx if xp.iinfo(idx.dtype).bits >= 32 else xp.astype(idx, xp.int32)
    outside = (wide < 0) | (wide >= vocab)
    if beyond:  # ids of the other model's larger vocabulary: dead, never an error
        extra = wide >= vocab
        safe, dead = _indices_in_range(
            xp, xp.where(extra, xp.zeros_like(idx), idx), vocab, name, vocab_name
        )
        return safe, extra if dead is None else (extra | dead)
    lib = library(idx)
    readable = lib is None or lib.values_readable(idx)
    if readable and is_concrete(outside):  # a lazy Dask graph or a meta tensor is not read
        if bool(xp.any(outside)):  # one read of a value, as the gather's own bounds check
            n = int(xp.sum(xp.astype(outside, xp.int32)))
            flat = xp.reshape(outside, (-1,))
            first = int(xp.reshape(wide, (-1,))[int(xp.argmax(xp.astype(flat, xp.int8)))])
            msg = (
                f"`{name}` holds {n} index(es) outside [0, {vocab}) (the vocabulary size "
                f"of `{vocab_name}`), the first {first}; give indices into `{vocab_name}`'s "
                "vocabulary axis (a padding entry: an index in range with log-probability "
                "-inf), or, for a teacher whose vocabulary is larger than the student's, "
                "pass vocab='intersect'."
            )
            raise ValueError(msg)
        return idx, None
    return xp.where(outside, xp.zeros_like(idx), idx), outside


def _on_indices(
    xp: ModuleType,
    idx: Array,
    x: Array,
    form: str,
    temperature: Any,
    keep: Array | None,
    total: bool = True,
) -> tuple[Array, Array | float]:
    """``log x`` at the indices, and the log of the side's total mass (0 for logits).

    The totals are taken over `x` as given (one per row, however many distributions share
    it). Values gathered for distributions that `keep` drops are replaced by a safe one,
    so a shared row's gradient gets nothing from them. With ``total=False`` (for
    renormalising over the indices) logits are not normalised over the vocabulary and the
    total is not computed: one pass over `x` less.
    """
    x_s = take_along_axis(xp, x, idx, -1)
    if keep is not None:
        x_s = xp.where(keep, x_s, 1.0 if form == "probs" else 0.0)
    if form == "logits":
        if not total:  # only the k logits are needed
            return (x_s / temperature if temperature != 1.0 else x_s), 0.0
        # On the scale of the largest logit, whose own log-probability is then -log1p(rest)
        # exactly: a tail 1 - e^lse is kept to the rounding of the mass beside it, not to
        # that of the largest logit (20 ulps of a logit of 20 are 2e-6 in float32).
        m = _finite_max(xp, x)
        shifted = x - m if temperature == 1.0 else (x - m) / temperature
        shifted_s = x_s - m if temperature == 1.0 else (x_s - m) / temperature
        return shifted_s - _log1p_rest(xp, shifted, keepdims=True), 0.0
    if form == "log_probs":
        return x_s, logsumexp(xp, x) if total else 0.0
    zero = x_s == 0  # log 0 = -inf, with a gradient of 0 (not 0 / 0) through the log
    log_x_s = xp.where(zero, -math.inf, xp.log(xp.where(zero, 1.0, x_s)))
    return log_x_s, xp.log(xp.sum(x, axis=-1)) if total else 0.0


def logsumexp(xp: ModuleType, x: Array) -> Array:
    """``log(sum(exp(x)))`` over the last axis; ``-inf`` for a row of ``-inf``.

    As the largest entry ``m`` plus ``log1p`` of the others' ``exp(x - m)``: where one
    entry holds nearly all the mass, the mass left beside it is kept to its own rounding,
    not to that of 1 (what a tail ``1 - e^lse`` near 0 needs).
    """
    m = _finite_max(xp, x)
    return _log1p_rest(xp, x - m) + xp.squeeze(m, axis=-1)


def _finite_max(xp: ModuleType, x: Array) -> Array:
    """The maximum over the last axis (kept), 0 where it is not finite."""
    m = xp.max(x, axis=-1, keepdims=True)
    return xp.where(xp.isfinite(m), m, 0.0)


def _log1p_rest(xp: ModuleType, shifted: Array, keepdims: bool = False) -> Array:
    """``log(sum(exp(shifted)))`` over the last axis for `shifted` whose maximum is 0:
    ``log1p`` of the mass beside one maximal entry (``exp - 1``, exactly 0, at the
    maxima, whose ties are counted), as :func:`klx._agnostic.log_softmax` does."""
    top = shifted == 0
    e = xp.exp(shifted)
    rest = xp.sum(xp.where(top, e - 1.0, e), axis=-1, keepdims=keepdims)
    ties = xp.sum(xp.astype(top, shifted.dtype), axis=-1, keepdims=keepdims) - 1.0
    return xp.log1p(rest + ties)


def _used(xp: ModuleType, keep: Array, shape: Shape) -> Array:
    """`keep` (full rank) reduced by ``any`` over the axes where `shape` has size 1 and
    `keep` does not: which rows of a broadcast array some kept distribution uses."""
    axes = tuple(i for i, (k, s) in enumerate(zip(keep.shape, shape, strict=True)) if s == 1 != k)
    return xp.any(keep, axis=axes, keepdims=True) if axes else keep


def log1mexp(xp: ModuleType, a: Array) -> Array:
    """``log(1 - e^a)`` for ``a < 0``, exact on both sides of ``a = -log 2`` (Maechler,
    "Accurately computing log(1 - exp(-|a|))", 2012); ``-inf`` for ``a >= 0``.

    Each branch gets a safe value where it is not taken, so gradients stay finite.
    """
    near = a > -math.log(2.0)
    inside = near & (a < 0.0)
    a_near = xp.where(inside, a, -1.0)
    a_far = xp.where(near, -1.0, a)
    out = xp.where(near, xp.log(-expm1(xp, a_near)), xp.log1p(-xp.exp(a_far)))
    return xp.where(near & ~inside & ~xp.isnan(a), -math.inf, out)


def validate_sparse(call: SparseCall) -> None:
    """Raise ValueError for out-of-range or repeated indices, or invalid P or Q values."""
    xp, ax = call.xp, call.axis
    if call.normalizer is not None and not isinstance(call.normalizer, float):
        check_normalizer_value(xp, call.normalizer)
    sides = (call.q, call.p)  # Q first, then P, then the index sets
    for side in sides:
        if side.form != TOP_K:
            keep = None if call.keep is None else _used(xp, call.keep, side.x.shape)
            check_distribution(xp, side.name, side.x, side.form, axis=ax, keep_full=keep)
    for side in sides:
        if side.form == TOP_K:
            check_distribution(xp, side.name, side.x, "log_probs", axis=None, keep_full=call.keep)
    for side in (call.p, call.q):
        if side.indices is not None:
            _validate_indices(call, side.indices, side.indices_name)
    for side in sides:
        if side.form == TOP_K:
            _validate_top_k_mass(call, side)


def _validate_indices(call: SparseCall, indices: Array, name: str) -> None:
    """Given indices: in range, and distinct within each distribution."""
    xp, ax = call.xp, call.axis
    _require_concrete(name, indices)
    keep = None if call.keep is None else xp.broadcast_to(call.keep, indices.shape)
    idx = indices if keep is None else xp.where(keep, indices, 0)
    vocab = call.vocab
    if vocab is not None:
        outside = _count(xp, (idx < 0) | (idx >= vocab))
        if outside:
            msg = (
                f"`{name}` holds {outside} index(es) outside [0, {vocab}) (the vocabulary "
                f"size of `{call.vocab_name}` along axis {ax}); give indices into "
                f"`{call.vocab_name}`'s vocabulary axis."
            )
            raise ValueError(msg)
    s = xp.moveaxis(xp.sort(idx, axis=ax), ax, -1)
    repeated = xp.any(s[..., 1:] == s[..., :-1], axis=-1)
    if call.keep is not None:
        repeated = repeated & xp.squeeze(call.keep, axis=ax)
    repeats = _count(xp, repeated)
    if repeats:
        msg = (
            f"`{name}` repeats an index within {repeats} distribution(s); the k indices "
            "of a distribution must be distinct (each vocabulary entry once)."
        )
        raise ValueError(msg)


def _validate_top_k_mass(call: SparseCall, side: Side) -> None:
    """A 'top_k' side's probabilities sum to at most 1 (to the dtype's tolerance)."""
    xp, ax = call.xp, call.axis
    lp = xp.astype(side.x, call.acc)
    if call.keep is not None:
        lp = xp.where(xp.broadcast_to(call.keep, lp.shape), lp, -math.inf)
    mass = logsumexp(xp, xp.moveaxis(lp, ax, -1))
    tol = tolerance(xp, side.x.dtype, side.x.shape[ax] or 1)
    above = _count(xp, mass > tol)
    if above:
        msg = (
            f"`{side.name}` of {above} distribution(s) hold more than probability 1 (the "
            f"largest log of the sum is {float(xp.max(mass)):.3g}, tolerance {tol:.3g}); "
            "give log-probabilities over the whole vocabulary (log_softmax of the "
            "logits, taken before the top k)."
        )
        raise ValueError(msg)
