"""The accelerator registry: every row reachable, gates, first-use checks, the off switch.

* Reachability: for each registry row, a call it claims, made through the public API,
  reaches the row's implementation (a spy) and equals the definition within the
  conformance tolerances. The CUDA rows are reached with CPU tensors under
  ``TRITON_INTERPRET=1`` through the registry's test-only device aliases.
* First use: a wrong or crashing accelerator warns once and the definition serves.
* ``KLX_ACCELERATORS=0``, :func:`klx.set_accelerators`, :func:`klx.explain`.
* The docs table is the registry's; no import circle in ``src/klx``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import klx
from klx._accel import gates, registry
from support import reference
from support.asserts import cuda_route

ROOT = Path(__file__).resolve().parents[2]
ROWS = {row.name: row for row in registry.ACCELERATORS}


@pytest.fixture(autouse=True)
def _fresh_checks():
    """Each test sees first-use checks as a new process would."""
    registry.reset_checks()
    yield
    registry.reset_checks()
    gates.DEVICE_ALIASES.clear()


def _kl_div_inputs(rng, shape, log_target=False):
    p = rng.random(shape) ** 2
    p[..., ::8] = 0.0  # exact zeros in the target
    p /= p.sum(axis=-1, keepdims=True)
    q = rng.random(shape) + 0.05
    q /= q.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        y = np.log(p) if log_target else p
    return np.log(q), y


def _claimed_call(row, backend):
    """Arguments of a public call that `row` claims to serve, on `backend`."""
    rng = np.random.default_rng(0)
    if row.operation == "kl_div":
        x, y = _kl_div_inputs(rng, (16, 64))
        return (
            klx.kl_div,
            (backend.asarray(x, "float32"), backend.asarray(y, "float32")),
            {"reduction": "sum"},
        )
    rows = max(2, row.min_size // 512)
    t = rng.normal(size=(rows, 512)) * 2
    s = rng.normal(size=(rows, 512)) * 2
    fn = klx.kl_divergence if "kl" in row.kinds else klx.js_divergence
    args = (backend.asarray(t, "float32"), backend.asarray(s, "float32"))
    return fn, args, {"p_form": "logits", "q_form": "logits", "reduction": "none"}


def _route(row, backend, monkeypatch):
    """Make `row`'s device match `backend`'s arrays, or skip with the reason."""
    if row.library != backend.name:
        pytest.skip(f"row {row.name} serves {row.library} arrays; this run tests {backend.name}")
    if backend.name == "torch":
        if "cuda" in row.devices:
            cuda_route(backend, monkeypatch)
        elif row.devices and backend.device.type not in row.devices:
            pytest.skip(f"row {row.name} serves {'/'.join(row.devices)} tensors, not cuda")


@pytest.mark.parametrize("name", list(ROWS))
def test_every_row_is_reached_from_the_public_api(name, backend, monkeypatch):
    row = ROWS[name]
    _route(row, backend, monkeypatch)
    module_name, _, function = row.implementation.partition(":")
    module = importlib.import_module(module_name)
    real = getattr(module, function)
    seen = []

    def spy(call):
        seen.append(call)
        return real(call)

    monkeypatch.setattr(module, function, spy)
    fn, args, kwargs = _claimed_call(row, backend)
    report = klx.explain(fn, *args, **kwargs)
    assert report.chosen == row.name, str(report)
    assert seen, "the implementation was not called"
    klx.set_accelerators(False)
    try:
        want = fn(*args, **kwargs)
    finally:
        klx.set_accelerators(True)
    got = report.result
    assert type(got) is type(want)
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    err = reference.rel_error(
        backend.to_numpy(got), backend.to_numpy(want), np.abs(backend.to_numpy(want)) + 1e-30
    )
    assert err <= reference.TOL["float32"], err


def test_js_from_logits_reaches_its_triton_kernel(backend, monkeypatch):
    """The two-pass JS kernel serves klx.js_divergence from logits (it once never did)."""
    row = ROWS["triton-rows-from-logits"]
    _route(row, backend, monkeypatch)
    from klx._accel import triton_distill

    calls = []
    real = triton_distill.js_rows_from_logits
    monkeypatch.setattr(
        triton_distill, "js_rows_from_logits", lambda *a: calls.append(a) or real(*a)
    )
    rng = np.random.default_rng(1)
    t = backend.asarray(rng.normal(size=(4, 300)), "float64")
    s = backend.asarray(rng.normal(size=(4, 300)), "float64")
    report = klx.explain(klx.js_divergence, t, s, p_form="logits", q_form="logits", beta=0.3)
    assert report.chosen == row.name, str(report)
    assert calls
    ref = reference.js_rows(
        np.exp(reference.log_softmax(backend.to_numpy(t), -1)),
        np.exp(reference.log_softmax(backend.to_numpy(s), -1)),
        -1,
        0.3,
    )
    np.testing.assert_allclose(backend.to_numpy(report.result), ref, rtol=1e-12)


def _broken(monkeypatch, row_name, how):
    row = ROWS[row_name]
    module_name, _, function = row.implementation.partition(":")
    module = importlib.import_module(module_name)
    real = getattr(module, function)

    def wrong(call):
        if how == "raise":
            msg = "a kernel that crashes"
            raise RuntimeError(msg)
        return real(call) * 2

    monkeypatch.setattr(module, function, wrong)


@pytest.mark.parametrize("how", ["wrong", "raise"])
def test_a_wrong_accelerator_warns_once_and_the_definition_serves(backend, monkeypatch, how):
    names = {"numpy": "numpy-blocked", "torch": "torch-cpu-blocked"}
    if backend.name not in names:
        pytest.skip("the CPU kl_div rows serve numpy and torch")
    _broken(monkeypatch, names[backend.name], how)
    x, y = _kl_div_inputs(np.random.default_rng(2), (8, 32))
    x, y = backend.asarray(x, "float64"), backend.asarray(y, "float64")
    with pytest.warns(klx.AcceleratorWarning, match=names[backend.name]) as caught:
        first = klx.explain(klx.kl_div, x, y, reduction="sum")
    assert len(caught) == 1
    assert first.chosen == "definition"
    assert any("first-use check" in why for _, why in first.refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = klx.kl_div(x, y, reduction="sum")
    ref, _ = reference.kl_div(backend.to_numpy(x), backend.to_numpy(y), "sum", False)
    np.testing.assert_allclose(backend.to_numpy(again), ref, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(first.result), ref, rtol=1e-12)


def test_probe_runs_once_per_device_and_dtype(backend):
    if backend.name not in ("numpy", "torch"):
        pytest.skip("the CPU kl_div rows serve numpy and torch")
    x, y = _kl_div_inputs(np.random.default_rng(3), (4, 16))
    for dtype in ("float32", "float64", "float32"):
        klx.kl_div(backend.asarray(x, dtype), backend.asarray(y, dtype), reduction="sum")
    checked = registry.checked()
    assert sorted(k[2] for k in checked) == ["float32", "float64"]
    assert all(checked.values())


def test_set_accelerators_and_explain(backend):
    x, y = _kl_div_inputs(np.random.default_rng(4), (4, 16))
    x, y = backend.asarray(x, "float32"), backend.asarray(y, "float32")
    klx.set_accelerators(False)
    try:
        assert not klx.accelerators_enabled()
        report = klx.explain(klx.kl_div, x, y, reduction="sum")
    finally:
        klx.set_accelerators(True)
    assert report.chosen == "definition"
    assert all("accelerators are off" in why for _, why in report.refused)
    assert str(report).startswith("klx.kl_div: served by definition")
    with pytest.raises(TypeError, match="`enabled` must be True or False"):
        klx.set_accelerators("no")


def test_environment_switch_turns_every_accelerator_off():
    code = (
        "import numpy as np, klx\n"
        "r = klx.explain(klx.kl_div, np.zeros((2, 4)), np.full((2, 4), 0.25), reduction='sum')\n"
        "print(klx.accelerators_enabled(), r.chosen)\n"
    )
    env = {**os.environ, "KLX_ACCELERATORS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "definition"]


@pytest.mark.parametrize("case", ["subclass", "mixed_dtype", "longdouble"])
def test_gates_refuse_with_a_reason(backend, case):
    if backend.name != "numpy":
        pytest.skip("the gate cases are NumPy arrays")
    x, y = _kl_div_inputs(np.random.default_rng(5), (8, 16))
    if case == "subclass":
        x, y = x.view(np.recarray), y.view(np.recarray)
        why = "subclass"
    elif case == "mixed_dtype":
        x = x.astype(np.float32)
        why = "different dtypes"
    else:
        x, y = x.astype(np.longdouble), y.astype(np.longdouble)
        why = f"not {np.dtype(np.longdouble).name}"
    report = klx.explain(klx.kl_div, x, y, reduction="sum")
    assert report.chosen == "definition"
    (reason,) = [r for n, r in report.refused if n == "numpy-blocked"]
    assert why in reason


def test_traced_calls_refuse_the_eager_rows(backend):
    if backend.name == "jax":
        import jax

        def traced(a, b):
            return klx.kl_div(a, b, reduction="sum")

        fn = jax.jit(traced)
        row = "jax-jit"
        why = "JAX tracer"
    elif backend.name == "torch":
        import torch

        def fn(a, b):
            return torch.func.grad(lambda u: klx.kl_div(u, b, reduction="sum"))(a)

        row = "torch-cpu-blocked"
        why = "torch.func"
    else:
        pytest.skip("tracing: jax.jit and torch.func")
    x, y = _kl_div_inputs(np.random.default_rng(6), (4, 8))
    report = klx.explain(fn, backend.asarray(x, "float64"), backend.asarray(y, "float64"))
    assert report.chosen == "definition"
    assert any(n == row and why in r for n, r in report.refused), str(report)


def test_docs_table_is_the_registry():
    text = (ROOT / "docs" / "accelerators.md").read_text()
    begin, end = "<!-- registry-table: begin -->\n", "\n<!-- registry-table: end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == registry.markdown_table(), (
        "docs/accelerators.md is out of date: paste klx._accel.explain.markdown_table()"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """klx modules `path` imports, at import time or inside functions (not for types only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for sub in ast.walk(tree):
        if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("klx"):
            # `from klx._accel import probes` imports klx._accel.probes (its package is
            # already imported); `from klx._x import f` imports klx._x
            for a in sub.names:
                sub_module = f"{sub.module}.{a.name}"
                found.add(sub_module if sub_module in modules else sub.module)
        elif isinstance(sub, ast.Import):
            found.update(a.name for a in sub.names if a.name.startswith("klx"))
    return found


def test_no_import_circle_in_the_package():
    src = ROOT / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "klx").rglob("*.py")
    }
    names = set(modules)
    graph = {
        m: {i for i in _imports(p, names) if i in names and i != m} for m, p in modules.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n] if n in path else [m, n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_check_command_runs_and_writes_json(backend, tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "klx.check", "--libraries", backend.name, "--repeat", "1"]
    cmd += ["--size", "8", "64", "--json", str(out)]
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)  # the command checks real devices only
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(a path on a dtype), 0 failed" in done.stdout
    # no warning of klx's own (the check asks for reduction='mean' on purpose)
    assert "KLDivMeanWarning" not in done.stderr and "AcceleratorWarning" not in done.stderr
    assert f"klx.check: checking {backend.name} on " in done.stderr  # progress, on stderr
    assert "| definition (reference) |" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["library"] for r in rows} == {backend.name}
    assert all(r["status"] == "ok" and r["cases"] > 0 for r in rows)
    assert {r["path"] for r in rows} >= {"definition"}


@pytest.mark.parametrize("name", ["triton-rows-from-logits", "triton-kl-div"])
def test_sliced_rows_reach_the_triton_kernels_without_a_copy(name, backend, monkeypatch):
    """`logits[:, :-1]` (unit stride, a longer row stride) is a layout the kernels take."""
    row = ROWS[name]
    _route(row, backend, monkeypatch)
    rng = np.random.default_rng(7)
    full = [backend.asarray(rng.normal(size=(6, 301)), "float32") for _ in range(2)]
    t, s = (x[:, :-1] for x in full)
    assert not t.is_contiguous()
    if row.operation == "kl_div":
        y = backend.asarray(np.full((6, 301), 1 / 300), "float32")[:, :-1]
        report = klx.explain(klx.kl_div, t, y, reduction="sum")
        want = reference.kl_div(backend.to_numpy(t), backend.to_numpy(y), "sum", False)[0]
    else:
        report = klx.explain(klx.kl_divergence, t, s, p_form="logits", q_form="logits")
        lp = reference.log_softmax(backend.to_numpy(t), -1)
        want = reference.kl_rows_log(
            np.exp(lp), reference.log_softmax(backend.to_numpy(s), -1), -1
        )[0]
    assert report.chosen == name, str(report)
    np.testing.assert_allclose(backend.to_numpy(report.result), want, rtol=2e-5, atol=1e-6)


def test_cuda_graph_capture_takes_the_definition(backend, monkeypatch):
    row = ROWS["triton-kl-div"]
    _route(row, backend, monkeypatch)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, y = _kl_div_inputs(np.random.default_rng(8), (4, 16))
    report = klx.explain(klx.kl_div, backend.asarray(x), backend.asarray(y), reduction="sum")
    assert report.chosen == "definition"
    assert ("triton-kl-div", "during CUDA-graph capture") in report.refused


def test_torch_cpu_rows_need_numpy(backend, monkeypatch):
    """torch's CPU rows run NumPy code on views: without NumPy they step aside."""
    if backend.name != "torch":
        pytest.skip("the torch CPU rows")
    monkeypatch.setitem(gates._IMPORTABLE, "numpy", False)
    x, y = _kl_div_inputs(np.random.default_rng(9), (4, 16))
    report = klx.explain(klx.kl_div, backend.asarray(x), backend.asarray(y), reduction="sum")
    assert report.chosen == "definition"
    assert ("torch-cpu-blocked", "needs numpy, which is not installed") in report.refused


def test_cuda_torch_without_triton_is_not_available_with_its_reason(backend, monkeypatch):
    """Issue 22 item 8: CUDA torch without Triton (Windows, some containers) reached the
    Triton rows, whose first-use check then 'disagreed with the definition'. A missing
    optional library is a refusal naming it, and no check runs."""
    row = ROWS["triton-rows-from-logits"]
    _route(row, backend, monkeypatch)
    monkeypatch.setitem(gates._IMPORTABLE, "triton", False)
    fn, args, kwargs = _claimed_call(row, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no AcceleratorWarning
        report = klx.explain(fn, *args, **kwargs)
    # the next row: the definition's value (with a closed-form derivative)
    assert report.chosen == "torch-closed-form", str(report)
    assert (row.name, "needs triton, which is not installed") in report.refused
    x, y = _kl_div_inputs(np.random.default_rng(9), (4, 16))
    report = klx.explain(klx.kl_div, backend.asarray(x), backend.asarray(y), reduction="sum")
    assert ("triton-kl-div", "needs triton, which is not installed") in report.refused
    assert not registry.checked(), "no first-use check ran"


@pytest.mark.parametrize("beta", [0.01, 0.5, 0.99])
def test_triton_js_serves_the_weights_of_its_direct_forms(backend, beta, monkeypatch):
    """The kernels take the definition's direct forms, exact for weights in [1/16, 15/16]
    (float32 JS at beta = 1e-9 needs the logaddexp forms: the definition serves it)."""
    row = ROWS["triton-rows-from-logits"]
    _route(row, backend, monkeypatch)
    _, args, kwargs = _claimed_call(row, backend)
    report = klx.explain(klx.js_divergence, *args, beta=beta, **kwargs)
    if 1 / 16 <= beta <= 15 / 16:
        assert report.chosen == row.name, str(report)
    else:
        assert report.chosen != row.name
        why = dict(report.refused)[row.name]
        assert why.startswith(f"serves weights in [0.0625, 0.9375], not beta = {beta:g}")


def test_remembered_choices_follow_the_gates(backend):
    """A call signature's remembered row never outlives what its gates read: turning the
    accelerators off, gradients, another dtype or layout, and the device alias."""
    if backend.name != "torch":
        pytest.skip("the torch CPU rows")
    x, y = _kl_div_inputs(np.random.default_rng(10), (4, 16))
    x, y = backend.asarray(x, "float32"), backend.asarray(y, "float32")
    row = registry.ACCELERATORS[1]
    assert registry.select(klx_call(x, y), "kl_div") is row
    assert registry.select(klx_call(x, y), "kl_div") is row  # remembered
    klx.set_accelerators(False)
    try:
        assert registry.select(klx_call(x, y), "kl_div") is None
    finally:
        klx.set_accelerators(True)
    assert registry.select(klx_call(x.requires_grad_(True), y), "kl_div") is None
    gates.DEVICE_ALIASES["cpu"] = "cuda"  # CPU tensors seen as CUDA ones: other rows
    chosen = registry.select(klx_call(x.detach(), y), "kl_div")
    assert chosen is None or chosen.name != row.name
    gates.DEVICE_ALIASES.clear()
    assert registry.select(klx_call(x.detach(), y), "kl_div") is row


def klx_call(x, y):
    from klx._call import parse_kl_div

    return parse_kl_div(x, y, "sum", False, None, None)


def test_compiled_frames_do_not_recompile_for_eager_calls(backend):
    """Eager calls with new signatures between calls of a compiled function leave its
    frame alone (the registry's memory of choices is not read while tracing)."""
    if backend.name != "torch":
        pytest.skip("torch.compile")
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, y = _kl_div_inputs(np.random.default_rng(11), (4, 8))
    x, y = backend.asarray(x, "float32"), backend.asarray(y, "float32")
    f = torch.compile(lambda a, b: klx.kl_div(a, b, reduction="sum"), backend="eager")
    want = klx.kl_div(x, y, reduction="sum")
    for i in range(6):
        a = torch.zeros(i + 1, 3)
        klx.kl_div(a, torch.full((i + 1, 3), 1 / 3), reduction="sum")  # a new signature
        torch.testing.assert_close(f(x, y), want)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.backends("torch", reason="negative-bit views are torch's")
def test_a_negated_view_is_read_as_torch_reads_it(backend):
    """A tensor with the negative bit set (torch._neg_view, the imaginary part of a
    conjugate) holds its values before negation: the fast paths read memory, so they refuse
    it, also after serving a plain tensor of the same layout (remembered decisions)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    x_np, y_np = _kl_div_inputs(rng, (64, 4096))
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    negated = torch._neg_view(-x)
    assert negated.is_neg() and torch.equal(negated, x)
    want = F.kl_div(x, y, reduction="sum")
    for _ in range(2):  # before and after the plain tensor's decision is remembered
        got = klx.kl_div(negated, y, reduction="sum")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        klx.kl_div(x, y, reduction="sum")
    report = klx.explain(klx.kl_div, negated, y, reduction="sum")
    assert any("negated view" in why for _, why in report.refused)
    got = klx.kl_divergence(y, torch._neg_view(-x), q_form="log_probs", reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.backends("numpy", reason="threads around dispatch; the records are the same")
def test_explain_reports_its_own_thread_calls(backend):
    """explain() records were one list for every thread: 23 of 2000 reports under 8 threads
    named another thread's path, and one explain() removed another's (equal) record."""
    import threading

    a = (np.log(np.full((64, 64), 1 / 64)), np.full((64, 64), 1 / 64))
    b = (np.ones(3) / 3, np.ones(3) / 3)
    want_a = klx.explain(klx.kl_div, *a, reduction="sum").chosen
    want_b = klx.explain(klx.kl_divergence, *b).chosen
    assert want_a != want_b  # two paths, so a report taken from the other thread shows
    wrong, errors = [], []

    def work(first: bool) -> None:
        try:
            for _ in range(250):
                if first:
                    report, want = klx.explain(klx.kl_div, *a, reduction="sum"), want_a
                else:
                    report, want = klx.explain(klx.kl_divergence, *b), want_b
                if report.chosen != want or any(n == want for n, _ in report.refused):
                    wrong.append(str(report))
        except Exception as exc:
            errors.append(repr(exc))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors and not wrong, (errors[:1], wrong[:1])


@pytest.mark.backends("numpy", "torch", reason="broadcast views on the CPU blocks")
def test_broadcast_inputs_are_served_as_views(backend):
    """kl_div(X[N, V], Y[1, V]) took the definition (1.5 GB extra and 2.7 s at 16384 x 4096
    in torch); its inputs are now broadcast views that the fast paths serve."""
    x, y = _kl_div_inputs(np.random.default_rng(5), (64, 128))
    xb, yb = backend.asarray(x), backend.asarray(y[:1])
    report = klx.explain(klx.kl_div, xb, yb, reduction="sum")
    assert report.chosen != "definition", str(report)
    want = reference.kl_div(x, np.broadcast_to(y[:1], x.shape), "sum", False)[0]
    np.testing.assert_allclose(backend.to_numpy(report.result), want, rtol=1e-13)


def _triton_rows_call(backend, monkeypatch):
    row = ROWS["triton-rows-from-logits"]
    _route(row, backend, monkeypatch)
    fn, args, kwargs = _claimed_call(row, backend)
    return row, fn, args, kwargs


def test_first_use_check_catches_a_kernel_wrong_only_near_p_equal_q(backend, monkeypatch):
    """Issue 22 item 11: the 3 x 4 probe never reached the kernels' unmasked branch nor a
    near-equal row, where the one-pass kernel lost every digit. The wide probe (a row
    past one block, a student within 1e-3 of its teacher) catches an error of 1e-6."""
    _, fn, args, kwargs = _triton_rows_call(backend, monkeypatch)
    from klx._accel import triton_distill

    real = triton_distill.kl_rows_from_logits
    monkeypatch.setattr(triton_distill, "kl_rows_from_logits", lambda t, s, T: real(t, s, T) + 1e-6)
    with pytest.warns(registry.AcceleratorWarning, match="a student within 1e-3 of its teacher"):
        report = klx.explain(fn, *args, **kwargs)
    assert report.chosen == "torch-closed-form"  # the definition's value


def test_first_use_check_runs_the_backward_kernels_when_gradients_are_needed(backend, monkeypatch):
    """With gradients the check's variant is its own, and it runs the backward kernels:
    a backward 1% off is caught (the forward alone was checked before)."""
    row, fn, args, kwargs = _triton_rows_call(backend, monkeypatch)
    import torch

    from klx._accel import triton_distill

    class _Off(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    klx.explain(fn, *args, **kwargs)  # the forward's check: passes
    real = triton_distill.kl_rows_from_logits
    monkeypatch.setattr(
        triton_distill, "kl_rows_from_logits", lambda t, s, T: _Off.apply(real(t, s, T))
    )
    args = tuple(a.detach().clone().requires_grad_(True) for a in args)
    with pytest.warns(registry.AcceleratorWarning, match="the gradient of"):
        report = klx.explain(fn, *args, **kwargs)
    assert report.chosen == "torch-closed-form"  # the definition's value
    variants = sorted(k[3] for k in registry.checked() if k[0] == row.name)
    assert variants == ["kl logits+logits", "kl logits+logits grad"]


def test_each_kernel_variant_gets_its_own_first_use_check(backend, monkeypatch):
    """kl_div's kernels are specialised on log_target and on 'none' against a sum: a
    log_target=True call after a False one ran a kernel no check had seen."""
    row = ROWS["triton-kl-div"]
    _route(row, backend, monkeypatch)
    x, y = _kl_div_inputs(np.random.default_rng(12), (4, 64))
    with np.errstate(divide="ignore"):
        log_y = np.log(y)
    xt = backend.asarray(x, "float32")
    for target, log_target in ((y, False), (log_y, True)):
        for reduction in ("sum", "none"):
            klx.kl_div(
                xt, backend.asarray(target, "float32"), reduction=reduction, log_target=log_target
            )
    variants = sorted(k[3] for k, ok in registry.checked().items() if k[0] == row.name and ok)
    assert variants == [
        "log_target sum",
        "log_target terms",
        "probs_target sum",
        "probs_target terms",
    ]


def test_gradient_probe_under_no_grad_does_not_switch_the_kernel_off(backend, monkeypatch):
    """A first call inside torch.no_grad() with inputs that require grad: no backward will
    run, so none is checked (the review found the check's own autograd.grad raising there,
    and the kernel off for the rest of the process)."""
    row, fn, args, kwargs = _triton_rows_call(backend, monkeypatch)
    import torch

    args = tuple(a.detach().clone().requires_grad_(True) for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert klx.explain(fn, *args, **kwargs).chosen == row.name
        assert klx.explain(fn, *args, **kwargs).chosen == row.name  # grad: its own check
    variants = sorted(k[3] for k, ok in registry.checked().items() if k[0] == row.name and ok)
    assert variants == ["kl logits+logits", "kl logits+logits grad"]


@pytest.mark.backends("numpy", reason="the registry's table, backend-independent")
def test_only_one_row_and_restored_after(backend):
    """registry.only(row): that row serves at any size (klx.check runs each path so);
    only(None): the definition; on exit the table and the switch are as before."""
    x, y = _kl_div_inputs(np.random.default_rng(12), (2, 4))
    a, b = backend.asarray(x), backend.asarray(y)
    before = klx.explain(klx.kl_divergence, np.exp(a), np.exp(a))
    assert before.chosen == "definition"  # below numpy-rows' minimum size
    with registry.only(ROWS["numpy-rows"]):
        assert klx.explain(klx.kl_divergence, np.exp(a), np.exp(a)).chosen == "numpy-rows"
    with registry.only(None):
        report = klx.explain(klx.kl_div, a, b, reduction="sum")
        assert report.chosen == "definition" and not klx.accelerators_enabled()
    assert klx.accelerators_enabled()
    assert klx.explain(klx.kl_div, a, b, reduction="sum").chosen == "numpy-blocked"
    assert klx.explain(klx.kl_divergence, np.exp(a), np.exp(a)).chosen == "definition"
