"""Shared test settings. Tests run under pytest-trio (`trio_mode = true`)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# `tests` helpers (the independent gateway client) are imported as a package from the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import broker_cleanup  # noqa: E402 -- needs the repository root on sys.path
from tests.security import leakscan  # noqa: E402

# CI explores the same Hypothesis examples on every run, so a green build stays green for the same code;
# local runs keep exploring new ones (and save what fails to .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


# The session-wide secret scan (tests/security/leakscan.py): captured output and logs of every test, and the
# files under the base temporary directory, must hold none of the tokens and passwords the tests use.
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    leakscan.record_report(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    leakscan.finish_session(session)
    # Housekeeping, never a verdict: a broker that cannot be reached here has failed its tests already.
    with contextlib.suppress(Exception):
        broker_cleanup.drop_test_queues()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    leakscan.summarize(terminalreporter)
