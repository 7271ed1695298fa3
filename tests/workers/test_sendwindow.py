"""The per-connection send limit: 120 per 60 s, heartbeats included, with a heartbeat reserve."""

from __future__ import annotations

import pytest

from workers.sendwindow import DEFAULT_HEARTBEAT_RESERVE, SEND_LIMIT, SendWindow, heartbeat_reserve


@pytest.mark.parametrize(
    ("interval_s", "reserve"),
    [(None, 3), (41.25, 3), (60.0, 2), (30.0, 3), (5.0, 13), (45.0, 3), (0.001, SEND_LIMIT - 1)],
)
def test_heartbeat_reserve(interval_s: float | None, reserve: int) -> None:
    assert heartbeat_reserve(interval_s) == reserve


def test_commands_get_120_minus_reserve_and_wait_for_the_oldest_to_expire() -> None:
    window = SendWindow(41.25)
    for i in range(117):
        assert window.delay_for_command(i * 0.5) == 0.0
        window.record(i * 0.5, heartbeat=False)
    assert window.delay_for_command(58.5) == 60.0 - 58.5
    assert window.delay_for_command(60.0) == 0.0  # the first send (at 0.0) has expired exactly now


def test_heartbeats_are_never_delayed_and_eat_the_reserve_first() -> None:
    window = SendWindow(41.25)
    for _ in range(117):
        window.record(0.0, heartbeat=False)
    for t in (1.0, 2.0, 3.0):  # fits in the reserve of 3
        window.record(t, heartbeat=True)
    assert len(window) == SEND_LIMIT
    # Commands are full; the wait is for the commands at 0.0 to expire.
    assert window.delay_for_command(5.0) == 55.0


def test_extra_heartbeats_beyond_the_reserve_push_commands_back() -> None:
    window = SendWindow(41.25)
    for _ in range(110):
        window.record(0.0, heartbeat=False)
    for t in range(10):  # the server asked for 10 heartbeats, 7 more than the reserve
        window.record(1.0 + t, heartbeat=True)
    # 110 commands + 10 heartbeats = 120: nothing fits until the commands at 0.0 expire.
    assert window.delay_for_command(20.0) == 40.0
    window2 = SendWindow(41.25)
    for t in range(10):
        window2.record(float(t), heartbeat=True)
    for _ in range(109):
        window2.record(10.0, heartbeat=False)
    # 109 + 10 = 119 < 120, but only because heartbeats (10) exceed the reserve; one more command fits.
    assert window2.delay_for_command(10.0) == 0.0
    window2.record(10.0, heartbeat=False)
    # Now full; the oldest heartbeat (at 0.0) expiring makes room.
    assert window2.delay_for_command(10.0) == 50.0


def test_reset_forgets_sends_and_interval() -> None:
    window = SendWindow(5.0)
    assert window.command_limit == SEND_LIMIT - 13
    for _ in range(50):
        window.record(0.0, heartbeat=False)
    window.reset()
    assert len(window) == 0
    assert window.reserve == DEFAULT_HEARTBEAT_RESERVE
    window.set_heartbeat_interval(41.25)
    assert window.command_limit == 117


def test_entries_expire_after_exactly_60_s() -> None:
    window = SendWindow()
    window.record(0.0, heartbeat=True)
    assert len(window) == 1
    window.record(59.999, heartbeat=False)
    assert len(window) == 2
    window.record(60.0, heartbeat=False)
    assert len(window) == 2
