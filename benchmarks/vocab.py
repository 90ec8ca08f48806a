"""Masked vocabularies and different vocabulary sizes against the dense KL, on the CPU.

    python -m benchmarks.vocab            # 1024 x 32000 float32 logits
    python -m benchmarks.vocab --quick    # 512 x 32000: half a minute
    python -m benchmarks.vocab --smoke    # tiny: the test suite runs it

KL(P || Q) from logits, 'sum', each case timed in alternation with the dense KL of the
same shape (so both see the same machine):

* "masked on both sides": the last 1000 ids are ``-inf`` in both models' logits (a
  vocabulary padded or masked the same way in both);
* "teacher masked only": the teacher's last 1000 ids are ``-inf``, the student's are not;
* "intersect, teacher padded": a teacher of V + 64 ids whose extra ids are ``-inf``, against
  a student of V ids, ``vocab='intersect'`` (the padded embedding tables of TRL #2215);
* "truncate, teacher larger": a teacher of V + 64 finite ids, ``vocab='truncate'``.

Prints a markdown table (milliseconds and the ratio to the dense KL) for NumPy and torch,
and writes vocab.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import warnings
from collections.abc import Callable
from typing import Any

import benchmarks
import klx
from benchmarks.backends import available
from benchmarks.cli import parser
from benchmarks.timing import interleaved, load_average, synchronizer

#: Extra ids of the larger teacher, and masked ids of the masked cases.
EXTRA, MASKED = 64, 1000


def _inputs(rows: int, vocab: int) -> dict[str, tuple[Any, Any, str]]:
    """Each case's teacher and student logits and its `vocab` option."""
    import numpy as np

    rng = np.random.default_rng(0)
    t = rng.normal(size=(rows, vocab + EXTRA)).astype(np.float32)
    s = rng.normal(size=(rows, vocab)).astype(np.float32)
    masked = min(MASKED, vocab // 4)
    both_t, both_s = t[:, :vocab].copy(), s.copy()
    both_t[:, -masked:] = -np.inf
    both_s[:, -masked:] = -np.inf
    only_t = t[:, :vocab].copy()
    only_t[:, -masked:] = -np.inf
    padded = t.copy()
    padded[:, vocab:] = -np.inf
    return {
        "dense": (np.ascontiguousarray(t[:, :vocab]), s, "same"),
        "masked on both sides": (both_t, both_s, "same"),
        "teacher masked only": (only_t, s, "same"),
        "intersect, teacher padded": (padded, s, "intersect"),
        "truncate, teacher larger": (t, s, "truncate"),
    }


def _cases(
    rows: int, vocab: int
) -> list[tuple[str, str, Callable[[], Any], Callable[[], Any], Any]]:
    inputs = _inputs(rows, vocab)
    libs: list[tuple[str, Callable[[Any], Any]]] = [("numpy", lambda a: a)]
    if any(name == "torch" for name, _ in available(None)):
        import torch

        libs.append(("torch", torch.from_numpy))
    kw: dict[str, Any] = {"p_form": "logits", "q_form": "logits", "reduction": "sum"}
    out = []
    for lib, to in libs:
        dense_t, dense_s, _ = inputs["dense"]
        dt, ds = to(dense_t), to(dense_s)

        def dense(dt: Any = dt, ds: Any = ds) -> Any:
            return klx.kl_divergence(dt, ds, **kw)

        for name, (t, s, mode) in inputs.items():
            if name == "dense":
                continue
            a, b = to(t), to(s)

            def case(a: Any = a, b: Any = b, mode: str = mode) -> Any:
                return klx.kl_divergence(a, b, vocab=mode, **kw)

            out.append((lib, name, case, dense, synchronizer(lib, "cpu")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="512 rows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for vocab.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows, vocab = (16, 256) if args.smoke else ((512, 32000) if args.quick else (1024, 32000))
    lines = [
        f"{rows} x {vocab} float32 logits, KL 'sum' (the larger teacher: {vocab + EXTRA} ids)",
        "",
        "| library | case | ms | dense KL ms | ratio |",
        "|---|---|---|---|---|",
    ]
    results = []
    for lib, name, case, dense, sync in _cases(rows, vocab):
        budget = 0.0 if args.smoke else 15.0
        t = interleaved(
            {"case": case, "dense": dense}, sync, budget_s=budget, min_rounds=1 if args.smoke else 5
        )
        ratio = t["case"].median_s / t["dense"].median_s
        lines.append(
            f"| {lib} | {name} | {t['case'].median_s * 1e3:.1f}{t['case'].flag()} | "
            f"{t['dense'].median_s * 1e3:.1f}{t['dense'].flag()} | {ratio:.2f} |"
        )
        results.append(
            {
                "library": lib,
                "case": name,
                "rows": rows,
                "vocab": vocab,
                "ms": t["case"].median_s * 1e3,
                "dense_ms": t["dense"].median_s * 1e3,
            }
        )
        print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    print(f"\nload average: {load_average():.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
