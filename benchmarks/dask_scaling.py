"""klx on a dask.distributed cluster: time against the number of workers.

    python -m benchmarks.dask_scaling                       # 1 and 2 workers, 8192 x 8192
    python -m benchmarks.dask_scaling --workers 1 2 4 --rows 65536 --memory-limit 1GiB

Each worker is a process with one thread and a memory limit. The inputs are made on the
workers by dask's random generator (P from uniforms, Q as logits), in chunks of
--chunk-rows rows, so the dataset may be far larger than any worker's memory: only
chunks are ever held. Prints a table and writes dask_scaling.json and dask_scaling.png
to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import time
from pathlib import Path

import benchmarks
import klx
from benchmarks.cli import parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="cluster sizes to time")
    ap.add_argument("--rows", type=int, default=8192, help="distributions")
    ap.add_argument("--vocab", type=int, default=8192, help="categories per distribution")
    ap.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk")
    ap.add_argument("--memory-limit", default="512MiB", help="per worker")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per size")
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for the results")
    args = ap.parse_args(argv)

    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster

    gib = 2 * args.rows * args.vocab * 4 / 2**30
    results = []
    for n in args.workers:
        with (
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                memory_limit=args.memory_limit,
                dashboard_address=None,
                silence_logs=40,
            ) as cluster,
            Client(cluster) as client,
        ):
            rng = da.random.default_rng(0)
            chunks = (args.chunk_rows, args.vocab)
            p = rng.random((args.rows, args.vocab), chunks=chunks, dtype=np.float32) + 1e-3
            p = p / p.sum(axis=-1, keepdims=True)
            q_logits = rng.standard_normal((args.rows, args.vocab), chunks=chunks, dtype=np.float32)
            kl = klx.kl_divergence(p, q_logits, q_form="logits", reduction="batchmean")
            client.compute(kl, sync=True)  # warm-up: workers import klx and numpy
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                value = client.compute(kl, sync=True)
                times.append(time.perf_counter() - t0)
            t = sorted(times)[len(times) // 2]
            results.append(
                {
                    "workers": n,
                    "seconds": t,
                    "value": float(value),
                    "rows": args.rows,
                    "vocab": args.vocab,
                    "input_gib": gib,
                    "memory_limit": args.memory_limit,
                }
            )
            print(f"{n} worker(s): {t:.2f} s (KL {float(value):.6f})")
    base = results[0]["seconds"]
    print(
        "\n| workers | s | speed-up | input GiB | memory limit per worker |\n|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['workers']} | {r['seconds']:.2f} | {base / r['seconds']:.2f} "
            f"| {r['input_gib']:.2f} | {r['memory_limit']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dask_scaling.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot([r["workers"] for r in results], [r["seconds"] for r in results], marker="o")
        ax.set(
            xlabel="workers (1 thread each)",
            ylabel="seconds",
            title=f"klx on dask: {gib:.1f} GiB of input",
        )
        fig.tight_layout()
        fig.savefig(out / "dask_scaling.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
