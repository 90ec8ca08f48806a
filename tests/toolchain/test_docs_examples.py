"""Every python block of README.md and docs/*.md runs as written, as a user would run it.

Each fenced ``python`` block is saved to a file and run as a script in a subprocess (so
the Dask example starts its cluster as it would for a user, under its own
``if __name__ == "__main__":``). A block runs in the tests session of the library it
needs (CuPy, Dask, JAX, torch, else NumPy), once per nox run. Also: the torch build is
chosen in one place, and the README says what has run on a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import backends as bk

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: The library whose tests session runs a block: the first of these it imports.
NEEDS = (
    ("cupy", "cupy"),
    ("dask", "dask"),
    ("distributed", "dask"),
    ("jax", "jax"),
    ("optax", "jax"),
    ("torch", "torch"),
)


def _blocks() -> list:
    params = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            code = match.group(1)
            imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M))
            backend = next((b for mod, b in NEEDS if mod in imported), "numpy")
            name = f"{page.relative_to(ROOT)}:{line}"
            params.append(pytest.param(code, backend, id=name))
    return params


def _session_backends(config: pytest.Config) -> list[str]:
    asked = [b for opt in config.getoption("--backend") for b in opt.split(",") if b]
    if not asked and os.environ.get("KLX_BACKENDS"):
        asked = [b for b in os.environ["KLX_BACKENDS"].split(",") if b]
    return asked


@pytest.mark.parametrize(("code", "backend_name"), _blocks())
def test_example_runs_as_a_script(code, backend_name, request, tmp_path):
    if backend_name == "cupy" and not bk.cuda_available():
        pytest.skip("needs CuPy and a CUDA device; this machine has none")
    asked = _session_backends(request.config)
    if asked and backend_name not in asked:
        pytest.skip(f"needs {backend_name}: runs in the {backend_name} tests session")
    if not asked:
        try:
            bk.load(backend_name)
        except ImportError:
            pytest.skip(f"needs {backend_name}, which is not installed")
    script = tmp_path / "example.py"
    script.write_text(code)
    # The checkout's klx first, as the tests see it (PYTHONPATH=src, or the nox install).
    paths = [str(ROOT / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in paths if p)}
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, f"the example failed:\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr


def _torch_pin() -> str:
    lines = (ROOT / "benchmarks" / "requirements.txt").read_text().splitlines()
    (pin,) = [line.strip() for line in lines if line.startswith("torch")]
    return pin


def test_torch_is_pinned_once_and_documented():
    """noxfile.py and the README's first command use one torch pin, and the docs explain it."""
    pin = _torch_pin()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin), f"pin without a local label: {pin}"
    nox_source = (ROOT / "noxfile.py").read_text()
    assert "_torch_pin()" in nox_source and not re.search(r"torch==\d", nox_source)
    readme = (ROOT / "README.md").read_text()
    first, second = readme.split("```bash")[1].split("```")[0].strip().splitlines()
    assert first.startswith("pip install -r benchmarks/requirements.txt && python -m benchmarks")
    assert all(f" {b}" in first for b in ("numpy", "torch", "jax", "dask"))
    assert second.startswith("pip install nox && nox")
    assert f"`{pin}`" in readme
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    assert "### Choosing the torch build" in guide and f"`{pin}`" in guide
    assert "download.pytorch.org/whl/cpu" in guide and "KLX_TORCH_SPEC" in guide


def test_installed_torch_is_the_pinned_one():
    """In the nox torch session, the torch that nox installed is the pinned version."""
    spec = os.environ.get("KLX_TORCH_SPEC")
    if spec is None:
        pytest.skip("KLX_TORCH_SPEC is unset: the nox torch session sets it")
    torch = pytest.importorskip("torch")
    wanted = spec.split("==", 1)[1]
    got = torch.__version__ if "+" in wanted else torch.__version__.split("+")[0]
    assert got == wanted, f"nox installed torch {torch.__version__} for {spec}"


def test_readme_says_what_has_run_on_a_gpu():
    opening = (ROOT / "README.md").read_text().split("```")[0]
    assert "never run on a GPU" in opening
    assert "Triton" in opening and "CuPy" in opening
    assert "python -m klx.check" in opening
    assert "pytest --backend torch --backend cupy" in opening
