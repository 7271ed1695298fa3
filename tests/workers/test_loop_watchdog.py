"""The worker's event-loop watchdog (F15) under MockClock: a stall is reported with its exact length."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from workers.telemetry import LOOP_CHECK_S, watch_event_loop


async def test_a_stall_is_reported_with_its_length_and_short_delays_are_not(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    stalls: list[float] = []
    caplog.set_level(logging.WARNING, logger="workers.telemetry")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_event_loop, stalls.append)
        await trio.sleep(0.1)
        autojump_clock.jump(0.5)  # nothing ran for 0.5 s: under the 1 s threshold
        await trio.sleep(1.1)  # to 1.7; the watchdog woke at 0.6, then every LOOP_CHECK_S: next due 1.85
        autojump_clock.jump(5.0)  # a 5 s blocking callback (F15), ending at 6.7
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert LOOP_CHECK_S == 0.25
    assert stalls == [pytest.approx(6.7 - 1.85)]
    assert [r.getMessage() for r in caplog.records] == ["worker.loop_stalled"]
