"""``python -m klx.check``."""

from __future__ import annotations

import sys

from klx.check.cli import main

if __name__ == "__main__":
    sys.exit(main())
