"""Reconnect backoff: full jitter, 60 s cap, 1 s floor between attempts (anchors/gateway.md 6.3 F14)."""

from __future__ import annotations

import random

from workers.backoff import BACKOFF_CAP_S, MIN_ATTEMPT_SPACING_S, ReconnectBackoff


def test_full_jitter_doubles_then_caps_at_60_s() -> None:
    backoff, twin = ReconnectBackoff(random.Random(7)), random.Random(7)
    # Far from the last attempt, so the floor never applies: the delays are exactly the jittered draws.
    caps = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for cap in caps:
        assert backoff.failure_delay(now=1000.0) == twin.uniform(0.0, cap)
    assert backoff.failures == len(caps)


def test_delays_stay_within_the_cap_for_many_failures() -> None:
    backoff = ReconnectBackoff(random.Random(3))
    delays = [backoff.failure_delay(now=1e6) for _ in range(200)]
    assert all(0.0 <= d <= BACKOFF_CAP_S for d in delays)


def test_attempts_are_never_closer_than_one_second() -> None:
    backoff, twin = ReconnectBackoff(random.Random(1)), random.Random(1)
    backoff.attempt_started(10.0)
    assert twin.uniform(0.0, 1.0) < 0.75  # the draw is small: the floor lifts it to 1 s after the attempt
    assert backoff.failure_delay(now=10.25) == MIN_ATTEMPT_SPACING_S - 0.25
    assert backoff.floored(10.25, 0.0) == 0.75
    assert backoff.floored(11.0, 0.0) == 0.0
    assert backoff.floored(10.25, 3.0) == 3.0


def test_latest_attempt_wins_and_reset_restarts_the_sequence() -> None:
    backoff, twin = ReconnectBackoff(random.Random(5)), random.Random(5)
    backoff.attempt_started(20.0)
    backoff.attempt_started(15.0)  # an older attempt does not move the floor back
    assert backoff.floored(20.5, 0.0) == 0.5
    for _ in range(4):
        backoff.failure_delay(now=100.0)
        twin.uniform(0.0, 1.0)
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.failure_delay(now=100.0) == twin.uniform(0.0, 1.0)
