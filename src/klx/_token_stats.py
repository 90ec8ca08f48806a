"""`token_stats`: per-token RL statistics of logits (log-probability of the label, entropy,
KL to a reference, log-sum-exp), every one from the same shifted logits."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from klx._backends import library
from klx._checks import (
    check_float,
    check_temperature,
    check_temperature_range,
    check_where,
    normalize_axis,
)
from klx._dtypes import accumulation_dtype, numpy_quiet
from klx._namespace import array_namespace, check_same_device, is_concrete
from klx._token_stats_math import StatsSpec, stats_values
from klx._typing import Array, Shape

__all__ = [
    "STATS",
    "TokenStatsCall",
    "check_ignore_index",
    "check_labels",
    "check_stats",
    "stats_rows",
    "token_stats",
]

#: The statistics, in the order a result lists them.
STATS = ("logprob", "entropy", "kl", "lse")
#: How a reference can be given.
REFERENCE_FORMS = ("logits", "log_probs", "probs")


class TokenStatsCall(NamedTuple):
    """A checked call of :func:`klx.token_stats`; the vocabulary is on the last axis of
    `logits` and `reference` (moved there), `labels` and `keep` have the batch shape."""

    xp: ModuleType
    logits: Array
    labels: Array | None
    reference: Array | None
    keep: Array | None
    spec: StatsSpec
    batch_shape: Shape
    acc: Any


def token_stats(
    logits: Array,
    labels: Array | None = None,
    reference: Array | None = None,
    *,
    stats: Sequence[str] | str | None = None,
    axis: int = -1,
    temperature: float | Array = 1.0,
    reference_form: str = "logits",
    where: Array | None = None,
    ignore_index: int = -100,
    xp: ModuleType | None = None,
) -> dict[str, Array]:
    r"""Per-token RL statistics of logits: log-probability, entropy, KL, log-sum-exp.

    The log-probability of each token's label (the sampled token), the entropy of the
    policy, its KL to a reference model and the log-sum-exp, from one pass of the math.

    With :math:`z` the logits of one token divided by `temperature` :math:`T`,
    :math:`P = \mathrm{softmax}(z)` and :math:`y` its label:

    .. math::

        \mathrm{lse} = \log \sum_v e^{z_v}, \qquad
        \mathrm{logprob} = z_y - \mathrm{lse}, \qquad
        H(P) = \mathrm{lse} - \sum_v p_v z_v, \qquad
        \mathrm{KL}(P \,\|\, Q) = \sum_v p_v (\log p_v - \log q_v),

    :math:`Q` the reference's distribution (from its logits at the same temperature, or its
    log-probabilities). The row maximum and the log-sum-exp are taken once, and every
    statistic is derived from the same shifted logits :math:`s = (z - \max z)`: the
    log-sum-exp is ``max + log1p(mass beside the maximum)`` (exact for nearly one-hot
    rows), the entropy ``log1p(...) + sum p (-s)``, a sum of terms ``>= 0`` (never
    negative, 0 for a one-hot row, no NaN at ``-inf`` logits). The KL is the terms of
    :func:`kl_divergence` between logits (exactly 0 for equal rows, never negative,
    accurate near P = Q). Gradients of every statistic are finite wherever the value is,
    ``-inf`` logits included.

    Parameters
    ----------
    logits : array
        The policy's logits, the vocabulary along `axis`.
    labels : array of int, optional
        The sampled tokens, the batch shape (the logits' shape without `axis`). Tokens
        whose label is `ignore_index` are dropped like `where` drops them. A label outside
        ``[0, vocab)`` is a ValueError where its value can be read (a device sync on a
        GPU); under ``jax.jit`` / ``torch.compile`` its log-probability is NaN.
    reference : array, optional
        The reference model's distribution, the shape of `logits`, in `reference_form`.
    stats : sequence of str, optional
        Which of 'logprob', 'entropy', 'kl', 'lse' to compute. By default every one the
        inputs allow: 'entropy' and 'lse' always, 'logprob' with `labels`, 'kl' with
        `reference`.
    axis : int, optional
        The vocabulary axis. Default -1.
    temperature : float or 0-d array, optional
        The logits (and reference logits) are divided by it. Default 1.
    reference_form : {'logits', 'log_probs', 'probs'}, optional
        How `reference` is given. Default 'logits'.
    where : bool array, optional
        Which tokens to keep, broadcastable to the batch shape. Dropped tokens are 0 in
        value and gradient, even where their row holds NaN.
    ignore_index : int, optional
        The label of tokens to drop. Default -100.
    xp : namespace, optional
        The array namespace; by default that of the arrays.

    Returns
    -------
    dict of str to array
        One array per statistic asked for, keyed by its name in the order of
        ``('logprob', 'entropy', 'kl', 'lse')``: the batch shape, the logits' library and
        device, their dtype (float32 for float16 / bfloat16).

    Raises
    ------
    TypeError, ValueError
        For an unknown statistic, 'logprob' without `labels` or 'kl' without
        `reference`, shapes or dtypes that do not fit, and labels out of range.

    See Also
    --------
    fused_linear_token_stats : The same from hidden states and the output layer, without
        the [tokens, vocab] logits.
    entropy : H(P) with the divergences' options.
    kl_divergence : KL(P || Q) with reductions.
    kl_estimate : Sampled KL estimators (k1, k2, k3) from the tokens' log-probabilities.

    Notes
    -----
    What the RL libraries compute with several passes over the logits: verl's
    ``logprobs_from_logits`` and ``entropy_from_logits``, TRL's ``selective_log_softmax``
    and ``entropy_from_logits``, OpenRLHF's ``log_probs_from_logits``; and
    ``torch.nn.functional.log_softmax`` + ``gather``.

    Speed: NumPy arrays and torch CPU tensors take the values in place on klx's own
    temporaries (as fast as that plain recipe or faster); the gradient is one closed-form
    expression of the softmax, ``p (g_lse - g_y - g_H (log p + H) + g_KL (d - KL)) / T +
    g_y onehot(y) / T`` (a ``torch.autograd.Function``, eager and inside
    ``torch.compile``; a ``jax.custom_jvp``), which recomputes the softmax from the
    logits rather than keeping it.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> z = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, -np.inf]])
    >>> out = klx.token_stats(z, labels=np.array([0, 1]), reference=np.zeros((2, 3)))
    >>> list(out)
    ['logprob', 'entropy', 'kl', 'lse']
    >>> out["logprob"], out["entropy"]
    (array([-0.4076..., -0.6931...]), array([0.8323..., 0.6931...]))
    >>> out["kl"]  # KL to the uniform distribution over 3 tokens
    array([0.2662..., 0.4054...])
    """
    call = parse_token_stats(
        logits,
        labels,
        reference,
        stats=stats,
        axis=axis,
        temperature=temperature,
        reference_form=reference_form,
        where=where,
        ignore_index=ignore_index,
        xp=xp,
    )
    xp = call.xp
    with numpy_quiet(call.logits):
        z = xp.astype(call.logits, call.acc, copy=False)
        ref = None if call.reference is None else xp.astype(call.reference, call.acc, copy=False)
        rows = stats_rows(xp, call.spec, z, call.labels, ref, call.keep)
        return dict(zip(call.spec.names, rows, strict=True))


def parse_token_stats(
    logits: Array,
    labels: Array | None,
    reference: Array | None,
    *,
    stats: object,
    axis: object,
    temperature: object,
    reference_form: object,
    where: Array | None,
    ignore_index: object,
    xp: ModuleType | None,
) -> TokenStatsCall:
    """Check the arguments of :func:`token_stats` (shapes, dtypes, options; the labels'
    range where their values can be read)."""
    named: list[tuple[str, Any]] = [("logits", logits), ("where", where)]
    if labels is not None:
        named.append(("labels", labels))
    if reference is not None:
        named.append(("reference", reference))
    xp = array_namespace(named, xp)
    check_float(xp, "logits", logits)
    names = check_stats(stats, labels is not None, reference is not None)
    form = _check_reference_form(reference_form)
    t = check_temperature(temperature, ("logits",), xp, form_names=("logits",))
    ignore = check_ignore_index(ignore_index)
    check_same_device(named, xp)
    shape = tuple(logits.shape)
    ax = normalize_axis(axis, len(shape))
    batch_shape = shape[:ax] + shape[ax + 1 :]
    if reference is not None:
        check_float(xp, "reference", reference)
        if tuple(reference.shape) != shape:
            msg = (
                f"`reference` has shape {tuple(reference.shape)} but `logits` has shape "
                f"{shape}; give the reference model's distribution over the same tokens and "
                "vocabulary (the same shape)."
            )
            raise ValueError(msg)
    dtype = logits.dtype if reference is None else xp.result_type(logits, reference)
    acc = accumulation_dtype(xp, dtype)
    check_temperature_range(t, xp.finfo(acc))
    keep = None
    if where is not None:
        check_where(xp, where, batch_shape)
        keep = xp.broadcast_to(where, batch_shape) if tuple(where.shape) != batch_shape else where
    if labels is not None:
        check_labels(xp, labels, batch_shape, shape[ax], ignore, "logits")
    if ax != len(shape) - 1:
        logits = xp.moveaxis(logits, ax, -1)
        reference = None if reference is None else xp.moveaxis(reference, ax, -1)
    spec = StatsSpec(names, t, form, ignore)
    return TokenStatsCall(xp, logits, labels, reference, keep, spec, batch_shape, acc)


def check_stats(stats: object, has_labels: bool, has_reference: bool) -> tuple[str, ...]:
    """The statistics asked for, in :data:`STATS` order; None: every one the inputs allow."""
    if stats is None:
        wanted = {"entropy", "lse"}
        if has_labels:
            wanted.add("logprob")
        if has_reference:
            wanted.add("kl")
        return tuple(s for s in STATS if s in wanted)
    asked = (stats,) if isinstance(stats, str) else stats
    valid = ", ".join(repr(s) for s in STATS)
    try:
        names = list(asked)  # type: ignore[call-overload]
    except TypeError:
        msg = f"`stats` must be a sequence of names among {valid}, got {stats!r}."
        raise TypeError(msg) from None
    for name in names:
        if not isinstance(name, str) or name not in STATS:
            msg = f"`stats` holds {name!r}, which is not a statistic; use names among {valid}."
            raise ValueError(msg)
    if not names:
        msg = f"`stats` is empty; ask for at least one of {valid} (or leave it None)."
        raise ValueError(msg)
    if "logprob" in names and not has_labels:
        msg = (
            "'logprob' (the log-probability of each token's label) needs `labels`; pass "
            "labels=..., or leave 'logprob' out of `stats`."
        )
        raise ValueError(msg)
    if "kl" in names and not has_reference:
        msg = (
            "'kl' (KL(policy || reference) per token) needs `reference`; pass "
            "reference=..., or leave 'kl' out of `stats`."
        )
        raise ValueError(msg)
    return tuple(s for s in STATS if s in names)


def _check_reference_form(form: object) -> str:
    if not isinstance(form, str) or form not in REFERENCE_FORMS:
        valid = ", ".join(repr(f) for f in REFERENCE_FORMS)
        msg = f"`reference_form` must be one of {valid}, got {form!r}."
        raise ValueError(msg)
    return form


def check_ignore_index(ignore_index: object) -> int:
    """`ignore_index` as an int (a TypeError naming it otherwise)."""
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__"):
        msg = f"`ignore_index` must be an int (the label of tokens to drop), got {ignore_index!r}."
        raise TypeError(msg)
    return int(ignore_index)


def check_labels(
    xp: ModuleType, labels: Array, batch_shape: Shape, vocab: int | None, ignore: int, of: str
) -> None:
    """Integer labels of the batch shape, in ``[0, vocab)`` or `ignore` (read only where
    the values can be read now: not traced, not a lazy Dask graph)."""
    if not xp.isdtype(labels.dtype, "integral"):
        msg = (
            f"`labels` must have an integer dtype (the sampled token ids), got {labels.dtype}; "
            "convert it with `astype` to an integer dtype."
        )
        raise TypeError(msg)
    if tuple(labels.shape) != tuple(batch_shape):
        msg = (
            f"`labels` has shape {tuple(labels.shape)}, but the batch shape of `{of}` is "
            f"{tuple(batch_shape)}; give one label per token."
        )
        raise ValueError(msg)
    lib = library(labels)
    if vocab is None or not (lib is None or lib.values_readable(labels)):
        return
    if not is_concrete(labels):
        return
    wide = labels if xp.iinfo(labels.dtype).bits >= 32 else xp.astype(labels, xp.int64)
    bad = ((wide < 0) | (wide >= vocab)) & (wide != ignore)
    if not is_concrete(bad):  # concrete labels inside jax.jit: staged, not readable
        return
    n = int(xp.sum(xp.astype(bad, xp.int32)))
    if n:
        msg = (
            f"`labels` holds {n} label(s) outside [0, {vocab}) (the vocabulary size) that are "
            f"not `ignore_index` ({ignore}); give token ids of the vocabulary, or "
            "`ignore_index` for tokens to drop."
        )
        raise ValueError(msg)


def stats_rows(
    xp: ModuleType,
    spec: StatsSpec,
    z: Array,
    labels: Array | None,
    reference: Array | None,
    keep: Array | None,
) -> tuple[Array, ...]:
    """The statistics of `spec` per token, in its order, from raw logits `z` [..., vocab]
    in the accumulation dtype (the reference likewise); `labels` and `keep` have the batch
    shape. Dropped tokens (by `keep`, or a label equal to ``spec.ignore_index``) are 0.

    The math is :func:`stats_values` (values) and :func:`stats_cotangents` (gradients);
    the libraries with a faster way to run it take it here: torch (an autograd Function
    with the closed-form gradient, eager and inside ``torch.compile``; in-place passes on
    CPU tensors; eager CUDA tensors' values by the Triton row kernel of
    :mod:`klx._accel.triton_token_stats`), JAX (a ``jax.custom_jvp``), NumPy (in-place
    passes); others, the values by :func:`stats_values` as they are.
    """
    lib = library(z)
    name = None if lib is None else lib.name
    if name == "torch":
        from klx._accel import gates, token_stats_torch

        rows: tuple[Array, ...]
        if gates.token_stats_refusal(z, reference, spec.temperature, spec.reference_form) is None:
            from klx._accel import triton_token_stats

            rows = triton_token_stats.rows(xp, spec, z, labels, reference, keep)
        else:
            rows = token_stats_torch.rows(xp, spec, z, labels, reference, keep)
        return rows
    if name == "jax":
        from klx._accel import token_stats_jax

        rows = token_stats_jax.rows(xp, spec, z, labels, reference, keep)
        return rows
    if name == "numpy":
        from klx._accel import token_stats_eager

        return token_stats_eager.rows(xp, spec, z, labels, reference, keep)
    return stats_values(xp, spec, z, labels, reference, keep)[0]
