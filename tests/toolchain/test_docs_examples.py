"""Every python block of README.md and docs/*.md runs as written, as a user would run it.

Each fenced ``python`` block is saved to a file and run as a script in a subprocess (so
the Dask example starts its cluster as it would for a user, under its own
``if __name__ == "__main__":``). A block runs in the tests session of the library it
needs (CuPy, Dask, JAX, torch, else NumPy), once per nox run.

What a block says it prints is checked, doctest-style: a ``print(...)`` line whose comment
reads ``# -> TEXT`` must print the line TEXT, exactly, in the order of the block's prints.
A comment that looks like a printed value (a number, an array, a tuple, True) without the
arrow fails the run: every printed claim in the docs is one the tests check. Also: the
torch build is chosen in one place, and the README says what has run on a GPU.
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
#: A print whose trailing comment states what it prints: ``print(x)  # -> 0.25``.
CLAIM = re.compile(r"^\s*print\(.*#\s*->\s?(.*?)\s*$")
#: A print comment that reads as a value, which must then be a checked claim.
LOOKS_PRINTED = re.compile(r"^\s*print\(.*#\s*([-\[(\d'\"]|True\b|False\b|None\b)")
#: The library whose tests session runs a block: the first of these it imports.
NEEDS = (
    ("cupy", "cupy"),
    ("dask", "dask"),
    ("distributed", "dask"),
    ("jax", "jax"),
    ("optax", "jax"),
    ("torch", "torch"),
    ("mlx", "mlx"),
)


#: Peers a block loads from their installed files (``distribution(NAME)``), and how to get
#: them: the torch session installs torchtune without its dependencies (noxfile.NO_DEPS).
PEERS = {"torchtune": "pip install --no-deps torchtune, as the torch nox session does"}


def _installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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
    for peer in PEERS:
        if f'distribution("{peer}")' in code and not _installed(peer):
            pytest.skip(f"needs {peer}, which is not installed ({PEERS[peer]})")
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
    printed = iter(run.stdout.splitlines())
    for claim in claims(code):
        assert any(line == claim for line in printed), (
            f"the block says a print shows {claim!r}; it printed, in order:\n{run.stdout}"
        )


def claims(code: str) -> list[str]:
    """The lines a block says it prints (``# -> TEXT`` on a print), in order."""
    return [m[1] for m in map(CLAIM.match, code.splitlines()) if m]


@pytest.mark.parametrize(("code", "backend_name"), _blocks())
def test_every_printed_value_in_a_comment_is_checked(code, backend_name):
    """A value in a print's comment is a claim: it must use ``# -> `` so the run checks it."""
    unchecked = [
        line.strip()
        for line in code.splitlines()
        if LOOKS_PRINTED.match(line) and not CLAIM.match(line)
    ]
    assert not unchecked, f"printed values stated without `# -> ` (not checked): {unchecked}"


def test_claims_are_read_as_written():
    code = "print(a)   # -> [0.5 0.25]\nprint(b)  # the six terms\nprint(c)  # -> True\n"
    assert claims(code) == ["[0.5 0.25]", "True"]
    assert LOOKS_PRINTED.match("print(x)  # 0.38913500325858347, as torch's")
    assert not LOOKS_PRINTED.match("print(x)  # the mean of rows 0 and 2")


def _torch_pin() -> str:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    (pin,) = [line.strip() for line in lines if line.startswith("torch==")]
    return pin


def test_torch_is_pinned_once_and_documented():
    """noxfile.py and the README's first command use one torch pin, and the docs explain it."""
    pin = _torch_pin()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin), f"pin without a local label: {pin}"
    nox_source = (ROOT / "noxfile.py").read_text()
    assert 'pinned("torch")' in nox_source and not re.search(r"torch==\d", nox_source)
    for name in ("requirements.txt", "requirements-cpu.txt"):
        text = (ROOT / "benchmarks" / name).read_text()
        assert not re.search(r"^torch", text, re.M), f"{name} pins torch itself"
    readme = (ROOT / "README.md").read_text()
    first, second = readme.split("```bash")[1].split("```")[0].strip().splitlines()
    assert first.startswith("pip install -r benchmarks/requirements.txt && python -m benchmarks")
    assert second.startswith("pip install -c constraints.txt nox && nox")
    cpu = readme.split("```bash")[2].split("```")[0].strip()
    assert cpu == "pip install -r benchmarks/requirements-cpu.txt && python -m benchmarks.run"
    assert f"`{pin}`" in readme
    assert "project's machines" not in readme, "the README speaks to users, not of our machines"
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
    assert "python -m benchmarks.gpu_check" in opening  # the one command (issue 22)
