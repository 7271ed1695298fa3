"""The per-token global limiter (R5, R9): GCRA at 50/s with a jitter margin."""

from __future__ import annotations

import bisect

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.global_limit import SLACK, GlobalLimiter

INTERVAL_S = 1.025 / 49
#: After a grant at t, the next may come at t + INTERVAL_S - EARLY_S (the tolerance of SLACK intervals).
EARLY_S = SLACK * INTERVAL_S


def max_in_any_window(times: list[float], window_s: float = 1.0) -> int:
    """The most grants in any closed window [t, t + window_s]."""
    ordered = sorted(times)
    return max((bisect.bisect_right(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0)


def test_grants_are_spaced_by_the_emission_interval() -> None:
    limiter = GlobalLimiter()
    assert limiter.emission_interval_s == INTERVAL_S
    assert limiter.try_acquire(0.0) == 0.0
    assert limiter.try_acquire(0.0) == pytest.approx(INTERVAL_S - EARLY_S, abs=1e-12)
    assert limiter.try_acquire(INTERVAL_S - EARLY_S) == 0.0
    # Taken early, the slot after it is still one interval after the theoretical one: early never adds up.
    assert limiter.try_acquire(INTERVAL_S - EARLY_S) == pytest.approx(INTERVAL_S, abs=1e-12)
    assert limiter.statistics().granted == 2


def test_refund_gives_the_slot_back_but_never_banks_it() -> None:
    limiter = GlobalLimiter()
    assert limiter.try_acquire(0.0) == 0.0
    limiter.refund(0.0)
    assert limiter.try_acquire(0.0) == 0.0
    limiter.refund(5.0)  # long after: no credit for a later burst
    assert limiter.try_acquire(5.0) == 0.0
    assert limiter.try_acquire(5.0) == pytest.approx(INTERVAL_S - EARLY_S, abs=1e-12)
    assert limiter.statistics().refunded == 2


def test_freeze_after_a_global_429() -> None:
    limiter = GlobalLimiter()
    assert limiter.try_acquire(0.0) == 0.0
    limiter.freeze(2.5)
    assert limiter.try_acquire(0.5) == 2.0
    assert limiter.try_acquire(2.5) == 0.0
    assert limiter.try_acquire(2.5) == pytest.approx(INTERVAL_S - EARLY_S, abs=1e-12)  # no burst after it


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="burst"):
        GlobalLimiter(50, burst=50)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.05, allow_nan=False), min_size=1, max_size=400),
    rate=st.sampled_from([50, 500]),
    burst=st.integers(min_value=1, max_value=5),
)
def test_never_more_than_rate_in_any_window(gaps: list[float], rate: int, burst: int) -> None:
    """Requests asked at random times, each granted or dropped: at most `rate` grants in any 1 s, and also
    in any 1 s of arrivals when latency varies by up to the jitter margin."""
    limiter = GlobalLimiter(rate, burst=burst)
    now, granted = 0.0, []
    for gap in gaps:
        now += gap
        if limiter.try_acquire(now) == 0.0:
            granted.append(now)
    assert max_in_any_window(granted, 1.0 + 0.025) <= rate


async def test_offered_twice_the_rate_it_sustains_over_95_percent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """100 req/s offered for 10 s to a dispatcher that waits what the limiter says."""
    limiter = GlobalLimiter()
    arrivals = [i / 100 for i in range(1000)]
    dispatched: list[float] = []
    for arrival in arrivals:
        await trio.sleep_until(max(arrival, trio.current_time()))
        while (wait := limiter.try_acquire(trio.current_time())) > 0.0:
            await trio.sleep(wait)
        dispatched.append(trio.current_time())
        if trio.current_time() >= 10.0:
            break
    in_10_s = sum(t < 10.0 for t in dispatched)
    # 10 s at one interval (1.025 / 49) apart, plus the head start of the tolerance: 47.9 req/s, 95.8 %.
    assert in_10_s == 479
    assert max_in_any_window(dispatched) <= 49
    assert dispatched[1] == 0.01  # its arrival: past the early slot
