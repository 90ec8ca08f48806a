"""`import klx` imports no array library (array-api-compat's rule: look in sys.modules only)."""

from __future__ import annotations

import subprocess
import sys


def test_import_klx_imports_no_array_library():
    code = (
        "import sys, klx\n"
        "klx.kl_div, klx.kl_divergence, klx.js_divergence, klx.validation\n"
        "loaded = [m for m in ('numpy', 'torch', 'jax', 'cupy', 'dask', 'array_api_strict', "
        "'triton', 'scipy') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import klx imported {out}"


def test_version():
    import klx

    assert klx.__version__.count(".") == 2
