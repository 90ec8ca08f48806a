"""Top-k divergences against the dense KL: memory and time of forward + backward on the CPU
(klx issue 27, part 3; NeMo-RL #3314's figures are GPU ones: 4.64 GiB and 3.2 ms at
8192 tokens x 151936 vocabulary, k = 64).

    python -m benchmarks.sparse_directions            # 2048 x 151936, k = 64
    python -m benchmarks.sparse_directions --quick    # 256 x 32000, k = 64: seconds
    python -m benchmarks.sparse_directions --smoke    # 16 x 512, k = 8: one run each

Each case is one step of distillation in float32 with torch on the CPU: the student's
logits require a gradient, the loss is reduced by 'batchmean' and ``backward()`` runs.

* dense: ``klx.kl_divergence(teacher_logits, student_logits)`` (the definition);
* sparse forward: ``klx.sparse_kl_divergence`` on a vLLM-style teacher (its top-k
  indices and log-probabilities only);
* sparse reverse, own top k: ``klx.sparse_divergence(..., direction='reverse',
  support='q', k=k)`` against the teacher's full logits;
* sparse JS, union: ``direction='js', support='union'``.

Times are medians of interleaved runs (:func:`benchmarks.timing.interleaved`); memory is
the extra peak resident set size of one step (``VmHWM``) beyond the inputs, each case in a
fresh process (in one process the allocator keeps the dense step's pages, and a later case
would reuse them unseen). 8192 x 151936
float32 logits are 4.6 GiB per side, more than a quick CPU run should hold: the default
size is 2048 rows (``--rows`` to change it). Prints a markdown table and writes
sparse_directions.json to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import subprocess
import warnings
from collections.abc import Callable
from typing import Any

import benchmarks
import klx
from benchmarks.cli import parser
from benchmarks.timing import extra_peak_bytes, interleaved, load_average, synchronizer


def cases(rows: int, vocab: int, k: int) -> dict[str, Callable[[], Any]]:
    """One forward + backward step per case, on the same inputs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(rows, vocab, generator=gen) * 2.0
    student_init = 0.6 * teacher + torch.randn(rows, vocab, generator=gen)
    top_lp, top_idx = torch.log_softmax(teacher, dim=-1).topk(k, dim=-1)

    def step(loss_of: Callable[[Any], Any]) -> Callable[[], Any]:
        def run() -> Any:
            z = student_init.clone().requires_grad_(True)
            loss = loss_of(z)
            loss.backward()
            return z.grad

        return run

    return {
        "dense KL (definition)": step(
            lambda z: klx.kl_divergence(teacher, z, reduction="batchmean")
        ),
        "sparse forward, teacher top k (vLLM)": step(
            lambda z: klx.sparse_kl_divergence(top_idx, top_lp, z, reduction="batchmean")
        ),
        "sparse reverse, student top k": step(
            lambda z: klx.sparse_divergence(
                teacher, z, direction="reverse", support="q", k=k, reduction="batchmean"
            )
        ),
        "sparse JS, union": step(
            lambda z: klx.sparse_divergence(
                teacher, z, direction="js", support="union", k=k, reduction="batchmean"
            )
        ),
    }


def memory_in_fresh_process(name: str, rows: int, vocab: int, k: int) -> float | None:
    """The extra peak RSS of one step of case `name`, measured in a new interpreter."""
    cmd = [sys.executable, "-m", "benchmarks.sparse_directions", "--memory-of", name]
    cmd += ["--rows", str(rows), "--vocab", str(vocab), "-k", str(k)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    value = done.stdout.strip().splitlines()[-1]
    return None if value == "None" else float(value)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="256 x 32000: seconds")
    ap.add_argument("--smoke", action="store_true", help="16 x 512, k = 8, one run each")
    ap.add_argument("--rows", type=int, default=2048, help="tokens (rows)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    ap.add_argument("-k", type=int, default=64, help="top k")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for the JSON")
    ap.add_argument("--memory-of", help="(internal) print one case's extra peak bytes")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows, vocab, k = args.rows, args.vocab, args.k
    if args.quick:
        rows, vocab = 256, 32000
    if args.smoke:
        rows, vocab, k = 16, 512, 8
    fns = cases(rows, vocab, k)
    sync = synchronizer("torch", "cpu")
    if args.memory_of:
        # One tiny step loads the code paths; then the first step at the real size (a
        # second would reuse the pages the first left resident).
        sync(cases(16, 512, 8)[args.memory_of]())
        print(extra_peak_bytes(fns[args.memory_of], sync, "torch", "cpu"))
        return 0
    memory = {name: memory_in_fresh_process(name, rows, vocab, k) for name in fns}
    budget, rounds = (0.0, 1) if args.smoke else (30.0, 5)
    times = interleaved(fns, sync, budget_s=budget, min_rounds=rounds, warmup=1)
    dense = times["dense KL (definition)"].median_s
    lines = [
        f"torch CPU float32, {rows} x {vocab}, k = {k}, forward + backward, 'batchmean'",
        "",
        "| case | ms | vs dense | extra peak MiB |",
        "|---|---|---|---|",
    ]
    results = []
    for name, t in times.items():
        mem = memory[name]
        mib = "n/a" if mem is None else f"{mem / 2**20:.0f}"
        lines.append(
            f"| {name} | {t.median_s * 1e3:.1f}{t.flag()} | {t.median_s / dense:.2f} | {mib} |"
        )
        results.append(
            {
                "case": name,
                "rows": rows,
                "vocab": vocab,
                "k": k,
                "ms": t.median_s * 1e3,
                "ratio_to_dense": t.median_s / dense,
                "extra_peak_bytes": mem,
            }
        )
    print("\n".join(lines))
    print(f"\nload average: {load_average():.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_directions.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
