"""`kl_div`: the contract of :func:`torch.nn.functional.kl_div`, on every array library."""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

from klx import _accel
from klx._backends import library
from klx._call import KLDivCall, parse_kl_div
from klx._dtypes import as_array, numpy_quiet
from klx._typing import Array
from klx._validation import check_distribution

__all__ = ["KLDivMeanWarning", "kl_div"]


class KLDivMeanWarning(UserWarning):
    """``reduction='mean'`` averages over every element, which is not the KL divergence."""


_MEAN_WARNING = (
    "reduction='mean' divides the total by the number of elements (batch size times "
    "support size), so it is not the KL divergence; 'batchmean' divides by the batch size "
    "only, and klx.kl_divergence(p, q, reduction='batchmean') averages over distributions "
    "whichever axis holds them. (torch.nn.functional.kl_div warns the same way.)"
)


def kl_div(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    log_target: bool = False,
    validate: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""The KL divergence with the contract of :func:`torch.nn.functional.kl_div`.

    The pointwise terms are

    .. math::

        \ell = y \, (\log y - x) \quad\text{or, with ``log_target=True``,}\quad
        \ell = e^{y} \, (y - x),

    with ``x = input`` (log-probabilities of Q) and ``y = target`` (probabilities of P, or
    their logs), so that summed over a distribution they give KL(P || Q): note the order,
    the *target* comes first in the divergence. Terms where P is 0 are 0, whatever Q is
    (torch gives NaN when ``input`` is ``-inf`` there); P > 0 with ``input = -inf`` gives
    ``+inf``; NaN propagates.

    Parameters
    ----------
    input : array
        Log-probabilities of Q (e.g. the output of ``log_softmax``). Real floating dtype.
    target : array
        Probabilities of P, or their logs when `log_target` is True. It broadcasts against
        `input` by the NumPy rules.
    reduction : {'mean', 'batchmean', 'sum', 'none'}, optional
        'none' returns the terms; 'sum' their sum; 'mean' the sum divided by the number of
        terms (this is *not* the KL divergence and warns with :class:`KLDivMeanWarning`,
        as torch does); 'batchmean' the sum divided by ``input.shape[0]`` (the KL divergence
        averaged over a batch whose distributions lie along the last axes; for 0-d input, the
        sum). Default 'mean', as in torch.
    log_target : bool, optional
        Whether `target` holds log-probabilities. Default False.
    validate : bool or None, optional
        Check the values first (a GPU synchronisation): `input` must be log-probabilities and
        `target` probabilities (or log-probabilities) that sum to 1 along the last axis.
        None (the default) follows :func:`klx.set_validation` / :func:`klx.validation`.
    xp : namespace, optional
        The array namespace; by default that of the arrays.

    Returns
    -------
    array
        An array of the inputs' library, on their device, of the promoted dtype of
        `input` and `target` (float16 and bfloat16 are accumulated in float32): the
        broadcast shape for 'none', 0-d otherwise.

    Raises
    ------
    TypeError
        Arrays from two libraries, non-arrays, or non-floating dtypes.
    ValueError
        An unknown reduction, shapes that do not broadcast, arrays on two devices, or
        (when validating) values that are not what the arguments promise.

    See Also
    --------
    kl_divergence : KL(P || Q) in the order the formula reads, over an explicit axis.
    torch.nn.functional.kl_div : The torch original.
    optax.kl_divergence, optax.kl_divergence_with_log_targets : Optax's equivalents.
    scipy.special.rel_entr : The pointwise terms ``y log(y / exp(x))`` in SciPy.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> target = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    >>> log_q = np.log(np.array([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]))
    >>> klx.kl_div(log_q, target, reduction="batchmean")  # mean KL over the 2 rows
    array(0.3891...)
    >>> klx.kl_div(np.array([-np.inf]), np.array([0.0]), reduction="sum")  # torch: nan
    array(0.)
    """
    call = parse_kl_div(input, target, reduction, log_target, validate, xp)
    if call.validate:
        _validate(call)
    if call.reduction == "mean" and not _compiling(input):
        # (not inside torch.compile(fullgraph=True), which cannot trace a warning)
        warnings.warn(_MEAN_WARNING, KLDivMeanWarning, stacklevel=2)
    with numpy_quiet(input):
        return as_array(_accel.evaluate_kl_div(call))


def _compiling(x: Any) -> bool:
    lib = library(x)
    return lib is not None and lib.compiling()


def _validate(call: KLDivCall) -> None:
    # torch's convention: the distributions lie along the last axis.
    xp = call.xp
    check_distribution(
        xp,
        "input",
        call.input,
        "log_probs",
        axis=-1 if call.input.ndim else None,
        hint_logits="if they are logits, pass their log_softmax",
    )
    check_distribution(
        xp,
        "target",
        call.target,
        "log_probs" if call.log_target else "probs",
        axis=-1 if call.target.ndim else None,
        hint_log="pass log_target=True if `target` holds log-probabilities",
        hint_probs="pass log_target=False if `target` holds probabilities",
        hint_logits="if they are logits, pass their log_softmax",
    )
