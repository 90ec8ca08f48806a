"""`python -m klx.check` as a user reads it: no warnings of its own, a progress line per
library and device on stderr, a legend of the columns, the definition labelled as the
reference, what to install to check what was not found, and a plain ``--help``.

The tests that run the command run it on NumPy alone, on small inputs (a second or two),
once per nox run (in the NumPy session); the others need no array library but NumPy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

import klx
from klx import check
from klx._accel import blocked, gates, registry
from klx._backends import BY_NAME, torch_gpu_note

ONCE = pytest.mark.backends("numpy", reason="runs the command on NumPy only; once per run")
SMALL = ["--repeat", "1", "--size", "8", "64"]
#: A progress line: the library, the device, how many checks, the verdict and the time.
PROGRESS = re.compile(
    r"^klx\.check: checking numpy on cpu \.\.\. \d+ checks, all ok \(\d+\.\d s\)$"
)


def _run(
    *args: str, hide: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command, with warnings as errors and the libraries in `hide` made uninstalled."""
    code = (
        "import sys\n"
        f"for name in {hide!r}:\n"
        "    sys.modules[name] = None  # import fails as for a library not installed\n"
        "from klx.check import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


@ONCE
def test_no_warnings_and_a_progress_line_on_stderr(backend):
    done = _run("--libraries", "numpy", *SMALL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line] != []
    assert all(PROGRESS.match(line) for line in done.stderr.splitlines()), done.stderr
    assert done.stdout.startswith("| library | device | path |")  # the table first


@ONCE
def test_the_table_has_a_legend_and_the_reference_row(backend):
    done = _run("--libraries", "numpy", *SMALL)
    out = done.stdout
    head = out.splitlines()[0]
    assert head == "| " + " | ".join(check._COLUMNS) + " |"
    legend = out.split("\nColumns:\n", 1)[1]
    for column in check._COLUMNS[2:]:  # library and device need no words
        assert re.search(rf"^  {re.escape(column)} +\S", legend, re.M), column
    assert "reference" in legend.split("\n  cases")[0]
    reference = [
        line for line in out.splitlines() if "| definition (reference) | float32 |" in line
    ]
    assert len(reference) == 1
    cells = [c.strip() for c in reference[0].strip("|").split("|")]
    ms_path, ms_definition, ms_peer = cells[-3:]
    # its time is the definition's, never set beside the peer as if it were klx's speed
    assert ms_path == "-" and float(ms_definition) > 0 and ms_peer == "-"
    fast = [line for line in out.splitlines() if "| numpy-blocked | float32 |" in line]
    assert "(NumPy formula)" in fast[0]
    assert re.search(r"klx\.check: \d+ checks \(a path on a dtype\), 0 failed", out)


@ONCE
def test_what_to_install_for_a_missing_library(backend):
    hidden = ("torch", "jax", "cupy", "dask", "array_api_strict")
    done = _run("--libraries", "numpy", *hidden, *SMALL, hide=(*hidden, "dask.array"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())  # the lines are wrapped
    assert "Not checked here, and how to check it:" in done.stdout
    assert "torch: not installed. To check it: pip install torch" in out
    assert "jax: not installed. To check it: pip install jax" in out
    assert '"jax[cuda12]"' in out
    assert "cupy: not installed. To check it: pip install cupy-cuda12x" in out
    assert 'dask: not installed. To check it: pip install "dask[array]"' in out
    assert "array_api_strict: not installed. To check it: pip install array-api-strict" in out
    assert "No GPU was checked" in out


def test_what_to_do_when_torch_sees_no_gpu():
    cpu = torch_gpu_note("2.13.0+cpu", None)
    assert "torch 2.13.0+cpu is a CPU-only build" in cpu
    assert "install a CUDA build of torch" in cpu
    cuda = torch_gpu_note("2.13.0", "12.8")
    assert "sees no GPU" in cuda and "nvidia-smi" in cuda


@ONCE
def test_nothing_checked_is_exit_status_2(backend):
    done = _run("--libraries", "jax", *SMALL, hide=("jax",))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nothing was checked" in done.stdout
    assert "jax: not installed. To check it: pip install jax" in " ".join(done.stdout.split())


@ONCE
def test_json_on_stdout_is_only_json(backend):
    done = _run("--libraries", "numpy", *SMALL, "--json", "-")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {r["path"] for r in report["rows"]} >= {"definition", "numpy-blocked"}
    assert all(r["status"] == "ok" and r["cases"] > 0 for r in report["rows"])
    assert report["exit_status"] == 0
    assert any(PROGRESS.match(line) for line in done.stderr.splitlines()), done.stderr


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_:
        check.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text
    assert text.startswith("usage: python -m klx.check")
    for option in ("--libraries", "--json", "--repeat", "--size", "--quiet"):
        assert option in text
    assert "exit status: 0 when every check passed, 1 when one failed" in " ".join(text.split())


@ONCE
def test_a_failed_first_use_check_is_reported_not_warned(backend, monkeypatch, capsys):
    """An AcceleratorWarning goes into the report (and the exit status), not to stderr."""
    real = blocked.kl_div_numpy

    def wrong(call):
        return real(call) + 1.0

    monkeypatch.setattr(blocked, "kl_div_numpy", wrong)
    registry.reset_checks()
    try:
        status = check.main(["--libraries", "numpy", *SMALL, "--quiet"])
    finally:
        registry.reset_checks()
    out, err = capsys.readouterr()
    assert status == 1
    assert err == ""
    assert "| numpy-blocked | float32 |" in out and "ERROR" in out
    problems = " ".join(out.split("\nWhat went wrong:\n", 1)[1].split("\nColumns:")[0].split())
    assert "AcceleratorWarning: klx accelerator 'numpy-blocked' disagreed" in problems
    assert re.search(r"\d+ failed: numpy/cpu/numpy-blocked/float32", out)


def test_klx_warnings_stay_in_and_others_pass_once(monkeypatch):
    from klx.check import runner

    monkeypatch.setattr(runner, "_FOREIGN_SEEN", set())
    detail: list[str] = []

    def three_paths() -> None:
        for _ in range(3):
            with check._own_warnings(detail):
                warnings.warn("another library's", UserWarning, stacklevel=1)
                warnings.warn("reduction='mean'", klx.KLDivMeanWarning, stacklevel=1)
                warnings.warn("a probe failed", klx.AcceleratorWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        three_paths()
    assert [(w.category, str(w.message)) for w in seen] == [(UserWarning, "another library's")]
    assert detail == ["AcceleratorWarning: a probe failed"] * 3


@pytest.mark.parametrize("count", [0, RuntimeError("no CUDA driver")])
def test_what_to_do_when_cupy_sees_no_gpu(count, monkeypatch):
    def device_count() -> int:
        if isinstance(count, Exception):
            raise count
        return count

    runtime = types.SimpleNamespace(getDeviceCount=device_count)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    notes: list[str] = []
    assert check._find(np, "cupy", notes) == []
    assert len(notes) == 1
    assert notes[0].startswith("a GPU through CuPy: CuPy found no CUDA device")
    assert "nvidia-smi" in notes[0]


def test_a_library_that_breaks_on_import_is_a_note_not_a_crash(monkeypatch):
    """A broken install of one library (not an ImportError) leaves the others checkable."""
    import importlib

    from klx import check

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "jax":
            msg = "jaxlib version mismatch"
            raise RuntimeError(msg)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    notes: list[str] = []
    assert check._find(None, "jax", notes) == []
    assert notes == ["jax: failed to import (RuntimeError: jaxlib version mismatch)"]


@ONCE
def test_switched_off_accelerators_are_off_not_failed(backend):
    """KLX_ACCELERATORS=0 made every accelerator FAILED and the exit status 1."""
    done = _run("--libraries", "numpy", *SMALL, env={"KLX_ACCELERATORS": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "klx.check: 2 checks (a path on a dtype), 0 failed" in done.stdout
    assert "klx's accelerators: off in this process (KLX_ACCELERATORS=0" in done.stdout
    assert "numpy-blocked" not in done.stdout.split("Columns:")[0]


@ONCE
def test_validation_on_does_not_fail_the_checks_own_inputs(backend):
    """KLX_VALIDATE=1 refused the check's inputs (zeros, -inf) and made it exit 1."""
    done = _run("--libraries", "numpy", *SMALL, env={"KLX_VALIDATE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout.split("Columns:")[0]
    assert "numpy-blocked" in done.stdout


def test_a_path_whose_library_is_missing_is_not_available_not_failed(monkeypatch):
    """Issue 22 item 8: CUDA torch without Triton marked both Triton rows as errors and
    exited 1. They are not available, with what to install; the other rows are checked."""
    from klx import check
    from klx._accel import registry

    monkeypatch.setitem(gates._IMPORTABLE, "triton", False)
    lib = check._Library("torch", "cuda:0", None, None, None, ("float32",), "cuda")
    notes: list[str] = []
    rows = check._serving(registry, lib, notes)
    assert not any(r.name.startswith("triton") for r in rows)
    assert notes == [
        f"{name} on cuda:0: not available: needs triton, which is not installed. To check "
        "it: pip install triton"
        for name in ("triton-kl-div", "triton-rows-from-logits")
    ]
    monkeypatch.setitem(gates._IMPORTABLE, "triton", True)
    names = {r.name for r in check._serving(registry, lib, [])}
    assert names == {"triton-kl-div", "triton-rows-from-logits", "torch-closed-form"}


@pytest.mark.backends("torch", reason="torch's devices as the check lists them")
def test_each_gpu_timing_waits_for_its_own_device(backend, monkeypatch):
    """Issue 22 item 10: torch.cuda.synchronize() waits for the current device only, so
    cuda:1's timings stopped the clock before its kernels had finished."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    libs = BY_NAME["torch"].check_devices(np, [])
    assert [lib.device for lib in libs] == ["cpu", "cuda:0", "cuda:1"]
    for lib in libs[1:]:
        assert lib.sync.func is torch.cuda.synchronize and lib.sync.args == (lib.device,)


@pytest.mark.backends("jax", reason="JAX's devices as the check lists them")
def test_jax_on_the_cpu_is_checked_beside_its_gpu(backend, monkeypatch):
    """With jax[cuda], jax.devices() lists the GPUs only: JAX's CPU was never checked."""
    import jax

    cpu = jax.devices("cpu")
    gpu = types.SimpleNamespace(platform="gpu", __str__=lambda self: "cuda:0")
    real = jax.devices
    monkeypatch.setattr(jax, "devices", lambda kind=None: [gpu] if kind is None else real(kind))
    libs = BY_NAME["jax"].check_devices(np, notes := [])
    assert [lib.device_type for lib in libs] == ["cpu", "cuda"]
    assert libs[0].device == str(cpu[0])
    assert not notes  # a GPU was found: no "JAX sees only cpu" note


def test_the_check_keeps_jax_from_taking_the_gpu_memory():
    """JAX preallocates 75% of a GPU's memory at start: the check asks it not to."""
    code = (
        "import os; os.environ.pop('XLA_PYTHON_CLIENT_PREALLOCATE', None)\n"
        "from klx import check; check._jax_shares_the_gpu()\n"
        "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["false"], run.stderr
