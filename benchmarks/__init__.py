"""klx's benchmarks. Run from anywhere inside the checkout, either way:

    python -m benchmarks.run            (with the checkout's root as the working directory)
    python path/to/benchmarks/run.py    (from any directory)

Importing this package puts the checkout's ``src`` first on ``sys.path``, so the klx
measured is the checkout's own, not an installed copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where results go by default: benchmarks/out in the checkout, whatever the cwd.
OUT = ROOT / "benchmarks" / "out"

if (ROOT / "src" / "klx").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
