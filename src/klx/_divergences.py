"""The divergences in the order the formulas read: KL, JS, skew KL and total variation, any
divergence by its name (:func:`divergence`), and new ones (:func:`register_divergence`).

Each function parses its arguments into a :class:`klx._call.DivergenceCall` that carries
the divergence's record (:mod:`klx._divergence_table`); everything after reads the record.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

from klx import _accel, _divergence_table
from klx._aggregation import aggregate_rows
from klx._call import DivergenceCall, parse_divergence
from klx._divergence_table import Divergence, lookup
from klx._dtypes import as_array, numpy_quiet
from klx._typing import Array
from klx._validation import check_distribution, check_normalizer_value

__all__ = [
    "alpha_divergence",
    "cross_entropy",
    "divergence",
    "js_divergence",
    "kl_divergence",
    "register_divergence",
    "renyi_divergence",
    "skew_kl_divergence",
    "tv_distance",
]


#: Validation's advice for each side (what ``check_distribution`` suggests), by name; a
#: side not listed is not validated (klx.entropy's second side is its first).
Hints = dict[str, dict[str, str]]
_HINTS: Hints = {
    "p": {"hint_log": "pass p_form='log_probs'", "hint_probs": "pass p_form='probs'"},
    "q": {"hint_log": "pass q_form='log_probs'", "hint_probs": "pass q_form='probs'"},
}


def kl_divergence(
    p: Array,
    q: Array,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
    normalized: bool = True,
    vocab: str = "same",
) -> Array:
    r"""The Kullback-Leibler divergence KL(P || Q), in the order the formula reads.

    .. math::

        \mathrm{KL}(P \,\|\, Q) = \sum_i p_i \, (\log p_i - \log q_i)

    summed over `axis`. Terms with :math:`p_i = 0` are 0 whatever :math:`q_i` is;
    :math:`p_i > 0` with :math:`q_i = 0` gives ``+inf``; a negative probability gives
    ``+inf``; NaN propagates (the conventions of :func:`scipy.special.rel_entr`, whose
    accuracy for nearly equal arguments it matches). KL(P || P) is exactly 0, and from two
    sets of logits the KL is never negative (see ``docs/numerics.md``). Gradients are
    finite with respect to every input wherever the divergence is finite, including
    logits with ``-inf`` entries.

    Parameters
    ----------
    p, q : array
        The two distributions along `axis`, as probabilities, log-probabilities or
        logits (see `p_form`, `q_form`). They broadcast against each other.
    axis : int, optional
        The axis that holds each distribution. Default -1.
    p_form, q_form : {'probs', 'log_probs', 'logits'}, optional
        How `p` and `q` are given. Logits are divided by `temperature` and normalised
        along `axis` with a stable log-sum-exp. Default 'probs'.
    temperature : float or 0-d array, optional
        Softmax temperature for logits: they are normalised as ``(x - max x) / T``. Any
        value but 1 with no logits is an error, as is a number too small for the dtype
        (its reciprocal overflows). A 0-d real array of the inputs' library (a tracer
        under ``jax.jit`` / ``jax.grad``, a tensor that requires grad) is used unread,
        so the temperature can be annealed or learned.
    where : bool array, optional
        Which distributions to keep, broadcastable to the batch shape (the shape without
        `axis`). Dropped ones contribute nothing, in value (0 under 'none') and in gradient,
        even if they hold NaN or ``-inf``; 'batchmean' averages over the kept ones only,
        and is 0 (with gradient 0) if none is kept.
    reduction : str, optional
        'none': one value per distribution (the batch shape); 'sum': their sum;
        'batchmean': their sum divided by `normalizer`, or by the number kept (at least 1:
        an empty or fully masked batch gives 0, not NaN). Default 'none'. Or an RL
        aggregation mode over per-token values with a sequence axis (verl's
        ``loss_agg_mode`` names): 'token-mean', 'seq-mean-token-sum',
        'seq-mean-token-mean', 'seq-mean-token-sum-norm' or 'group-mean-token-mean'
        (formulas in :func:`klx.aggregate`); sequences without a kept token are left out.
    validate : bool or None, optional
        Check the values first (reads them: a GPU synchronisation): probabilities must be
        non-negative and sum to 1, log-probabilities must be <= 0 and their exp sum to 1.
        None (the default) follows :func:`klx.set_validation` / :func:`klx.validation`.
    xp : namespace, optional
        The array namespace; by default that of the arrays.
    normalizer : float or 0-d array, optional
        With 'batchmean' only (an error otherwise): divide the sum over the kept
        distributions by this instead of their count, e.g. the number of tokens in all the
        micro-batches of an accumulated step, so that the micro-batches' losses add up to
        the step's mean. A number >= 0, or a 0-d integer or floating array of the
        inputs' library and device (its value is read only in validation mode). A
        normalizer of 0 (a step without tokens) divides by 1: the result is 0. With an
        aggregation mode, the mode's divisor over the whole step: kept tokens
        ('token-mean'), sequences (the 'seq-mean-...' modes) or groups ('group-mean-token-mean').
    sequence_axis : int, optional
        With an aggregation mode: the axis of the batch shape (the shape without `axis`)
        along which a sequence's tokens lie. Default -1.
    token_budget : float, optional
        With 'seq-mean-token-sum-norm': its constant divisor C (Dr. GRPO's generation
        budget). Default: the length of the sequence axis.
    group_ids : int array, optional
        With 'group-mean-token-mean': one id per sequence (the batch shape without
        `sequence_axis`).
    normalized : bool, optional
        True (the default): `p` and `q` are distributions. False: non-negative measures,
        taken as they are, and the generalized KL :math:`\sum_i p_i \log(p_i / q_i) - p_i +
        q_i` (SciPy's ``special.kl_div`` summed; also by name, ``"generalized_kl"``); probs
        only (log-probabilities and logits are distributions), and validation checks each
        entry, not the sums. For two distributions both give the KL.
    vocab : {'same', 'intersect', 'truncate'}, optional
        When `p` and `q` differ in size along `axis` (a teacher and a student whose
        embedding tables are padded differently, 151,936 and 152,064 rows: TRL #2215),
        sharing the ids ``0 .. V-1``, ``V = min(V_p, V_q)``. 'same' (the default): the
        sizes must match (or one be 1, broadcast); a mismatch is a ValueError naming both.
        'intersect': each side is normalised over its own whole vocabulary, then its mass
        on the ids ``>= V`` is one tail bin (0 on the smaller side), and the divergence is
        that of the coarsened distributions, :math:`\sum_{i<V} p_i \log(p_i / q_i) + p_T
        \log(p_T / q_T)`: exact, so ``+inf`` where P puts mass ``p_T > 0`` on ids Q does
        not have. 'truncate': the shared ids only, each side renormalised over them (TRL's
        slicing of the logits to the shorter vocabulary): the divergence between the
        conditionals given a shared token, finite where 'intersect' is ``+inf``. See
        ``docs/distillation.md``.

    Returns
    -------
    array
        Of the inputs' library, device and promoted dtype (float16 and bfloat16 are
        accumulated in float32).

    See Also
    --------
    kl_div : The torch-compatible form (arguments in the reverse order).
    js_divergence : The symmetric, bounded Jensen-Shannon divergence.
    skew_kl_divergence : KL(P || alpha P + (1 - alpha) Q), finite wherever P is.
    scipy.special.rel_entr : The pointwise terms in SciPy; ``rel_entr(p, q).sum(axis)``.
    scipy.special.kl_div : The generalized terms, ``normalized=False``.
    scipy.stats.entropy : ``entropy(p, q, axis=axis)`` normalises first, then gives the KL.
    torch.nn.functional.kl_div : ``kl_div(log(q), p, reduction='batchmean')`` for 2-D input.
    optax.kl_divergence : ``kl_divergence(log(q), p)``, the same reversed order as torch.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> p = np.array([0.5, 0.5, 0.0])
    >>> q = np.array([0.25, 0.25, 0.5])
    >>> klx.kl_divergence(p, q)  # log 2
    array(0.6931...)
    >>> klx.kl_divergence(q, p)  # Q puts mass where P has none
    array(inf)
    >>> klx.kl_divergence(np.array([2.0, 1.0]), np.array([1.0, 1.0]), normalized=False)
    array(0.3862...)

    Knowledge distillation, with temperature and a padding mask:

    >>> teacher = np.array([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0]])
    >>> student = np.array([[1.5, 1.2, 0.3], [5.0, -3.0, 1.0]])
    >>> keep = np.array([True, False])  # the second row is padding
    >>> klx.kl_divergence(teacher, student, p_form="logits", q_form="logits",
    ...                   temperature=2.0, where=keep, reduction="batchmean")
    array(0.0152...)

    A teacher with one more id than the student (``vocab=``):

    >>> student = np.array([0.25, 0.5, 0.25])
    >>> klx.kl_divergence(np.array([0.5, 0.25, 0.25, 0.0]), student, vocab="intersect")
    array(0.1732...)
    >>> teacher = np.array([0.5, 0.25, 0.125, 0.125])  # mass on the id the student lacks
    >>> klx.kl_divergence(teacher, student, vocab="intersect")
    array(inf)
    >>> klx.kl_divergence(teacher, student, vocab="truncate")  # given a shared id
    array(0.2325...)
    """
    if not isinstance(normalized, bool):  # (user code is not type-checked)
        msg = f"`normalized` must be True or False, got {normalized!r}."  # type: ignore[unreachable]
        raise TypeError(msg)
    call = parse_divergence(
        "kl" if normalized else "generalized_kl",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        vocab=vocab,
    )
    return evaluate(call)


def js_divergence(
    p: Array,
    q: Array,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    beta: float = 0.5,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The generalized Jensen-Shannon divergence of P and Q.

    .. math::

        \mathrm{JS}_\beta(P, Q) = \beta \, \mathrm{KL}(P \,\|\, M)
            + (1 - \beta) \, \mathrm{KL}(Q \,\|\, M), \qquad M = \beta P + (1 - \beta) Q.

    Each term is computed from ``r = log(q / p)`` in log space, so nothing underflows;
    JS(P, P) is exactly 0 and JS is never negative (each term is a Jensen gap, and a
    negative rounding error is set to 0). At ``beta = 0.5`` it is symmetric and at most
    ``log 2``; at ``beta`` 0 or 1 it is 0 (NaN if either input holds NaN). Natural
    logarithms throughout.

    Parameters
    ----------
    p, q : array
        As in :func:`kl_divergence`.
    axis, p_form, q_form, temperature : optional
        As in :func:`kl_divergence`.
    beta : float, optional
        The weight of P in the mixture, in [0, 1]. Default 0.5.
    where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    kl_divergence : KL(P || Q); JS is a weighted sum of two of them, against the mixture.
    scipy.spatial.distance.jensenshannon : Returns the *square root* of JS at beta = 0.5.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> klx.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0]))  # disjoint: log 2
    array(0.6931...)
    """
    call = parse_divergence(
        "js",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        options={"beta": beta},
    )
    return evaluate(call)


def skew_kl_divergence(
    p: Array,
    q: Array,
    *,
    alpha: float = 0.1,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The skew KL divergence: KL(P || M) against the mixture M = alpha P + (1 - alpha) Q.

    .. math::

        \mathrm{SKL}_\alpha(P \,\|\, Q) = \mathrm{KL}\bigl(P \,\|\,
            \alpha P + (1 - \alpha) Q\bigr)
            = \sum_i p_i \, \bigl(\log p_i - \log(\alpha p_i + (1 - \alpha) q_i)\bigr)

    Skewing Q towards P bounds the divergence by :math:`-\log \alpha` and keeps it finite
    where Q is 0 and P is not (a student that rules out a teacher's token), which is why
    distillation uses it (DistiLLM's skew KL, Ko et al. 2024). Each term is computed from
    ``r = log(q / p)`` as ``-p log(alpha + (1 - alpha) e^r)``, a ``log1p``/``expm1`` form
    that is exactly 0 where ``p = q`` and never underflows (from two logits inputs it gets
    ``m - p`` added, so no term is negative: see ``docs/numerics.md``); gradients are
    finite wherever the value is. At ``alpha = 0`` it is :func:`kl_divergence` exactly; at
    ``alpha = 1`` it is 0. Natural logarithms throughout.

    Parameters
    ----------
    p, q : array
        As in :func:`kl_divergence`.
    alpha : float, optional
        The weight of P in the mixture, in [0, 1]. Default 0.1.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    kl_divergence : The case ``alpha = 0``.
    js_divergence : Mixes both ways: ``beta KL(P || M) + (1 - beta) KL(Q || M)``.
    tv_distance : Bounded by 1, also finite where supports differ.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    >>> klx.kl_divergence(p, q)
    array(inf)
    >>> klx.skew_kl_divergence(p, q, alpha=0.1)  # log(1 / 0.1)
    array(2.3025...)
    """
    call = parse_divergence(
        "skew_kl",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        options={"alpha": alpha},
    )
    return evaluate(call)


def tv_distance(
    p: Array,
    q: Array,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The total variation distance between P and Q.

    .. math::

        \mathrm{TV}(P, Q) = \tfrac12 \sum_i |p_i - q_i|

    Symmetric, in [0, 1] for distributions, and finite whatever the supports, where the KL
    may be infinite (Pinsker's inequality bounds it by the KL:
    :math:`\mathrm{TV} \le \sqrt{\mathrm{KL}/2}`). Log-probabilities and logits are
    turned into probabilities first. Where ``p_i = q_i`` the gradient of :math:`|p_i - q_i|` is
    the array library's own subgradient (0 in torch, 1 in JAX), never NaN.

    Parameters
    ----------
    p, q : array
        As in :func:`kl_divergence`.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    kl_divergence : Its upper bound by Pinsker's inequality; infinite where supports differ.
    skew_kl_divergence : A KL that is finite where supports differ.
    js_divergence : A symmetric divergence bounded by ``log 2``.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> klx.tv_distance(np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5]))
    array(0.5)
    """
    call = parse_divergence(
        "tv",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    return evaluate(call)


def cross_entropy(
    p: Array,
    q: Array,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The cross-entropy of Q against the (soft) labels P: H(P) + KL(P || Q).

    .. math::

        H(P, Q) = -\sum_i p_i \log q_i = H(P) + \mathrm{KL}(P \,\|\, Q)

    summed over `axis`: the loss of a model Q against probability targets P (soft labels,
    label smoothing, a teacher's probabilities). Terms with :math:`p_i = 0` are 0 whatever
    :math:`q_i` is; :math:`p_i > 0` with :math:`q_i = 0` gives ``+inf``; a negative
    probability gives ``+inf``; NaN propagates (the conventions of
    :func:`kl_divergence`). Unlike a divergence it is not 0 at P = Q but the entropy
    H(P); it differs from the KL by H(P), which does not depend on Q, so both have the
    same gradient with respect to Q. Each term is ``>= 0``, so nothing cancels; from
    logits ``log q`` is the exact log-softmax. Gradients are finite with respect to every
    input wherever the value is, also where P is 0 and at ``-inf`` logits.

    Parameters
    ----------
    p, q : array
        The labels P and the model's distribution Q along `axis`, as probabilities,
        log-probabilities or logits (see `p_form`, `q_form`). They broadcast against each
        other.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    entropy : H(P), the cross-entropy of P with itself.
    kl_divergence : The cross-entropy less H(P).
    torch.nn.functional.cross_entropy : ``cross_entropy(logits, p)`` with probability
        targets (classes on axis 1), 'mean' over the batch: ``cross_entropy(p, logits,
        axis=1, q_form='logits', reduction='batchmean')``.
    optax.softmax_cross_entropy : ``softmax_cross_entropy(logits, p)``, per distribution:
        ``cross_entropy(p, logits, q_form='logits')``.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> p = np.array([0.5, 0.5, 0.0])
    >>> q = np.array([0.25, 0.25, 0.5])
    >>> klx.cross_entropy(p, q)  # log 4 = H(P) + KL(P || Q) = log 2 + log 2
    array(1.3862...)
    >>> klx.cross_entropy(p, p)  # H(P)
    array(0.6931...)

    Soft labels against a model's logits, averaged over the batch:

    >>> labels = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 0.0]])
    >>> klx.cross_entropy(labels, logits, q_form="logits", reduction="batchmean")
    array(0.5806...)
    """
    call = parse_divergence(
        "cross_entropy",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    return evaluate(call)


def alpha_divergence(
    p: Array,
    q: Array,
    alpha: float,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The alpha-divergence (Amari's) of order `alpha` between P and Q.

    .. math::

        D_\alpha(P \,\|\, Q) = \frac{1}{\alpha (1 - \alpha)} \sum_i
        \big[\alpha p_i + (1 - \alpha) q_i - p_i^\alpha q_i^{1 - \alpha}\big]

    One convention (Amari's, as in Cichocki and Amari 2010): ``alpha -> 1`` is
    KL(P || Q), ``alpha -> 0`` is KL(Q || P), ``alpha = 1/2`` is
    :math:`2 \sum (\sqrt{p_i} - \sqrt{q_i})^2`, four times the squared Hellinger
    distance :math:`H^2 = \tfrac12 \sum (\sqrt{p_i} - \sqrt{q_i})^2`, and
    :math:`D_\alpha(P \| Q) = D_{1 - \alpha}(Q \| P)`. It is computed term by term from
    ``d = log p - log q`` in ``expm1`` forms, each term ``>= 0``: continuous through
    ``alpha`` = 0 and 1 (no cliff at ``1 - 1e-8``, 1, ``1 + 1e-8``), never negative, exactly
    0 for P = Q. Where P is 0 a term is ``q / alpha`` (``+inf`` for ``alpha <= 0``); where Q
    is 0, ``p / (1 - alpha)`` (``+inf`` for ``alpha >= 1``).

    Parameters
    ----------
    p, q : array
        As in :func:`kl_divergence`.
    alpha : float
        The order: any finite real number.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    renyi_divergence : The log-sum form of the same power sum, ``D_alpha`` of Rényi.
    kl_divergence : The order 1 (and, with P and Q swapped, 0).
    scipy.special.kl_div : The generalized KL term ``x log(x / y) - x + y`` (order 1).

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    >>> float(klx.alpha_divergence(p, q, 1.0)), float(klx.kl_divergence(p, q))
    (0.5108256237659905, 0.5108256237659905)
    >>> float(klx.alpha_divergence(p, q, 0.5))  # 2 sum (sqrt p - sqrt q)^2
    0.42229123600033647
    """
    call = parse_divergence(
        "alpha",
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        options={"alpha": alpha},
    )
    return evaluate(call)


def renyi_divergence(
    p: Array,
    q: Array,
    alpha: float,
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""The Rényi divergence of order `alpha` between P and Q.

    .. math::

        D_\alpha(P \,\|\, Q) = \frac{1}{\alpha - 1} \log \sum_i p_i^\alpha q_i^{1 - \alpha}

    for ``alpha >= 0``, with its limits: ``alpha = 1`` is KL(P || Q), ``alpha = 0`` is
    :math:`-\log Q(\{i : p_i > 0\})`, ``alpha = inf`` (``math.inf``) is
    :math:`\log \max_i p_i / q_i`. Non-decreasing in ``alpha`` and never negative. Near
    ``alpha = 1`` and near P = Q the sum's gap to 1 is taken from the alpha-divergence's
    terms (:func:`alpha_divergence`), so ``log1p`` keeps every digit and the order 1 is
    reached without a cliff; where the sum is far below 1 it is summed directly. It is
    a log of a sum, applied per distribution after the sum, so it also holds where rows
    are summed in pieces (CPU blocks, Dask chunks, fused-linear chunks).

    Parameters
    ----------
    p, q : array
        As in :func:`kl_divergence`.
    alpha : float
        The order: a number >= 0, or ``math.inf``.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    alpha_divergence : Amari's family on the same power sum, without the log.
    kl_divergence : The order 1.

    Examples
    --------
    >>> import math
    >>> import numpy as np
    >>> import klx
    >>> p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    >>> float(klx.renyi_divergence(p, q, 0.0))  # -log Q(supp P) = -log(1/2)
    0.6931471805599453
    >>> float(klx.renyi_divergence(p, q, math.inf))  # log max p / q = log 2
    0.6931471805599453
    """
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == math.inf:
        kind, options = "renyi_inf", {}
    else:
        kind, options = "renyi", {"alpha": alpha}
    call = parse_divergence(
        kind,
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        options=options,
    )
    return evaluate(call)


def evaluate(call: DivergenceCall, hints: Hints = _HINTS) -> Array:
    """Validate (if asked: the sides named in `hints`, with their advice), then compute
    `call` by an accelerator or the definition."""
    if call.validate:
        # a record of measures: each entry is checked, not the sums
        axis = None if call.divergence.measures else call.axis
        for name, x, form in (("p", call.p, call.p_form), ("q", call.q, call.q_form)):
            if name in hints:
                check_distribution(
                    call.xp, name, x, form, axis=axis, keep_full=call.keep, **hints[name]
                )
        if call.normalizer is not None and not isinstance(call.normalizer, float):
            check_normalizer_value(call.xp, call.normalizer)
        agg = call.aggregation
        if agg is not None and agg.normalizer is not None and not isinstance(agg.normalizer, float):
            check_normalizer_value(call.xp, agg.normalizer)
    with numpy_quiet(call.p):
        out = _accel.evaluate_divergence(call)
        if call.aggregation is not None:
            keep = None if call.keep is None else call.xp.squeeze(call.keep, axis=call.axis)
            out = aggregate_rows(call.xp, out, keep, call.aggregation)
        return as_array(out)


def divergence(
    p: Array,
    q: Array,
    kind: str | Divergence = "kl",
    *,
    axis: int = -1,
    p_form: str = "probs",
    q_form: str = "probs",
    temperature: float = 1.0,
    where: Array | None = None,
    reduction: str = "none",
    validate: bool | None = None,
    xp: ModuleType | None = None,
    normalizer: float | Array | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
    vocab: str = "same",
    **options: float,
) -> Array:
    r"""Any divergence klx knows, by its name: ``divergence(p, q, "js", beta=0.3)``.

    The same as the divergence's own function (``kind="kl"`` is :func:`kl_divergence`,
    "js" :func:`js_divergence`, "skew_kl" :func:`skew_kl_divergence`, "tv" (or "tvd")
    :func:`tv_distance`), and the way to call one added by
    :func:`register_divergence`. ``docs/divergences.md`` lists them all.

    Parameters
    ----------
    p, q : array
        The two distributions along `axis` (see :func:`kl_divergence`).
    kind : str or Divergence, optional
        The divergence's name or one of its aliases, or its record. Default 'kl'.
    axis, p_form, q_form, temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.
    vocab : {'same', 'intersect', 'truncate'}, optional
        Two vocabulary sizes along `axis`, as in :func:`kl_divergence`: the divergence
        is taken between the aligned distributions.
    **options : float
        The divergence's own parameters (``beta`` of JS, ``alpha`` of skew KL); those
        not given take their defaults. Any other keyword is a TypeError.

    Returns
    -------
    array
        As in :func:`kl_divergence`.

    See Also
    --------
    kl_divergence : ``kind="kl"``.
    js_divergence : ``kind="js"``.
    skew_kl_divergence : ``kind="skew_kl"``.
    tv_distance : ``kind="tv"``.
    register_divergence : Adds a divergence that this function then serves by its name.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> p = np.array([0.5, 0.5, 0.0])
    >>> q = np.array([0.25, 0.25, 0.5])
    >>> klx.divergence(p, q, "kl")  # log 2
    array(0.6931...)
    >>> klx.divergence(p, q, "tvd")
    array(0.5)
    """
    call = parse_divergence(
        lookup(kind, "kind"),
        p,
        q,
        axis=axis,
        p_form=p_form,
        q_form=q_form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        options=options,
        vocab=vocab,
    )
    return evaluate(call)


def register_divergence(record: Divergence, *, replace: bool = False) -> Callable[..., Array]:
    r"""Teach klx a new divergence, and get its public function.

    After this, the divergence is served like the built-in ones: by the returned
    function and :func:`divergence` (by its name) on every array library, on any axis,
    from probabilities, log-probabilities or logits, with masks, reductions, validation
    and gradients (autodiff of its terms); by :func:`fused_linear_divergence`
    (``divergence=record.name``); by the accelerators that serve any divergence (the CPU
    row blocks, Dask chunks); and in :func:`explain`.

    Parameters
    ----------
    record : Divergence
        Its name, terms, options and (optionally) finishing step: see
        :class:`klx.Divergence`. Write the terms against the array API (``xp``) only, with
        a safe value in the untaken branch of every ``where``, so gradients stay finite.
    replace : bool, optional
        Replace a divergence of the same name (else that is a ValueError). Default False.

    Returns
    -------
    callable
        ``f(p, q, *, axis=-1, p_form='probs', q_form='probs', temperature=1.0,
        where=None, reduction='none', validate=None, xp=None, normalizer=None,
        sequence_axis=None, token_budget=None, group_ids=None, vocab='same',
        **options)``, named after ``record.public`` (or ``record.name``).

    Examples
    --------
    The squared Hellinger distance, ``1/2 sum (sqrt p - sqrt q)^2``:

    >>> import numpy as np
    >>> import klx
    >>> def hellinger_terms(xp, p, q):
    ...     d = xp.sqrt(p) - xp.sqrt(q)
    ...     return 0.5 * d * d
    >>> hellinger = klx.register_divergence(
    ...     klx.Divergence("hellinger_doc", hellinger_terms, formula="1/2 sum (sqrt p - sqrt q)^2"))
    >>> hellinger(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    array(1.)
    >>> klx.divergence(np.array([0.5, 0.5]), np.array([0.5, 0.5]), "hellinger_doc")
    array(0.)
    """
    _divergence_table.register(record, replace=replace)

    def registered(p: Array, q: Array, **kwargs: Any) -> Array:
        return divergence(p, q, record, **kwargs)

    params = [v for k, v in inspect.signature(divergence).parameters.items() if k != "kind"]
    registered.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    registered.__name__ = registered.__qualname__ = record.public or record.name
    registered.__doc__ = (
        f"The divergence {record.name!r}: {record.formula or 'see its record'}.\n\n"
        "Arguments and result as in :func:`klx.divergence` (registered with "
        ":func:`klx.register_divergence`)."
    )
    return registered
