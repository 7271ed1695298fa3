"""The pacing of `workers.dependencies` under MockClock: retry delays, how often the waiting warning is
logged, and the one line when the dependency is up."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from workers.dependencies import WARN_EVERY_S, DependencyWait, open_when_up


def test_delays_double_up_to_the_cap_and_the_warning_repeats_every_30_s() -> None:
    wait = DependencyWait(initial_s=0.5, max_s=5.0)
    now = 100.0
    warned_at = []
    delays = []
    for _ in range(40):
        step = wait.failed(now)
        delays.append(step.delay_s)
        if step.warn:
            warned_at.append(now)
        now += step.delay_s
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    # At once, then every 30 s (on the 5 s retry grid).
    assert warned_at == [100.0, 132.5, 162.5, 192.5, 222.5, 252.5, 282.5]
    assert all(b - a >= WARN_EVERY_S for a, b in itertools.pairwise(warned_at))
    assert wait.waited_s(now) == now - 100.0


def test_a_dependency_up_at_once_has_waited_nothing() -> None:
    assert DependencyWait().waited_s(5.0) is None


async def test_open_when_up_retries_until_the_opener_works(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[float] = []

    @contextlib.asynccontextmanager
    async def not_before_70_s() -> AsyncIterator[str]:
        attempts.append(trio.current_time())
        if trio.current_time() < 70.0:
            raise ConnectionRefusedError("refused")
        yield "connection"

    caplog.set_level(logging.INFO, logger="workers.dependencies")
    url = "amqp://user:s3cret@broker:5672/"
    async with open_when_up("amqp", url, not_before_70_s, (ConnectionRefusedError,)) as value:
        assert value == "connection"
    assert attempts[:5] == [0.0, 0.5, 1.5, 3.5, 7.5]
    assert attempts[-1] == 72.5  # 7.5 + 13 * 5.0
    events = [(r.getMessage(), r.levelno, getattr(r, "url", None)) for r in caplog.records]
    redacted = "amqp://user:[redacted]@broker:5672/"
    assert events == [
        ("dependency.waiting", logging.WARNING, redacted),  # t=0
        ("dependency.waiting", logging.WARNING, redacted),  # t=32.5
        ("dependency.waiting", logging.WARNING, redacted),  # t=62.5
        ("dependency.up", logging.INFO, redacted),
    ]
    assert caplog.records[-1].waited_s == 72.5
