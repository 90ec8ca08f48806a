"""constraints.txt: one tested version of every dependency, used by every install.

On 2026-12-06 a fresh `nox` failed: the dask session installed `dask[array] distributed`
unpinned, and pip paired dask 2026.11.0 with distributed 2021.4.1 (the newest release
without an upper bound on dask). Every session now installs with `-c constraints.txt`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))

import lock

ROOT = Path(__file__).parents[2]
PIN = re.compile(r"^([a-z0-9-]+)==([0-9][^\s+;]*)$")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: {line!r} is not `name==version` (canonical name)"
        pins[match[1]] = match[2]
    return pins


def _names(requirements: list[str]) -> set[str]:
    return {lock.canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_dependency_of_every_extra_is_pinned():
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = _names(project["dependencies"])
    for extra, requirements in extras.items():
        if extra not in ("all", "dev"):  # those name other extras
            wanted |= _names(requirements)
    wanted |= {"triton", "optax", "torchtune", "nox", "ruff", "mypy"}  # what noxfile.py adds
    assert not wanted - set(pins), f"not pinned in constraints.txt: {sorted(wanted - set(pins))}"


def test_dask_and_distributed_are_one_release():
    pins = _pins()
    assert pins["dask"] == pins["distributed"], "distributed pins dask's exact release"


def test_torch_and_triton_agree_with_the_torch_wheel():
    """torch's CUDA wheel pins triton exactly; a lock made from a local CPU wheel would not."""
    pins = _pins()
    assert "triton" in pins and "torch" in pins
    assert any(name.startswith("nvidia-") for name in pins), "resolved against the index's wheel"


def test_every_install_takes_the_constraints():
    nox_source = (ROOT / "noxfile.py").read_text()
    installs = re.findall(r"session\.install\((.*?)\)", nox_source, re.S)
    constrained = [i for i in installs if '"-c", CONSTRAINTS' in i]
    upgrading = [i for i in installs if '"--upgrade"' in i]  # the upstream session, by design
    peers = [i for i in upgrading if '"--no-deps"' in i]  # its peers without dependencies
    assert len(constrained) == 1 and len(upgrading) == 2 and len(installs) == 3
    assert peers == ['"--upgrade", "--no-deps", *NO_DEPS[backend]']
    assert "_install(session" in nox_source
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -c constraints.txt nox" in ci
    requirements = (ROOT / "benchmarks" / "requirements.txt").read_text().splitlines()
    assert "-c ../constraints.txt" in requirements
    cpu = (ROOT / "benchmarks" / "requirements-cpu.txt").read_text().splitlines()
    assert "-r requirements.txt" in cpu


def test_the_benchmark_installs_what_the_lock_resolved():
    """The benchmark's requirements name nothing that constraints.txt leaves free."""
    lines = (ROOT / "benchmarks" / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line and not line.startswith(("#", "-"))]
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", requirements[0])
    assert extras, "the first requirement installs klx with its extras"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = _names(requirements[1:])
    for extra in extras[1].split(","):
        named |= _names(project["optional-dependencies"][extra])
    assert not named - set(_pins()), sorted(named - set(_pins()))


def test_lock_writes_canonical_names_without_local_labels():
    text = lock.render({"torch": "2.13.0", "array-api-compat": "1.16.0"})
    assert text.splitlines()[-2:] == ["array-api-compat==1.16.0", "torch==2.13.0"]
    assert lock.canonical("Array_API.compat") == "array-api-compat"
    source = (ROOT / "tools" / "lock.py").read_text()
    assert '"--isolated"' in source and '.split("+", 1)[0]' in source
