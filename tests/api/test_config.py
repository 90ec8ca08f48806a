"""Configuration and environment: the validation switch (:func:`klx.set_validation`,
:func:`klx.validation`, ``KLX_VALIDATE``) and ``KLX_NUM_THREADS``.

The accelerators' switch (:func:`klx.set_accelerators`, ``KLX_ACCELERATORS``) is tested with
the accelerators (tests/accelerators), and what importing klx does in
tests/toolchain/test_import.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import klx

P = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
Q = np.array([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])


def _python(code, **env):
    """Run `code` in a new Python process with `env` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_program_wide_switch(backend):
    a, b = backend.asarray(Q), backend.asarray(P)
    assert not klx.is_validating()
    klx.kl_div(a, b, reduction="sum")  # wrong, silently: validation is off by default
    with klx.validation():
        with pytest.raises(ValueError, match="log-probabilities"):
            klx.kl_div(a, b, reduction="sum")
        klx.kl_div(a, b, reduction="sum", validate=False)  # an explicit False wins
    klx.set_validation(True)
    try:
        with pytest.raises(ValueError, match="log-probabilities"):
            klx.kl_div(a, b, reduction="sum")
    finally:
        klx.set_validation(False)


def test_environment_variable_turns_it_on():
    code = (
        "import numpy as np, klx\n"
        "try:\n"
        "    klx.kl_div(np.array([0.5, 0.5]), np.array([0.5, 0.5]), reduction='sum')\n"
        "except ValueError as e:\n"
        "    print('raised')\n"
    )
    out = _python(code, KLX_VALIDATE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"


def test_validation_blocks_interleaved_across_threads_restore_the_setting():
    assert not klx.is_validating()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with klx.validation(True):
            a_in.set()
            b_in.wait(5)
            seen["a"] = klx.is_validating()  # B's block is the innermost one open: off
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with klx.validation(False):
            b_in.set()
            a_out.wait(5)
            seen["b"] = klx.is_validating()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start()
    tb.start()
    ta.join(10)
    tb.join(10)
    assert seen == {"a": False, "b": False}
    assert not klx.is_validating(), "A exits, then B: validation must not stay on"
    # and in the other order of exits, nested in one thread
    outer = klx.validation(True)
    inner = klx.validation(False)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert not klx.is_validating()
    inner.__exit__(None, None, None)
    assert not klx.is_validating()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5"])
def test_klx_num_threads_must_be_a_positive_integer(value):
    code = "import klx"
    out = _python(code, KLX_NUM_THREADS=value)
    assert out.returncode != 0
    assert "KLX_NUM_THREADS must be a positive integer" in out.stderr
    assert f"got {value!r}" in out.stderr


def test_klx_num_threads_is_honoured():
    code = "import klx._accel.threads as t; print(t.workers())"
    out = _python(code, KLX_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
