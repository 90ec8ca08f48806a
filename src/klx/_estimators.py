"""`kl_estimate`: sampled estimators of KL(P || Q) for RL (Schulman's k1, k2, k3)."""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any, NamedTuple

from klx._aggregation import AGGREGATIONS, Aggregation, aggregate_rows, split_reduction
from klx._agnostic import log_softmax, reduce_rows, shape_size
from klx._backend_ops import _inductor_cpu, stop_gradient, take_along_axis, with_derivative
from klx._backends import library
from klx._call import normalizer_array
from klx._checks import (
    REDUCTIONS,
    broadcast_shapes,
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
from klx._validation import _count, _require_concrete, check_distribution

__all__ = ["ESTIMATORS", "GRADIENTS", "k3_from_log_ratio", "kl_estimate"]


#: Schulman's estimators, by the names verl's `kl_penalty` and OpenRLHF's
#: `compute_approx_kl` give them.
ESTIMATORS = ("k1", "k2", "k3")
#: What the gradient of the estimate is.
GRADIENTS = ("estimator", "straight_through", "importance")

#: 1 / (j + 2)! for j = 0 .. 14: e^r - 1 - r = r^2 sum_j r^j / (j + 2)!, whose truncation
#: after r^16 is exact to float64 rounding (relative 6e-18) for |r| <= 1/2. Beyond 1/2,
#: expm1(r) - r loses at most a few ulps to cancellation.
_K3_SERIES = tuple(1.0 / math.factorial(j + 2) for j in range(15))
_K3_SERIES_RADIUS = 0.5


class Sampler(NamedTuple):
    """How the sampler drew the tokens: :func:`klx.kl_estimate` given full logits.

    `tokens` is broadcast to the batch shape and `mask` to the full shape (the
    vocabulary at `axis`), or None.
    """

    tokens: Array
    mask: Array | None
    #: A float, or a 0-d array of the inputs' library.
    temperature: Any
    axis: int
    vocab: int
    #: `log_p_old` is over the vocabulary too (else: per token, as the sampler gave it).
    old_full: bool


class EstimateCall(NamedTuple):
    """A checked call of :func:`klx.kl_estimate`.

    With `sampler`, `log_p`, `log_q` (and `log_p_old` where ``sampler.old_full``) are
    over the vocabulary at ``sampler.axis``, and `shape` is the batch shape (one value
    per sampled token).
    """

    xp: ModuleType
    log_p: Array
    log_q: Array
    log_p_old: Array | None
    sampler: Sampler | None
    validate: bool
    estimator: str
    gradient: str
    clamp: float | None
    #: The `where` mask broadcast to `shape`, or None.
    keep: Array | None
    reduction: str
    normalizer: float | Array | None
    shape: Shape
    dtype: Any
    acc: Any
    #: An aggregation mode: `reduction` is then 'none' and this reduces the per-token values.
    aggregation: Aggregation | None = None


def kl_estimate(
    log_p: Array,
    log_q: Array,
    *,
    estimator: str = "k3",
    gradient: str = "estimator",
    log_p_old: Array | None = None,
    tokens: Array | None = None,
    sampling_mask: Array | None = None,
    temperature: float | Array = 1.0,
    axis: int = -1,
    clamp: float | None = None,
    where: Array | None = None,
    reduction: str = "none",
    normalizer: float | Array | None = None,
    validate: bool | None = None,
    xp: ModuleType | None = None,
    sequence_axis: int | None = None,
    token_budget: float | None = None,
    group_ids: Array | None = None,
) -> Array:
    r"""A sampled estimate of KL(P || Q) from tokens drawn from P (the policy).

    With :math:`r = \log q(x) - \log p(x)` for a sampled token :math:`x \sim P`
    (Schulman, "Approximating KL divergence", 2020):

    .. math::

        k_1 = -r, \qquad k_2 = \tfrac12 r^2, \qquad k_3 = (e^r - 1) - r.

    :math:`E_P[k_1] = E_P[k_3] = \mathrm{KL}(P \,\|\, Q)` (unbiased); :math:`k_2` is biased
    (:math:`E_P[k_2] = \tfrac12 E_P[r^2]`, close to the KL only when P and Q are close);
    :math:`k_2, k_3 \ge 0`. :math:`k_3` is computed from :math:`r` in log space
    (``expm1(r) - r``, and a series for :math:`|r| \le 1/2`, which keeps full relative
    precision as :math:`k_3 \to 0`): it never forms :math:`q / p`, is exact where
    :math:`p \gg q` (:math:`e^r` underflows to 0, :math:`k_3 = -1 - r`), and overflows to
    ``inf`` only where the value itself exceeds the dtype's range. Nothing is clamped unless
    you pass `clamp`. An infinite log-ratio gives ``inf`` (Q = 0 where P sampled); NaN
    propagates.

    **As the sampler drew the tokens.** Sampling with a temperature :math:`T` and top-k /
    top-p truncation draws from :math:`\tilde P`, not from P. Given `tokens` (the sampled
    ids), `log_p` and `log_q` are the full logits (or log-probabilities) over the
    vocabulary at `axis`, and both are put on the sampler's support, the same for both:

    .. math::

        \log \tilde p(x) = x^P_{t}/T - \log \sum_{v \in M} e^{x^P_v / T},
        \qquad \log \tilde q(x) = x^Q_{t}/T - \log \sum_{v \in M} e^{x^Q_v / T},

    with :math:`t` the sampled id and :math:`M` the `sampling_mask` at its position (every
    id when None); the estimator is taken on these per-token log-probabilities, so every
    statement above holds with :math:`\tilde P, \tilde Q` for P, Q: :math:`E_{\tilde
    P}[k_1] = E_{\tilde P}[k_3] = \mathrm{KL}(\tilde P \,\|\, \tilde Q)`, the KL between
    the truncated, tempered distributions, and the gradient options' targets are those
    of :math:`\tilde P_\theta` (the mask held fixed, as the sampler drew it). `log_p_old`
    over the vocabulary is put on the same support, so the importance ratio
    :math:`\tilde\pi_\theta / \tilde\pi_\mathrm{old}` is 1 on-policy; it is always
    per token, never a sequence's product broadcast over its tokens. A sampled id outside
    `sampling_mask` has probability 0 under both: its estimate is NaN
    (:math:`-\infty - (-\infty)`), with finite gradients elsewhere; validation mode raises.

    Parameters
    ----------
    log_p : array
        :math:`\log \pi_\theta(x)` of the sampled tokens under the policy P (any shape);
        with `tokens`, the policy's logits (or log-probabilities) over the vocabulary at
        `axis`.
    log_q : array
        :math:`\log \pi_\mathrm{ref}(x)` of the same tokens under the reference model Q;
        broadcast against `log_p` (with `tokens`, Q's logits over the same vocabulary).
    estimator : {'k1', 'k2', 'k3'}, optional
        Default 'k3' (verl's 'low_var_kl', OpenRLHF's 'k3').
    gradient : {'estimator', 'straight_through', 'importance'}, optional
        What the gradient of the estimate is, with respect to the policy's parameters
        :math:`\theta` and the samples held fixed (the usual loss; expectations over
        :math:`x \sim P_\theta`):

        * 'estimator' (default): the estimator's own gradient. :math:`E[\nabla k_1] = 0`;
          :math:`E[\nabla k_2] = \nabla_\theta \mathrm{KL}(P_\theta \| Q)`;
          :math:`E[\nabla k_3] = \nabla_\theta \mathrm{KL}(Q \| P_\theta)`, the gradient
          of the *other* direction of the KL, not of the KL that `k3` estimates.
        * 'straight_through': the value of the chosen estimator with the gradient of
          :math:`k_2`, so :math:`E[\nabla] = \nabla_\theta \mathrm{KL}(P_\theta \| Q)`
          whatever the estimator (verl's ``kl_loss_type`` 'k1+', 'k3+').
        * 'importance': :math:`\rho \, k_n` with the importance weight
          :math:`\rho = \pi_\theta(x) / \pi_\mathrm{old}(x)` (DeepSeek-V3.2, eq. 7), whose
          gradient :math:`\rho (k_n \nabla \log \pi_\theta + \nabla k_n)` has expectation
          :math:`\nabla_\theta E_{P_\theta}[k_n]`: exactly
          :math:`\nabla_\theta \mathrm{KL}(P_\theta \| Q)` for k1 and k3 (for k2, the
          gradient of its biased mean). On-policy (`log_p_old` None) :math:`\rho` is
          ``exp(log_p - stop_gradient(log_p))``: 1 in value, so the value is :math:`k_n`.
    log_p_old : array, optional
        With ``gradient='importance'`` only: the log-probabilities of the samples under
        the policy that drew them (:math:`\pi_\mathrm{old}`, e.g. before this step's
        updates in PPO/GRPO). The value :math:`\rho k_n` is then an unbiased estimate of
        KL(P || Q) (k1, k3) from samples of :math:`\pi_\mathrm{old}`. With `tokens`:
        either the old policy's logits over the vocabulary (the shape of `log_p`, put on
        the sampler's support like `log_p`), or the sampler's own log-probabilities of
        the sampled tokens (the shape of `tokens`), used as given: they must then be of
        the truncated, tempered distribution (vLLM ``logprobs_mode='processed_logprobs'``
        with the temperature applied), not the raw ones (TRL issue #4159: a ratio of 2.0
        at T = 0.6).
    tokens : array of int, optional
        The sampled ids, one per position (the shape of `log_p` without `axis`). Given,
        `log_p` and `log_q` are read as full logits and the estimate is taken on the
        sampler's support (see above). Ids outside ``[0, V)`` are a ValueError wherever
        their values can be read; traced, their estimate is NaN. Ids where `where` is
        False are never read (padding ids such as -100 are fine there).
    sampling_mask : bool array, optional
        The ids the sampler could draw at each position (its top-k / top-p / min-p
        support, as DeepSeek-V3.2 and vLLM's ``return_sampling_mask`` keep it): the shape
        of `log_p`, or one that broadcasts to it with the whole vocabulary at `axis`.
        Needs `tokens`.
    temperature : float or 0-d array, optional
        The sampler's temperature, dividing the logits of P, Q (and the old policy)
        before they are renormalised. Default 1; another value needs `tokens`.
    axis : int, optional
        The vocabulary axis of the full logits (with `tokens` only). Default -1.
    clamp : float, optional
        Clip each :math:`k_n` to ``[-clamp, clamp]`` (before the gradient option is
        applied; a clipped entry has no gradient of its own). Off by default; verl's
        'low_var_kl' clips k3 to [-10, 10] and its log-ratio to [-20, 20].
    where : bool array, optional
        Which tokens to keep, broadcastable to the samples' shape. Dropped tokens
        contribute 0 in value and gradient, even if they hold NaN or ``inf``.
    reduction : str, optional
        'none': one value per token; 'sum'; 'batchmean': the mean over the kept tokens
        (0, with gradient 0, if none is kept); or an RL aggregation mode over sequences
        ('token-mean', 'seq-mean-token-mean', ...: :func:`klx.aggregate`).
    normalizer : float or 0-d array, optional
        As in :func:`kl_divergence`: with 'batchmean', divide the sum by this number
        instead of the count of kept tokens (e.g. the tokens of all micro-batches of a
        step; 0 gives 0); with an aggregation mode, its divisor over the whole step.
    validate : bool, optional
        With `tokens`: read the values and raise ValueError for logits that are not a
        distribution (NaN, ``+inf``), ids outside the vocabulary or outside
        `sampling_mask` (kept tokens only). None (default) follows
        :func:`klx.set_validation`. Per-token inputs are not read.
    xp : namespace, optional
        The array namespace; by default that of the arrays.
    sequence_axis, token_budget, group_ids : optional
        With an aggregation mode, as in :func:`kl_divergence`.

    Returns
    -------
    array
        One value per sampled token (the shape of the per-token inputs, or of `tokens`)
        or their reduction, of the inputs' library, device and promoted dtype (float16
        and bfloat16 are computed in float32).

    Raises
    ------
    TypeError, ValueError
        For options, dtypes and shapes always (`sampling_mask`, a temperature other than
        1 or `axis` without `tokens`; `tokens` not integer; vocabularies that differ);
        for ids outside the vocabulary where values can be read; for ids outside
        `sampling_mask` in validation mode.

    See Also
    --------
    kl_divergence : The exact KL when both full distributions are at hand.
    sparse_kl_divergence : The KL against a teacher known on its top k ids.

    Notes
    -----
    Equivalents elsewhere: verl ``kl_penalty(logprob, ref_logprob, kl_penalty)`` with 'k1'
    ('kl'), 'k2' ('mse'), 'k3' ('low_var_kl', clamped), and 'k1+' / 'k3+' for the
    straight-through form; OpenRLHF ``compute_approx_kl(log_probs, log_probs_base,
    kl_estimator)`` with 'k1', 'k2', 'k3'; TRL's GRPOTrainer per-token KL is k3.
    TRL and verl compute the trainer's log-probabilities as ``log_softmax(logits / T)``
    over the whole vocabulary while vLLM samples from (and, with
    ``processed_logprobs``, reports) the truncated distribution: the ratio is then off
    by the kept mass (TRL #6789); pass `sampling_mask` to put both on the sampler's
    support. TRL's sequence-level importance ratio (``vllm_importance_sampling_mode=
    'sequence_*'``) broadcast over the tokens adds the other tokens' terms to each
    token's gradient (TRL #6594); here the ratio is per token.

    References
    ----------
    J. Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html.
    DeepSeek-AI, "DeepSeek-V3.2", 2025, section 3.1 (unbiased KL estimate), eq. 7.

    Examples
    --------
    >>> import numpy as np
    >>> import klx
    >>> log_p = np.log(np.array([0.5, 0.2, 0.9]))  # the policy's sampled tokens
    >>> log_q = np.log(np.array([0.4, 0.3, 0.9]))  # the reference model's
    >>> klx.kl_estimate(log_p, log_q)  # k3 per token
    array([0.0231..., 0.0945..., 0.        ])
    >>> klx.kl_estimate(log_p, log_q, estimator="k1", reduction="batchmean")
    array(-0.0607...)

    As the sampler drew them: full logits over 4 ids, sampled at T = 0.7 from the top 2.

    >>> logits_p = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, 1.5, 1.0, 0.0]])
    >>> logits_q = np.array([[1.5, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    >>> top2 = np.array([[True, True, False, False], [False, True, True, False]])
    >>> klx.kl_estimate(
    ...     logits_p, logits_q, tokens=np.array([0, 2]), sampling_mask=top2, temperature=0.7
    ... )
    array([0.0158..., 0.1017...])
    """
    return evaluate_estimate(parse_estimate(**locals()))


def parse_estimate(
    log_p: Array,
    log_q: Array,
    *,
    estimator: object,
    gradient: object,
    log_p_old: Array | None,
    tokens: Array | None,
    sampling_mask: Array | None,
    temperature: object,
    axis: object,
    clamp: object,
    where: Array | None,
    reduction: object,
    normalizer: object,
    validate: object,
    xp: ModuleType | None,
    sequence_axis: object = None,
    token_budget: object = None,
    group_ids: object = None,
) -> EstimateCall:
    """Check the arguments of :func:`kl_estimate` (raising TypeError / ValueError)."""
    named = [("log_p", log_p), ("log_q", log_q), ("where", where)]
    if log_p_old is not None:
        named.append(("log_p_old", log_p_old))
    if tokens is not None:
        named.append(("tokens", tokens))
    if sampling_mask is not None:
        named.append(("sampling_mask", sampling_mask))
    if group_ids is not None:
        named.append(("group_ids", group_ids))
    named += normalizer_array(normalizer)
    xp = array_namespace(named, xp)
    check_float(xp, "log_p", log_p)
    check_float(xp, "log_q", log_q)
    est = _check_choice("estimator", estimator, ESTIMATORS)
    grad = _check_choice("gradient", gradient, GRADIENTS)
    red = check_reduction(reduction, REDUCTIONS + AGGREGATIONS)
    t = check_temperature(temperature, ("logits",), xp)
    check_same_device(named, xp)
    if log_p_old is not None:
        if grad != "importance":
            msg = (
                "`log_p_old` (the log-probabilities of the policy that drew the samples) "
                f"is used only by gradient='importance', got gradient={grad!r}; pass "
                "gradient='importance', or leave log_p_old=None."
            )
            raise ValueError(msg)
        check_float(xp, "log_p_old", log_p_old)
    sampler = None
    if tokens is None:
        _no_sampler_without_tokens(sampling_mask, t, axis)
        shapes = [("log_p", tuple(log_p.shape)), ("log_q", tuple(log_q.shape))]
        if log_p_old is not None:
            shapes.append(("log_p_old", tuple(log_p_old.shape)))
        shape = broadcast_shapes(shapes)
    else:
        sampler, shape = _parse_sampler(xp, log_p, log_q, log_p_old, tokens, sampling_mask, t, axis)
    red, norm, aggregation = split_reduction(
        xp,
        red,
        shape,
        sequence_axis=sequence_axis,
        normalizer=normalizer,
        token_budget=token_budget,
        group_ids=group_ids,
    )
    keep = None
    if where is not None:
        check_where(xp, where, shape)
        keep = xp.broadcast_to(where, shape) if tuple(where.shape) != shape else where
    dtype = xp.result_type(log_p, log_q)
    acc = accumulation_dtype(xp, dtype)
    check_temperature_range(t, xp.finfo(acc))
    return EstimateCall(
        xp,
        log_p,
        log_q,
        log_p_old,
        sampler,
        resolve_validate(validate),
        est,
        grad,
        _check_clamp(clamp),
        keep,
        red,
        norm,
        shape,
        dtype,
        acc,
        aggregation,
    )


def _no_sampler_without_tokens(sampling_mask: Array | None, t: Any, axis: object) -> None:
    """Per-token inputs: the sampler's options need the full logits and `tokens`."""
    given = []
    if sampling_mask is not None:
        given.append("`sampling_mask`")
    if not (isinstance(t, float) and t == 1.0):
        given.append(f"`temperature`={t!r}")
    if axis != -1:
        given.append(f"`axis`={axis!r}")
    if given:
        msg = (
            f"{' and '.join(given)} describe(s) the vocabulary, but `tokens` is None, so "
            "`log_p` and `log_q` are read as the sampled tokens' log-probabilities; pass "
            "the full logits (or log-probabilities) over the vocabulary as `log_p` and "
            "`log_q` with `tokens=` (the sampled ids), or leave these options out."
        )
        raise ValueError(msg)


def _parse_sampler(
    xp: ModuleType,
    log_p: Array,
    log_q: Array,
    log_p_old: Array | None,
    tokens: Array,
    sampling_mask: Array | None,
    t: Any,
    axis: object,
) -> tuple[Sampler, Shape]:
    """Check the full form of :func:`kl_estimate`; its sampler and batch shape."""
    if not xp.isdtype(tokens.dtype, "integral"):
        msg = (
            f"`tokens` must have an integer dtype (the sampled token ids), got "
            f"{tokens.dtype}; convert it with `astype` to an integer dtype."
        )
        raise TypeError(msg)
    nd = log_p.ndim
    ax = normalize_axis(axis, nd)
    p_shape = tuple(log_p.shape)
    if tokens.ndim != nd - 1 or log_q.ndim != nd:
        msg = (
            f"with `tokens`, `log_p` and `log_q` hold the whole vocabulary along `axis` "
            f"(one dimension more than `tokens`), got `tokens` of shape "
            f"{tuple(tokens.shape)}, `log_p` {p_shape} and `log_q` {tuple(log_q.shape)}; "
            "pass the logits (or log-probabilities) over the vocabulary, not the sampled "
            "tokens' log-probabilities."
        )
        raise ValueError(msg)
    vocab = p_shape[ax]

    def batch(x: Array) -> Shape:
        s = tuple(x.shape)
        return s[:ax] + s[ax + 1 :]

    full: list[tuple[str, Array]] = [("log_q", log_q)]
    shapes = [("tokens", tuple(tokens.shape)), ("log_p", batch(log_p)), ("log_q", batch(log_q))]
    old_full = False
    if log_p_old is not None:
        if log_p_old.ndim == nd:
            old_full = True
            full.append(("log_p_old", log_p_old))
            shapes.append(("log_p_old", batch(log_p_old)))
        elif log_p_old.ndim == nd - 1:
            shapes.append(("log_p_old", tuple(log_p_old.shape)))
        else:
            msg = (
                f"`log_p_old` has shape {tuple(log_p_old.shape)}; with `tokens` of shape "
                f"{tuple(tokens.shape)} give either the old policy's logits over the "
                f"vocabulary (the shape of `log_p`, {p_shape}) or the sampler's "
                "log-probabilities of the sampled tokens (the shape of `tokens`)."
            )
            raise ValueError(msg)
    if sampling_mask is not None:
        if sampling_mask.dtype != xp.bool:
            msg = (
                f"`sampling_mask` must be a boolean array (True where the sampler could "
                f"draw the token), got dtype {sampling_mask.dtype}; pass e.g. `mask != 0`."
            )
            raise TypeError(msg)
        if sampling_mask.ndim > nd:
            msg = (
                f"`sampling_mask` has shape {tuple(sampling_mask.shape)}; give one boolean "
                f"per vocabulary entry and position, the shape of `log_p` {p_shape} (or "
                "one that broadcasts to it, with the whole vocabulary along `axis`)."
            )
            raise ValueError(msg)
        # leading axes of size 1, by the broadcasting rules (a (V,) mask for every position)
        sampling_mask = sampling_mask[(None,) * (nd - sampling_mask.ndim) + (...,)]
        full.append(("sampling_mask", sampling_mask))
        shapes.append(("sampling_mask", batch(sampling_mask)))
    for name, x in full:
        if x.shape[ax] != vocab:
            msg = (
                f"`log_p` has {vocab} vocabulary entries along axis {ax} but `{name}` has "
                f"{x.shape[ax]}; give both over the same vocabulary."
            )
            raise ValueError(msg)
    shape = broadcast_shapes(shapes)
    mask = sampling_mask
    if mask is not None:
        mask = xp.broadcast_to(mask, (*shape[:ax], vocab, *shape[ax:]))
    toks = xp.broadcast_to(tokens, shape) if tuple(tokens.shape) != shape else tokens
    if vocab is None:
        msg = (
            "the vocabulary size (the size of `log_p` along `axis`) is unknown (a Dask "
            "array after boolean indexing); call `.compute_chunk_sizes()` on it first."
        )
        raise ValueError(msg)
    return Sampler(toks, mask, t, ax, vocab, old_full), shape


def evaluate_estimate(call: EstimateCall) -> Array:
    """Validate (if asked), then compute a checked call of :func:`kl_estimate`."""
    with numpy_quiet(call.log_p):
        if call.validate and call.sampler is not None:
            validate_sampled(call, call.sampler)
        return as_array(_estimate(call.xp, call))


def _estimate(xp: ModuleType, call: EstimateCall) -> Array:
    lp, lq, old = _per_token(xp, call)
    r = lq - lp  # log q - log p
    clamp = call.clamp
    if call.estimator == "k3" and call.gradient == "estimator":
        # d k3 / dr = e^r - 1, one expression of r (autodiff of the branches kept masks),
        # clipped inside: a clipped entry's derivative is 0, not 0 * e^r (NaN where e^r
        # overflows, r > 88.7 in float32)
        k = with_derivative(
            xp, r, lambda a: _k3_value(xp, a, clamp=clamp), lambda a: _k3_derivative(xp, a, clamp)
        )
    else:
        k = estimator_values(xp, call.estimator, r)
        if clamp is not None:
            k = xp.clip(k, -clamp, clamp)
    if call.gradient == "straight_through":
        # The value of k, the gradient of k2 = r^2 / 2 (0 where r is infinite, so that
        # an infinite value does not turn the gradient into NaN).
        finite = xp.isfinite(r)
        r_safe = xp.where(finite, r, 0.0)
        k2 = 0.5 * (r_safe * r_safe)
        k = (k2 - stop_gradient(k2)) + stop_gradient(k)
    elif call.gradient == "importance":
        old = lp if old is None else old
        if call.estimator == "k3" and call.clamp is None:
            k = importance_k3(xp, lp, lq, stop_gradient(old))
        else:
            k = xp.exp(lp - stop_gradient(old)) * k
    count = shape_size(call.shape)
    out = reduce_rows(xp, k, call.reduction, call.keep, count, call.normalizer)
    if call.aggregation is not None:
        out = aggregate_rows(xp, out, call.keep, call.aggregation)
    return xp.astype(out, call.dtype, copy=False)


def _per_token(xp: ModuleType, call: EstimateCall) -> tuple[Array, Array, Array | None]:
    """The sampled tokens' log-probabilities under P, Q and the old policy (or None)."""
    s = call.sampler
    if s is None:
        old = None if call.log_p_old is None else _prepare(xp, call.log_p_old, call)
        return _prepare(xp, call.log_p, call), _prepare(xp, call.log_q, call), old
    tokens, live = _sampled_ids(xp, call, s)
    mask = s.mask
    if mask is not None:
        mask = xp.moveaxis(mask, s.axis, -1) if s.axis != len(call.shape) else mask
        drawable = xp.any(mask, axis=-1)
        live = drawable if live is None else live & drawable
        # A position whose mask is empty, or that `where` drops, is renormalised over the
        # whole vocabulary instead (finite, with finite gradients); its value is set apart.
        safe = drawable if call.keep is None else drawable & call.keep
        mask = mask | ~xp.expand_dims(safe, axis=-1)
    column = xp.expand_dims(tokens, axis=-1)
    lp = _on_support(xp, call.log_p, call, s, column, mask, live)
    lq = _on_support(xp, call.log_q, call, s, column, mask, live)
    old = None
    if call.log_p_old is not None:
        if s.old_full:
            old = _on_support(xp, call.log_p_old, call, s, column, mask, live)
        else:
            old = _prepare(xp, call.log_p_old, call)
    return lp, lq, old


def _sampled_ids(xp: ModuleType, call: EstimateCall, s: Sampler) -> tuple[Array, Array | None]:
    """The sampled ids (0 where `where` drops a token), and which are in the vocabulary
    (None when all are).

    Read now where the values can be read: an id outside ``[0, V)`` is a ValueError.
    Traced (``jax.jit``, ``torch.compile``) or lazy (Dask), such a token is one the
    sampler could not draw: 0 stands in for the gather, and its estimate is NaN.
    """
    tokens = s.tokens
    if call.keep is not None:  # padding ids (-100) where nothing is kept
        tokens = xp.where(call.keep, tokens, xp.zeros_like(tokens))
    wide = tokens if xp.iinfo(tokens.dtype).bits >= 32 else xp.astype(tokens, xp.int32)
    outside = (wide < 0) | (wide >= s.vocab)
    lib = library(tokens)
    if (lib is None or lib.values_readable(tokens)) and is_concrete(outside):
        n = _count(xp, outside)
        if n:
            msg = (
                f"`tokens` holds {n} id(s) outside [0, {s.vocab}) (the vocabulary size of "
                "`log_p` along `axis`); give the sampled ids into that vocabulary (and drop "
                "padding positions with `where=`)."
            )
            raise ValueError(msg)
        return tokens, None
    return xp.where(outside, xp.zeros_like(tokens), tokens), ~outside


def _on_support(
    xp: ModuleType,
    x: Array,
    call: EstimateCall,
    s: Sampler,
    column: Array,
    mask: Array | None,
    live: Array | None,
) -> Array:
    """``log p~(token)`` of full logits `x`: ``x/T`` renormalised over the sampling mask.

    ``x_tok / T - logsumexp_{v in mask}(x_v / T)``; ``-inf`` for a token outside the
    mask (or not `live`). Entries outside the mask are ``-inf`` through a ``where``, so
    their gradient is 0, and a ``-inf`` result passes no gradient back (not NaN).
    """
    x = xp.astype(x, call.acc, copy=False)
    if s.axis != len(call.shape):
        x = xp.moveaxis(x, s.axis, -1)
    full = (*call.shape, s.vocab)
    if tuple(x.shape) != full:
        x = xp.broadcast_to(x, full)
    if call.keep is not None:  # dropped positions: a safe row, whatever they hold
        x = xp.where(xp.expand_dims(call.keep, axis=-1), x, 0.0)
    if mask is not None:
        x = xp.where(mask, x, -math.inf)
    t = s.temperature
    if not isinstance(t, float):
        t = xp.astype(t, call.acc, copy=False)
    tok = take_along_axis(xp, log_softmax(xp, x, -1, t), column, -1)[..., 0]
    impossible = tok == -math.inf
    if live is not None:
        impossible = impossible | ~live
    return xp.where(impossible, -math.inf, tok)


def _prepare(xp: ModuleType, x: Array, call: EstimateCall) -> Array:
    """`x` in the accumulation dtype, broadcast, with dropped tokens replaced by 0."""
    x = xp.astype(x, call.acc, copy=False)
    if tuple(x.shape) != call.shape:
        x = xp.broadcast_to(x, call.shape)
    return x if call.keep is None else xp.where(call.keep, x, 0.0)


def validate_sampled(call: EstimateCall, s: Sampler) -> None:
    """Raise ValueError for logits that are not a distribution, and for sampled ids
    outside the vocabulary or outside the sampling mask (kept tokens only)."""
    xp = call.xp
    keep_full = None if call.keep is None else xp.expand_dims(call.keep, axis=s.axis)
    full = [("log_p", call.log_p), ("log_q", call.log_q)]
    if s.old_full and call.log_p_old is not None:
        full.append(("log_p_old", call.log_p_old))
    for name, x in full:
        check_distribution(xp, name, x, "logits", axis=s.axis, keep_full=keep_full)
    _require_concrete("tokens", s.tokens)
    kept = xp.ones_like(s.tokens, dtype=xp.bool) if call.keep is None else call.keep
    wide = s.tokens if xp.iinfo(s.tokens.dtype).bits >= 32 else xp.astype(s.tokens, xp.int32)
    outside = kept & ((wide < 0) | (wide >= s.vocab))
    n = _count(xp, outside)
    if n:
        msg = (
            f"`tokens` holds {n} id(s) outside [0, {s.vocab}) (the vocabulary size of "
            "`log_p` along `axis`); give the sampled ids into that vocabulary (and drop "
            "padding positions with `where=`)."
        )
        raise ValueError(msg)
    if s.mask is None:
        return
    mask = xp.moveaxis(s.mask, s.axis, -1) if s.axis != len(call.shape) else s.mask
    ids = xp.expand_dims(xp.where(kept, s.tokens, xp.zeros_like(s.tokens)), axis=-1)
    allowed = take_along_axis(xp, xp.astype(mask, xp.int8), ids, -1)[..., 0]
    n = _count(xp, kept & (allowed == 0))
    if n:
        msg = (
            f"`tokens` holds {n} sampled id(s) outside `sampling_mask`, which the sampler "
            "could not have drawn (their estimate is NaN); pass the mask the sampler used "
            "at each position (its top-k / top-p support, over the same vocabulary), or "
            "drop those positions with `where=`."
        )
        raise ValueError(msg)


def estimator_values(xp: ModuleType, estimator: str, r: Array) -> Array:
    """Schulman's `estimator` of the log-ratio ``r = log q - log p``."""
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * (r * r)
    return k3_from_log_ratio(xp, r)


def k3_from_log_ratio(xp: ModuleType, r: Array) -> Array:
    """``e^r - 1 - r`` to full relative precision, without overflow before the result's.

    A series for ``|r| <= 1/2`` (where ``expm1(r) - r`` cancels), ``expm1(r) - r``
    elsewhere; ``+inf`` at ``r = +-inf``, NaN for NaN. Every branch is fed a safe value
    where it is not taken, so gradients stay finite (:func:`_k3_value` is the same value
    for a function whose derivative is given, without the guard of the exponential).
    """
    over = r > _log_max(xp, r)
    return _k3_value(xp, r, xp.where(over, 0.0, r))


def _log_max(xp: ModuleType, r: Array) -> float:
    """The largest finite ``log`` of `r`'s dtype (above it ``e^r`` overflows)."""
    return math.log(float(xp.finfo(r.dtype).max))


def _k3_value(
    xp: ModuleType, r: Array, r_exp: Array | None = None, clamp: float | None = None
) -> Array:
    """``e^r - 1 - r`` as :func:`k3_from_log_ratio`, with ``expm1(r_exp)`` for the range
    beyond the series (`r` itself by default: autodiff of this form would meet
    ``0 * inf`` where r overflows the exponential; for the value alone it need not),
    clipped to ``[-clamp, clamp]`` if `clamp` is given.

    Traced, each operation is one of a fused elementwise loop that a CPU computes at
    the speed of its arithmetic: one polynomial, one exponential and three selects
    against constants per element. Selects that combine masks, or a select that feeds
    the exponential (inductor's is a call, around which the loop's registers are saved),
    took 2.3x the plain ``exp(r) - 1 - r`` inside torch.compile on a CPU, this form 1.6x
    (the loop alone, one thread).
    """
    small, _, series = _k3_series(xp, r)
    eager = is_concrete(r)
    over = r > _log_max(xp, r)
    # Eager, the exponential is fed 0 above log(max) also for the value alone: a lazy
    # library (Dask) computes it later, outside klx's silenced overflow warnings.
    rb = r_exp if r_exp is not None else xp.where(over, 0.0, r) if eager else r
    # Beyond |r| = 1/2, traced: exp(r) - 1, what inductor's CPU code computes for expm1
    # and what XLA's expm1 computes there (besides a series of its own for small x, which
    # took jax.jit's k3 from 1.3x to 1.8x the plain formula); both within 4 ulps of k3
    # in float32. Eager, the library's expm1 (NumPy's float32 exp(r) - 1 loses 9 ulps
    # of k3 near r = 1/2, expm1 2).
    em1 = xp.expm1(rb) if eager else xp.exp(rb) - 1.0
    # Above log(max) the value exceeds the dtype's range: +inf (also at r = +inf, where
    # expm1(r) - r is inf - inf). r = -inf gives -1 + inf = +inf; NaN stays NaN (both
    # compares are False).
    big = xp.where(over, math.inf, em1 - rb)
    k = xp.where(small, series, big)
    return k if clamp is None else xp.clip(k, -clamp, clamp)


def _k3_series(xp: ModuleType, r: Array) -> tuple[Array, Array, Array]:
    """Where ``|r| <= 1/2`` (False for NaN), r there (0 elsewhere), and k3's series at it."""
    small = xp.abs(r) <= _K3_SERIES_RADIUS
    rs = xp.where(small, r, 0.0)
    # float32 (and what accumulates in it) needs 8 terms: the first left out is 1e-9 of
    # the sum; float64 all 15 (traced, each term is an op of the fused loop)
    terms = _K3_SERIES if r.dtype == xp.float64 else _K3_SERIES[:8]
    series = xp.zeros_like(rs) + terms[-1]
    for c in reversed(terms[:-1]):  # Horner
        series = series * rs + c
    # (series r) r, not series r^2: for |r| < 1e-154 r^2 is subnormal in float64, and its
    # rounding there is many ulps of k3 (r = 6.3e-160: 1.99464e-319 for 1.99467e-319)
    return small, rs, (series * rs) * rs


def _k3_derivative(xp: ModuleType, r: Array, clamp: float | None = None) -> Array:
    """``e^r - 1``, the derivative of k3. Eager, the library's ``expm1``. Inside
    torch.compile on a CPU (whose ``expm1`` is ``exp(x) - 1``), ``k3(r) + r``: the same
    series and exponential as the value, so that inductor computes the value's sum and
    the saved derivative in one loop (1.8x the plain formula's gradient with klx's own
    ``expm1``, 1.4x so: the loops alone). Otherwise traced (``jax.jit``, whose gradient
    needs no value), r plus k3's series within ``|r| <= 1/2`` and ``exp(r) - 1``
    beyond, within 2 ulps (XLA's own expm1 took 1.8x the plain formula's gradient, this
    1.3x). ``-1`` at ``r = -inf`` (where k3 is ``+inf``), ``+inf`` above log(max), NaN
    for NaN.

    Within ``|r| <= 1/2`` k3 is at most a third of ``|r|`` (no cancellation); beyond,
    the sum keeps k3's few ulps (r > 0), or the rounding of ``|r|`` in ``k3 ~ -1 - r``
    relative to ``e^r - 1 ~ -1`` (r < 0: at most ``|r| / 2`` ulps, 8 ulps in float32
    where ``e^r`` still shows in float32, r > -17; mpmath-checked by the tests).

    With `clamp`, the derivative of k3 clipped to ``[-clamp, clamp]``: 0 where k3 exceeds
    it (k3 >= 0), NaN for NaN.
    """
    k = None
    if _inductor_cpu(r):
        k = _k3_value(xp, r)
        d = xp.where(r == -math.inf, -1.0, k + r)
    elif is_concrete(r):
        d = xp.expm1(r)
    else:
        small, rs, series = _k3_series(xp, r)
        d = xp.where(small, rs + series, xp.exp(r) - 1.0)
    if clamp is None:
        return d
    k = _k3_value(xp, r) if k is None else k
    return xp.where(k > clamp, 0.0, d)


def importance_k3(xp: ModuleType, lp: Array, lq: Array, old: Array) -> Array:
    """``rho k3`` with ``rho = exp(lp - old)`` (`old` held fixed), its value and gradient
    each without overflow or cancellation before the result's own.

    The value is ``exp(log rho + log k3(r))``, ``r = lq - lp``, with ``log k3`` in a form
    for each range of r: ``rho`` may underflow while ``k3`` overflows (float32,
    ``lp = -90``, ``old = -2``, ``lq = -1``: the product is e - 90 e^-88, not inf).
    Beyond ``|r| = 1/2`` the gradient is that of ``exp(lq - old) - rho (1 + r)``, whose
    derivatives are the exact ``rho (e^r - 1)`` (in lq) and ``-rho r`` (in lp); ``k3``'s
    own derivative added to ``k3`` cancels there instead (-32 for -20 at r = 20 in
    float32); within it, that of ``rho k3`` with k3's series. Every form is fed safe values
    where it does not apply, so gradients stay finite.
    """
    r = lq - lp
    d = lp - old  # log rho
    e = lq - old  # log(rho e^r), apart: lp must not reach it (its two paths, +1 and -1,
    # would add and cancel the large exp(e) in float32: -32 for -20 at r = 20)
    finite = xp.isfinite(r) & xp.isfinite(d) & xp.isfinite(e)
    rs = xp.where(finite, r, 0.0)
    ds = xp.where(finite, d, 0.0)
    es = xp.where(finite, e, 0.0)
    # log k3(r) by range: the series near 0, r + log1p(-(1 + r) e^-r) above, and
    # log(expm1(r) - r) below (no cancellation beyond |r| = 1/2).
    small = xp.abs(rs) <= _K3_SERIES_RADIUS
    series = k3_from_log_ratio(xp, xp.where(small, rs, 0.0))
    zero = series == 0.0
    log_small = xp.log(xp.where(zero, 1.0, series))
    up = rs > _K3_SERIES_RADIUS
    ru = xp.where(up, rs, 1.0)
    log_up = ru + xp.log1p(-(1.0 + ru) * xp.exp(-ru))
    rd = xp.where(~small & ~up, rs, -1.0)
    log_down = xp.log(xp.expm1(rd) - rd)
    log_k3 = xp.where(small, log_small, xp.where(up, log_up, log_down))
    value = xp.where(small & zero, 0.0, xp.exp(ds + log_k3))
    # Where neither rho nor k3 can leave the range, their product keeps k3's precision
    # (exp of a log costs |log k3| ulps: 42 at r = 1e-9).
    log_max = math.log(float(xp.finfo(lp.dtype).max))
    direct = (xp.abs(ds) <= 0.5 * log_max) & (xp.abs(rs) <= 0.5 * log_max)
    k3 = k3_from_log_ratio(xp, xp.where(direct, rs, 0.0))
    value = xp.where(direct, xp.exp(xp.where(direct, ds, 0.0)) * k3, value)
    # Outside the finite range: what the plain product gives (inf, NaN), no gradient.
    plain = stop_gradient(xp.exp(d) * k3_from_log_ratio(xp, r))
    value = xp.where(finite, value, plain)
    # The gradient's form, at safe values where its exponentials would overflow.
    # Every exponential of the gradient's form finite (rho (1 + r) and their difference
    # too: the margin of 1 keeps a - b below the dtype's max), else no gradient there.
    log_b = ds + xp.log(xp.abs(1.0 + rs) + 1.0)
    in_range = finite & (es <= log_max - 1.0) & (log_b <= log_max - 1.0)
    rho = xp.exp(xp.where(in_range, ds, 0.0))
    a = xp.exp(xp.where(in_range, es, 0.0))
    # Near r = 0 rho * k3 itself (a - rho (1 + r) would leave only eps-sized differences).
    g = xp.where(small, rho * series, a - rho * (1.0 + xp.where(small, 0.0, rs)))
    g = xp.where(in_range, g, 0.0)
    return stop_gradient(value) + (g - stop_gradient(g))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        valid = ", ".join(repr(a) for a in allowed)
        msg = f"`{name}` must be one of {valid}, got {value!r}."
        raise ValueError(msg)
    return value


def _check_clamp(clamp: object) -> float | None:
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real):
        msg = f"`clamp` must be a positive number or None, got {clamp!r}."
        raise TypeError(msg)
    c = float(clamp)
    if not c > 0:
        msg = f"`clamp` must be positive (estimates are clipped to [-clamp, clamp]), got {clamp!r}."
        raise ValueError(msg)
    return c
