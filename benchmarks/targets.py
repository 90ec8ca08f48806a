"""The CPU targets of issue 14, quiet and with busy background processes, in one table.

    python -m benchmarks.targets                 # quiet, then with 1 busy process (< 5 min)
    python benchmarks/targets.py --load 0 2      # from anywhere: quiet, then 2 busy

Each case times klx and its peer in alternation on the same inputs (so both see the same
machine), until the spread of each is small or the case's time budget is spent; a ratio
whose figures stayed noisy is flagged. Every condition records the load average. Cases:

* torch CPU ``kl_div`` 1024 x 4096 'sum' against ``F.kl_div`` (target 0.6; with 1/8 of the
  target entries exactly 0 too);
* torch CPU ``kl_divergence`` from logits, T = 2, 'batchmean', 512 x 32000 and 2048 x 32000
  against eager ``log_softmax`` twice + ``kl_div(log_target=True)`` (target 0.8);
* torch 32 x 100 in four layouts (contiguous, sliced, transposed, expanded) and every
  reduction against ``F.kl_div`` on the same tensors (target 1.5);
* NumPy ``kl_div`` 1024 x 4096 every reduction, with and without zeros, against the
  hand-written formula (target 1.0 quiet, 1.1 loaded);
* Dask ``kl_div`` 4096 x 4096 in 8 chunks, against the plain dask formula on the same
  chunks (target 1.2);
* NumPy and torch 'sum' against the limit measured in the same run: the larger of reading
  both inputs once (``np.dot``) and ``np.log`` of one input spread over the cores (target 2).

Prints the markdown table and writes targets.json and targets.md to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import benchmarks
import klx
from benchmarks.cli import parser
from benchmarks.timing import Timing, busy, interleaved, load_average, synchronizer


@dataclass
class Case:
    name: str
    klx: Callable[[], Any]
    peer_name: str
    peer: Callable[[], Any]
    sync: Callable[[Any], None]
    target: float
    #: Target under load, where the issue sets another one.
    target_loaded: float | None = None
    budget_s: float = 1.0
    min_rounds: int = 5


def _none(_: Any) -> None:
    return None


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


def _numpy_inputs(shape: tuple[int, int], zeros: bool) -> tuple[Any, Any]:
    from benchmarks.backends import make_inputs

    x, y = make_inputs("numpy", "cpu", shape, zeros=zeros)
    return x, y


def torch_cases(quick: bool) -> Iterator[Case]:
    import torch
    import torch.nn.functional as F

    for zeros in (False, True):
        x, y = (torch.from_numpy(a) for a in _numpy_inputs((1024, 4096), zeros))
        yield Case(
            f"torch kl_div 1024x4096 sum{' zeros 1/8' if zeros else ''}",
            lambda x=x, y=y: klx.kl_div(x, y, reduction="sum"),
            "F.kl_div",
            lambda x=x, y=y: F.kl_div(x, y, reduction="sum"),
            _none,
            0.6,
        )
    g = torch.Generator().manual_seed(0)
    for rows in (512,) if quick else (512, 2048):
        t = torch.randn(rows, 32000, generator=g)
        s = torch.randn(rows, 32000, generator=g)

        def eager(t: Any = t, s: Any = s) -> Any:
            lp, lq = F.log_softmax(t / 2.0, -1), F.log_softmax(s / 2.0, -1)
            return F.kl_div(lq, lp, reduction="batchmean", log_target=True)

        yield Case(
            f"torch kl_divergence logits {rows}x32000 batchmean",
            lambda t=t, s=s: klx.kl_divergence(
                t, s, p_form="logits", q_form="logits", temperature=2.0, reduction="batchmean"
            ),
            "eager log_softmax + kl_div",
            eager,
            _none,
            0.8,
            budget_s=4.0 if rows > 512 else 2.0,
            min_rounds=3,
        )
    base_x, base_y = (torch.from_numpy(a) for a in _numpy_inputs((128, 256), False))
    layouts = {
        "contiguous": lambda a: a[:32, :100].contiguous(),
        "sliced": lambda a: a[:32, :100],
        "transposed": lambda a: a[:100, :32].t(),
        "expanded": lambda a: a[:1, :100].expand(32, 100),
    }
    for layout, make in layouts.items():
        x, y = make(base_x), make(base_y)
        for red in ("none", "sum", "mean", "batchmean"):
            yield Case(
                f"torch 32x100 {layout} {red}",
                _quiet(lambda x=x, y=y, red=red: klx.kl_div(x, y, reduction=red)),
                "F.kl_div",
                _quiet(lambda x=x, y=y, red=red: F.kl_div(x, y, reduction=red)),
                _none,
                1.5,
                budget_s=0.3,
                min_rounds=200,
            )


def numpy_cases(quick: bool) -> Iterator[Case]:
    import numpy as np

    def formula(x: Any, y: Any, red: str) -> Callable[[], Any]:
        def run() -> Any:
            with np.errstate(all="ignore"):
                t = y * (np.log(y) - x)
                if red == "none":
                    return t
                s = np.sum(t)
                return s / t.size if red == "mean" else s / x.shape[0] if red == "batchmean" else s

        return run

    for zeros in (False, True):
        x, y = _numpy_inputs((1024, 4096), zeros)
        for red in ("none", "sum", "mean", "batchmean") if not quick else ("none", "sum"):
            yield Case(
                f"numpy kl_div 1024x4096 {red}{' zeros 1/8' if zeros else ''}",
                _quiet(lambda x=x, y=y, red=red: klx.kl_div(x, y, reduction=red)),
                "formula y*(log y - x)",
                formula(x, y, red),
                _none,
                1.0,
                target_loaded=1.1,
            )


def dask_cases(quick: bool) -> Iterator[Case]:
    import dask.array as da

    shape = (2048, 4096) if quick else (4096, 4096)
    for zeros in (False, True):
        xn, yn = _numpy_inputs(shape, zeros)
        x = da.from_array(xn, chunks=(shape[0] // 8, shape[1]))
        y = da.from_array(yn, chunks=(shape[0] // 8, shape[1]))
        for red in ("sum", "none"):
            peer = (y * (da.log(y) - x)).sum() if red == "sum" else y * (da.log(y) - x)
            yield Case(
                f"dask kl_div {shape[0]}x{shape[1]} {red}{' zeros 1/8' if zeros else ''}",
                _quiet(lambda x=x, y=y, red=red: klx.kl_div(x, y, reduction=red)),
                "dask formula",
                lambda peer=peer: peer,
                synchronizer("dask", "cpu"),
                1.2,
            )


def limit_cases() -> Iterator[Case]:
    """klx 'sum' against the limit: max(two-input read, log of one input on every core)."""
    import numpy as np
    import torch

    from klx._accel.threads import _pool
    from klx._accel.threads import workers as _workers

    for zeros in (False, True):
        x, y = _numpy_inputs((1024, 4096), zeros)
        xf, yf = x.reshape(-1), y.reshape(-1)
        out = np.empty_like(yf)
        w = _workers()
        cuts = [xf.size * i // w for i in range(w + 1)]

        def log_part(k: int, yf: Any = yf, out: Any = out, cuts: list[int] = cuts) -> Any:
            with np.errstate(all="ignore"):
                return np.log(yf[cuts[k] : cuts[k + 1]], out=out[cuts[k] : cuts[k + 1]])

        def log_spread(log_part: Any = log_part, parts: int = len(cuts) - 1) -> Any:
            return list(_pool().map(log_part, range(parts)))

        bounds = {"read both inputs (np.dot)": lambda xf=xf, yf=yf: np.dot(xf, yf)}
        bounds[f"np.log of one input on {w} threads"] = log_spread
        t = interleaved(bounds, _none, budget_s=1.0)
        name = max(t, key=lambda k: t[k].median_s)  # the limit: the slower of the two
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        suffix = " zeros 1/8" if zeros else ""
        for lib, a, b in (("numpy", x, y), ("torch", tx, ty)):
            yield Case(
                f"{lib} kl_div 1024x4096 sum{suffix} vs the limit",
                lambda a=a, b=b: klx.kl_div(a, b, reduction="sum"),
                f"limit: {name}",
                bounds[name],
                _none,
                2.0,
            )


def run_condition(load: int, groups: list[str], quick: bool) -> list[dict[str, Any]]:
    makers = {
        "torch": lambda: torch_cases(quick),
        "numpy": lambda: numpy_cases(quick),
        "dask": lambda: dask_cases(quick),
        "limit": limit_cases,
    }
    rows: list[dict[str, Any]] = []
    with busy(load):
        for group in groups:
            for case in makers[group]():
                t = interleaved(
                    {"klx": case.klx, "peer": case.peer},
                    case.sync,
                    budget_s=case.budget_s,
                    min_rounds=case.min_rounds,
                )
                rows.append(_row(case, t["klx"], t["peer"], load))
                r = rows[-1]
                print(
                    f"  [{'quiet' if not load else f'{load} busy'}] {case.name}: "
                    f"{r['klx_ms']:.3f} / {r['peer_ms']:.3f} ms = {r['ratio']:.2f} "
                    f"(target {r['target']}, load {r['load']:.1f}){r['flag']}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _row(case: Case, ours: Timing, peer: Timing, load: int) -> dict[str, Any]:
    target = case.target_loaded if load and case.target_loaded else case.target
    peer_ms = peer.median_s * 1e3
    ratio = ours.median_s * 1e3 / peer_ms
    noisy = [n for n, t in (("klx", ours), ("peer", peer)) if t.noisy]
    flag = "" if not noisy else f" noisy: {', '.join(noisy)}"
    return {
        "condition": "quiet" if not load else f"{load} busy",
        "case": case.name,
        "klx_ms": ours.median_s * 1e3,
        "klx_spread": ours.spread,
        "peer": case.peer_name,
        "peer_ms": peer_ms,
        "peer_spread": peer.spread,
        "ratio": ratio,
        "target": target,
        "met": ratio <= target,
        "load": max(ours.load),
        "runs": ours.runs,
        "flag": flag,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| condition | load avg | case | klx ms | peer | peer ms | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = max(r["klx_spread"], r["peer_spread"])
        lines.append(
            f"| {r['condition']} | {r['load']:.1f} | {r['case']} | {r['klx_ms']:.3f} "
            f"| {r['peer']} | {r['peer_ms']:.3f} | {r['ratio']:.2f} | {r['target']} "
            f"| {'yes' if r['met'] else '**no**'}"
            f"{f' (spread {spread:.0%})' if r['flag'] else ''} |"
        )
    return "\n".join(lines)


def _initialise(libraries: list[str]) -> None:
    """Import and run each library once (thread pools started), before anything is timed."""
    for lib in libraries:
        if lib == "torch":
            import torch

            torch.ones(1 << 20).exp().sum().item()
        else:
            import jax.numpy as jnp

            jnp.exp(jnp.ones(1 << 20)).sum().block_until_ready()


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument(
        "--load",
        type=int,
        nargs="*",
        default=[0, 1],
        help="conditions: numbers of busy background processes, each run in turn",
    )
    ap.add_argument(
        "--groups",
        nargs="*",
        default=["torch", "numpy", "dask", "limit"],
        choices=["torch", "numpy", "dask", "limit"],
        help="which cases to run",
    )
    ap.add_argument("--quick", action="store_true", help="fewer cases (no 2048 x 32000)")
    ap.add_argument(
        "--init",
        nargs="*",
        default=[],
        choices=["torch", "jax"],
        help="libraries to import and run once before timing (do they slow the others?)",
    )
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for targets.json/.md")
    args = ap.parse_args(argv)
    _initialise(args.init)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for load in args.load:
        print(f"condition: {load} busy background processes", file=sys.stderr)
        rows += run_condition(load, args.groups, args.quick)
    meta = {
        "klx": klx.__version__,
        "klx_path": klx.__file__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "argv": sys.argv,
        "seconds": time.perf_counter() - t0,
        "load_at_end": load_average(),
        "initialised": args.init,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows)
    (out / "targets.md").write_text(text + "\n")
    print(text)
    print(f"\n{meta['seconds']:.0f} s; wrote {out / 'targets.json'} and {out / 'targets.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
