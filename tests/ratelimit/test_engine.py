"""The engine's trio shell under MockClock: FIFO order, maximum wait, cancellation, fallback, exact times."""

from __future__ import annotations

import math

import pytest
import trio
import trio.lowlevel
import trio.testing

from ratelimit.backend import BackendUnavailable, LocalBackend
from ratelimit.buckets import RateLimitHeaders
from ratelimit.engine import Ratelimiter, RateLimitTimeout, RequestRefused
from ratelimit.global_limit import SLACK
from ratelimit.model import Ask, EngineConfig, Outcome, Permit, Refusal, Wait

ASK = Ask(token="tok", route="POST /channels/{channel_id}/messages", major="1")


def ok(limit: int, remaining: int, reset_after: float) -> Outcome:
    return Outcome("response", status=200, headers=RateLimitHeaders(limit, remaining, reset_after, "h"))


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def limiter(**config: object) -> Ratelimiter:
    config.setdefault("global_rate", 1_000_000_000)
    config.setdefault("jitter_margin_s", 0.0)
    return Ratelimiter(LocalBackend(EngineConfig(**config)))  # type: ignore[arg-type]


async def test_waiters_are_served_in_arrival_order_at_the_exact_resets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = limiter()
    probe = await engine.acquire(ASK)
    await engine.release(probe, ok(2, 2, 1.0))
    served: list[tuple[int, float]] = []

    async def request(index: int) -> None:
        permit = await engine.acquire(ASK)
        served.append((index, round(trio.current_time(), 4)))
        await engine.release(permit, ok(2, 1, 1.0))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(6):
            nursery.start_soon(request, index)
            await trio.lowlevel.checkpoint()  # arrival order = index
    assert [index for index, _ in served] == list(range(6))
    # 2 per window of 1 s from the probe's answer: 2 now, 2 at +1 s, 2 at +2 s.
    assert [when - start for _, when in served] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]


async def test_a_wait_beyond_the_maximum_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    engine = limiter()
    await engine.release(await engine.acquire(ASK), ok(1, 0, 30.0))
    start = trio.current_time()
    with pytest.raises(RateLimitTimeout) as caught:
        await engine.acquire(ASK, max_wait_s=5.0)
    assert trio.current_time() == pytest.approx(start, abs=1e-6)  # no sleeping first
    assert caught.value.reason == "bucket" and math.isclose(caught.value.wait_s, 30.0)
    assert engine.statistics().timeouts == 1


async def test_a_probe_in_flight_elsewhere_is_polled_until_the_maximum_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = limiter()
    await engine.acquire(ASK)  # the probe, never answered
    start = trio.current_time()
    with pytest.raises(RateLimitTimeout):
        await engine.acquire(ASK, max_wait_s=0.5)
    assert trio.current_time() - start == pytest.approx(0.5, abs=1e-6)


async def test_a_local_answer_wakes_the_probe_waiters_at_once(autojump_clock: trio.testing.MockClock) -> None:
    engine = limiter()
    probe = await engine.acquire(ASK)
    woke: list[float] = []

    async def waiter() -> None:
        permit = await engine.acquire(ASK)
        woke.append(trio.current_time())
        await engine.release(permit, ok(5, 3, 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.003)  # less than one poll interval
        await engine.release(probe, ok(5, 4, 1.0))
    assert woke == [pytest.approx(0.003, abs=1e-6)]


async def test_cancelled_waiter_takes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    engine = limiter()
    await engine.release(await engine.acquire(ASK), ok(1, 0, 2.0))
    with trio.move_on_after(1.0):
        await engine.acquire(ASK)
    permit = await engine.acquire(ASK)  # the cancelled waiter did not consume the next window's slot
    assert trio.current_time() == pytest.approx(2.0, abs=1e-6)
    assert isinstance(permit, Permit)


async def test_refusal_raises_request_refused(autojump_clock: trio.testing.MockClock) -> None:
    engine = limiter()
    permit = await engine.acquire(ASK)
    await engine.release(permit, Outcome("response", status=401, code=0))
    with pytest.raises(RequestRefused) as caught:
        await engine.acquire(ASK)
    assert caught.value.reason == "token_revoked"


class SwitchableBackend(LocalBackend):
    """A local backend that can be made unreachable, to drive the fallback path."""

    name = "switchable"
    down = False

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        if self.down:
            raise BackendUnavailable("switched off")
        return await super().acquire(ask)

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        if self.down:
            raise BackendUnavailable("switched off")
        await super().release(permit, outcome)


def in_fallback(engine: Ratelimiter) -> bool:
    return engine.in_fallback


async def test_unreachable_backend_falls_back_to_one_in_flight_and_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = SwitchableBackend(EngineConfig(global_rate=100, jitter_margin_s=0.0))
    engine = Ratelimiter(backend, fallback_share=4, recheck_s=1.0)
    backend.down = True
    first = await engine.acquire(ASK)
    assert in_fallback(engine) and engine.statistics().fallback_grants == 1
    # Conservative: one in flight per bucket, and a quarter of the global rate.
    assert engine.fallback.config.max_in_flight == 1 and engine.fallback.config.global_rate == 25
    with pytest.raises(RateLimitTimeout):
        await engine.acquire(ASK, max_wait_s=0.2)
    await engine.release(first, ok(5, 4, 1.0))  # goes back to the fallback that granted it
    backend.down = False
    await trio.sleep(1.0)
    await engine.acquire(ASK)  # from the shared backend again
    assert not in_fallback(engine)
    assert engine.statistics().fallback_grants == 1 and engine.statistics().backend_errors == 1


class CountingBackend(LocalBackend):
    calls = 0

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        self.calls += 1
        return await super().acquire(ask)


async def test_one_task_per_process_waits_for_the_global_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """40 requests on 40 channels at a global limit of 10/s: they leave paced, and the backend is asked about
    once per grant instead of once per waiting channel per slot."""
    backend = CountingBackend(EngineConfig(global_rate=10, jitter_margin_s=0.0))
    engine = Ratelimiter(backend)
    sent: list[float] = []

    async def request(channel: int) -> None:
        ask = Ask(token="tok", route="GET /channels/{channel_id}", major=str(channel))
        permit = await engine.acquire(ask)
        sent.append(trio.current_time())
        await engine.release(permit, Outcome("response", 200))

    async with trio.open_nursery() as nursery:
        for channel in range(40):
            nursery.start_soon(request, channel)
    assert len(sent) == 40
    # One interval (1 / (10 - SLACK) s at rate 10 without burst) apart, the second early by the slack.
    assert sent[-1] == pytest.approx((39 - SLACK) / (10 - SLACK), abs=1e-6)
    # Per grant: the fast path's ask, the stale slot's ask, the ask after sleeping (not 40 per slot).
    assert backend.calls <= 3 * 40
