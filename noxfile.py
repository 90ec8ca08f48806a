"""The conformance matrix and the checks, as nox sessions.

    nox                      # lint, typecheck and the tests on every backend
    nox -s "tests(backend='torch')"
    nox --no-venv -s tests   # a prepared environment with no network (a GPU host)

Each tests session installs klx, the test tools and one backend only, and runs the
same suite with ``--backend`` set, so a backend that fails to import fails its
session. The cupy session needs a CUDA device and otherwise ends with a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

# The CPU build of torch that the project's machines hold on disk; an unpinned torch
# would download a multi-GB CUDA build. Override with KLX_TORCH_SPEC elsewhere.
TORCH = os.environ.get("KLX_TORCH_SPEC", "torch==2.13.0")

BACKENDS = {
    "numpy": ["numpy"],
    # triton runs klx's kernels under TRITON_INTERPRET=1 on CPU tensors.
    "torch": [TORCH, "triton"],
    "jax": ["jax[cpu]"],
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
    args = [f"--backend={backend}", "--conformance-out=conformance"]
    if backend == "numpy":
        # The kernel modules import torch/triton or cupy, which this session has not.
        kernels = [
            f"--ignore=src/klx/_accel/{m}.py" for m in ("triton_kl", "triton_distill", "cupy_kl")
        ]
        args += ["--doctest-modules", *kernels, "src/klx", "--doctest-glob=README.md", "README.md"]
        args += ["tests"]
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; with one
    # they run compiled, on the GPU.
    env = {} if _cuda_available() else {"TRITON_INTERPRET": "1"}
    session.run("pytest", *args, *session.posargs, env=env)
    if backend == "torch":
        # The Triton kernels once more, through the real compiler (to sm_90 / sm_80 cubins).
        compile_tests = "tests/toolchain/test_triton_compile.py"
        session.run("pytest", "--backend=torch", compile_tests, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    if session.venv_backend != "none":
        session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    if session.venv_backend != "none":
        session.install("-e", ".", "mypy>=1.10")
    session.run("mypy")
