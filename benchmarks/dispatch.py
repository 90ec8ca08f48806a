"""Dispatch overhead on tiny inputs: klx.kl_div against torch.nn.functional.kl_div.

    python -m benchmarks.dispatch [--rows 32 --cols 100 --calls 20000]

At 32 x 100 the arithmetic is negligible and the time is Python and dispatch. The two
calls are interleaved (one of each, repeatedly) and each call is timed alone, so both
see the same machine state; the medians are printed with their ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import statistics
import time
import warnings

import klx
from benchmarks.cli import parser
from benchmarks.timing import busy, load_average


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=32, help="rows of the inputs")
    ap.add_argument("--cols", type=int, default=100, help="columns of the inputs")
    ap.add_argument("--calls", type=int, default=20000, help="timed calls of each")
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    x = torch.randn(args.rows, args.cols).log_softmax(-1)
    y = torch.rand(args.rows, args.cols)
    y /= y.sum(-1, keepdim=True)
    print(f"load average {load_average():.1f}, {args.load} busy processes")
    print("| reduction | klx us | F.kl_div us | ratio |\n|---|---|---|---|")
    with warnings.catch_warnings(), busy(args.load):
        warnings.simplefilter("ignore")
        for reduction in ("sum", "none", "batchmean", "mean"):
            ours, theirs = [], []
            for _ in range(args.calls):
                t0 = time.perf_counter_ns()
                klx.kl_div(x, y, reduction=reduction)
                t1 = time.perf_counter_ns()
                F.kl_div(x, y, reduction=reduction)
                t2 = time.perf_counter_ns()
                ours.append(t1 - t0)
                theirs.append(t2 - t1)
            a, b = statistics.median(ours) / 1e3, statistics.median(theirs) / 1e3
            print(f"| {reduction} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
