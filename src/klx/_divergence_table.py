"""Every divergence klx computes, one :class:`Divergence` record each.

A record holds all that klx knows about a divergence: its name and aliases, its pointwise
terms, an optional finishing step (for divergences that are not a plain sum of terms),
its options each with its own check, and its closed-form derivative from logits where it
has one. Everything else reads the records: the public functions (:func:`klx.divergence`
and the named ones), :func:`klx.fused_linear_divergence`, the accelerator registry's
gates, :func:`klx.explain`, the docs table (:func:`markdown_table`) and the tests'
parametrisation. Nothing else lists divergence names. The cross-entropy has a record here
too (it is no divergence: at P = Q it is H(P), not 0, which its ``zero_at_equal`` says).

This module sits above the math (:mod:`klx._agnostic`, whose terms it names) and below
the call objects (:mod:`klx._call`, which carry a record): the math never imports it.

Adding a divergence is a record (here, or through :func:`klx.register_divergence` in a
user's own code), its terms, and its tests and docs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from klx import _agnostic
from klx import _closed_forms as closed_forms
from klx._checks import mixture_weight, real_number
from klx._typing import Array

__all__ = [
    "BUILT_IN",
    "DIVERGENCES",
    "ENTROPY",
    "Divergence",
    "Option",
    "built_in",
    "lookup",
    "markdown_table",
    "register",
    "unregister",
]


#: The arguments of klx's divergence functions (and of fused_linear_divergence): an option
#: of a record cannot take one of these names, which the functions would take themselves.
RESERVED = frozenset(
    {
        "p", "q", "kind", "axis", "p_form", "q_form", "temperature", "where", "reduction",
        "validate", "xp", "normalizer", "divergence", "p_hidden", "p_weight", "q_hidden",
        "q_weight", "p_bias", "q_bias", "softcap", "chunk_size", "labels", "hard_weight",
        "ignore_index",
    }
)  # fmt: skip

#: How a record's terms take the two distributions: 'forms' (as given, with their forms,
#: axis and temperature: the built-in terms, which keep full accuracy from any form),
#: 'probs' or 'log_probs' (klx converts both sides first).
READS = ("forms", "probs", "log_probs")
#: How a record's terms are combined along the distribution: summed, or their maximum
#: (Rényi's order infinity, ``log max p / q``).
COMBINES = ("sum", "max")


@dataclass(frozen=True)
class Option:
    """A divergence's own parameter (JS's ``beta``, skew KL's ``alpha``).

    Parameters
    ----------
    name : str
        The keyword it is passed as.
    default : float
        Its value when not given.
    check : callable
        ``check(name, value) -> float``: the checked value, or a TypeError / ValueError
        that names the argument, says what was wrong and how to fix it.
    doc : str
        One line for the docs table.
    """

    name: str
    default: float
    check: Callable[[str, object], float]
    doc: str = ""


@dataclass(frozen=True)
class Divergence:
    r"""One divergence: everything klx needs to compute it, on every backend.

    Parameters
    ----------
    name : str
        Its name: ``klx.divergence(p, q, name)``, ``fused_linear_divergence(...,
        divergence=name)``, the accelerator table's kinds.
    terms : callable
        Its pointwise terms, whose sum over the distribution axis is the divergence of one
        pair (before `finish`); or a tuple of such arrays, one per sum `finish` takes.
        With ``reads='forms'``: ``terms(xp, p, q, *, p_form, q_form, axis, temperature,
        **options)``; with 'probs' or 'log_probs':
        ``terms(xp, p, q, **options)`` on both sides converted so (in the accumulation
        dtype, dropped rows already replaced by safe ones). Written against `xp` only.
    formula : str
        The definition in one line, for the docs and error messages.
    aliases : tuple of str
        Other names accepted for it (``'tvd'`` for ``'tv'``).
    options : tuple of Option
        Its own parameters, each with its default and check.
    reads : {'forms', 'probs', 'log_probs'}
        What `terms` takes (see there). Default 'probs'.
    finish : callable, optional
        ``finish(xp, *sums, **options)``: the divergence from the per-distribution sums of
        the terms (one per array of terms), for a divergence that is not a plain sum
        (Rényi's log of a sum). Applied per distribution, after the sum and before masks
        and reductions, so it works when rows are computed in pieces (blocks, chunks,
        Dask).
    combine : {'sum', 'max'} or tuple of them
        How the terms are combined along the distribution: 'sum' (the default), or
        'max' (Rényi's order infinity); one per array where `terms` gives several.
    logits_derivatives : callable, optional
        Its derivatives from logits in closed form, ``f(xp, call, t, s, rows, *, need_t,
        need_s)`` (see :mod:`klx._closed_forms`); the closed-form accelerators serve
        only records that have one.
    probs_derivatives : callable, optional
        The same between two probability arrays (the derivatives in the probabilities
        themselves), for the closed-form accelerators' probabilities rows.
    public : str
        The name of its own public function, if it has one (for the docs and
        :func:`klx.explain`).
    measures : bool
        Whether its terms take non-negative measures as they are (SciPy's
        ``special.kl_div``), not distributions: given as probs only, and validation then
        checks each entry, not that each distribution sums to 1. Default False.
    zero_at_equal : bool
        Whether it is 0 where P = Q, as a divergence is (the default); the tests that
        check ``D(P, P) = 0`` read it.
    """

    name: str
    terms: Callable[..., Array]
    formula: str = ""
    aliases: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    reads: str = "probs"
    finish: Callable[..., Array] | None = None
    combine: str | tuple[str, ...] = "sum"
    logits_derivatives: Callable[..., tuple[Array | None, Array | None]] | None = None
    probs_derivatives: Callable[..., tuple[Array | None, Array | None]] | None = None
    public: str = ""
    measures: bool = False
    zero_at_equal: bool = True

    def derivatives_from(
        self, p_form: str, q_form: str
    ) -> Callable[..., tuple[Array | None, Array | None]] | None:
        """Return its closed-form derivatives between two arrays of these forms.

        Parameters
        ----------
        p_form, q_form : str
            The forms of the two arrays: 'logits' and 'logits', or 'probs' and 'probs'.

        Returns
        -------
        callable or None
            :attr:`logits_derivatives` or :attr:`probs_derivatives`; None for other forms
            or where the record gives none.
        """
        if p_form == q_form == "logits":
            return self.logits_derivatives
        if p_form == q_form == "probs":
            return self.probs_derivatives
        return None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            msg = f"`name` must be an identifier such as 'hellinger', got {self.name!r}."
            raise ValueError(msg)
        aliases: Any = self.aliases  # (checked at run time: records come from users)
        if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
            msg = f"`aliases` of {self.name!r} must be a tuple of names, got {aliases!r}."
            raise TypeError(msg)
        object.__setattr__(self, "aliases", tuple(aliases))  # hashable, as records are
        options: Any = tuple(self.options)
        object.__setattr__(self, "options", options)
        for option in options:
            if not isinstance(option, Option):
                msg = f"`options` of {self.name!r} must be klx.Option records, got {option!r}."
                raise TypeError(msg)
            if option.name in RESERVED:
                msg = (
                    f"the option {option.name!r} of {self.name!r} is an argument of klx's "
                    "divergence functions, which would take it; name the option otherwise."
                )
                raise ValueError(msg)
        terms: object = self.terms  # (checked at run time: records come from users)
        if not callable(terms):
            msg = f"`terms` of {self.name!r} must be callable, got {terms!r}."
            raise TypeError(msg)
        if self.reads not in READS:
            msg = f"`reads` of {self.name!r} must be one of {READS}, got {self.reads!r}."
            raise ValueError(msg)
        kinds = self.combine if isinstance(self.combine, tuple) else (self.combine,)
        if not kinds or not all(k in COMBINES for k in kinds):
            msg = (
                f"`combine` of {self.name!r} must be one of {COMBINES} (or a tuple of them, one "
                f"per array of terms), got {self.combine!r}."
            )
            raise ValueError(msg)
        zero: object = self.zero_at_equal  # (checked at run time: records come from users)
        if not isinstance(zero, bool):
            msg = f"`zero_at_equal` of {self.name!r} must be True or False, got {zero!r}."
            raise TypeError(msg)
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            msg = f"the options of {self.name!r} repeat a name: {names}."
            raise ValueError(msg)

    def option_values(self, given: Mapping[str, object]) -> tuple[tuple[str, float], ...]:
        """The record's options, each checked, from the keywords `given`.

        Parameters
        ----------
        given : mapping of str to object
            The options passed, by name; those not given take their defaults.

        Returns
        -------
        tuple of (str, float)
            Every option's name and checked value, in the record's order.

        Raises
        ------
        TypeError
            A keyword that is not one of its options; or an option's own check.
        ValueError
            An option's own check (a value out of range).
        """
        if not self.options and not given:  # (KL, TV: the common case, per call)
            return ()
        known = {o.name for o in self.options}
        for name in given:
            if name not in known:
                takes = ", ".join(f"`{k}`" for k in sorted(known)) or "no options"
                msg = (
                    f"`{name}` is not an option of the divergence {self.name!r} (it takes "
                    f"{takes}); leave it out or choose the divergence that has it."
                )
                raise TypeError(msg)
        return tuple((o.name, o.check(o.name, given.get(o.name, o.default))) for o in self.options)


# --------------------------------------------------------------------------- option checks


def alpha_order(name: str, value: object) -> float:
    """The order `name` of the alpha-divergence: any finite real number."""
    a = real_number(name, value, "a finite real number")
    if not math.isfinite(a):
        msg = (
            f"`{name}` must be finite, got {value!r}; the alpha-divergence has no order "
            "infinity (klx.renyi_divergence has: alpha=math.inf)."
        )
        raise ValueError(msg)
    return a


def renyi_order(name: str, value: object) -> float:
    """The order `name` of Rényi's divergence: a finite real number >= 0 (its order
    infinity is the record 'renyi_inf', which :func:`klx.renyi_divergence` picks)."""
    a = real_number(name, value, "a real number >= 0")
    if math.isinf(a) and a > 0:
        msg = (
            f"`{name}`=inf is Rényi's order infinity, log max p / q: call "
            "klx.renyi_divergence(p, q, alpha=math.inf) or the divergence 'renyi_inf'."
        )
        raise ValueError(msg)
    if not a >= 0.0 or not math.isfinite(a):
        msg = f"`{name}` must be a finite number >= 0 (Rényi's order), got {value!r}."
        raise ValueError(msg)
    return a


#: The entropy H(P) of :func:`klx.entropy`: a record for the divergences' machinery (forms,
#: masks, reductions, validation, dispatch), whose terms read P alone (the call passes P
#: as both sides). It is not in the table: it is no divergence (``klx.divergence(p, q,
#: "entropy")`` would ignore Q), and no registered divergence may take its name.
ENTROPY = Divergence(
    "entropy",
    _agnostic.entropy_terms,
    formula="-sum p log p",
    reads="forms",
    logits_derivatives=closed_forms.entropy_derivatives,
    public="entropy",
    zero_at_equal=False,
)


#: Every divergence klx knows, by name: the built-in ones, then those registered
#: (:func:`klx.register_divergence`). Written under :data:`_LOCK`, each time as a new
#: dict, so readers never see one mid-change.
DIVERGENCES: dict[str, Divergence] = {}
#: Every name and alias -> its record (rebuilt with :data:`DIVERGENCES`).
_BY_NAME: dict[str, Divergence] = {}
_LOCK = threading.Lock()


def _publish(table: dict[str, Divergence]) -> None:
    global DIVERGENCES, _BY_NAME
    by_name = {n: r for r in table.values() for n in (r.name, *r.aliases)}
    DIVERGENCES, _BY_NAME = table, by_name


def register(record: object, *, replace: bool = False) -> Divergence:
    """Add `record` to the table (see :func:`klx.register_divergence`). klx's own
    divergences cannot be replaced: their names select its kernels."""
    if not isinstance(record, Divergence):
        msg = f"`record` must be a klx.Divergence, got {type(record).__name__}."
        raise TypeError(msg)
    with _LOCK:
        table = dict(DIVERGENCES)
        if replace and record.name in table:
            if record.name in BUILT_IN:
                msg = f"{record.name!r} is one of klx's own divergences; it cannot be replaced."
                raise ValueError(msg)
            del table[record.name]
        if ENTROPY.name in (record.name, *record.aliases):  # served as a record, not by name
            msg = f"the divergence name {ENTROPY.name!r} is taken by 'klx.entropy'; choose another."
            raise ValueError(msg)
        taken = {n: r.name for r in table.values() for n in (r.name, *r.aliases)}
        for n in (record.name, *record.aliases):
            if n in taken:
                msg = (
                    f"the divergence name {n!r} is taken by {taken[n]!r}; choose another "
                    "name (or pass replace=True to replace a record of the same name)."
                )
                raise ValueError(msg)
        table[record.name] = record
        _publish(table)
    return record


def unregister(name: str) -> None:
    """Remove the record `name` (for tests that register their own; not klx's own)."""
    with _LOCK:
        if name in DIVERGENCES and name not in BUILT_IN:
            table = dict(DIVERGENCES)
            del table[name]
            _publish(table)


def lookup(name: object, argument: str = "divergence") -> Divergence:
    """The record called `name` (or by one of its aliases), or `name` itself if it is a
    record; a ValueError that names `argument` and lists the known names otherwise.

    A record given directly may not take a name or alias of another registered record
    (klx's kernels serve its own divergences by name): that is a ValueError too.
    """
    by_name = _BY_NAME  # one snapshot: register() swaps the dicts whole
    if isinstance(name, Divergence):
        for n in (name.name, *name.aliases):
            other = by_name.get(n)
            if other is not None and other is not name:
                msg = (
                    f"the divergence record {name.name!r} uses the name {n!r} of the "
                    f"registered divergence {other.name!r}; give it a name of its own."
                )
                raise ValueError(msg)
        return name
    if isinstance(name, str):
        record = by_name.get(name)
        if record is not None:
            return record
        valid = ", ".join(repr(n) for n in by_name)
        msg = f"`{argument}` must be one of {valid}, got {name!r}."
        raise ValueError(msg)
    msg = (
        f"`{argument}` must be a divergence's name (such as 'kl') or a klx.Divergence, "
        f"got {type(name).__name__}."
    )
    raise TypeError(msg)


def names() -> list[str]:
    """Every accepted name: each record's, then its aliases."""
    return list(_BY_NAME)


def built_in() -> tuple[Divergence, ...]:
    """The records klx ships (not those registered since), in the docs' order."""
    return tuple(DIVERGENCES[n] for n in BUILT_IN)


def markdown_table() -> str:
    """The table of divergences in ``docs/divergences.md``, generated from the records."""
    lines = [
        "| name | function | definition | options | closed-form derivative from logits |",
        "|---|---|---|---|---|",
    ]
    for r in built_in():
        name = " / ".join(f"`{n}`" for n in (r.name, *r.aliases))
        fn = f"`klx.{r.public}`" if r.public else f'`klx.divergence(p, q, "{r.name}")`'
        opts = "; ".join(f"`{o.name}` = {o.default:g}: {o.doc}" for o in r.options) or "-"
        opts = opts.replace("|", "\\|")
        closed = "yes" if r.logits_derivatives is not None else "no"
        formula = "`" + r.formula.replace("|", "\\|") + "`" if r.formula else "-"
        lines.append(f"| {name} | {fn} | {formula} | {opts} | {closed} |")
    return "\n".join(lines)


for _record in (
    Divergence(
        "kl",
        _agnostic.kl_terms,
        formula="sum p log(p / q)",
        reads="forms",
        logits_derivatives=closed_forms.kl_derivatives,
        probs_derivatives=closed_forms.kl_probs_derivatives,
        public="kl_divergence",
    ),
    Divergence(
        "js",
        _agnostic.js_terms,
        formula="beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q",
        options=(Option("beta", 0.5, mixture_weight, "the weight of P in M, in [0, 1]"),),
        reads="forms",
        logits_derivatives=closed_forms.js_derivatives,
        public="js_divergence",
    ),
    Divergence(
        "skew_kl",
        _agnostic.skew_kl_terms,
        formula="KL(P || alpha P + (1 - alpha) Q)",
        options=(Option("alpha", 0.1, mixture_weight, "the weight of P in M, in [0, 1]"),),
        reads="forms",
        logits_derivatives=closed_forms.skew_kl_derivatives,
        public="skew_kl_divergence",
    ),
    Divergence(
        "tv",
        _agnostic.tv_terms,
        formula="1/2 sum |p - q|",
        aliases=("tvd",),
        reads="forms",
        logits_derivatives=closed_forms.tv_derivatives,
        public="tv_distance",
    ),
    Divergence(
        "cross_entropy",
        _agnostic.cross_entropy_terms,
        formula="-sum p log q",
        reads="forms",
        logits_derivatives=closed_forms.cross_entropy_derivatives,
        public="cross_entropy",
        zero_at_equal=False,
    ),
    Divergence(
        "generalized_kl",
        _agnostic.generalized_kl_terms,
        formula="sum p log(p / q) - p + q of measures: kl_divergence(normalized=False)",
        reads="forms",
        public="kl_divergence",
        measures=True,
    ),
    Divergence(
        "mix",
        _agnostic.mix_terms,
        formula="lam KL(P || Q) + (1 - lam) KL(Q || P)",
        options=(
            Option(
                "lam", 0.5, mixture_weight, "the weight of KL(P || Q), in [0, 1]; 1/2: symmetric"
            ),
        ),
        reads="forms",
        logits_derivatives=closed_forms.mix_derivatives,
    ),
    Divergence(
        "alpha",
        _agnostic.alpha_terms,
        formula="sum[alpha p + (1 - alpha) q - p^alpha q^(1 - alpha)] / (alpha (1 - alpha))",
        options=(Option("alpha", 0.5, alpha_order, "any real; 1: KL(P || Q), 0: KL(Q || P)"),),
        reads="forms",
        public="alpha_divergence",
        logits_derivatives=closed_forms.alpha_derivatives,
    ),
    Divergence(
        "renyi",
        _agnostic.renyi_terms,
        formula="log(sum p^alpha q^(1 - alpha)) / (alpha - 1)",
        options=(Option("alpha", 0.5, renyi_order, "its order, >= 0; 1: KL(P || Q)"),),
        reads="forms",
        finish=_agnostic.renyi_finish,
        combine=("sum", "sum", "max"),
        public="renyi_divergence",
        logits_derivatives=closed_forms.renyi_derivatives,
    ),
    Divergence(
        "renyi_inf",
        _agnostic.max_log_ratio_terms,
        formula="log max(p / q): Rényi's order alpha = inf",
        aliases=("max_divergence",),
        reads="forms",
        combine="max",
        public="renyi_divergence",
    ),
):
    register(_record)

#: The names of the records klx ships.
BUILT_IN: tuple[str, ...] = tuple(DIVERGENCES)
