"""Fixtures shared by the simulator's tests."""

from __future__ import annotations

import pytest

from benchmarks.simulator import sessions as sim_sessions


@pytest.fixture
def no_identify_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """IDENTIFYs of one identify key back to back (two of one shard, or shard 0 of 2 and shard 0 of 4),
    without waiting out Discord's 5 s per key."""
    monkeypatch.setattr(sim_sessions, "IDENTIFY_INTERVAL_S", 0.0)
