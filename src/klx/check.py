"""``python -m klx.check``: check klx's accelerators on this machine's own hardware.

For every installed array library and every device it can see (CUDA through torch,
CuPy and JAX included), each accelerator of the registry that serves that library and
device runs on test inputs (zero targets, ``-inf`` log-probabilities, logits, masked
rows) and is compared with an independent float64 NumPy reference, as is the array-API
definition itself. One timing per accelerator against the definition and against the
library's native peer (``F.kl_div``, the hand-written formula, ...). It prints one
table, writes it as JSON with ``--json PATH``, lists the libraries and devices it did
not find, and exits with status 1 on any mismatch::

    python -m klx.check
    python -m klx.check --json klx-check.json --repeat 20

Needs NumPy (for the reference).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Row", "main", "run"]

LIBRARIES = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict")
#: Allowed error relative to the scale of the terms, by dtype (the conformance tolerances).
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}
#: float16 results below its smallest subnormal's half are off by up to this, at any scale.
ATOL = {"float16": 2.0**-25}


@dataclass
class Row:
    """One line of the report."""

    library: str
    device: str
    path: str
    dtype: str
    cells: int = 0
    max_error: float = 0.0
    tolerance: float = 0.0
    status: str = "ok"
    ms_path: float | None = None
    ms_definition: float | None = None
    ms_peer: float | None = None
    peer: str = ""
    detail: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reference


def _ref_kl_div(np: Any, x: Any, y: Any, reduction: str, log_target: bool) -> tuple[Any, float]:
    """float64 terms of torch's kl_div with klx's conventions; returns (value, scale)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    with np.errstate(all="ignore"):
        w = np.exp(y) if log_target else y
        log_w = y if log_target else np.log(np.where(w > 0, w, 1.0))
        nan = np.isnan(x) | np.isnan(y)
        terms = np.where(w > 0, w * (log_w - x), 0.0)
        terms = np.where(nan, np.nan, terms)
        # each term is rounded from w log w and w x: its error scales with both
        scale = np.where(w > 0, np.abs(w * log_w) + np.abs(w * x), 0.0)
        scale = np.where(np.isfinite(scale), scale, 0.0)
    if reduction == "none":
        return terms, scale
    div = {"sum": 1, "mean": terms.size, "batchmean": x.shape[0]}[reduction]
    return np.sum(terms) / div, np.sum(scale) / div


def _ref_log_softmax(np: Any, x: Any, temperature: float) -> Any:
    x = x.astype(np.float64) / temperature
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _ref_rows(np: Any, kind: str, t: Any, s: Any, temperature: float, beta: float) -> Any:
    """float64 KL or JS per row, from logits."""
    with np.errstate(all="ignore"):
        lp, lq = _ref_log_softmax(np, t, temperature), _ref_log_softmax(np, s, temperature)
        p, q = np.exp(lp), np.exp(lq)
        if kind == "kl":
            return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)
        m = beta * p + (1 - beta) * q
        lm = np.log(np.where(m > 0, m, 1.0))
        a = np.where(p > 0, p * (lp - lm), 0.0)
        b = np.where(q > 0, q * (lq - lm), 0.0)
        return np.sum(beta * a + (1 - beta) * b, axis=-1)


def _cases(np: Any, rows: int, cols: int, seed: int = 0) -> dict[str, Any]:
    """Inputs in float64: probabilities with exact zeros, -inf log-probabilities, logits."""
    rng = np.random.default_rng(seed)
    p = rng.random((rows, cols)) ** 3
    p[:, ::8] = 0.0  # one target entry in eight is exactly 0
    p /= p.sum(axis=-1, keepdims=True)
    q = rng.random((rows, cols)) + 0.05
    q /= q.sum(axis=-1, keepdims=True)
    log_q = np.log(q)
    log_q[0, 0] = -np.inf  # -inf where the target is 0: torch gives NaN, klx 0
    t = rng.normal(size=(rows, cols)) * 3
    s = rng.normal(size=(rows, cols)) * 3
    t[1, 2] = -np.inf
    return {"p": p, "log_q": log_q, "t": t, "s": s}


# --------------------------------------------------------------------------- libraries


@dataclass
class _Library:
    name: str
    device: str
    #: float64 NumPy array -> array of this library on this device, of the named dtype.
    put: Callable[[Any, str], Any]
    get: Callable[[Any], Any]
    sync: Callable[[], None]
    dtypes: tuple[str, ...]
    device_type: str


def _libraries(np: Any, only: Sequence[str], notes: list[str]) -> list[_Library]:
    found: list[_Library] = []
    for name in only:
        try:
            importlib.import_module("dask.array" if name == "dask" else name)
        except ImportError as exc:
            notes.append(f"{name}: not installed ({exc.name})")
            continue
        found.extend(_devices(np, name, notes))
    return found


def _devices(np: Any, name: str, notes: list[str]) -> list[_Library]:
    def nop() -> None:
        return None

    if name == "numpy":
        return [
            _Library(
                "numpy",
                "cpu",
                lambda a, d: a.astype(d),
                lambda a: np.asarray(a, dtype=np.float64),
                nop,
                ("float32", "float64"),
                "cpu",
            )
        ]
    if name == "torch":
        import torch

        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if len(devices) == 1:
            notes.append("CUDA through torch: not found (torch.cuda.device_count() is 0)")
        out = []
        for dev in devices:
            sync = torch.cuda.synchronize if dev != "cpu" else nop

            def put_torch(a: Any, d: str, dev: str = dev) -> Any:
                return torch.from_numpy(a.copy()).to(dev, getattr(torch, d))

            out.append(
                _Library(
                    "torch",
                    dev,
                    put_torch,
                    lambda a: a.detach().to("cpu", torch.float64).numpy(),
                    sync,
                    ("float16", "bfloat16", "float32", "float64"),
                    dev.split(":")[0],
                )
            )
        return out
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call,unused-ignore]
        import jax.numpy as jnp

        out = []
        kinds = {d.platform for d in jax.devices()}
        if "gpu" not in kinds and "cuda" not in kinds:
            notes.append(f"GPU through JAX: not found (jax.devices(): {sorted(kinds)})")
        for d in jax.devices()[:1] + [d for d in jax.devices()[1:] if d.platform != "cpu"][:1]:

            def put_jax(a: Any, dt: str, d: Any = d) -> Any:
                return jax.device_put(jnp.asarray(a).astype(dt), d)

            out.append(
                _Library(
                    "jax",
                    str(d),
                    put_jax,
                    lambda a: np.asarray(a.astype(jnp.float64)),
                    nop,
                    ("float16", "bfloat16", "float32", "float64"),
                    "cpu" if d.platform == "cpu" else "cuda",
                )
            )
        return out
    if name == "cupy":
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver
            count = 0
            notes.append(f"CUDA through CuPy: not found ({exc})")
        out = []
        for i in range(count):

            def put(a: Any, d: str, i: int = i) -> Any:
                with cupy.cuda.Device(i):
                    return cupy.asarray(a.astype(d))

            out.append(
                _Library(
                    "cupy",
                    f"cuda:{i}",
                    put,
                    lambda a: a.astype("float64").get(),
                    cupy.cuda.runtime.deviceSynchronize,
                    ("float32", "float64"),
                    "cuda",
                )
            )
        return out
    if name == "dask":
        import dask.array as da

        return [
            _Library(
                "dask",
                "cpu",
                lambda a, d: da.from_array(  # type: ignore[no-untyped-call,unused-ignore]
                    a.astype(d), chunks=(max(1, a.shape[0] // 2), -1)
                ),
                lambda a: np.asarray(a.compute(), dtype=np.float64),
                nop,
                ("float32", "float64"),
                "cpu",
            )
        ]
    import array_api_strict as xps

    cpu = xps.Device("CPU_DEVICE")
    return [
        _Library(
            "array_api_strict",
            "cpu",
            lambda a, d: xps.asarray(a, dtype=getattr(xps, d), device=cpu),
            lambda a: np.asarray(xps.astype(a, xps.float64)),
            nop,
            ("float32", "float64"),
            "cpu",
        )
    ]


# --------------------------------------------------------------------------- the check


def _error(np: Any, got: Any, want: Any, scale: Any, atol: float = 0.0) -> float:
    """Worst (|got - want| - atol) / scale; inf where NaN or infinities disagree."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    same_nan = np.isnan(got) == np.isnan(want)
    same_inf = np.where(np.isinf(want), got == want, ~np.isinf(got))
    if not (np.all(same_nan) and np.all(same_inf)):
        return math.inf
    finite = np.isfinite(want)
    if not np.any(finite):
        return 0.0
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), want.shape)[finite]
    diff = np.maximum(np.abs(got[finite] - want[finite]) - atol, 0.0)
    return float(np.max(diff / np.maximum(scale, 1e-300)))


def _timed(fn: Callable[[], Any], sync: Callable[[], None], repeat: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _served(klx: Any, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, raising if the path `expected` did not serve it."""
    report = klx.explain(fn, *args, **kwargs)
    if report.chosen != expected:
        msg = f"served by {report.chosen}, not {expected}: " + "; ".join(
            f"{name}: {why}" for name, why in report.refused
        )
        raise RuntimeError(msg)
    return report.result


def _kl_div_cells(
    np: Any, klx: Any, lib: _Library, dtype: str, expected: str
) -> tuple[int, float, list[str]]:
    """Every reduction x log_target of kl_div by the path `expected`, against the reference."""
    case = _cases(np, 6, 40)
    cells, worst, bad = 0, 0.0, []
    for log_target in (False, True):
        with np.errstate(divide="ignore"):
            y64 = np.log(case["p"]) if log_target else case["p"]
        x = lib.put(case["log_q"], dtype)
        y = lib.put(y64, dtype)
        xs, ys = lib.get(x), lib.get(y)  # the values in `dtype`, for the reference
        for reduction in ("none", "sum", "mean", "batchmean"):
            ref, scale = _ref_kl_div(np, xs, ys, reduction, log_target)
            out = _served(
                klx, expected, klx.kl_div, x, y, reduction=reduction, log_target=log_target
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale, ATOL.get(dtype, 0.0))
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"kl_div {reduction} log_target={log_target}: error {err:.3g}")
    return cells, worst, bad


def _rows_cells(
    np: Any, klx: Any, lib: _Library, dtype: str, kinds: Sequence[str], expected: str
) -> tuple[int, float, list[str]]:
    case = _cases(np, 6, 40, seed=1)
    t, s = lib.put(case["t"], dtype), lib.put(case["s"], dtype)
    ts, ss = lib.get(t), lib.get(s)
    cells, worst, bad = 0, 0.0, []
    for kind in kinds:
        for temperature in (1.0, 2.0):
            ref = _ref_rows(np, kind, ts, ss, temperature, 0.5)
            scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)) or 1.0
            fn = klx.kl_divergence if kind == "kl" else klx.js_divergence
            out = _served(
                klx, expected, fn, t, s, p_form="logits", q_form="logits", temperature=temperature
            )
            got = lib.get(out)
            err = _error(np, got, ref, scale)
            cells += 1
            worst = max(worst, err)
            if err > TOLERANCE[dtype]:
                bad.append(f"{kind} from logits T={temperature}: error {err:.3g}")
    return cells, worst, bad


def _peer(lib: _Library) -> tuple[str, Callable[[Any, Any], Any]] | None:
    """The library's native way to compute kl_div 'sum', for the timing column."""
    if lib.name == "torch":
        import torch.nn.functional as F

        return "F.kl_div", lambda x, y: F.kl_div(x, y, reduction="sum")
    if lib.name == "numpy":
        import numpy as np

        return "np formula", lambda x, y: np.sum(y * (np.log(y) - x))
    if lib.name == "jax":
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, y: jnp.sum(jax.scipy.special.xlogy(y, y) - y * x))
        return "jit formula", lambda x, y: f(x, y).block_until_ready()
    if lib.name == "cupy":
        import cupy

        return "cupy formula", lambda x, y: cupy.sum(y * (cupy.log(y) - x))
    return None


def run(
    libraries: Sequence[str] = LIBRARIES, repeat: int = 10, size: tuple[int, int] = (1024, 4096)
) -> tuple[list[Row], list[str]]:
    """Check every accelerator on every library and device found; returns (rows, notes)."""
    import numpy as np

    import klx
    from klx._accel import registry

    notes: list[str] = []
    report: list[Row] = []
    for lib in _libraries(np, libraries, notes):
        serving = [
            r
            for r in registry.ACCELERATORS
            if r.library == lib.name and (not r.devices or lib.device_type in r.devices)
        ]
        paths: list[Any] = [None, *serving]  # None: the definition
        for row in paths:
            for dtype in lib.dtypes:
                if row is not None and dtype not in row.dtypes:
                    continue
                report.append(_check(np, klx, registry, lib, row, dtype, repeat, size))
    return report, notes


def _check(
    np: Any,
    klx: Any,
    registry: Any,
    lib: _Library,
    row: Any,
    dtype: str,
    repeat: int,
    size: tuple[int, int],
) -> Row:
    name = "definition" if row is None else row.name
    out = Row(lib.name, lib.device, name, dtype, tolerance=TOLERANCE[dtype])
    forced = _forcing(klx, registry, row)
    try:
        with forced:
            if row is None or row.operation == "kl_div":
                cells, worst, bad = _kl_div_cells(np, klx, lib, dtype, name)
            else:
                cells, worst, bad = 0, 0.0, []
            if row is None or row.operation == "divergence":
                kinds = ("kl", "js") if row is None else row.kinds
                kinds = [k for k in kinds if k in ("kl", "js")]
                c2, w2, b2 = _rows_cells(np, klx, lib, dtype, kinds, name)
                cells, worst, bad = cells + c2, max(worst, w2), bad + b2
            out.cells, out.max_error, out.detail = cells, worst, bad
            out.status = "MISMATCH" if bad else "ok"
            if dtype == "float32":
                _time(np, klx, lib, row, out, repeat, size)
    except Exception as exc:  # a crash is a failure of the path, reported, not raised
        out.status = "ERROR"
        out.detail.append(f"{type(exc).__name__}: {exc}")
    return out


def _forcing(klx: Any, registry: Any, row: Any) -> Any:
    """A context in which only `row` (or, for None, no accelerator) may serve a call."""

    class Only:
        def __enter__(self) -> None:
            self.before = klx.accelerators_enabled()
            self.saved = registry._BY_KEY.copy()
            registry.forget_choices()
            if row is None:
                klx.set_accelerators(False)
            else:
                key = (row.operation, row.library)
                registry._BY_KEY[key] = (row.__class__(**{**asdict(row), "min_size": 0}),)

        def __exit__(self, *exc: object) -> None:
            registry._BY_KEY.clear()
            registry._BY_KEY.update(self.saved)
            registry.forget_choices()
            klx.set_accelerators(self.before)

    return Only()


def _time(
    np: Any, klx: Any, lib: _Library, row: Any, out: Row, repeat: int, size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(2)
    y64 = rng.random(size) + 0.01
    y64 /= y64.sum(axis=-1, keepdims=True)
    x64 = np.log(rng.random(size) + 0.01)
    x, y = lib.put(x64, "float32"), lib.put(y64, "float32")
    if row is None or row.operation == "kl_div":

        def path() -> Any:
            return klx.kl_div(x, y, reduction="sum")

    else:

        def path() -> Any:
            fn = klx.kl_divergence if "kl" in row.kinds else klx.js_divergence
            return fn(x, y, p_form="logits", q_form="logits", reduction="sum")

    from klx._accel import registry

    def force(r: Any) -> Any:
        return _forcing(klx, registry, r)

    with force(row):
        out.ms_path = _timed(lambda: _materialise(path()), lib.sync, repeat)
    if row is not None:
        with force(None):
            out.ms_definition = _timed(lambda: _materialise(path()), lib.sync, repeat)
    peer = _peer(lib) if row is None or row.operation == "kl_div" else None
    if peer is not None:
        out.peer = peer[0]
        out.ms_peer = _timed(lambda: peer[1](x, y), lib.sync, repeat)


def _materialise(x: Any) -> Any:
    compute = getattr(x, "compute", None)  # Dask: the work happens here
    if compute is not None:
        return compute()
    ready = getattr(x, "block_until_ready", None)
    return ready() if ready is not None else x


def _table(rows: Sequence[Row], notes: Sequence[str]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = (
        "| library | device | path | dtype | cells | max error | tolerance | status | "
        "ms path | ms definition | ms peer |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.library} | {r.device} | {r.path} | {r.dtype} | {r.cells} | "
            f"{r.max_error:.2g} | {r.tolerance:.1e} | {r.status} | {ms(r.ms_path)} | "
            f"{ms(r.ms_definition)} | {ms(r.ms_peer)}{' (' + r.peer + ')' if r.peer else ''} |"
        )
    for r in rows:
        for d in r.detail:
            lines.append(f"{r.library} {r.device} {r.path} {r.dtype}: {d}")
    lines += [f"not checked: {n}" for n in notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 on any mismatch or error)."""
    parser = argparse.ArgumentParser(
        prog="python -m klx.check",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    parser.add_argument(
        "--libraries",
        nargs="+",
        default=list(LIBRARIES),
        choices=LIBRARIES,
        help="array libraries to check (those not installed are listed as not checked)",
    )
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per figure (median)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[1024, 4096],
        metavar=("ROWS", "COLS"),
        help="float32 input shape of the timings",
    )
    args = parser.parse_args(argv)
    rows, notes = run(args.libraries, args.repeat, (args.size[0], args.size[1]))
    print(_table(rows, notes))
    failed = [r for r in rows if r.status != "ok"]
    print(
        f"\nklx.check: {len(rows)} paths checked, {len(failed)} failed"
        + (
            ""
            if not failed
            else ": " + ", ".join(f"{r.library}/{r.device}/{r.path}/{r.dtype}" for r in failed)
        )
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": [asdict(r) for r in rows], "not_checked": notes}, fh, indent=2)
        print(f"written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
