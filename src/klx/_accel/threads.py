"""klx's thread pool: the CPU paths (the NumPy blocks of ``kl_div``, the row blocks of the
divergences) share pieces of one call between the calling thread and the pool's threads
(:func:`share_pieces`: each takes the next piece as it goes, so a thread the OS holds back
delays only its own piece).

The pool is made on first use, with :func:`workers` threads, and made again in a forked
child (:func:`os.register_at_fork`), whose copy of the parent's pool has no threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from klx._config import num_threads

__all__ = ["share_pieces", "workers"]

_POOL: list[Any] = []


def workers() -> int:
    """Threads klx's CPU paths use: the cores this process may run on, at most
    :func:`klx._config.num_threads` (``KLX_NUM_THREADS``) where set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, num_threads() or cores))


def _pool() -> Any:
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="klx"))
    return _POOL[0]


def share_pieces(
    count: int,
    workers: int,
    task: Callable[[int, Any], None],
    state: Callable[[], Any] = lambda: None,
) -> None:
    """Run ``task(i, state)`` for every piece ``i < count`` on the calling thread and up to
    ``workers - 1`` of the pool's threads, each taking the next piece as it goes.

    The caller works too (one hand-over fewer, and on a busy machine one thread fewer for
    the OS to schedule), and a thread the OS holds back delays only the piece it holds;
    ``state()`` is made once per thread (block buffers). What a piece computes must not
    depend on which thread runs it.
    """
    from concurrent.futures import wait

    order = iter(range(count))
    lock = threading.Lock()

    def work(_: int) -> None:
        mine = state()
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            task(i, mine)

    helpers: list[Any] = []
    try:
        try:
            for k in range(min(workers, count) - 1):
                helpers.append(_pool().submit(work, k))
        except RuntimeError:  # the interpreter is shutting down: the caller does it all
            pass
        work(-1)
    finally:
        # A helper that has not started has nothing left to take (and may be queued
        # behind this very call, when it runs on a pool thread): cancel it, and wait for
        # the others, so that no helper still writes once this returns, even after an error.
        helpers = [h for h in helpers if not h.cancel()]
        wait(helpers)
    for h in helpers:
        h.result()


def _forget_pool() -> None:
    """In a forked child: the parent's pool came without its threads; make a new one."""
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
