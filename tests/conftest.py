"""Shared test settings. Tests run under pytest-trio (`trio_mode = true`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

# `tests` helpers (the independent gateway client) are imported as a package from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# CI explores the same Hypothesis examples on every run, so a green build stays green for the same code;
# local runs keep exploring new ones (and save what fails to .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
