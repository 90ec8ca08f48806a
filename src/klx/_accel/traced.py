"""Rows that serve traced calls as well as eager ones: the divergences whose record has a
closed-form derivative between two sets of logits (KL, JS, skew KL, TV, the family's) or
two probability arrays (KL), each with that derivative (:mod:`klx._closed_forms`), for
JAX and for torch.

The value is the array-API definition's (:func:`klx._agnostic.divergence_rows`), to the
bit; only the derivative differs: one fused expression of the two softmaxes instead of
autodiff of every guard.

* JAX: a ``jax.custom_jvp``. ``jax.grad`` and ``jax.vjp`` take its transpose, forward
  mode (``jax.jvp``, ``jacfwd``) takes it directly, higher orders differentiate it in
  turn, inside and outside ``jax.jit``, and ``jax.vmap`` batches it.
* torch: a ``torch.autograd.Function``
  (:class:`klx._accel.torch_closed_form.FromLogitsRows`), eager and inside
  ``torch.compile`` (which traces it); without gradients, the definition itself.

Distributions that ``where`` drops get a derivative of exactly 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klx._agnostic import divergence_rows, mask_rows
from klx._divergence_table import BUILT_IN, ENTROPY
from klx._namespace import is_concrete

if TYPE_CHECKING:
    from klx._typing import DivergenceCall

__all__ = ["jax_rows", "torch_rows"]


def jax_rows(call: DivergenceCall) -> Any:
    """Per-distribution values of a JAX call from two logits (or probability) inputs, with a
    closed-form JVP."""
    import jax
    import jax.numpy as jnp

    xp, axis, temperature = call.xp, call.axis, call.temperature
    has_keep = call.keep is not None
    derivatives = call.divergence.derivatives_from(call.p_form, call.q_form)
    assert derivatives is not None  # the row's closed_form gate refuses a record without
    form = call.p_form
    # (a registered record cannot take these names)
    own = call.divergence.name in (*BUILT_IN, ENTROPY.name)

    def value(t: Any, s: Any, k: Any) -> Any:
        # Traced, a dropped distribution needs no stand-in here: its value is discarded by
        # a select (klx._agnostic.reduce_rows) and its derivative is the rule's, which
        # takes the stand-ins and is masked. XLA's CPU code wrote the stand-ins' selects
        # out in full before the maximum (see benchmarks/RESULTS.md, issue 24's sixth round).
        stand_in = has_keep and is_concrete(t)
        return divergence_rows(xp, call, t, s, k if stand_in else None)

    rows = jax.custom_jvp(value)  # (called, not as a decorator: typed where JAX is not)

    def rows_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
        t, s, k = primals
        dt, ds, _ = tangents
        # A side without a tangent (the teacher's, for jax.grad of the student) comes as a
        # symbolic zero: its c is not computed (the mixture's c_t costs a row sum more).
        need_t, need_s = not _symbolic_zero(dt), not _symbolic_zero(ds)
        out = rows(t, s, k)
        if not (need_t or need_s):
            return out, jnp.zeros_like(out)
        if has_keep:  # the definition's stand-in rows (their derivative is dropped below)
            t, s = mask_rows(xp, t, k, form), mask_rows(xp, s, k, form)
        # Traced (jax.jit), klx's own closed forms take rows=None: one that reads the value
        # computes what it needs of it, so that jax.grad computes only that (all of it for
        # the alpha-divergence outside (0, 1) and Rényi at order 1; XLA merges the two
        # where jax.value_and_grad computes both). Eagerly the value is at hand (computed
        # above, not to be computed twice); a registered record's always get it.
        traced = not is_concrete(out)
        given = None if own and traced else out
        if given is not None and has_keep and traced:
            # The value above took no stand-ins (NaN where a dropped row holds garbage, and
            # 0 * NaN in the transpose): a registered record's get the stand-ins' values.
            given = divergence_rows(xp, call, t, s, None)
        c_t, c_s = derivatives(xp, call, t, s, given, need_t=need_t, need_s=need_s)
        parts = [c * d for c, d in ((c_t, dt), (c_s, ds)) if c is not None]
        tangent = jnp.sum(parts[0] if len(parts) == 1 else parts[0] + parts[1], axis=axis)
        tangent = tangent / temperature
        if has_keep:
            tangent = jnp.where(jnp.squeeze(k, axis=axis), tangent, 0.0)
        return out, tangent

    rows.defjvp(rows_jvp, symbolic_zeros=True)
    p = xp.astype(call.p, call.acc, copy=False)
    q = xp.astype(call.q, call.acc, copy=False)
    keep = call.keep if has_keep else jnp.zeros((), dtype=bool)
    return rows(p, q, keep)


def _symbolic_zero(tangent: Any) -> bool:
    """Whether a ``custom_jvp`` tangent is JAX's symbolic zero (no tangent for that input)."""
    import jax

    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def torch_rows(call: DivergenceCall) -> Any:
    """Per-distribution values of a torch call from two logits inputs, eager or inside
    torch.compile: with gradients, a ``torch.autograd.Function`` whose backward is the
    closed form (:class:`klx._accel.torch_closed_form.FromLogitsRows`); without, the
    definition."""
    import torch

    from klx._accel.torch_closed_form import FromLogitsRows

    xp = call.xp
    t = xp.astype(call.p, call.acc, copy=False)
    s = xp.astype(call.q, call.acc, copy=False)
    if not (torch.is_grad_enabled() and (t.requires_grad or s.requires_grad)):
        return divergence_rows(xp, call, t, s, call.keep)
    bare = call._replace(p=None, q=None, keep=None)  # its tensors go as arguments
    return FromLogitsRows.apply(t, s, call.keep, xp, bare)  # type: ignore[no-untyped-call,unused-ignore]
