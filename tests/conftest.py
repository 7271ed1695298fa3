"""Shared test settings. Tests run under pytest-trio (`trio_mode = true`)."""

from __future__ import annotations

import sys
from pathlib import Path

# `tests` helpers (the independent gateway client) are imported as a package from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
