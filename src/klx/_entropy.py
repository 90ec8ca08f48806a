"""The Shannon entropy H(P) (:func:`entropy`), with the divergences' forms, masks,
reductions, validation and dispatch.

It is a divergence call (:func:`klx._call.parse_divergence`) of the record
:data:`klx._divergence_table.ENTROPY`, whose terms read P alone: P is passed as both
sides, and only P is validated.
"""

from __future__ import annotations

from types import ModuleType

from klx._backends import library
from klx._call import parse_divergence
from klx._divergence_table import ENTROPY
from klx._divergences import Hints, evaluate
from klx._typing import Array

__all__ = ["entropy"]

#: Validation's advice, in entropy's own argument names (its second side is its first).
_HINTS: Hints = {
    "p": {
        "hint_log": "pass form='log_probs'",
        "hint_probs": "pass form='probs'",
        "hint_logits": "if they are logits, say so (form='logits')",
    }
}


def entropy(
    p: Array,
    *,
    axis: int = -1,
    form: str = "probs",
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
    r"""The Shannon entropy of P, in nats.

    .. math::

        H(P) = -\sum_i p_i \log p_i

    summed over `axis`: :func:`scipy.special.entr` summed, as :func:`scipy.stats.entropy`
    of one argument gives it (which first divides `p` by its sum). ``0 log 0 = 0``; a
    negative probability gives ``-inf`` (as ``entr``); NaN propagates. For a distribution
    of n outcomes, 0 <= H(P) <= log n. From logits, ``log p`` is the exact log-softmax,
    which keeps the mass beside the maximum of a nearly one-hot distribution: its small
    entropy is accurate to a few ulps, where a plain log-sum-exp rounds part of it away.
    Gradients are finite wherever the entropy is, also at ``-inf`` logits and at zero
    probabilities (0 there, where the derivative ``-log p - 1`` is infinite).

    Parameters
    ----------
    p : array
        The distributions along `axis`, as probabilities, log-probabilities or logits (see
        `form`).
    axis : int, optional
        The axis that holds each distribution. Default -1.
    form : {'probs', 'log_probs', 'logits'}, optional
        How `p` is given. Logits are divided by `temperature` and normalised along `axis`.
        Default 'probs'.
    temperature, where, reduction, validate, xp, normalizer : optional
        As in :func:`kl_divergence`.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        Of the input's library, device and dtype (float16 and bfloat16 are accumulated in
        float32): one value per distribution, or their reduction.

    See Also
    --------
    cross_entropy : ``-sum p log q = H(P) + KL(P || Q)``; H(P) is ``cross_entropy(p, p)``.
    scipy.stats.entropy : ``entropy(p, axis=axis)``, of `p` divided by its sum.
    scipy.special.entr : The pointwise terms ``-p log p``.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> klx.entropy(np.array([0.5, 0.5, 0.0]))  # log 2
    array(0.6931...)
    >>> klx.entropy(np.array([[0.0, 1.0], [2.0, 2.0]]), form="logits", temperature=0.5)
    array([0.3653..., 0.6931...])
    """
    call = parse_divergence(
        ENTROPY,
        p,
        # P again, as a view: torch.compile cannot trace the closed-form row's
        # autograd.Function given one tensor twice (its derivative reads the second);
        # not an array: as given, for the checks' message
        p[...] if library(p) is not None else p,
        axis=axis,
        p_form=form,
        q_form=form,
        temperature=temperature,
        where=where,
        reduction=reduction,
        validate=validate,
        xp=xp,
        normalizer=normalizer,
        sequence_axis=sequence_axis,
        token_budget=token_budget,
        group_ids=group_ids,
        form_names=("form", "form"),
    )
    return evaluate(call, _HINTS)
