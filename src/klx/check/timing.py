"""The timings of :mod:`klx.check`: a path, the definition and the library's own way
(its peer), each the median of a number of float32 calls on one device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from klx import _backends
from klx._backends import CheckDevice
from klx.check.report import Row


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


def _peer(lib: CheckDevice) -> tuple[str, Callable[[Any, Any], Any]] | None:
    """The library's native way to compute kl_div 'sum', for the timing column."""
    return _backends.BY_NAME[lib.name].peer()


def _time(
    np: Any,
    klx: Any,
    lib: CheckDevice,
    row: Any,
    out: Row,
    repeat: int,
    size: tuple[int, int],
    timings: dict[str, float],
) -> None:
    """Fill `out`'s timings; the definition's and the peer's are taken once per device."""
    adapter = _backends.BY_NAME[lib.name]
    rng = np.random.default_rng(2)
    y64 = rng.random(size) + 0.01
    y64 /= y64.sum(axis=-1, keepdims=True)
    x64 = np.log(rng.random(size) + 0.01)
    x, y = lib.put(x64, "float32"), lib.put(y64, "float32")
    if row is None or row.operation == "kl_div":
        operation = "kl_div"

        def path() -> Any:
            return klx.kl_div(x, y, reduction="sum")

    else:
        fn = klx.kl_divergence if not row.kinds or "kl" in row.kinds else klx.js_divergence
        operation = fn.__name__

        def path() -> Any:
            return fn(x, y, p_form="logits", q_form="logits", reduction="sum")

    from klx._accel import registry

    def force(r: Any) -> Any:
        return registry.only(r)

    if row is not None:
        with force(row):
            out.ms_path = _timed(lambda: adapter.materialise(path()), lib.sync, repeat)
    if operation not in timings:
        with force(None):
            timings[operation] = _timed(lambda: adapter.materialise(path()), lib.sync, repeat)
    out.ms_definition = timings[operation]
    peer = _peer(lib) if row is not None and row.operation == "kl_div" else None
    if peer is not None:
        out.peer = peer[0]
        if "peer" not in timings:
            timings["peer"] = _timed(lambda: peer[1](x, y), lib.sync, repeat)
        out.ms_peer = timings["peer"]
