"""The CPU fast paths (NumPy blocks, torch through NumPy views, Dask chunks, row blocks).

Against the float64 references (never klx against itself), on the layouts, dtypes and
special values each path claims; plus bit-for-bit repeatability, bounded memory
(``tracemalloc`` sees NumPy's allocations) and fork safety of klx's thread pool.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest

import klx
from support import reference

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _inputs(shape, zeros, log_target, seed=0):
    """log Q and the target (P, or log P), float64, every 8th target entry 0 if `zeros`."""
    rng = np.random.default_rng(seed)
    p = rng.random(shape) + 1e-3
    p /= p.sum(-1, keepdims=True)
    if zeros:
        p.reshape(-1)[::8] = 0.0
    log_q = np.log(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]))
    with np.errstate(divide="ignore"):
        return log_q, (np.log(p) if log_target else p)


def _layout(backend, a, dtype, layout):
    """`a` on the backend in `layout`: contiguous, transposed, sliced, the transpose of
    a slice, or expanded."""
    if layout == "transposed":
        return backend.xp.permute_dims(backend.asarray(np.ascontiguousarray(a.T), dtype), (1, 0))
    if layout == "sliced":
        big = np.zeros((a.shape[0] + 3, a.shape[1] + 5))
        big[1 : a.shape[0] + 1, 2 : a.shape[1] + 2] = a
        return backend.asarray(big, dtype)[1 : a.shape[0] + 1, 2 : a.shape[1] + 2]
    if layout == "sliced_transposed":  # the transpose of a slice: neither C nor F order
        big = np.zeros((a.shape[1] + 5, a.shape[0] + 3))
        big[: a.shape[1], : a.shape[0]] = a.T
        sliced = backend.asarray(big, dtype)[: a.shape[1], : a.shape[0]]
        return backend.xp.permute_dims(sliced, (1, 0))
    if layout == "expanded":
        return backend.xp.broadcast_to(backend.asarray(a[:1], dtype), a.shape)
    return backend.asarray(a, dtype)


def _check(backend, out, x64, y64, reduction, log_target, dtype):
    ref, scale = reference.kl_div(x64, y64, reduction, log_target)
    err = reference.rel_error(backend.to_numpy(out), ref, scale, reference.ATOL.get(dtype, 0))
    assert err <= reference.TOL[dtype], (reduction, err)


def _served_by(func, *args, **kwargs):
    with np.errstate(all="ignore"):
        report = klx.explain(func, *args, **kwargs)
    return report.chosen, report.result


@pytest.mark.backends("numpy", "torch", reason="the blocked CPU kl_div paths")
@pytest.mark.filterwarnings("ignore::klx.KLDivMeanWarning")
@pytest.mark.parametrize(
    "layout", ["contiguous", "transposed", "sliced", "sliced_transposed", "expanded"]
)
@pytest.mark.parametrize("shape", [(32, 100), (600, 700)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_any_layout_matches_reference(backend, layout, shape, zeros, log_target):
    log_q, tgt = _inputs(shape, zeros, log_target)
    if layout == "expanded":
        log_q, tgt = np.broadcast_to(log_q[:1], shape), np.broadcast_to(tgt[:1], shape)
    x = _layout(backend, log_q, "float32", layout)
    y = _layout(backend, tgt, "float32", layout)
    x32, y32 = backend.to_numpy(x), backend.to_numpy(y)
    for reduction in REDUCTIONS:
        chosen, out = _served_by(klx.kl_div, x, y, reduction=reduction, log_target=log_target)
        assert chosen == f"{'torch-cpu' if backend.name == 'torch' else 'numpy'}-blocked"
        assert out.dtype == x.dtype
        assert tuple(out.shape) == (shape if reduction == "none" else ())
        _check(backend, out, x32, y32, reduction, log_target, "float32")
        if backend.name == "torch" and reduction == "none":  # torch's own layout
            import torch.nn.functional as F

            peer = F.kl_div(x, y, reduction="none", log_target=log_target)
            assert out.stride() == peer.stride(), (layout, out.stride(), peer.stride())
    np.testing.assert_array_equal(backend.to_numpy(x), x32)  # inputs untouched


@pytest.mark.backends("numpy", "torch", reason="the blocked CPU kl_div paths")
@pytest.mark.filterwarnings("ignore::klx.KLDivMeanWarning")
@pytest.mark.parametrize(
    ("x_layout", "y_layout"),
    [("transposed", "contiguous"), ("contiguous", "sliced"), ("expanded", "transposed")],
)
@pytest.mark.parametrize("shape", [(32, 100), (600, 700)])
def test_kl_div_two_layouts_match_reference(backend, x_layout, y_layout, shape):
    """Input and target in different layouts: the terms pair up element by element."""
    log_q, tgt = _inputs(shape, zeros=True, log_target=False)
    if "expanded" in (x_layout, y_layout):
        log_q, tgt = np.broadcast_to(log_q[:1], shape), np.broadcast_to(tgt[:1], shape)
    x = _layout(backend, log_q, "float32", x_layout)
    y = _layout(backend, tgt, "float32", y_layout)
    for reduction in REDUCTIONS:
        chosen, out = _served_by(klx.kl_div, x, y, reduction=reduction)
        assert chosen.endswith("-blocked")
        assert tuple(out.shape) == (shape if reduction == "none" else ())
        _check(backend, out, backend.to_numpy(x), backend.to_numpy(y), reduction, False, "float32")


SPECIAL = {  # a special (target, input) pair; the definition's term in the comment
    "zero_target": (0.0, -3.0),  # 0
    "zero_vs_neginf": (0.0, -np.inf),  # 0 log 0 against -inf: 0
    "zero_vs_posinf": (0.0, np.inf),  # 0
    "nan_input": (0.0, np.nan),  # NaN propagates even under a zero target
    "nan_target": (np.nan, -3.0),  # NaN
    "negative_target": (-0.25, -3.0),  # a probability below 0 (no log target has one)
    "posinf": (None, np.inf),  # -inf, and under a zero target 0
}


@pytest.mark.backends("numpy", "torch", reason="the blocked CPU kl_div paths")
@pytest.mark.parametrize("case", list(SPECIAL))
@pytest.mark.parametrize(("shape", "i"), [((512, 1024), 300_000), ((20, 50), 333)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_special_values_in_blocks(backend, case, shape, i, zeros, log_target):
    """Special values deep inside a threaded, blocked input, or in a small one-block
    input, among positive targets (the bare formula's block, which must notice them) or
    targets with zeros (the safe log's): the definition's conventions."""
    target, value = SPECIAL[case]
    if log_target and case == "negative_target":
        pytest.skip("a log target has no negative probability")
    log_q, p = _inputs(shape, zeros=zeros, log_target=False)
    if target is not None:
        p.reshape(-1)[i] = target
    log_q.reshape(-1)[i] = value
    if case == "posinf":
        p.reshape(-1)[8] = 0.0
        log_q.reshape(-1)[8] = np.inf
    with np.errstate(divide="ignore"):
        tgt = np.log(p) if log_target else p
    x, y = backend.asarray(log_q, "float32"), backend.asarray(tgt, "float32")
    for reduction in ("none", "sum"):
        chosen, out = _served_by(klx.kl_div, x, y, reduction=reduction, log_target=log_target)
        assert chosen.endswith("-blocked")
        assert out.dtype == x.dtype
        _check(
            backend, out, backend.to_numpy(x), backend.to_numpy(y), reduction, log_target, "float32"
        )


@pytest.mark.backends("numpy", "torch", reason="the blocked CPU kl_div paths")
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(300, 1000), (20, 50)])
def test_kl_div_float16_is_blocked_and_accurate(backend, log_target, shape):
    log_q, tgt = _inputs(shape, zeros=True, log_target=log_target)
    x, y = backend.asarray(log_q, "float16"), backend.asarray(tgt, "float16")
    for reduction in ("none", "sum", "batchmean"):
        chosen, out = _served_by(klx.kl_div, x, y, reduction=reduction, log_target=log_target)
        assert chosen.endswith("-blocked")
        assert out.dtype == x.dtype
        _check(
            backend,
            out,
            backend.to_numpy(x),
            backend.to_numpy(y),
            reduction,
            log_target,
            "float16",
        )


def _on(backend, a, dtype):
    """`a` on the backend; Dask in chunks of 64 rows (the first and last rows apart)."""
    if backend.name == "dask":
        import dask.array as da

        return da.from_array(a.astype(dtype), chunks=(64, a.shape[1]))
    return backend.asarray(a, dtype)


@pytest.mark.backends("numpy", "torch", "dask", reason="the CPU fast paths of these")
@pytest.mark.parametrize("shape", [(512, 1024), (20, 50)])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_terms_of_both_signs_of_infinity_stay_quiet(backend, shape, reduction):
    """A block (or Dask chunk) whose definition has a +inf and a -inf term: the terms as
    the definition gives them, the sum NaN, and no NumPy warning or FloatingPointError
    (the suite turns warnings into errors; these calls are not wrapped in errstate)."""
    log_q, p = _inputs(shape, zeros=False, log_target=False)
    flat_q, flat_p = log_q.reshape(-1), p.reshape(-1)
    flat_p[5] = -0.25  # a negative target: +inf
    flat_q[6] = np.inf  # an infinite input under a positive target: -inf
    flat_p[-3] = -0.25  # and again far away (another Dask chunk)
    x, y = _on(backend, log_q, "float32"), _on(backend, p, "float32")
    out = klx.kl_div(x, y, reduction=reduction)
    _check(
        backend, out, log_q.astype(np.float32), p.astype(np.float32), reduction, False, "float32"
    )


@pytest.mark.backends("numpy", "torch", "dask", reason="the CPU fast paths of these")
@pytest.mark.parametrize("shape", [(512, 1024), (20, 50)])
@pytest.mark.parametrize("log_target", [False, True])
def test_float16_terms_beyond_its_range_are_inf_quietly(backend, shape, log_target):
    """float16 input, terms accumulated in float32: a term or a sum beyond float16's range
    is inf in the result, as torch gives, with no overflow warning."""
    log_q, tgt = _inputs(shape, zeros=False, log_target=log_target)
    log_q.reshape(-1)[7] = -60000.0  # a term of 1.2e5 (1.6e5 with a log target of 1)
    tgt.reshape(-1)[7] = 1.0 if log_target else 2.0
    x, y = _on(backend, log_q, "float16"), _on(backend, tgt, "float16")
    out = klx.kl_div(x, y, reduction="none", log_target=log_target)
    assert out.dtype == x.dtype
    terms = backend.to_numpy(out)
    assert terms.reshape(-1)[7] == np.inf
    rest = np.ones(terms.size, dtype=bool)
    rest[7] = False
    ref, scale = reference.kl_div(
        backend.to_numpy(x).astype(np.float64), backend.to_numpy(y), "none", log_target
    )
    err = reference.rel_error(
        terms.reshape(-1)[rest],
        ref.reshape(-1)[rest],
        np.broadcast_to(scale, ref.shape).reshape(-1)[rest],
        reference.ATOL["float16"],
    )
    assert err <= reference.TOL["float16"], err
    total = klx.kl_div(x, y, reduction="sum", log_target=log_target)
    assert total.dtype == x.dtype
    assert backend.to_numpy(total) == np.inf


@pytest.mark.backends("numpy", "torch", "dask", reason="the CPU fast paths of these")
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("zeros", [False, True])
def test_blocked_results_repeat_bit_for_bit(backend, reduction, zeros):
    log_q, p = _inputs((700, 1100), zeros, log_target=False)
    x, y = backend.asarray(log_q, "float32"), backend.asarray(p, "float32")
    first = backend.to_numpy(klx.kl_div(x, y, reduction=reduction))
    for _ in range(3):
        np.testing.assert_array_equal(
            backend.to_numpy(klx.kl_div(x, y, reduction=reduction)), first
        )
    if zeros and reduction == "none":  # a zero target gives +0.0, as in the definition
        assert not np.signbit(first.reshape(-1)[::8]).any()


@pytest.mark.backends("dask", reason="Dask chunks")
@pytest.mark.filterwarnings("ignore::klx.KLDivMeanWarning")
@pytest.mark.parametrize("log_target", [False, True])
def test_dask_chunks_by_the_numpy_path(backend, log_target):
    import dask.array as da

    log_q, tgt = _inputs((301, 257), zeros=True, log_target=log_target)
    x = da.from_array(log_q.astype(np.float32), chunks=(64, 100))
    y = da.from_array(tgt.astype(np.float32), chunks=(100, 64))  # other chunks: aligned
    for reduction in REDUCTIONS:
        chosen, out = _served_by(klx.kl_div, x, y, reduction=reduction, log_target=log_target)
        assert chosen == "dask-chunks"
        assert isinstance(out, da.Array)
        assert out.dtype == np.float32
        _check(
            backend,
            out,
            log_q.astype(np.float32),
            tgt.astype(np.float32),
            reduction,
            log_target,
            "float32",
        )


def _logits(shape, seed=1):
    return np.random.default_rng(seed).normal(scale=2.0, size=shape)


@pytest.mark.backends("numpy", "torch", "dask", reason="the CPU fast paths of these")
@pytest.mark.parametrize("kind", ["kl", "js", "mix"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("q_layout", ["full", "broadcast"])
def test_rows_any_axis_and_broadcast_match_reference(backend, kind, axis, q_layout):
    n, vocab = 40, 30000  # 1.2e6 elements: past the row path's threshold
    t = _logits((n, vocab))
    s = _logits((1, vocab) if q_layout == "broadcast" else (n, vocab), seed=2)
    where = np.arange(n) % 5 != 0
    if axis == 0:
        t, s = t.T, s.T
    p, q = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    f = {"kl": klx.kl_divergence, "js": klx.js_divergence}.get(kind, klx.divergence)
    kwargs = {"p_form": "logits", "q_form": "logits", "temperature": 2.0, "reduction": "none"}
    if kind == "mix":  # the forward/reverse mixture, lam = 1/2 (the symmetric KL)
        kwargs["kind"] = "mix"
    kwargs["where"] = backend.asarray(where)
    chosen, out = _served_by(f, p, q, axis=axis, **kwargs)
    assert chosen == f"{backend.name if backend.name != 'torch' else 'torch-cpu'}-rows"
    t32 = backend.to_numpy(p)
    s32 = np.broadcast_to(backend.to_numpy(q), t32.shape)
    lp = reference.log_softmax(t32, axis, 2.0)
    lq = reference.log_softmax(s32, axis, 2.0)
    if kind == "kl":
        ref, scale = reference.kl_rows_log(np.exp(lp), lq, axis)
        err = np.max(np.where(where, np.abs(backend.to_numpy(out) - ref) / (scale + 1e-30), 0))
    elif kind == "mix":
        fwd, f_scale = reference.kl_rows_log(np.exp(lp), lq, axis)
        rev, r_scale = reference.kl_rows_log(np.exp(lq), lp, axis)
        ref, scale = 0.5 * (fwd + rev), 0.5 * (f_scale + r_scale)
        err = np.max(np.where(where, np.abs(backend.to_numpy(out) - ref) / (scale + 1e-30), 0))
    else:
        ref = reference.js_rows(np.exp(lp), np.exp(lq), axis, 0.5)
        err = np.max(np.where(where, np.abs(backend.to_numpy(out) - ref), 0))
    assert err <= 1e-5
    assert np.all(backend.to_numpy(out)[~where] == 0)
    again = f(p, q, axis=axis, **kwargs)
    np.testing.assert_array_equal(backend.to_numpy(again), backend.to_numpy(out))  # bit for bit


@pytest.mark.backends("numpy", "torch", reason="the CPU rows path's KL from logits")
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_rows_kl_from_logits_special_rows(backend, temperature):
    """The row path's own KL-from-logits kernel, row by row against float64: zero weights,
    an infinite row, NaN (kept and masked), identical and near-equal rows, a teacher so
    peaked that ``expm1`` overflows, and one whose small probabilities are subnormal (the
    definition decides those rows)."""
    n, vocab = 40, 30000
    rng = np.random.default_rng(5)
    t = rng.normal(scale=2.0, size=(n, vocab)).astype(np.float32)
    s = rng.normal(scale=2.0, size=(n, vocab)).astype(np.float32)
    t[0, ::7] = -np.inf  # zero weights of P
    s[1, 3] = -np.inf  # Q = 0 where P > 0: +inf
    t[2, 10] = np.nan  # NaN propagates
    t[3, 10] = np.nan  # ... unless the row is masked
    s[4] = t[4]  # P = Q: exactly 0
    s[5] = t[5] + np.float32(1e-3) * rng.normal(size=vocab).astype(np.float32)  # near-equal
    t[6, 0] = 300.0  # P one-hot to float32: q / p beyond e^88 elsewhere
    t[7, :5] = 400.0  # ties at the maximum
    t[8], s[8] = 0.0, 0.0  # P's other entries subnormal (e^-103): p expm1(-d) is no q there
    t[8, 1:], s[8, 1:] = -103.0 * temperature, -15.5 * temperature
    t[9], s[9] = 0.0, 0.0
    t[9, 1:], s[9, 1:] = -100.0 * temperature, -12.0 * temperature
    t[11, ::5] = s[11, ::5] = -np.inf  # one vocabulary masked on both sides
    t[12, 1::9] = -np.inf  # P masked where Q is not
    where = np.ones(n, dtype=bool)
    where[3] = where[10] = False
    p, q = backend.asarray(t, "float32"), backend.asarray(s, "float32")
    kwargs = {"p_form": "logits", "q_form": "logits", "temperature": temperature}
    chosen, out = _served_by(
        klx.kl_divergence, p, q, reduction="none", where=backend.asarray(where), **kwargs
    )
    assert chosen == f"{'torch-cpu' if backend.name == 'torch' else 'numpy'}-rows"
    got = backend.to_numpy(out).astype(np.float64)
    lp = reference.log_softmax(t, -1, temperature)
    lq = reference.log_softmax(s, -1, temperature)
    ref, scale = reference.kl_rows_log(np.exp(lp), lq, -1)
    assert np.isposinf(got[1]) and np.isnan(got[2])
    assert got[3] == 0 and got[10] == 0 and got[4] == 0
    finite = np.isfinite(ref) & where
    assert np.all(got[finite] >= 0)
    err = np.abs(got[finite] - ref[finite]) / (scale[finite] + 1e-30)
    assert np.max(err) <= 1e-5, (np.argmax(err), np.max(err))
    assert abs(got[5] - ref[5]) <= 1e-2 * ref[5]  # a divergence of ~1e-7, to 1%


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.backends("numpy", reason="NumPy allocations and threads")
@pytest.mark.parametrize("case", ["q_broadcast", "axis_0", "kl_div_float16", "kl_div_transposed"])
def test_bounded_memory(backend, case):
    """Extra memory well under one input's size where the definition takes several."""
    n, vocab = 256, 32768  # 2^23 elements
    if case.startswith("kl_div"):
        dtype = np.float16 if case == "kl_div_float16" else np.float32
        x = np.full((n, vocab), -np.log(vocab), dtype=dtype)
        y = np.full((n, vocab), 1.0 / vocab, dtype=dtype)
        if case == "kl_div_transposed":
            x, y = x.T, y.T
        run = lambda: klx.kl_div(x, y, reduction="sum")  # noqa: E731
        size = x.nbytes
    else:
        t = np.zeros((n, vocab), dtype=np.float32)
        s = np.zeros((1, vocab), dtype=np.float32)
        axis = -1
        if case == "axis_0":
            t, s, axis = t.T, np.zeros((n, vocab), dtype=np.float32).T, 0
        run = lambda: klx.kl_divergence(  # noqa: E731
            t, s, axis=axis, p_form="logits", q_form="logits", reduction="sum"
        )
        size = t.nbytes
    assert np.isfinite(run())
    assert _peak_bytes(run) < size / 2


def _child_kl(seed):
    rng = np.random.default_rng(seed)
    p = rng.random((512, 1024)).astype(np.float32) + 0.01
    return float(klx.kl_div(np.log(p / p.sum()), p / p.sum(), reduction="sum"))


@pytest.mark.backends("numpy", reason="NumPy allocations and threads")
def test_thread_pool_survives_fork(backend):
    """A forked child (multiprocessing, DataLoader workers) gets a pool of its own."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform cannot fork")
    parent = _child_kl(0)  # starts klx's pool in this process (2^19 elements, threaded)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map_async(_child_kl, [0, 0]).get(timeout=60)  # hung forever before
    assert got == [parent, parent]


@pytest.mark.backends("numpy", reason="klx's own threads, with no array library involved")
def test_pieces_run_once_each_on_the_caller_and_the_pool(backend):
    """Every piece runs once, state is made once per thread, the calling thread works too,
    and an error is raised only after no thread is still working."""
    from klx._accel.threads import share_pieces
    from klx._accel.threads import workers as _workers

    lock = threading.Lock()
    seen, states = [], []

    def state():
        with lock:
            states.append(threading.get_ident())
        return threading.get_ident()

    def task(i, mine):
        assert mine == threading.get_ident()  # this thread's own state
        time.sleep(0.002)  # long enough for the pool's threads to take pieces too
        with lock:
            seen.append((i, mine))

    share_pieces(16, 2, task, state)
    assert sorted(i for i, _ in seen) == list(range(16))
    assert threading.get_ident() in {t for _, t in seen}  # the caller took pieces
    assert len(states) == len(set(states)) <= 2  # one state per thread
    if _workers() > 1:
        assert len({t for _, t in seen}) == 2

    done = []

    def failing(i, _):
        if i == 3:
            raise ValueError("piece 3")
        time.sleep(0.005)
        done.append(i)

    with pytest.raises(ValueError, match="piece 3"):
        share_pieces(8, 2, failing)
    settled = len(done)
    time.sleep(0.05)
    assert len(done) == settled  # nothing still running after the raise


@pytest.mark.backends("numpy", reason="klx's own threads; one backend is enough")
def test_none_terms_repeat_bit_for_bit_whichever_thread_meets_a_zero_weight(backend):
    """Which blocks take the safe log is decided per piece: the sign of a zero term
    (``exp(-200) * (-200 - 0)`` underflows to -0.0) must not depend on thread timing."""
    n = 1 << 22  # 8 pieces of 2 blocks with two threads
    x = np.zeros(n, np.float32)
    y = np.full(n, -200.0, np.float32)
    y[(1 << 19) + (1 << 18) + 5] = -np.inf  # one zero weight, in the second piece
    first = klx.kl_div(x, y, reduction="none", log_target=True)
    assert not first.any()
    for _ in range(6):
        again = klx.kl_div(x, y, reduction="none", log_target=True)
        np.testing.assert_array_equal(again.view(np.uint32), first.view(np.uint32))


@pytest.mark.backends("numpy", reason="klx's own threads; one backend is enough")
def test_calls_on_klx_own_threads_do_not_wait_for_each_other(backend):
    """kl_div run as a task of klx's pool (more tasks than threads) must finish: a call
    does not wait for a helper queued behind itself. In a child process, so that a
    deadlock fails the test instead of hanging the run."""
    code = textwrap.dedent(
        """
        import numpy as np
        import klx
        from klx._accel.threads import _pool

        rng = np.random.default_rng(0)
        x = np.log(rng.dirichlet(np.ones(4096), size=256)).astype(np.float32)
        y = rng.dirichlet(np.ones(4096), size=256).astype(np.float32)
        expected = klx.kl_div(x, y, reduction="sum")
        tasks = [_pool().submit(klx.kl_div, x, y, reduction="sum") for _ in range(6)]
        print(all(t.result() == expected for t in tasks))
        """
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("kl_div calls on klx's own pool deadlocked")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


@pytest.mark.backends("numpy", reason="klx's own threads; one backend is enough")
def test_a_large_call_during_interpreter_shutdown(backend):
    """A thread still running when the main script ends may call kl_div on a large input:
    the pool cannot take new work then, and the calling thread does all of it."""
    code = textwrap.dedent(
        """
        import threading, time
        import numpy as np
        import klx

        x = np.zeros(1 << 20, np.float32)
        y = np.full(1 << 20, 1e-6, np.float32)

        def late():
            time.sleep(0.5)  # the main thread has finished by now
            print("late", float(klx.kl_div(x, y, reduction="sum")))

        threading.Thread(target=late).start()
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    p = np.float64(np.float32(1e-6))
    expected = float(p * np.log(p) * (1 << 20))  # x = 0: the terms are p log p
    assert run.stdout.startswith("late ")
    # float32 blocks of 2^18 equal terms summed: about 1e-5 relative of rounding
    assert float(run.stdout.split()[1]) == pytest.approx(expected, rel=2e-4)


@pytest.mark.backends("numpy", "torch", reason="the CPU row path's blocks along a leading axis")
@pytest.mark.parametrize("p_form", ["probs", "logits"])
def test_rows_along_a_leading_axis_are_summed_pairwise(backend, p_form):
    """Distributions along axis 0 (32000 x 64, float32) were summed in sequence: 5.6e-6 of
    the terms' scale (9.5e-6 from logits), at the edge of the stated 1e-5; now 1.5e-7."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(32000), size=64).T.copy()
    q = rng.dirichlet(np.ones(32000), size=64).T.copy()
    terms = p * np.log(p / q)
    want, scale = np.sum(terms, axis=0), np.sum(np.abs(terms), axis=0)
    given = (p, q) if p_form == "probs" else (np.log(p), np.log(q))
    a, b = (backend.asarray(x, "float32") for x in given)
    report = klx.explain(klx.kl_divergence, a, b, axis=0, p_form=p_form, q_form=p_form)
    assert report.chosen.endswith("rows"), str(report)
    got = backend.to_numpy(report.result).astype(np.float64)
    assert np.max(np.abs(got - want) / scale) < 1e-6


@pytest.mark.backends("numpy", reason="BLAS threads under the NumPy blocks")
def test_blas_thread_count_moves_a_sum_by_at_most_an_ulp(backend):
    """docs/cpu.md: a 'sum' may differ by one ulp under another BLAS thread count (the
    blocks' dot products), and 'none' is bit-identical under any."""
    code = (
        "import hashlib, numpy as np, klx\n"
        "rng = np.random.default_rng(0)\n"
        "x = np.log(rng.dirichlet(np.ones(4096), size=1024))\n"
        "y = rng.dirichlet(np.ones(4096), size=1024)\n"
        "print(repr(float(klx.kl_div(x, y, reduction='sum'))))\n"
        "print(hashlib.sha256(klx.kl_div(x, y, reduction='none').tobytes()).hexdigest())\n"
    )
    runs = []
    for threads in (None, "1"):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
        }
        if threads:
            env |= {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        runs.append(out)
    (s1, n1), (s2, n2) = runs
    assert abs(float(s1) - float(s2)) <= np.spacing(float(s1))
    assert n1 == n2


@pytest.mark.backends("numpy", "torch", "dask", reason="the NumPy row blocks' KL from logits")
def test_rows_kl_from_logits_keeps_an_underflowed_p_against_a_zero_of_q(backend):
    """At T = 1e-45, P's second entry underflows to 0 but is positive, against a -inf logit
    of Q: the KL is +inf, as the definition says. The row blocks gave 0 (they read the
    probabilities, which cannot tell it from p = 0); the first-use check caught it, in the
    dask session, where a test of this temperature happened to come first."""
    from klx._accel import registry
    from klx._accel.table import ACCELERATORS

    t = np.array([[2.0, 1.0, -np.inf, 0.5], [0.0, 1.0, 2.0, 3.0]])
    s = np.array([[1.5, -np.inf, 0.3, 0.5], [3.0, 2.0, 1.0, 0.0]])
    name = {"numpy": "numpy-rows", "torch": "torch-cpu-rows", "dask": "dask-rows"}[backend.name]
    (row,) = [r for r in ACCELERATORS if r.name == name]
    kw = {"p_form": "logits", "q_form": "logits", "temperature": 1e-45}
    with registry.only(row):
        got = backend.to_numpy(klx.kl_divergence(backend.asarray(t), backend.asarray(s), **kw))
    with registry.only(None):
        want = backend.to_numpy(klx.kl_divergence(backend.asarray(t), backend.asarray(s), **kw))
    assert got[0] == np.inf
    np.testing.assert_array_equal(got, want)


@pytest.mark.backends("numpy", "torch", "dask", reason="the NumPy row blocks' mixture kernel")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.5 + 1e-7, 1.0])
def test_rows_mix_from_logits_against_mpmath(backend, lam, dtype):
    """The row blocks' own kernel for ``lam KL(P || Q) + (1 - lam) KL(Q || P)`` (forced on
    a small input) against mpmath, row by row, at weights whose forms differ (1/2: no
    expm1; near 1/2: a row factor 2 lam - 1 of 2e-7): entries with ``d >= 1`` and far
    below 0, a sharp pair, P = Q (exactly 0); float64 within 4 ulps of
    the row (or 1e-15), float32 within 1e-6. Rows of logits 1e-3 apart are as accurate as
    their float32 / float64 logits allow (1e-2, 1e-9). Zero weights of P (the definition's
    rows), of Q, a subnormal P, NaN and a masked row: as mpmath, +inf and NaN included."""
    from klx._accel import registry
    from klx._accel.table import ACCELERATORS

    rng = np.random.default_rng(11)
    n, vocab, temperature = 14, 300, 2.0
    t = rng.normal(scale=2.0, size=(n, vocab))
    s = t + 0.5 * rng.normal(size=(n, vocab))
    s[1] = t[1] + 1e-3 * rng.normal(size=vocab)  # near-equal
    s[2] = t[2]  # P = Q
    t[3, 0] = 30.0  # P far above Q at one entry: d >= 1
    t[4, :3] = 25.0
    s[5, 0] = 30.0  # Q far above P: d far below 0
    t[6] *= 10.0  # sharp on both sides
    s[6] *= 10.0
    t[8, ::7] = -np.inf  # zero weights of P: +inf unless lam = 1
    s[9, 3] = -np.inf  # a zero of Q under P > 0: +inf unless lam = 0
    t[10, 4] = np.nan
    t[11, ::5] = s[11, ::5] = -np.inf  # one vocabulary masked on both sides
    t[12], s[12] = 0.0, 0.0  # P's other weights subnormal (e^-103)
    t[12, 1:], s[12, 1:] = -103.0 * temperature, -15.5 * temperature
    where = np.ones(n, dtype=bool)
    where[13] = False
    t, s = t.astype(dtype), s.astype(dtype)
    name = {"numpy": "numpy-rows", "torch": "torch-cpu-rows", "dask": "dask-rows"}[backend.name]
    (row,) = [r for r in ACCELERATORS if r.name == name]
    kw = {"p_form": "logits", "q_form": "logits", "temperature": temperature, "lam": lam}
    p, q = backend.asarray(t, dtype), backend.asarray(s, dtype)
    with registry.only(row), np.errstate(all="ignore"):
        out = klx.divergence(p, q, "mix", reduction="none", where=backend.asarray(where), **kw)
    assert out.dtype == p.dtype and tuple(out.shape) == (n,)
    got = backend.to_numpy(out).astype(np.float64)
    want = reference.mp_mix_rows(t, s, lam, "logits", temperature)
    want[13] = 0.0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    assert got[2] == 0.0 and got[13] == 0.0
    finite = np.isfinite(want)
    assert np.all(got[finite] >= 0)
    loose = np.zeros(n, dtype=bool)
    loose[1] = True
    err = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0))
    if dtype == "float64":
        ok = (err <= 4 * np.spacing(np.abs(want))) | (err <= 1e-15)
        near = 1e-9
    else:
        ok = err <= 1e-6 * np.abs(want)
        near = 1e-2
    bad = np.nonzero(finite & ~loose & ~ok)[0]
    assert bad.size == 0, (bad, got[bad], want[bad])
    assert err[1] <= near * want[1]
