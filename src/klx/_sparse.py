"""Divergences between distributions known on a few indices per position (top k).

:func:`sparse_divergence` compares P and Q on an index set S (P's top k, Q's top k or
their union) plus one tail bin each: forward KL, reverse KL or Jensen-Shannon. Either
side may be a full distribution over the vocabulary or, on the side that gives S, its
log-probabilities at its own top k only (as vLLM returns them).
:func:`sparse_kl_divergence` is its forward KL with P's top k given.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal, overload

from klx._dtypes import as_array, numpy_quiet
from klx._sparse_call import TOP_K, Masses, SparseCall, parse_sparse
from klx._sparse_math import sparse_values
from klx._sparse_validation import validate_sparse
from klx._typing import Array

__all__ = ["sparse_divergence", "sparse_kl_divergence"]


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

    and the result is, over the :math:`|S| + 1` bins B,

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


def evaluate_sparse(call: SparseCall) -> Array | tuple[Array, Masses]:
    """Validate (if asked), then compute a checked call by the array-API definition."""
    with numpy_quiet(call.q.x):
        if call.validate:
            validate_sparse(call)
        value, masses = sparse_values(call.xp, call)
        if masses is None:
            return as_array(value)
        return as_array(value), {n: as_array(m) for n, m in masses.items()}
