"""The per-token global limiter (R5, R9): GCRA at 50/s with a jitter margin and a tolerance."""

from __future__ import annotations

import bisect

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.global_limit import DEFAULT_JITTER_MARGIN_S, SLACK, GlobalLimiter

#: `rate * T - tolerance = 1 s + J`: 1.025 s over 50 - 1 + 1 - SLACK = 49.1 slots (95.8 % of 50/s).
INTERVAL_S = 1.025 / 49.1
#: After a grant at t, the next may come at t + INTERVAL_S - EARLY_S (the tolerance of SLACK intervals).
EARLY_S = SLACK * INTERVAL_S


def max_in_any_window(times: list[float], window_s: float = 1.0) -> int:
    """The most grants in any closed window [t, t + window_s]."""
    ordered = sorted(times)
    return max((bisect.bisect_right(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0)


def max_in_any_open_window(times: list[float], window_s: float) -> int:
    """The most grants in any half-open window [t, t + window_s): Discord's (and the simulator's) rule.
    1 ns less than `window_s` absorbs the float rounding of TAT sums at the exact bound."""
    ordered = sorted(times)
    span = window_s - 1e-9
    return max((bisect.bisect_right(ordered, t + span) - i for i, t in enumerate(ordered)), default=0)


def test_the_defaults_keep_a_margin_of_44_ms() -> None:
    limiter = GlobalLimiter()
    assert DEFAULT_JITTER_MARGIN_S == 0.025 and SLACK == 0.9
    assert limiter.emission_interval_s == pytest.approx(0.020876, abs=1e-6)
    assert 1 / limiter.emission_interval_s / 50 == pytest.approx(0.958, abs=1e-3)
    assert 50 * limiter.emission_interval_s - 1.0 == pytest.approx(0.0438, abs=1e-4)  # M = J + tolerance
    # The bound the interval is chosen for: `rate` intervals less the tolerance span exactly 1 s + J.
    assert 50 * limiter.emission_interval_s - limiter.tolerance_s == pytest.approx(1.025, abs=1e-12)
    bursty = GlobalLimiter(50, burst=5)
    assert 50 * bursty.emission_interval_s - bursty.tolerance_s == pytest.approx(1.025, abs=1e-12)


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
    """Requests asked at random times, each granted or dropped: at most `rate` grants in any half-open
    1 s + J, so at most `rate` in any 1 s of arrivals when latency varies by up to the jitter margin J."""
    limiter = GlobalLimiter(rate, burst=burst)
    now, granted = 0.0, []
    for gap in gaps:
        now += gap
        if limiter.try_acquire(now) == 0.0:
            granted.append(now)
    assert max_in_any_open_window(granted, 1.0 + DEFAULT_JITTER_MARGIN_S) <= rate


def test_the_worst_case_lands_exactly_on_the_bound() -> None:
    """Idle, then asked at every instant it allows: grant 0 at its TAT, every later one at TAT - tolerance.
    Grant 50 is then exactly 1 s + J after grant 0; delays that differ by J put their arrivals exactly 1 s
    apart, which Discord's half-open window `(t - 1 s, t]` keeps apart."""
    limiter = GlobalLimiter()
    now, granted = 0.0, []
    while len(granted) < 51:
        wait = limiter.try_acquire(now)
        if wait == 0.0:
            granted.append(now)
        else:
            now += wait
    assert granted[50] - granted[0] == pytest.approx(1.0 + DEFAULT_JITTER_MARGIN_S, abs=1e-9)
    # Every request delayed by J more than the last one: still never 51 in any 1 s.
    arrivals = [at + DEFAULT_JITTER_MARGIN_S for at in granted[:50]]
    assert max_in_any_open_window([*arrivals, granted[50]], 1.0) <= 50


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
    # Grant 0 at 0, grant k at k intervals (1.025 / 49.1) less the tolerance: 480 in 10 s, 96 %.
    assert in_10_s == 480
    assert max_in_any_window(dispatched) <= 50
    assert max_in_any_open_window(dispatched, 1.0 + DEFAULT_JITTER_MARGIN_S) <= 50
    assert dispatched[1] == 0.01  # its arrival: past the early slot
