"""The conformance matrix and the checks, as nox sessions.

    nox                      # lint, typecheck, the tests on every backend, report, docs
    nox -s "tests(backend='torch')"
    nox -s docs              # the documentation site, warnings as errors
    nox --no-venv -s tests   # a prepared environment with no network (a GPU host)

Each tests session installs klx, the test tools and one backend only, and runs the
same suite with ``--backend`` set, so a backend that fails to import fails its
session. The cupy session needs a CUDA device and otherwise ends with a skip.
``conformance_report`` then reads every tests session's results and compares the
backends with each other (``tools/conformance_report.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "conformance_report", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
CONFORMANCE = "conformance"


def _torch_pin() -> str:
    """The torch line of benchmarks/requirements.txt: one pin for nox and the benchmark."""
    lines = (ROOT / "benchmarks" / "requirements.txt").read_text().splitlines()
    return next(line.strip() for line in lines if line.startswith("torch=="))


# Which build pip takes for this pin (CPU or CUDA) is the index's choice: see
# docs/getting-started.md, "Choosing the torch build". KLX_TORCH_SPEC overrides it.
TORCH = os.environ.get("KLX_TORCH_SPEC", _torch_pin())

BACKENDS = {
    "numpy": ["numpy"],
    # triton runs klx's kernels under TRITON_INTERPRET=1 on CPU tensors.
    "torch": [TORCH, "triton"],
    "jax": ["jax[cpu]", "optax"],  # optax: the peer that docs/coming-from.md checks against
    "cupy": ["cupy-cuda12x"],
    "dask": ["dask[array]", "distributed"],
    "array_api_strict": ["array-api-strict"],
}


def _cuda_available() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia"))


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The test suite and conformance matrix on one backend."""
    if backend == "cupy" and not _cuda_available():
        session.skip("cupy needs a CUDA device, and this machine has none")
    if session.venv_backend != "none":
        session.install("-e", ".[test]", *BACKENDS[backend])
    args = [f"--backend={backend}", f"--conformance-out={CONFORMANCE}"]
    if backend == "numpy":
        # The kernel modules import torch/triton or cupy, which this session has not; so do
        # fused_linear_divergence's torch and JAX modules.
        kernels = [
            f"--ignore=src/klx/_accel/{m}.py" for m in ("triton_kl", "triton_distill", "cupy_kl")
        ] + [f"--ignore=src/klx/{m}.py" for m in ("_fused_torch", "_fused_jax")]
        args += ["--doctest-modules", *kernels, "src/klx", "tests"]
    env = {}
    if backend == "torch" and session.venv_backend != "none":
        env["KLX_TORCH_SPEC"] = (
            TORCH  # tests/toolchain/test_docs_examples.py checks what was installed
        )
    if backend == "torch" and not _cuda_available():
        # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; with
        # one they run compiled, on the GPU.
        env["TRITON_INTERPRET"] = "1"
    session.run("pytest", *args, *session.posargs, env=env)
    if backend == "torch":
        # The Triton kernels once more, through the real compiler (to sm_90 / sm_80 cubins).
        compile_tests = "tests/toolchain/test_triton_compile.py"
        session.run("pytest", "--backend=torch", compile_tests, *session.posargs)


LINTED = ("src", "tests", "benchmarks", "tools", "docs/conf.py", "noxfile.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    if session.venv_backend != "none":
        session.install("ruff>=0.6")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    if session.venv_backend != "none":
        session.install("-e", ".", "mypy>=1.10")
    session.run("mypy")


@nox.session
def conformance_report(session: nox.Session) -> None:
    """One report from every tests session's results: each backend against the others."""
    if session.venv_backend != "none":
        session.install("numpy>=1.26")
    session.run(
        "python", "tools/conformance_report.py", CONFORMANCE, "--out", f"{CONFORMANCE}/report.md"
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx), warnings as errors; then a headless browser opens it."""
    if session.venv_backend != "none":
        session.install("-e", ".[docs,test]")
    html = "docs/_build/html"
    session.run("sphinx-build", "-W", "--keep-going", "-q", "-b", "html", "docs", html)
    session.run(
        "pytest",
        "tests/toolchain/test_docs_site.py",
        "-p",
        "no:cacheprovider",
        env={"KLX_DOCS_HTML": html},
    )
