"""What ``python -m benchmarks.run`` prints and decides, on made-up figures: the command line
(unknown backends, ``--help``), the bandwidth bound and its flags, the rule for noisy
figures, the one-screen summary, the full table, the cells it does not measure and why.

No timing runs here and no array library but NumPy is needed: the benchmark's decisions are
plain functions of its rows (``benchmarks/report.py``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from benchmarks.backends import BACKENDS, available, unknown_backend_error  # noqa: E402
from benchmarks.cli import parser  # noqa: E402
from benchmarks.timing import Timing, interleaved  # noqa: E402

GB = 1e9


def timing(ms: float, spread: float = 0.02) -> Timing:
    return Timing(ms / 1e3, spread, 50, (0.5, 0.6))


def rows_for(
    backend: str,
    shape: tuple[int, int],
    times: dict[str, float],
    *,
    reduction: str = "sum",
    target: str = "dense",
    bandwidth: float = 10 * GB,
    cache: int = 32 * 2**20,
    spreads: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one cell: implementation -> median ms."""
    key = {
        "backend": backend,
        "device": "cpu",
        "shape": list(shape),
        "dtype": "float32",
        "target": target,
        "reduction": reduction,
    }
    spreads = spreads or {}
    return [
        report.cell_row(
            key,
            impl,
            timing(ms, spreads.get(impl, 0.02)),
            1,
            itemsize=4,
            bandwidth=bandwidth,
            cache_bytes=cache,
            extra_peak=None,
        )
        for impl, ms in times.items()
    ]


# ------------------------------------------------------------------------ command line


def test_unknown_backend_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--backends", "numpy", "pytorch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown backend 'pytorch' (did you mean 'torch'?)" in err
    assert "numpy, torch, jax, cupy, dask" in err
    assert "not installed" not in err


def test_unknown_backend_message() -> None:
    assert unknown_backend_error(["numpy", "dask"]) is None
    assert unknown_backend_error([]) is None
    said = unknown_backend_error(["tensorflow", "Numpy"])
    assert said is not None
    assert said.startswith("unknown backends 'tensorflow', 'Numpy' (did you mean 'numpy'?)")
    assert said.endswith(", ".join(BACKENDS))
    # available() refuses the same names, before it looks for anything installed.
    with pytest.raises(SystemExit, match="unknown backend 'pytorch'"):
        available(["pytorch"])


def test_help_says_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert not re.search(r"default[^()]*\)\s*\(default:", text), text
    assert "(without it: every installed one)" in text
    assert "(default: 0)" in text  # --load: a real default is still said


def test_help_formatter() -> None:
    ap = parser("doc")
    ap.add_argument("--a", help="numbers (default: all of them)")
    ap.add_argument("--b", type=int, default=3, help="count")
    ap.add_argument("--c", help="a name")
    ap.add_argument("--d", action="store_true", help="a switch")
    text = " ".join(ap.format_help().split())
    assert "numbers (default: all of them) --b" in text
    assert "count (default: 3)" in text
    assert "a name --d" in text
    assert text.endswith("a switch")


# ------------------------------------------------------------------------------ bound


def test_bound_counts_the_bytes_that_must_move() -> None:
    assert report.bytes_moved(1000, 4, "sum") == 8000  # both inputs read once
    assert report.bytes_moved(1000, 4, "batchmean") == 8000
    assert report.bytes_moved(1000, 4, "none") == 12000  # and the output written
    (row,) = rows_for("numpy", (4096, 4096), {"klx": 20.0})
    assert row["bound_ms"] == pytest.approx(2 * 4096 * 4096 * 4 / (10 * GB) * 1e3)
    assert row["x_bound"] == pytest.approx(20.0 / row["bound_ms"])
    assert row["bound_note"] == ""
    assert row["gb_per_s"] == pytest.approx(2 * 4096 * 4096 * 4 / 20e-3 / GB)


def test_a_time_below_the_bound_is_flagged() -> None:
    assert report.bound_note(0.9e-3, 1e-3, cache_resident=False) == report.BELOW_BOUND
    assert report.bound_note(1.1e-3, 1e-3, cache_resident=False) == ""
    # In cache the bound does not apply: said, whatever the ratio.
    assert report.bound_note(0.1e-3, 1e-3, cache_resident=True) == report.IN_CACHE
    # 4096x4096 'sum' reads 128 MiB: at 10 GB/s no call takes less than 13.4 ms.
    rows = rows_for("numpy", (4096, 4096), {"klx": 5.0, "numpy formula": 30.0})
    report.add_peer_ratios(rows)
    assert rows[0]["bound_note"] == report.BELOW_BOUND
    assert rows[0]["x_bound"] < 1
    text = " ".join(report.render_summary(rows, [], ["header"]).split())
    assert "0.37 !1" in text and "!N: klx's time is below the bound in N cells" in text
    assert "numpy/cpu 4096x4096 dense 'sum' klx: 5.000 ms is below the bound, 13.422 ms" in text
    assert "below bound: check" in report.table(rows)


def test_cache_resident_sizes_have_no_bound_ratio() -> None:
    rows = rows_for("numpy", (32, 100), {"klx": 0.01, "numpy formula": 0.02})
    report.add_peer_ratios(rows)
    assert all(r["bound_note"] == report.IN_CACHE for r in rows)
    (line,) = report.summary_lines(rows)
    assert line["klx / bound"] == report.IN_CACHE


# --------------------------------------------------------------------------- outliers


def test_spread_status() -> None:
    assert report.spread_status(0.05) == "ok"
    assert report.spread_status(0.10) == "ok"
    assert report.spread_status(0.3) == "noisy"
    assert report.spread_status(139.21) == "unstable"
    assert report.spread_status(float("inf")) == "unstable"


def test_noisy_figures_are_measured_again() -> None:
    calls: list[list[str]] = []
    answers = iter(
        [
            {"klx": timing(1.0, 0.02), "torch formula": timing(7.996, 139.21)},
            {"torch formula": timing(0.008, 0.30)},
            {"torch formula": timing(0.009, 0.04)},
        ]
    )

    def measure(names: list[str]) -> dict[str, Timing]:
        calls.append(names)
        return next(answers)

    got = report.settle(measure, ["klx", "torch formula"])
    assert calls == [["klx", "torch formula"], ["torch formula"], ["torch formula"]]
    assert got["klx"][1] == 1
    t, count = got["torch formula"]
    assert count == 3
    assert t.median_s == pytest.approx(0.009e-3)  # the measurement with the least spread


def test_a_figure_that_stays_unstable_is_dropped_and_said() -> None:
    answers = iter([{"klx": timing(1.0), "torch formula": timing(7.996, 139.21)}])
    answers2 = iter([{"torch formula": timing(0.008, 0.9)}, {"torch formula": timing(3, 2.0)}])

    def measure(names: list[str]) -> dict[str, Timing]:
        return next(answers if len(names) == 2 else answers2)

    got = report.settle(measure, ["klx", "torch formula"], retries=2)
    t, count = got["torch formula"]
    assert count == 3 and t.spread == pytest.approx(0.9)
    key = {
        "backend": "torch",
        "device": "cpu",
        "shape": [32, 100],
        "dtype": "float32",
        "target": "dense",
        "reduction": "sum",
    }
    rows = [
        report.cell_row(key, n, t, c, itemsize=4, bandwidth=10 * GB, cache_bytes=0, extra_peak=None)
        for n, (t, c) in got.items()
    ]
    rows += rows_for("torch", (32, 100), {"F.kl_div": 2.0}, cache=0)
    report.add_peer_ratios(rows)
    dropped = next(r for r in rows if r["impl"] == "torch formula")
    assert dropped["status"] == "unstable"
    assert dropped["x_best_peer"] is None
    # klx is compared with the peers whose figures stand: F.kl_div, not the dropped one.
    assert rows[0]["x_best_peer"] == pytest.approx(0.5)
    table = report.table(rows)
    assert "13921%" not in table and "90%" not in table
    line = next(x for x in table.splitlines() if "torch formula" in x)
    assert "| - |" in line and ">50%" in line and "dropped: unstable over 3 measurements" in line
    text = " ".join(report.render_summary(rows, [], ["header"]).split())
    assert (
        "1 figure dropped, its spread above 50% over 3 measurements (in no ratio, summary "
        "or plot): torch/cpu 32x100 dense 'sum' torch formula"
    ) in text


def test_fast_calls_are_repeated_within_a_sample() -> None:
    count = 0

    def fn() -> None:
        nonlocal count
        count += 1

    t = interleaved({"fn": fn}, lambda _: None, budget_s=0.02, min_sample_s=1e-3, warmup=1)
    assert count > 5 * t["fn"].runs  # each sample is many calls
    assert t["fn"].median_s < 1e-4  # and the figure is per call


# ---------------------------------------------------------------------------- summary


def _fake_run() -> list[dict[str, Any]]:
    rows = []
    for target in ("dense", "zeros 1/8"):
        for reduction in ("sum", "none"):
            kw = {"target": target, "reduction": reduction}
            rows += rows_for(
                "numpy", (4096, 4096), {"klx": 16.0, "numpy formula": 60.0, "xlogy": 90.0}, **kw
            )
            rows += rows_for("numpy", (32, 100), {"klx": 0.02, "numpy formula": 0.005}, **kw)
            rows += rows_for(
                "torch",
                (4096, 4096),
                {"klx": 20.0, "F.kl_div": 19.5, "torch.compile(F.kl_div)": 40.0},
                **kw,
            )
    report.add_peer_ratios(rows)
    return rows


def test_summary_one_line_per_backend_and_size() -> None:
    rows = _fake_run()
    lines = {(x["backend"], x["size"]): x for x in report.summary_lines(rows)}
    assert set(lines) == {
        ("numpy/cpu", "4096x4096"),
        ("numpy/cpu", "32x100"),
        ("torch/cpu", "4096x4096"),
    }
    big = lines[("numpy/cpu", "4096x4096")]
    assert big["verdict"] == "faster than peers"
    assert big["best peer"] == "numpy formula"
    assert big["klx / best peer"] == "0.27"
    assert big["klx ms"] == "16"
    # 'sum' moves 128 MiB (13.4 ms at 10 GB/s), 'none' 192 MiB (20.1 ms).
    assert big["klx / bound"] == "0.99 !2"  # the median; 'none': 16 ms < 20.1 ms
    small = lines[("numpy/cpu", "32x100")]
    assert small["verdict"] == "slower than peers"
    assert small["klx / bound"] == report.IN_CACHE
    assert lines[("torch/cpu", "4096x4096")]["verdict"] == "on par with peers"
    assert lines[("torch/cpu", "4096x4096")]["best peer"] == "F.kl_div"


def test_summary_is_one_screen_and_comes_first() -> None:
    rows = []
    for backend in ("numpy", "torch", "jax", "dask"):
        for shape in ((32, 100), (256, 1024), (1024, 4096), (4096, 4096)):
            for reduction in ("sum", "none"):
                for target in ("dense", "zeros 1/8"):
                    rows += rows_for(
                        backend,
                        shape,
                        {"klx": 1.0, "peer a": 1.5, "peer b": 2.0, "peer c": 0.9},
                        reduction=reduction,
                        target=target,
                    )
    report.add_peer_ratios(rows)
    text = report.render_summary(rows, [], ["HEADER"], ["FOOTER"])
    lines = text.splitlines()
    assert lines[0] == "HEADER" and lines[-1] == "FOOTER"
    assert len(lines) <= 40
    assert max(map(len, lines)) <= 100
    assert lines[2].split() == [
        "backend",
        "size",
        "klx",
        "ms",
        "klx",
        "/",
        "best",
        "peer",
        "best",
        "peer",
        "klx",
        "/",
        "bound",
        "verdict",
    ]
    assert sum("slower than peers" in x for x in lines) == 16  # klx 1.0 against peer c's 0.9
    # klx's 1 ms is below the bound of the sizes beyond the cache: said, 6 lines at most.
    assert sum(x.startswith("- ") and "is below the bound" in x for x in lines) == 6
    assert "- ... and 90 more times below the bound (results.md lists them)" in lines


def test_noisy_ratios_are_marked() -> None:
    rows = rows_for("numpy", (32, 100), {"klx": 1.0, "numpy formula": 2.0})
    rows += rows_for(
        "numpy", (64, 100), {"klx": 1.0, "numpy formula": 2.0}, spreads={"numpy formula": 0.3}
    )
    report.add_peer_ratios(rows)
    lines = report.summary_lines(rows)
    assert [x["klx / best peer"] for x in lines] == ["0.50", "0.50 ~"]
    text = report.render_summary(rows, [], ["header"])
    assert "~: a figure behind the ratio is noisy (spread 10%-50%, in results.md)" in text
    assert "1 of 4 figures are noisy" in text


def test_verdict() -> None:
    assert report.verdict([0.5, 0.6]) == "faster than peers"
    assert report.verdict([1.5, 1.2]) == "slower than peers"
    assert report.verdict([0.98, 1.03]) == "on par with peers"
    assert report.verdict([0.5, 1.0, 1.5, 1.6]) == "mixed: 1 faster, 1 on par, 2 slower"
    assert report.verdict([0.5, 1.5]) == "mixed: 1 faster, 1 slower"
    assert report.verdict([1.0, 1.5]) == "mixed: 1 on par, 1 slower"
    assert report.verdict([]) == "no figure (noisy)"


def test_full_table_has_a_dtype_column() -> None:
    table = report.table(_fake_run()).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:4] == ["backend", "device", "shape", "dtype"]
    assert all(len(line.strip("|").split("|")) == len(head) for line in table)
    assert "| float32 |" in table[2]


def test_main_prints_the_summary_and_writes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _fake_run()
    skipped = [
        {"backend": "dask", "device": "cpu", "shape": [32, 100], "reason": "too small"},
        {"backend": "dask", "device": "cpu", "shape": [256, 1024], "reason": "too small"},
    ]
    bandwidth = {"cpu": {"gb_per_s": 10.0, "how": "numpy dot", "cache_bytes": 32 * 2**20}}

    def fake_run(args: Any) -> dict[str, Any]:
        return {"rows": rows, "skipped": skipped, "bandwidth": bandwidth}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(report, "plot", lambda *a, **k: False)
    assert bench.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("klx ")
    assert "default mode" in out
    assert "cpu 10.0 GB/s (numpy dot)" in out
    assert "dask/cpu 32x100, 256x1024: not measured: too small" in out
    assert str(tmp_path / "results.md") in out
    assert "| backend | device |" not in out  # the full table is in the file
    md = (tmp_path / "results.md").read_text()
    assert "| backend | device | shape | dtype |" in md
    assert md.count("\n| numpy | cpu |") == 20
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["skipped"] == skipped and len(saved["rows"]) == len(rows)


# ----------------------------------------------------------------------- skipped cells


def test_dask_tiny_sizes_are_skipped_with_the_reason() -> None:
    reason = bench.skip_reason("dask", (32, 100))
    assert reason is not None
    assert "1,048,576 elements" in reason and "scheduler" in reason
    assert "2.5 ms here" in (bench.skip_reason("dask", (32, 100), overhead_ms=2.5) or "")
    assert bench.skip_reason("dask", (4096, 4096)) is None
    assert bench.skip_reason("numpy", (32, 100)) is None
    assert bench.skip_reason("torch", (32, 100)) is None
    # Every default size that Dask skips is said, in one line.
    sizes = [s for s in bench.SIZES["default"] if bench.skip_reason("dask", s)]
    assert sizes == [(32, 100), (128, 512)]
    skipped = [
        {"backend": "dask", "device": "cpu", "shape": list(s), "reason": reason}
        for s in sizes
        for _ in range(2)  # dense and zeros 1/8
    ]
    (line,) = report.notes([], skipped)
    assert line == f"dask/cpu 32x100, 128x512: not measured: {reason}"


# ------------------------------------------------------------------------------- plot


def test_one_colour_per_implementation_in_every_panel() -> None:
    first = report.colours(["klx", "numpy formula", "F.kl_div", "jax.jit(klx)"])
    second = report.colours(["F.kl_div", "jax.jit(klx)", "klx", "numpy formula"])
    assert first == second
    assert first["klx"] == first["jax.jit(klx)"] == report.KLX_COLOUR
    assert len({first["numpy formula"], first["F.kl_div"], report.KLX_COLOUR}) == 3


def test_plot_draws_every_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = _fake_run()
    rows[0]["status"] = "unstable"  # not drawn
    rows[1]["status"] = "noisy"  # crossed
    skipped = [{"backend": "torch", "device": "cpu", "shape": [8, 8], "reason": "why"}]
    assert report.plot(rows, tmp_path / "r.png", "title", {"cpu": 32 * 2**20}, 4, skipped)
    assert (tmp_path / "r.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------ failures


def test_an_implementation_that_raises_is_left_out_and_said() -> None:
    """A failing call is recorded with its reason; a cell where every call fails is empty."""
    np = pytest.importorskip("numpy")
    x = np.zeros((4, 8), dtype=np.float32)
    key = {
        "backend": "numpy",
        "device": "cpu",
        "shape": [4, 8],
        "dtype": "float32",
        "target": "dense",
        "reduction": "sum",
    }

    def broken(x: Any, y: Any, reduction: str) -> Any:
        msg = "boom"
        raise ValueError(msg)

    def fine(x: Any, y: Any, reduction: str) -> Any:
        return lambda: float(np.sum(x * y))

    skipped: list[dict[str, Any]] = []
    limits = (10 * GB, 32 * 2**20, 0.01)
    rows = bench._one_cell(
        key, {"klx": broken}, x, x, lambda _: None, limits, lambda _: None, skipped
    )
    assert rows == []
    assert skipped == [
        {
            "backend": "numpy",
            "device": "cpu",
            "shape": [4, 8],
            "reason": "klx 'sum' failed: ValueError: boom",
            "impl": "klx",
        }
    ]
    rows = bench._one_cell(
        key,
        {"klx": broken, "numpy formula": fine},
        x,
        x,
        lambda _: None,
        limits,
        lambda _: None,
        skipped,
    )
    assert [r["impl"] for r in rows] == ["numpy formula"]
    (line,) = report.summary_lines(rows)
    assert line["verdict"] == "klx failed (notes)"
    assert any("klx 'sum' failed: ValueError: boom" in n for n in report.notes(rows, skipped))
    assert interleaved({}, lambda _: None) == {}


def test_verdict_without_a_peer() -> None:
    rows = rows_for("numpy", (4096, 4096), {"klx": 5.0})
    (line,) = report.summary_lines(rows)
    assert line["verdict"] == "no peer measured"
