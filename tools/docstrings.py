"""numpydoc's validation of klx's public API, as ``nox -s lint`` runs it::

    python tools/docstrings.py

It checks the package docstring and every name in ``klx.__all__`` (with the public
methods of its classes), with the checks, exclusions and overrides of
``[tool.numpydoc_validation]`` in pyproject.toml, and exits 1 if any is flagged. It reads
``klx.__all__`` rather than files because ``python -m numpydoc lint`` checks every function
of a file, and klx's private modules hold many helpers that are not API. An exclusion is a
regular expression searched in the name as ``klx.<name>`` (``klx.Divergence.option_values``).

A docstring's line may also carry ``# numpydoc ignore=CODE`` (numpydoc's own syntax).
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from types import ModuleType

from numpydoc.hooks.validate_docstrings import parse_config, process_file
from numpydoc.validate import validate

ROOT = Path(__file__).resolve().parents[1]
#: This checkout's klx, whatever else is installed.
SRC = ROOT / "src"


def public_names(package: ModuleType) -> list[str]:
    """Every documented object of `package`'s ``__all__``, with its classes' own methods."""
    names = []
    for name in package.__all__:
        obj = getattr(package, name)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue  # __version__: a string, documented where it is read
        names.append(f"klx.{name}")
        if inspect.isclass(obj):
            names += [
                f"klx.{name}.{member}"
                for member, value in vars(obj).items()
                if not member.startswith("_")
                and (inspect.isfunction(value) or isinstance(value, property | classmethod))
            ]
    return names


def main() -> int:
    sys.path.insert(0, str(SRC))
    import klx

    config = parse_config(ROOT)
    checks, exclude, overrides = config["checks"], config["exclude"], config["overrides"]
    # The package docstring, as numpydoc's file linter sees it (its validator for an
    # imported module needs a def or class in the module's file).
    found = [
        f"{where}: {name}: {code} {message}"
        for where, name, code, message in process_file(str(SRC / "klx" / "__init__.py"), config)
    ]
    names = public_names(klx)
    for name in names:
        if exclude is not None and exclude.search(name):
            continue
        report = validate(name)
        obj = functools.reduce(getattr, name.split(".")[1:], klx)
        doc = inspect.getdoc(obj) or ""
        for code, message in report["errors"]:
            if code not in checks or (code in overrides and overrides[code].search(doc)):
                continue
            found.append(f"{report['file']}:{report['file_line']}: {name}: {code} {message}")
    for line in found:
        print(line)
    print(f"numpydoc: {len(names) + 1} docstrings of klx's public API, {len(found)} flagged")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
