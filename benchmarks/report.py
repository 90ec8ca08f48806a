"""What ``python -m benchmarks.run`` decides and prints, apart from the timing itself: the
bandwidth bound and its flags, the rule for noisy figures, the one-screen summary, the full
table and the plot. Everything here is a plain function of the rows, so the tests check it
on made-up rows without any array library but the standard one.

A row is one cell: one implementation on one backend, device, shape, dtype, target and
reduction, with its median time (``median_ms``), its spread, and what follows from them
(see :func:`cell_row`).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.timing import MAX_SPREAD, Timing

#: Above this spread (interquartile range over the median) a figure is not printed at all:
#: the middle half of its runs disagree by more than half of the figure.
DROP_SPREAD = 0.5

#: Ratios within this fraction of 1 are 'on par'.
PAR = 0.05

BELOW_BOUND = "below bound: check"
IN_CACHE = "in cache"


# ----------------------------------------------------------------------------- the bound


def bytes_moved(elements: int, itemsize: int, reduction: str) -> int:
    """The bytes one call must move: both inputs read once, and for ``'none'`` the output
    (one value per element) written once."""
    return elements * itemsize * (3 if reduction == "none" else 2)


def bound_note(time_s: float, bound_s: float, cache_resident: bool) -> str:
    """What a time's ratio to the bound needs said next to it.

    ``'in cache'`` where the bytes fit in the last-level cache (they are read from the
    cache, so the memory-bandwidth bound does not apply); ``'below bound: check'`` where a
    time is below the bound, which no correct measurement can be (the call skipped work,
    or the bandwidth was under-measured); else ``''``.
    """
    if cache_resident:
        return IN_CACHE
    if time_s < bound_s:
        return BELOW_BOUND
    return ""


# --------------------------------------------------------------------------- outliers


def spread_status(spread: float) -> str:
    """``'ok'`` (spread at most :data:`~benchmarks.timing.MAX_SPREAD`), ``'noisy'`` (at most
    :data:`DROP_SPREAD`: printed, with its spread) or ``'unstable'`` (its figure dropped)."""
    if spread <= MAX_SPREAD:
        return "ok"
    if spread <= DROP_SPREAD:
        return "noisy"
    return "unstable"


def settle(
    measure: Callable[[list[str]], dict[str, Timing]], names: list[str], retries: int = 2
) -> dict[str, tuple[Timing, int]]:
    """Measure every name, then measure again, up to `retries` times, the names whose figure
    is not 'ok'; keep each name's measurement with the smallest spread.

    Parameters
    ----------
    measure
        Times the calls it is given by name, together (one :class:`Timing` each).
    names
        The calls to time.
    retries
        How many more measurements a call whose spread stays large gets.

    Returns
    -------
    dict
        name -> (the kept :class:`Timing`, how many measurements were taken).
    """
    best = {name: (t, 1) for name, t in measure(list(names)).items()}
    for _ in range(retries):
        again = [n for n in names if spread_status(best[n][0].spread) != "ok"]
        if not again:
            break
        for name, t in measure(again).items():
            kept, count = best[name]
            best[name] = (t if t.spread < kept.spread else kept, count + 1)
    return best


# ------------------------------------------------------------------------------- rows


def is_klx(impl: str) -> bool:
    """Whether an implementation is klx's (``'klx'``, ``'jax.jit(klx)'``)."""
    return "klx" in impl


def cell_row(
    key: dict[str, Any],
    impl: str,
    timing: Timing,
    measurements: int,
    *,
    itemsize: int,
    bandwidth: float,
    cache_bytes: int,
    extra_peak: float | None,
) -> dict[str, Any]:
    """One row of the results: `key` (backend, device, shape, dtype, target, reduction)
    with `impl`'s time, its bound (at `bandwidth`, bytes per second) and its flags.

    ``x_best_peer`` is filled by :func:`add_peer_ratios`, once every implementation of the
    cell has its row.
    """
    n = key["shape"][0] * key["shape"][1]
    moved = bytes_moved(n, itemsize, key["reduction"])
    bound_s = moved / bandwidth
    status = spread_status(timing.spread)
    return {
        **key,
        "impl": impl,
        "median_ms": timing.median_s * 1e3,
        "spread": timing.spread,
        "status": status,
        "measurements": measurements,
        "runs": timing.runs,
        "load": max(timing.load),
        "gb_per_s": moved / timing.median_s / 1e9,
        "bound_ms": bound_s * 1e3,
        "x_bound": timing.median_s / bound_s,
        "bound_note": bound_note(timing.median_s, bound_s, moved <= cache_bytes),
        "x_best_peer": None,
        "extra_peak_mb": None if extra_peak is None else extra_peak / 2**20,
    }


def _cell(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["backend"], r["device"], tuple(r["shape"]), r["dtype"], r["target"], r["reduction"])


def add_peer_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``x_best_peer``: its time over the fastest peer's (not klx) in its
    cell; None where the row or every peer is unstable."""
    best: dict[tuple[Any, ...], float] = {}
    for r in rows:
        if not is_klx(r["impl"]) and r["status"] != "unstable":
            best[_cell(r)] = min(best.get(_cell(r), math.inf), r["median_ms"])
    for r in rows:
        peer = best.get(_cell(r))
        ok = peer is not None and r["status"] != "unstable"
        r["x_best_peer"] = r["median_ms"] / peer if ok else None


# ---------------------------------------------------------------------------- summary


def verdict(ratios: list[float], why_none: str = "no figure (noisy)") -> str:
    """klx against its best peer over the cells of one size (ratios of klx's time to the
    best peer's: below 1 is faster); `why_none` where there is no ratio."""
    if not ratios:
        return why_none
    faster = sum(q < 1 - PAR for q in ratios)
    slower = sum(q > 1 + PAR for q in ratios)
    par = len(ratios) - faster - slower
    n = len(ratios)
    if faster == n:
        return "faster than peers"
    if slower == n:
        return "slower than peers"
    if par == n:
        return "on par with peers"
    parts = [f"{k} {what}" for k, what in ((faster, "faster"), (par, "on par"), (slower, "slower"))]
    return f"mixed: {', '.join(p for p in parts if not p.startswith('0 '))}"


def _ratio_text(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1 or max(values) - min(values) < 0.005:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def _ms_text(values: list[float]) -> str:
    def fmt(v: float) -> str:
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"

    return fmt(statistics.median(values)) if values else "-"


def summary_lines(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One line per backend, device, shape and dtype: klx's time (median over the cells), its
    ratio to the best peer (median, and range over the cells; ``~`` where a figure behind it
    is noisy), the peer that was best in most cells, its ratio to the bound (median over the
    cells beyond the cache; ``!N``: below the bound in N cells), the verdict. A dtype column
    only where the rows have several (the header says the one dtype)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_cell(r)[:4], []).append(r)
    dtypes = {r["dtype"] for r in rows}
    out = []
    for (backend, device, shape, dtype), sel in groups.items():
        klx_rows = [r for r in sel if is_klx(r["impl"])]
        kept = [r for r in klx_rows if r["status"] != "unstable"]
        ratios = [r["x_best_peer"] for r in kept if r["x_best_peer"] is not None]
        bound = [r["x_bound"] for r in kept if r["bound_note"] != IN_CACHE]
        below = sum(r["bound_note"] == BELOW_BOUND for r in kept)
        winners: Counter[str] = Counter()
        noisy = any(r["status"] == "noisy" for r in kept)
        for cell in {_cell(r) for r in sel}:
            peers = [
                r
                for r in sel
                if _cell(r) == cell and not is_klx(r["impl"]) and r["status"] != "unstable"
            ]
            if peers:
                fastest = min(peers, key=lambda r: r["median_ms"])
                winners[fastest["impl"]] += 1
                noisy = noisy or fastest["status"] == "noisy"
        dropped = len(klx_rows) - len(kept)
        if not klx_rows:
            why_none = "klx failed (notes)"
        elif kept and not winners:
            why_none = "no peer measured"
        else:
            why_none = "no figure (noisy)"
        bound_text = f"{statistics.median(bound):.2f}" if bound else IN_CACHE if kept else "-"
        out.append(
            {
                "backend": f"{backend}/{device}",
                "size": f"{shape[0]}x{shape[1]}",
                **({"dtype": dtype} if len(dtypes) > 1 else {}),
                "klx ms": _ms_text([r["median_ms"] for r in kept]),
                "klx / best peer": _ratio_text(ratios) + (" ~" if noisy and ratios else ""),
                "best peer": winners.most_common(1)[0][0] if winners else "-",
                "klx / bound": bound_text + (f" !{below}" if below else ""),
                "verdict": verdict(ratios, why_none) + (f" ({dropped} dropped)" if dropped else ""),
            }
        )
    return out


def _columns(lines: list[dict[str, str]]) -> str:
    if not lines:
        return "(nothing was measured)"
    heads = list(lines[0])
    width = {h: max(len(h), *(len(line[h]) for line in lines)) for h in heads}
    text = ["  ".join(h.ljust(width[h]) for h in heads).rstrip()]
    text += ["  ".join(line[h].ljust(width[h]) for h in heads).rstrip() for line in lines]
    return "\n".join(text)


def notes(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[str]:
    """The lines under the summary: cells skipped and why, figures dropped or noisy, and
    times below the bound."""
    out = []
    reasons: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        where = f"{s['backend']}/{s['device']}"
        reasons.setdefault((where, s["reason"]), [])
        size = f"{s['shape'][0]}x{s['shape'][1]}"
        if size not in reasons[(where, s["reason"])]:
            reasons[(where, s["reason"])].append(size)
    for (where, reason), sizes in reasons.items():
        out.append(f"{where} {', '.join(sizes)}: not measured: {reason}")
    dropped = [r for r in rows if r["status"] == "unstable"]
    if dropped:
        named = "; ".join(_where(r) for r in dropped[:6])
        more = f"; and {len(dropped) - 6} more (results.md)" if len(dropped) > 6 else ""
        many = len(dropped) > 1
        out.append(
            f"{len(dropped)} {'figures' if many else 'figure'} dropped, "
            f"{'their' if many else 'its'} spread above {DROP_SPREAD:.0%} over "
            f"{max(r['measurements'] for r in dropped)} measurements (in no ratio, summary "
            f"or plot): {named}{more}"
        )
    noisy = [r for r in rows if r["status"] == "noisy"]
    if noisy:
        out.append(
            f"{len(noisy)} of {len(rows)} figures are noisy (spread {MAX_SPREAD:.0%}-"
            f"{DROP_SPREAD:.0%} after up to {max(r['measurements'] for r in noisy)} "
            "measurements): kept, with their spread in the full table"
        )
    below = [r for r in rows if r["bound_note"] == BELOW_BOUND and r["status"] != "unstable"]
    for r in below[:6]:
        out.append(
            f"{_where(r)}: {r['median_ms']:.3f} ms is below the bound, {r['bound_ms']:.3f} ms: "
            "check"
        )
    if len(below) > 6:
        out.append(f"... and {len(below) - 6} more times below the bound (results.md lists them)")
    return out


def _where(r: dict[str, Any]) -> str:
    return (
        f"{r['backend']}/{r['device']} {r['shape'][0]}x{r['shape'][1]} {r['target']} "
        f"'{r['reduction']}' {r['impl']}"
    )


def render_summary(
    rows: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    header: list[str],
    footer: Iterable[str] = (),
) -> str:
    """The one-screen summary: `header` lines, one line per backend and size, the notes,
    and `footer` lines (where the full results are)."""
    note_lines = notes(rows, skipped)
    lines = summary_lines(rows)
    parts = [*_wrap(header), "", _columns(lines)]
    if any("~" in line["klx / best peer"] for line in lines):
        parts.append(
            f"~: a figure behind the ratio is noisy (spread {MAX_SPREAD:.0%}-{DROP_SPREAD:.0%}, "
            "in results.md)"
        )
    if any("!" in line["klx / bound"] for line in lines):
        parts.append(
            "!N: klx's time is below the bound in N cells, which no correct measurement can "
            "be: check (notes)"
        )
    if note_lines:
        parts += ["", "Notes:", *_wrap(f"- {line}" for line in note_lines)]
    footer = list(footer)
    if footer:
        parts += ["", *_wrap(footer)]
    return "\n".join(parts)


def _wrap(lines: Iterable[str], width: int = 100) -> list[str]:
    """Each line folded at `width`, its continuation indented by two spaces."""
    return [
        part
        for line in lines
        for part in textwrap.wrap(
            line, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
        )
        or [""]
    ]


# ------------------------------------------------------------------------------ table


def table(rows: list[dict[str, Any]]) -> str:
    """Every cell, as a markdown table (dtype, GB/s, ratios, memory, spread and flags)."""
    head = (
        "| backend | device | shape | dtype | target | reduction | implementation | ms | GB/s "
        "| x best peer | x bound | extra MB | load avg | spread | note |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        mem = "-" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}"
        dropped = r["status"] == "unstable"
        ms = "-" if dropped else f"{r['median_ms']:.3f}"
        gbs = "-" if dropped else f"{r['gb_per_s']:.1f}"
        peer = "-" if r["x_best_peer"] is None else f"{r['x_best_peer']:.2f}"
        bound = "-" if dropped else f"{r['x_bound']:.2f}"
        spread = f">{DROP_SPREAD:.0%}" if dropped else f"{r['spread']:.0%}"
        note = [r["bound_note"]] if r["bound_note"] and not dropped else []
        if r["status"] == "noisy":
            note.append("noisy")
        if dropped:
            note.append(f"dropped: unstable over {r['measurements']} measurements")
        elif r["measurements"] > 1:
            note.append(f"measured {r['measurements']} times")
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['shape'][0]}x{r['shape'][1]} "
            f"| {r['dtype']} | {r['target']} | {r['reduction']} | {r['impl']} | {ms} | {gbs} "
            f"| {peer} | {bound} | {mem} | {r['load']:.1f} | {spread} | {'; '.join(note)} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plot

#: Peers' colours, in the order their names first appear (klx's own is KLX_COLOUR).
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]
KLX_COLOUR = "#d62728"


def colours(impls: Iterable[str]) -> dict[str, str]:
    """One colour per implementation, the same in every panel: klx's (under any name) red,
    the peers' from :data:`PALETTE` in sorted order."""
    names = sorted(set(impls))
    peers = [n for n in names if not is_klx(n)]
    out = {n: KLX_COLOUR for n in names if is_klx(n)}
    out.update({n: PALETTE[i % len(PALETTE)] for i, n in enumerate(peers)})
    return out


def plot(
    rows: list[dict[str, Any]],
    path: Path,
    title: str,
    cache_bytes: dict[str, int],
    itemsize: int = 4,
    skipped: Iterable[dict[str, Any]] = (),
) -> bool:
    """One panel per backend (columns) and reduction (rows): time per call against size,
    log-log, one colour per implementation in every panel, the bound as a grey line, the
    sizes whose bytes moved fit in cache shaded; a legend outside the panels. Dropped (unstable)
    figures are not drawn, noisy ones are crossed; a panel says which sizes were not
    measured (`skipped`). Returns False without matplotlib."""
    from benchmarks.cli import pyplot

    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys((r["backend"], r["device"]) for r in rows))
    reductions = list(dict.fromkeys(r["reduction"] for r in rows))
    colour = colours(r["impl"] for r in rows)
    not_measured: dict[tuple[str, str], list[str]] = {}
    for sk in skipped:
        if "impl" in sk:  # one implementation failed there; the others were measured
            continue
        names = not_measured.setdefault((sk["backend"], sk["device"]), [])
        if f"{sk['shape'][0]}x{sk['shape'][1]}" not in names:
            names.append(f"{sk['shape'][0]}x{sk['shape'][1]}")
    shapes = [tuple(r["shape"]) for r in rows] + [tuple(sk["shape"]) for sk in skipped]
    sizes = sorted(set(shapes), key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(
        len(reductions),
        len(groups),
        figsize=(3.6 * len(groups) + 3.2, 3.3 * len(reductions) + 1.2),
        squeeze=False,
        layout="constrained",
    )
    for i, (row_axes, reduction) in enumerate(zip(axes, reductions, strict=True)):
        for j, (ax, (backend, device)) in enumerate(zip(row_axes, groups, strict=True)):
            sel = [
                r
                for r in rows
                if (r["backend"], r["device"]) == (backend, device) and r["reduction"] == reduction
            ]
            for impl, target in sorted({(r["impl"], r["target"]) for r in sel}):
                pts = sorted(
                    (r["shape"][0] * r["shape"][1], r["median_ms"], r["status"])
                    for r in sel
                    if (r["impl"], r["target"]) == (impl, target) and r["status"] != "unstable"
                )
                style = {
                    "color": colour[impl],
                    "linestyle": "-" if target == "dense" else "--",
                    "linewidth": 2.6 if is_klx(impl) else 1.4,
                    "zorder": 3 if is_klx(impl) else 2,
                }
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, **style)
                noisy = [p for p in pts if p[2] == "noisy"]
                ax.scatter(
                    [p[0] for p in noisy], [p[1] for p in noisy], marker="x", s=60, c="black"
                )
            bound = sorted(
                {(r["shape"][0] * r["shape"][1], r["bound_ms"]) for r in sel if is_klx(r["impl"])}
            )
            ax.plot(
                [b[0] for b in bound], [b[1] for b in bound], color="grey", ls=":", lw=2, zorder=1
            )
            per_element = itemsize * (3 if reduction == "none" else 2)
            fits = cache_bytes.get(device, 0) / per_element
            if fits > 0:
                ax.axvspan(1, fits, color="grey", alpha=0.12, lw=0)
            elems = [s[0] * s[1] for s in sizes]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(elems[0] / 2, elems[-1] * 2)
            ax.set_xticks(elems, [f"{s[0]}x{s[1]}" for s in sizes], rotation=30, fontsize=8)
            ax.minorticks_off()
            ax.set_title(f"{backend} on {device}, reduction='{reduction}'", fontsize=10)
            if i == len(reductions) - 1:
                ax.set_xlabel("input shape (rows x columns)", fontsize=9)
            if j == 0:
                ax.set_ylabel("ms per call (log scale; lower is better)", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if (backend, device) in not_measured:
                ax.text(
                    0.03,
                    0.97,
                    f"not measured: {', '.join(not_measured[(backend, device)])}\n"
                    "(why: the summary's notes)",
                    transform=ax.transAxes,
                    va="top",
                    fontsize=8,
                )
    ours = sorted(n for n in colour if is_klx(n))
    label = "klx" + (" (under jax.jit on JAX)" if "jax.jit(klx)" in ours else "")
    handles = [Line2D([], [], color=KLX_COLOUR, lw=2.6, marker="o", label=label)]
    handles += [
        Line2D([], [], color=colour[n], lw=1.4, marker="o", label=n)
        for n in sorted(n for n in colour if not is_klx(n))
    ]
    handles += [
        Line2D([], [], color="black", ls="-", label="dense target"),
        Line2D([], [], color="black", ls="--", label="target with 1/8 zeros"),
        Line2D([], [], color="grey", ls=":", lw=2, label="bandwidth bound"),
        Patch(color="grey", alpha=0.12, label="bytes fit in cache:\nbound not meaningful"),
        Line2D([], [], color="black", marker="x", ls="", ms=8, label="noisy figure"),
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
