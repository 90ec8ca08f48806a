"""Input cases for the conformance matrix: float64 NumPy data, drawn from a fixed seed."""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
from scipy.special import log_softmax

from support import reference


def _dirichlet(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if not shape:
        return np.asarray(rng.uniform(0.05, 1.0))
    g = rng.gamma(1.0, size=shape)
    return g / g.sum(axis=-1, keepdims=True)


def kl_div_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(input = log Q, target = P) in float64 for the named case."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shapes = {
        "random": (8, 16),
        "zeros_in_target": (6, 10),
        "neginf_input": (6, 10),
        "q_zero_p_positive": (4, 5),
        "nan": (3, 4),
        "1d": (7,),
        "3d": (2, 3, 5),
        "4d": (2, 2, 3, 4),
        "empty": (0, 5),
        "single": (1, 1),
        "scalar": (),
        "broadcast": (8, 16),
        # More elements than the CPU accelerators' blocks (and their threading threshold),
        # not a multiple of them; zeros and -inf in a few blocks only.
        "large": (521, 1013),
    }
    shape = shapes[name]
    target = _dirichlet(rng, shape)
    log_q = np.log(_dirichlet(rng, shape))
    if name in ("zeros_in_target", "neginf_input"):
        zero = rng.uniform(size=shape) < 0.3
        target = np.where(zero, 0.0, target)
        target = target / target.sum(axis=-1, keepdims=True)
        if name == "neginf_input":
            # Q is 0 exactly where P is: torch gives NaN, the KL is finite.
            log_q = np.where(zero, -np.inf, log_q)
    if name == "q_zero_p_positive":
        log_q[1, 2] = -np.inf  # P > 0 there: the KL is +inf
    if name == "nan":
        log_q[0, 1] = np.nan
        target[2, 3] = 0.0
        log_q[2, 3] = np.nan  # NaN must propagate even where P is 0
    if name == "large":
        rows = [3, 200, 517]
        target[rows, 5] = 0.0
        log_q[rows[1], 5] = -np.inf  # torch: NaN; klx: 0
        target[rows] /= target[rows].sum(axis=-1, keepdims=True)
    if name == "broadcast":
        log_q = log_q[:1]  # input (1, 16) against target (8, 16)
    return log_q, target


KL_DIV_CASES = (
    "random",
    "zeros_in_target",
    "neginf_input",
    "q_zero_p_positive",
    "nan",
    "1d",
    "3d",
    "4d",
    "empty",
    "single",
    "scalar",
    "broadcast",
    "large",
)


def draw_distribution(rng, shape, axis, form, zeros=False, temperature=1.0):
    """A random distribution along `axis` given in `form`, and its probabilities (float64).

    With `zeros`, about a quarter of the entries are 0 (logits of ``-inf``), never the
    first one of a distribution.
    """
    logits = rng.normal(scale=2.0, size=shape)
    if zeros:
        logits = np.where(rng.uniform(size=shape) < 0.25, -np.inf, logits)
        # keep at least one entry per distribution
        first = [slice(None)] * len(shape)
        first[axis] = 0
        logits[tuple(first)] = 0.0
    log_p = reference.log_softmax(logits, axis, temperature)
    probs = np.exp(log_p)
    given = {"probs": probs, "log_probs": log_p, "logits": logits}[form]
    return given, probs


#: The float64 reference of each divergence klx ships (probabilities along the last axis;
#: keyword options as its record names them). The tests of every divergence read the
#: records through :func:`divergence_cases`: a record without a reference here fails them.
_REFERENCE_ROWS = {
    "kl": lambda p, q: reference.kl_rows(p, q, -1)[0],
    "js": lambda p, q, beta=0.5: reference.js_rows(p, q, -1, beta),
    "skew_kl": lambda p, q, alpha=0.1: reference.skew_kl_rows(p, q, -1, alpha)[0],
    "tv": lambda p, q: reference.tv_rows(p, q, -1)[0],
    "cross_entropy": lambda p, q: reference.cross_entropy_rows(p, q, -1)[0],
    "alpha": lambda p, q, alpha=0.5: reference.alpha_rows(p, q, alpha),
    "renyi": lambda p, q, alpha=0.5: reference.renyi_rows(p, q, alpha),
    "renyi_inf": lambda p, q: reference.renyi_rows(p, q, math.inf),
    "mix": lambda p, q, lam=0.5: reference.mix_rows(p, q, lam),
    "generalized_kl": lambda p, q: reference.generalized_kl_rows(p, q),
}
#: Arguments a record's public function takes besides its options: Rényi's order
#: infinity is ``renyi_divergence(p, q, alpha=math.inf)``, the generalized KL
#: ``kl_divergence(p, q, normalized=False)``.
_PUBLIC_ARGUMENTS = {"renyi_inf": {"alpha": math.inf}, "generalized_kl": {"normalized": False}}


def _by_name(p, q, kind, **kwargs):
    import klx

    return klx.divergence(p, q, kind, **kwargs)


def divergence_cases(options=None, closed_form=False, logits=False):
    """``{name: (public function, options, reference rows)}`` for every built-in record
    (with `closed_form`, those with a closed-form derivative from logits; with `logits`,
    those that take logits: not the records of measures), each with the options in
    ``options[name]`` (default: none, the record's defaults)."""
    import klx
    from klx._divergence_table import built_in

    options = options or {}
    cases = {}
    for record in built_in():
        if closed_form and record.logits_derivatives is None:
            continue
        if logits and record.measures:
            continue
        if record.name not in _REFERENCE_ROWS:
            msg = (
                f"the divergence {record.name!r} has no float64 reference: add one to "
                "_REFERENCE_ROWS in tests/support/cases.py"
            )
            raise AssertionError(msg)
        opts = {o.name: o.default for o in record.options} | dict(options.get(record.name, {}))
        ref = _REFERENCE_ROWS[record.name]
        if record.public:
            fn = getattr(klx, record.public)
        else:  # served by name only
            fn = functools.partial(_by_name, kind=record.name)
        args = _PUBLIC_ARGUMENTS.get(record.name, {})
        if args:
            fn = functools.partial(fn, **args)
        cases[record.name] = (fn, opts, lambda p, q, ref=ref, opts=opts: ref(p, q, **opts))
    return cases


def top_k_case(rng, batch, vocab, k, temperature=1.0, masked_vocab=False):
    """Teacher log-probs, their top-k indices (shuffled), student logits (float64)."""
    t = rng.normal(scale=2.0, size=(*batch, vocab))
    s = rng.normal(scale=1.5, size=(*batch, vocab))
    if masked_vocab:
        s[..., -1] = -np.inf  # a vocabulary entry the student never puts mass on
        t[..., -1] = -np.inf
    lp_full = log_softmax(t, axis=-1)
    order = np.argsort(-lp_full, axis=-1, kind="stable")[..., :k]
    idx = rng.permuted(order, axis=-1)  # any order
    lp = np.take_along_axis(lp_full, idx, axis=-1)
    return idx, lp, s, np.exp(log_softmax(s / temperature, axis=-1))


def small_cases() -> tuple[np.ndarray, np.ndarray]:
    """Rows of dyadic distributions (each sums to 1 exactly, in float32 too): nearly
    equal, one-hot, zeros in P, zeros in Q, and an ordinary pair."""
    e = 2.0**-20
    p = [
        [0.25, 0.25, 0.5, 0.0],
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.125, 0.375, 0.25, 0.25],
        [0.0625, 0.1875, 0.5, 0.25],
    ]
    q = [
        [0.25 + e, 0.25 - e, 0.5, 0.0],
        [0.5, 0.25, 0.125, 0.125],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.5, 0.0, 0.0],
        [0.25, 0.25, 0.25, 0.25],
    ]
    return np.array(p), np.array(q)


def exact_logits(x: np.ndarray) -> np.ndarray:
    """log x, -inf where x is 0."""
    return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), -np.inf)
