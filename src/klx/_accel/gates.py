"""The gates: whether a row of the accelerator table may serve a call, each written once.

:func:`refusal` returns why a row refuses a call (None: it may serve), reading the call's
:class:`Context` (its arrays, library, device type and trace), worked out once per call.
Layout, device and trace facts come from the arrays' library adapter
(:mod:`klx._backends`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

from klx._accel.table import Accelerator
from klx._backends import Library, Trace, by_name
from klx._call import DivergenceCall, KLDivCall
from klx._config import accelerators_enabled
from klx._namespace import library_of
from klx._typing import Array, Call

__all__ = [
    "DEVICE_ALIASES",
    "Context",
    "context",
    "device_type",
    "refusal",
    "token_stats_refusal",
]


#: Test hook: device types seen as others (e.g. {'cpu': 'cuda'} routes CPU tensors to the
#: CUDA rows, to run their Triton kernels under TRITON_INTERPRET=1). Empty in use.
DEVICE_ALIASES: dict[str, str] = {}

#: Outcome of each first-use check: (row name, device, dtype) -> passed.
_CHECKED: dict[tuple[str, str, str, str], bool] = {}
#: Implementations that could not be imported: row name -> reason.
_UNLOADABLE: dict[str, str] = {}


def _arrays(call: Call) -> tuple[Array, Array]:
    if isinstance(call, KLDivCall):
        return call.input, call.target
    return call.p, call.q


def _dtype_name(dtype: Any) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(getattr(dtype, "name", None) or dtype).rsplit(".", 1)[-1]
    return name


#: dtype object -> its name ('float32'): a dict lookup is cheaper than str() per call.
_DTYPE_NAMES: dict[Any, str] = {}


def device_type(lib: str, x: Array) -> str:
    """The device type the gates see for an array `x` of `lib` ('cpu', 'cuda'), after
    :data:`DEVICE_ALIASES`."""
    kind = by_name(lib).device_type(x)
    return DEVICE_ALIASES.get(kind, kind)


def _size(x: Array) -> int:
    n = 1
    for s in x.shape:
        n *= int(s)
    return n


def _contiguous(lib: str, x: Array) -> bool:
    return by_name(lib).contiguous(x)


def _rows_layout(lib: str, x: Array) -> bool:
    """Last axis of stride 1; rows at any uniform stride (a 2-D slice such as x[:, :-1])."""
    return by_name(lib).rows_layout(x)


class Context(NamedTuple):
    """What every row's gates read about a call, worked out once per call."""

    a: Array
    b: Array
    lib: str
    device: str
    traced: Trace | None
    #: The arrays' library (:mod:`klx._backends`).
    library: Library


def context(call: Call) -> Context:
    a, b = _arrays(call)
    lib = library_of(call.xp)
    adapter = by_name(lib)
    kind = adapter.device_type(a)
    device = DEVICE_ALIASES.get(kind, kind)
    return Context(a, b, lib, device, adapter.trace(a, b, device=device), adapter)


def refusal(row: Accelerator, call: Call, ctx: Context) -> str | None:
    """Every gate, written once."""
    a, b, lib, dev = ctx.a, ctx.b, row.library, ctx.device
    if not accelerators_enabled():
        return "accelerators are off (KLX_ACCELERATORS=0 or klx.set_accelerators(False))"
    if ctx.lib != lib:
        return f"serves {lib} arrays only"
    if ctx.traced is not None and ctx.traced.kind not in row.traces:
        return ctx.traced.why
    cls = ctx.library.base_type()
    if cls is not None and (type(a) is not cls or type(b) is not cls):
        return f"a subclass of {cls.__module__}.{cls.__qualname__} keeps its own semantics"
    neg = ctx.library.lazily_negated
    if ctx.traced is None and (neg(a) or neg(b)):
        # Its memory holds the values before negation: kernels and NumPy views would read them.
        return "a lazily negated view (Tensor.is_neg()); the definition reads it as torch does"
    if row.devices and dev not in row.devices:
        return f"serves {'/'.join(row.devices)} arrays, not {dev}"
    if a.dtype != b.dtype:
        return "the two arrays have different dtypes"
    if _dtype_name(a.dtype) not in row.dtypes:
        return f"serves {', '.join(row.dtypes)}, not {_dtype_name(a.dtype)}"
    if tuple(a.shape) != tuple(b.shape):
        return "the arrays broadcast (it needs one shape)"
    if row.layout == "contiguous" and not (_contiguous(lib, a) and _contiguous(lib, b)):
        return "needs C-contiguous arrays"
    if row.layout == "rows" and not (_rows_layout(lib, a) and _rows_layout(lib, b)):
        return "needs rows along the last axis with stride 1"
    if row.min_size and _size(a) < row.min_size:
        return f"fewer than {row.min_size} elements (the definition is as fast)"
    if isinstance(call, DivergenceCall):  # a row of operation 'divergence'
        if row.kinds and call.kind not in row.kinds:
            return f"serves {', '.join(row.kinds)}, not {call.kind!r}"
        if row.closed_form and call.divergence.derivatives_from(call.p_form, call.q_form) is None:
            forms = f"{call.p_form} and {call.q_form}"
            return f"{call.kind!r} has no closed-form derivative from {forms} (its record: none)"
        if row.forms and (call.p_form, call.q_form) not in row.forms:
            return f"serves forms {row.forms}, not {(call.p_form, call.q_form)}"
        if call.axis != a.ndim - 1 and row.layout != "any":
            return "serves distributions along the last axis only"
        if not isinstance(call.temperature, float):
            return "the temperature is an array (a traced or learned one), not a number"
        beta = dict(call.options).get("beta")
        if row.weights and beta is not None and not row.weights[0] <= beta <= row.weights[1]:
            lo, hi = row.weights
            return (
                f"serves weights in [{lo:g}, {hi:g}], not beta = {beta:g} (the definition's "
                "logaddexp forms serve it)"
            )
    grad = ctx.library.requires_grad
    if not row.autograd and (grad(a) or grad(b)):
        return "inputs require gradients and it has no backward"
    for module in row.requires:
        if not _importable(module):
            return f"needs {module}, which is not installed"
    if row.name in _UNLOADABLE:
        return _UNLOADABLE[row.name]
    return None


_IMPORTABLE: dict[str, bool] = {}


def _importable(module: str) -> bool:
    found = _IMPORTABLE.get(module)
    if found is None:
        found = _IMPORTABLE[module] = importlib.util.find_spec(module) is not None
    return found


def token_stats_refusal(
    z: Array, reference: Array | None, temperature: object, reference_form: str
) -> str | None:
    """Why the Triton row kernel of :func:`klx.token_stats`
    (:mod:`klx._accel.triton_token_stats`) may not serve torch logits `z` (None: it may):
    eager CUDA tensors of float32 / float64, a Python float temperature, a reference (if
    any) given as logits."""
    if not accelerators_enabled():
        return "accelerators are off (KLX_ACCELERATORS=0 or klx.set_accelerators(False))"
    if device_type("torch", z) != "cuda":
        return "serves cuda tensors only"
    adapter = by_name("torch")
    arrays = (z,) if reference is None else (z, reference)
    traced = adapter.trace(*arrays, device="cuda")
    if traced is not None:
        return traced.why
    cls = adapter.base_type()
    if any(type(a) is not cls or adapter.lazily_negated(a) for a in arrays):
        return "a tensor subclass or a lazily negated view"
    if _dtype_name(z.dtype) not in ("float32", "float64"):
        return f"serves float32 and float64 (the accumulation dtypes), not {z.dtype}"
    if not isinstance(temperature, float):
        return "the temperature is an array (a traced or learned one), not a number"
    if reference is not None and reference_form != "logits":
        return f"serves a reference given as logits, not {reference_form!r}"
    if _size(z) == 0:
        return "no tokens or an empty vocabulary"
    if not _importable("triton"):
        return "needs triton, which is not installed"
    return None
