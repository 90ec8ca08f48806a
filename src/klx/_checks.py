"""Argument checks: every error message names the argument, what was wrong, and the fix.

These checks read shapes, dtypes and Python values only, never array values, so
they cost nothing on a GPU and work under ``jax.jit`` and on lazy arrays.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from klx._typing import Shape

__all__ = [
    "FORMS",
    "KL_DIV_REDUCTIONS",
    "REDUCTIONS",
    "broadcast_shapes",
    "broadcasts_to",
    "check_flag",
    "check_float",
    "check_form",
    "check_normalizer",
    "check_reduction",
    "check_temperature",
    "check_temperature_range",
    "check_where",
    "mixture_weight",
    "normalize_axis",
    "real_number",
    "shape_of",
]

#: Reductions of the torch-compatible :func:`klx.kl_div`.
KL_DIV_REDUCTIONS = ("none", "sum", "mean", "batchmean")
#: Reductions of :func:`klx.kl_divergence` and :func:`klx.js_divergence`.
REDUCTIONS = ("none", "sum", "batchmean")
#: The ways a distribution can be given.
FORMS = ("probs", "log_probs", "logits")


def check_reduction(reduction: object, allowed: Sequence[str]) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        valid = ", ".join(repr(r) for r in allowed)
        hint = ""
        if reduction == "mean" and "mean" not in allowed:
            hint = (
                "; 'mean' is not offered here because torch's 'mean' averages over every "
                "element, which is not the KL divergence: use 'batchmean' for the mean over "
                "distributions"
            )
        msg = f"`reduction` must be one of {valid}, got {reduction!r}{hint}."
        raise ValueError(msg)
    return reduction


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        msg = f"`{name}` must be True or False, got {value!r}."
        raise TypeError(msg)
    return value


#: dtypes already found to be real floating, per namespace (dtypes of two libraries
#: must never be compared): a set lookup is cheaper than `isdtype`.
_REAL_FLOATING: dict[str, set[Any]] = {}


def check_float(xp: ModuleType, name: str, x: Any) -> None:
    """Require a real floating dtype of at least 16 bits that the namespace computes with."""
    known = _REAL_FLOATING.setdefault(xp.__name__, set())
    if x.dtype in known:
        return
    try:
        real = xp.isdtype(x.dtype, "real floating")
    except (TypeError, ValueError):  # e.g. ml_dtypes' bfloat16 in a NumPy array
        msg = (
            f"`{name}` has dtype {x.dtype}, which {xp.__name__} cannot compute with (an "
            "extension dtype such as ml_dtypes' bfloat16); convert it with "
            "`astype(numpy.float32)` first."
        )
        raise TypeError(msg) from None
    if real and xp.finfo(x.dtype).bits >= 16:
        known.add(x.dtype)
        return
    if real:
        fix = "float8 is a storage format: convert it to bfloat16, float16 or float32 first"
    elif xp.isdtype(x.dtype, "complex floating"):
        fix = "take the real part or the magnitude first"
    else:
        fix = "convert it with `astype` to a floating dtype such as float32 first"
    msg = (
        f"`{name}` must have a real floating-point dtype (float16, bfloat16, float32 or "
        f"float64), got {x.dtype}; {fix}."
    )
    raise TypeError(msg)


def shape_of(x: Any) -> Shape:
    """`x`'s shape with None for a size not known yet (Dask's NaN after boolean indexing)."""
    return tuple(None if s is None or s != s else s for s in x.shape)


def broadcast_shapes(named: Sequence[tuple[str, Shape]]) -> Shape:
    """Broadcast shapes by the array API rules, or raise a ValueError naming both shapes.

    A size not known yet (None, Dask after boolean indexing) broadcasts against 1 and
    against another unknown size (trusted, as Dask does: a mismatch fails when computed);
    against a known size other than 1 it is an error, since klx cannot check they match.
    """
    first_name, first_shape = named[0]
    if None not in first_shape and all(shape == first_shape for _, shape in named):
        return tuple(first_shape)
    result: list[int | None] = []
    for name, shape in named:
        padded_result = [1] * (len(shape) - len(result)) + result
        padded_shape = [1] * (len(result) - len(shape)) + list(shape)
        merged: list[int | None] = []
        for a, b in zip(padded_result, padded_shape, strict=True):
            if a == 1:
                merged.append(b)
            elif b == 1 or a == b:  # None == None: two unknown sizes are trusted, as Dask does
                merged.append(a)
            elif a is None or b is None:
                msg = (
                    f"`{first_name}` has shape {tuple(first_shape)} and `{name}` has shape "
                    f"{tuple(shape)}: a size that is not known yet (a Dask array after "
                    "boolean indexing) cannot be matched against a known size other than 1; "
                    "call `.compute_chunk_sizes()` on the Dask arrays first."
                )
                raise ValueError(msg)
            else:
                msg = (
                    f"`{first_name}` has shape {tuple(first_shape)} and `{name}` has shape "
                    f"{tuple(shape)}, which do not broadcast together; give arrays of the "
                    "same shape (or shapes that broadcast by the NumPy rules)."
                )
                raise ValueError(msg)
        result = merged
    return tuple(result)


def normalize_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not hasattr(axis, "__index__") or _is_array(axis):
        msg = f"`axis` must be an int, got {axis!r}."
        raise TypeError(msg)
    axis = operator.index(axis)  # a NumPy integer too
    if ndim == 0:
        msg = (
            "the distributions must have at least one dimension, got 0-d arrays; "
            "give the probabilities along an axis."
        )
        raise ValueError(msg)
    if not -ndim <= axis < ndim:
        msg = f"`axis` {axis} is out of range for {ndim}-d arrays; use -{ndim} <= axis < {ndim}."
        raise ValueError(msg)
    return axis % ndim


def check_form(name: str, form: object) -> str:
    if not isinstance(form, str) or form not in FORMS:
        valid = ", ".join(repr(f) for f in FORMS)
        msg = f"`{name}` must be one of {valid}, got {form!r}."
        raise ValueError(msg)
    return form


def real_number(name: str, value: object, what: str) -> float:
    """A Python (or NumPy) real number as a float; a TypeError naming `name` otherwise."""
    if not _is_bool(value) and isinstance(value, numbers.Real):
        return float(value)
    msg = f"`{name}` must be {what}, got {value!r}."
    raise TypeError(msg)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def check_temperature(
    temperature: object,
    forms: Sequence[str],
    xp: ModuleType | None = None,
    form_names: Sequence[str] = ("p_form", "q_form"),
) -> Any:
    """A positive, finite temperature (a float), or a 0-d array used as it is; the
    arguments that give `forms` are `form_names` (for the message of a temperature
    without logits).

    Given the namespace `xp`, a 0-d real array of the inputs' library (a JAX tracer
    inside ``jax.jit`` / ``jax.grad``, a torch tensor that requires grad) is not read:
    its value may not be known yet, and this lets a temperature be annealed or learned
    inside a compiled function (without `xp`, only numbers are taken). A
    ``torch.SymFloat`` (a number under ``torch.compile(dynamic=True)``) is compared,
    never converted.
    """
    t: Any = temperature
    if type(t).__name__ == "SymFloat" or isinstance(t, numbers.Real):
        if type(t).__name__ != "SymFloat":  # torch.compile's symbolic float stays one
            t = real_number("temperature", t, "a positive real number")
        if not (t > 0 and t < math.inf):  # comparisons: math.isfinite breaks a SymFloat
            msg = f"`temperature` must be positive and finite, got {temperature!r}."
            raise ValueError(msg)
    elif _is_array(t) and xp is not None:
        if t.ndim != 0 or not xp.isdtype(t.dtype, "real floating"):
            msg = (
                "`temperature` given as an array must be a 0-d real floating array of the "
                f"inputs' library, got shape {tuple(t.shape)} and dtype {t.dtype}."
            )
            raise ValueError(msg)
    else:
        real_number("temperature", t, "a positive real number (or a 0-d array)")
    if "logits" not in forms and not (isinstance(t, float) and t == 1.0):
        names = list(dict.fromkeys(form_names))
        quoted = " nor ".join(f"`{n}`" for n in names)
        which = f"neither {quoted} is" if len(names) > 1 else f"{quoted} is not"
        how = " / ".join(f"{n}='logits'" for n in names)
        msg = (
            f"`temperature`={temperature!r} applies only to logits, but {which} 'logits'; "
            f"give logits with {how}, or leave temperature at 1."
        )
        raise ValueError(msg)
    return t


def check_temperature_range(temperature: Any, finfo: Any) -> None:
    """A temperature so small that logits / T overflow the dtype: a clear error.

    Only for Python numbers (an array's value is not read). ``(x - max x) / T`` cannot
    overflow to ``+inf``, but it needs ``1 / T`` finite (a compiler may multiply by it)
    and `T` a normal number (subnormals are flushed to 0 by XLA on the CPU).
    """
    if not isinstance(temperature, float):
        return
    tiny, big = float(finfo.smallest_normal), float(finfo.max)
    dtype = str(finfo.dtype).rsplit(".", 1)[-1]
    if temperature < tiny or 1.0 / temperature > big:
        wider = " or float64 inputs" if dtype != "float64" else ""
        msg = (
            f"`temperature`={temperature!r} is too small for {dtype}, in which the "
            f"logits are computed: it must be at least {max(tiny, 1.0 / big):.3g} (so that "
            f"1 / temperature is finite); use a larger temperature{wider}."
        )
        raise ValueError(msg)


def _is_array(x: object) -> bool:
    """An array (a NumPy scalar is a number here, not an array)."""
    return not isinstance(x, numbers.Number) and hasattr(x, "shape") and hasattr(x, "dtype")


def mixture_weight(name: str, value: object) -> float:
    """A mixture weight `name` (beta of JS, alpha of skew KL): a real number in [0, 1]."""
    w = real_number(name, value, "a real number in [0, 1]")
    if not 0.0 <= w <= 1.0:
        msg = f"`{name}` must lie in [0, 1] (the weight of P in the mixture M), got {value!r}."
        raise ValueError(msg)
    return w


def check_normalizer(xp: ModuleType, normalizer: object, reduction: str) -> float | Any:
    """`normalizer` for 'batchmean': a finite number >= 0, or a 0-d real array of `xp`.

    Returns a Python float, the array itself, or None. The array's value is not read
    here (validation mode checks it).
    """
    if normalizer is None:
        return None
    if reduction in ("none", "sum"):
        msg = (
            f"`normalizer` replaces the count that reduction='batchmean' (or an aggregation "
            f"mode such as 'token-mean') divides by, but reduction={reduction!r}; pass "
            "reduction='batchmean' with the normalizer, or leave normalizer=None."
        )
        raise ValueError(msg)
    if isinstance(normalizer, bool):
        msg = f"`normalizer` must be a number >= 0 or a 0-d array, got {normalizer!r}."
        raise TypeError(msg)
    if isinstance(normalizer, numbers.Real):
        try:
            n = float(normalizer)
        except OverflowError:  # an int beyond float's range (10**400)
            n = math.inf
        if not (n >= 0 and math.isfinite(n)):
            msg = (
                f"`normalizer` must be a finite number >= 0 (the number of tokens to divide "
                f"the sum by; 0, for a step without tokens, gives 0), got {normalizer!r}."
            )
            raise ValueError(msg)
        return n
    dtype = getattr(normalizer, "dtype", None)
    shape = getattr(normalizer, "shape", None)
    if shape is None or dtype is None:
        msg = (
            f"`normalizer` must be a number >= 0 or a 0-d array, got "
            f"{type(normalizer).__module__}.{type(normalizer).__qualname__}."
        )
        raise TypeError(msg)
    if tuple(shape) != ():
        msg = (
            f"`normalizer` must be a single number (a 0-d array), got shape "
            f"{tuple(shape)}; pass e.g. `mask.sum()`."
        )
        raise ValueError(msg)
    if dtype == xp.bool or not xp.isdtype(dtype, ("real floating", "integral")):
        msg = (
            f"`normalizer` must have an integer or real floating dtype, got {dtype}; "
            "convert it with `astype` first."
        )
        raise TypeError(msg)
    return normalizer


def broadcasts_to(shape: Shape, target: Shape) -> bool:
    """Whether `shape` broadcasts to `target` (a size None, unknown to Dask, matches)."""
    return len(shape) <= len(target) and all(
        w == 1 or w == b or w is None or b is None
        for w, b in zip(reversed(shape), reversed(target), strict=False)
    )


def check_where(xp: ModuleType, where: Any, batch_shape: Shape) -> None:
    """`where` must be boolean and broadcast to the batch shape (the shape without `axis`)."""
    if where.dtype != xp.bool:
        msg = (
            f"`where` must be a boolean array (True keeps a distribution), got dtype "
            f"{where.dtype}; pass e.g. `mask != 0`."
        )
        raise TypeError(msg)
    shape = tuple(where.shape)
    if not broadcasts_to(shape, batch_shape):
        msg = (
            f"`where` has shape {shape}, which does not broadcast to the batch shape "
            f"{tuple(batch_shape)} (the inputs' shape without `axis`); give one boolean per "
            "distribution."
        )
        raise ValueError(msg)
