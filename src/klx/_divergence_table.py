"""Every divergence klx computes, one :class:`Divergence` record each.

A record holds all that klx knows about a divergence: its name and aliases, its pointwise
terms, an optional finishing step (for divergences that are not a plain sum of terms),
its options each with its own check, and its closed-form derivative from logits where it
has one. Everything else reads the records: the public functions (:func:`klx.divergence`
and the named ones), :func:`klx.fused_linear_divergence`, the accelerator registry's
gates, :func:`klx.explain`, the docs table (:func:`markdown_table`) and the tests'
parametrisation. Nothing else lists divergence names.

This module sits above the math (:mod:`klx._agnostic`, whose terms it names) and below
the call objects (:mod:`klx._call`, which carry a record): the math never imports it.

Adding a divergence is a record (here, or through :func:`klx.register_divergence` in a
user's own code), its terms, and its tests and docs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from klx import _agnostic
from klx import _closed_forms as closed_forms
from klx._checks import mixture_weight

__all__ = [
    "BUILT_IN",
    "DIVERGENCES",
    "Divergence",
    "Option",
    "built_in",
    "lookup",
    "markdown_table",
    "register",
    "unregister",
]

Array = Any

#: How a record's terms take the two distributions: 'forms' (as given, with their forms,
#: axis and temperature: the built-in terms, which keep full accuracy from any form),
#: 'probs' or 'log_probs' (klx converts both sides first).
READS = ("forms", "probs", "log_probs")


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
        pair (before `finish`). With ``reads='forms'``: ``terms(xp, p, q, *, p_form,
        q_form, axis, temperature, **options)``; with 'probs' or 'log_probs':
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
        ``finish(xp, sums, **options)``: the divergence from the per-distribution sums of
        the terms, for a divergence that is not a plain sum (Rényi's log of a sum). Applied
        per distribution, after the sum and before masks and reductions, so it works
        when rows are computed in pieces (blocks, chunks, Dask).
    logits_derivatives : callable, optional
        Its derivatives from logits in closed form, ``f(xp, call, t, s, rows, *, need_t,
        need_s)`` (see :mod:`klx._accel.closed_forms`); the closed-form accelerators serve
        only records that have one.
    public : str
        The name of its own public function, if it has one (for the docs and
        :func:`klx.explain`).
    """

    name: str
    terms: Callable[..., Array]
    formula: str = ""
    aliases: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    reads: str = "probs"
    finish: Callable[..., Array] | None = None
    logits_derivatives: Callable[..., tuple[Array | None, Array | None]] | None = field(
        default=None, compare=False
    )
    public: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            msg = f"`name` must be an identifier such as 'hellinger', got {self.name!r}."
            raise ValueError(msg)
        terms: object = self.terms  # (checked at run time: records come from users)
        if not callable(terms):
            msg = f"`terms` of {self.name!r} must be callable, got {terms!r}."
            raise TypeError(msg)
        if self.reads not in READS:
            msg = f"`reads` of {self.name!r} must be one of {READS}, got {self.reads!r}."
            raise ValueError(msg)
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            msg = f"the options of {self.name!r} repeat a name: {names}."
            raise ValueError(msg)

    def option_values(self, given: Mapping[str, object]) -> tuple[tuple[str, float], ...]:
        """The record's options, each checked, from the keywords `given` (defaults for
        those not given). A keyword that is not one of its options is a TypeError."""
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


#: The built-in divergences, by name (aliases resolve through :func:`lookup`).
DIVERGENCES: dict[str, Divergence] = {}


def register(record: object, *, replace: bool = False) -> Divergence:
    """Add `record` to the table (see :func:`klx.register_divergence`)."""
    if not isinstance(record, Divergence):
        msg = f"`record` must be a klx.Divergence, got {type(record).__name__}."
        raise TypeError(msg)
    taken = {}
    for existing in DIVERGENCES.values():
        if replace and existing.name == record.name:
            continue
        for n in (existing.name, *existing.aliases):
            taken[n] = existing.name
    for n in (record.name, *record.aliases):
        if n in taken:
            msg = (
                f"the divergence name {n!r} is taken by {taken[n]!r}; choose another name "
                "(or pass replace=True to replace a record of the same name)."
            )
            raise ValueError(msg)
    DIVERGENCES[record.name] = record
    return record


def unregister(name: str) -> None:
    """Remove the record `name` (for tests that register their own)."""
    DIVERGENCES.pop(name, None)


def lookup(name: object, argument: str = "divergence") -> Divergence:
    """The record called `name` (or by one of its aliases); a ValueError that names
    `argument` and lists the known names otherwise."""
    if isinstance(name, Divergence):
        return name
    if isinstance(name, str):
        if name in DIVERGENCES:
            return DIVERGENCES[name]
        for record in DIVERGENCES.values():
            if name in record.aliases:
                return record
    valid = ", ".join(repr(n) for n in names())
    msg = f"`{argument}` must be one of {valid}, got {name!r}."
    raise ValueError(msg)


def names() -> list[str]:
    """Every accepted name: each record's, then its aliases."""
    return [n for r in DIVERGENCES.values() for n in (r.name, *r.aliases)]


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
        public="tv_distance",
    ),
):
    register(_record)

#: The names of the records klx ships.
BUILT_IN: tuple[str, ...] = tuple(DIVERGENCES)
