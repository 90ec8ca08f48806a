"""What every benchmark CLI shares: an argument parser whose ``--help`` shows each default,
and matplotlib for the plots."""

from __future__ import annotations

import argparse
import sys
from typing import Any


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and '(default: ...)' after every option that has a
    default worth saying: not after a help text that already says its default, nor after
    a switch (default False) or an option whose default is None (its help says what
    happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unsaid = action.default is None or action.default is False
        if "default" in text or unsaid or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=_Formatter)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt
