"""Bucket math of one ratelimit key (R2-R4, R6, R8, R9): pure calls with exact virtual times."""

from __future__ import annotations

import math

import pytest

from ratelimit.buckets import (
    BucketBlock,
    BucketState,
    GlobalFreeze,
    Grant,
    RateLimited,
    RateLimitHeaders,
    RateLimitScope,
    SublimitBlock,
)


def headers(limit: int, remaining: int, reset_after: float, bucket: str = "abcd") -> RateLimitHeaders:
    return RateLimitHeaders(limit=limit, remaining=remaining, reset_after=reset_after, bucket=bucket)


def grant(state: BucketState, now: float) -> Grant:
    result = state.try_acquire(now)
    assert isinstance(result, Grant), result
    return result


def learned(limit: int = 5, reset_after: float = 1.0) -> BucketState:
    """A bucket whose probe (at 0.0) came back at 0.0 with a full window of `limit`."""
    state = BucketState()
    probe = grant(state, 0.0)
    state.on_response(headers(limit, limit, reset_after), 0.0, probe)
    return state


def test_unknown_bucket_allows_exactly_one_probe() -> None:
    state = BucketState()
    probe = grant(state, 0.0)
    assert probe.probe
    assert state.try_acquire(0.0) == math.inf
    assert state.try_acquire(0.5) == math.inf
    state.on_response(headers(5, 4, 1.0), 0.5, probe)
    stats = state.statistics()
    assert (stats.limit, stats.remaining, stats.reset_at, stats.in_flight) == (5, 4, 1.5, 0)
    assert stats.bucket_hash == "abcd"
    assert isinstance(state.try_acquire(0.5), Grant)


def test_cancelled_probe_lets_the_next_caller_probe() -> None:
    state = BucketState()
    probe = grant(state, 0.0)
    state.on_cancel(probe, 0.25)
    assert grant(state, 0.25).probe


def test_limit_5_grants_5_then_waits_exactly_until_the_reset() -> None:
    state = learned(limit=5, reset_after=1.0)
    grants = [grant(state, 0.0) for _ in range(5)]
    assert all(g.counted for g in grants)
    assert state.statistics().in_flight == 5
    assert state.try_acquire(0.0) == 1.0
    assert state.try_acquire(0.25) == 0.75


def test_capacity_is_consumed_at_grant_not_at_response() -> None:
    state = learned()
    grant(state, 0.0)
    grant(state, 0.0)
    assert state.statistics().remaining == 3


def test_out_of_order_responses_never_raise_remaining_and_the_later_reset_wins() -> None:
    state = learned(limit=5, reset_after=1.0)  # deadline 1.0
    first, second = grant(state, 0.0), grant(state, 0.0)
    state.on_response(headers(5, 2, 1.0), 0.25, second)  # Discord saw another client's request too
    assert (state.statistics().remaining, state.statistics().reset_at) == (2, 1.25)
    state.on_response(headers(5, 4, 0.5), 0.5, first)  # older, higher Remaining, earlier reset
    assert (state.statistics().remaining, state.statistics().reset_at) == (2, 1.25)


def test_rollover_refills_to_limit_minus_in_flight() -> None:
    state = learned(limit=5, reset_after=1.0)
    late = [grant(state, 0.0) for _ in range(5)]
    for g in late[:3]:
        state.on_response(headers(5, 0, 1.0), 0.0, g)
    assert state.try_acquire(0.5) == 0.5
    # At 1.0 two grants are still in flight: they may land in Discord's new window.
    granted = [grant(state, 1.0) for _ in range(3)]
    assert state.try_acquire(1.0) == math.inf  # deadline of the new window unknown until a response
    stats = state.statistics()
    assert (stats.remaining, stats.in_flight, stats.window, stats.reset_at) == (0, 5, 1, None)
    state.on_response(headers(5, 1, 0.75), 1.25, granted[0])
    assert state.statistics().reset_at == 2.0
    assert state.try_acquire(1.25) == 0.75


def test_stale_response_from_the_ended_window_is_ignored() -> None:
    state = learned(limit=5, reset_after=1.0)
    old = grant(state, 0.5)
    new = grant(state, 1.0)  # rolls over: 5 - 1 in flight = 4, then this grant: 3
    assert state.statistics().remaining == 3
    state.on_response(headers(5, 3, 1.0), 1.25, new)
    assert state.statistics().reset_at == 2.25
    state.on_response(headers(5, 0, 0.5), 1.5, old)  # deadline 2.0 < 2.25: the old window's news
    assert state.statistics().remaining == 3
    assert state.statistics().in_flight == 0


def test_limit_shrinking_clamps_remaining_and_growing_waits_for_the_refill() -> None:
    state = learned(limit=5, reset_after=1.0)
    g = grant(state, 0.0)
    state.on_response(headers(2, 2, 1.0), 0.0, g)
    assert (state.statistics().limit, state.statistics().remaining) == (2, 2)
    g = grant(state, 0.0)
    state.on_response(headers(10, 9, 1.0), 0.0, g)
    assert (state.statistics().limit, state.statistics().remaining) == (10, 1)
    grant(state, 0.0)
    assert state.try_acquire(0.0) == 1.0
    grant(state, 1.0)
    assert state.statistics().remaining == 8  # 10 - 1 in flight at the rollover, minus this grant


def test_hash_change_is_recorded() -> None:
    state = learned()
    g = grant(state, 0.0)
    state.on_response(headers(5, 4, 1.0, bucket="ef01"), 0.0, g)
    assert state.bucket_hash == "ef01"


def test_cancellation_returns_capacity() -> None:
    state = learned(limit=2, reset_after=1.0)
    a, b = grant(state, 0.0), grant(state, 0.0)
    assert state.try_acquire(0.0) == 1.0
    state.on_cancel(b, 0.25)
    assert state.statistics().remaining == 1
    assert isinstance(state.try_acquire(0.25), Grant)
    state.on_cancel(a, 0.25)
    assert state.statistics().remaining == 1


def test_cancel_after_rollover_gives_back_what_the_refill_held_back() -> None:
    state = learned(limit=2, reset_after=1.0)
    a = grant(state, 0.0)
    grant(state, 1.0)  # refill 2 - 1 = 1, granted: 0
    assert state.statistics().remaining == 0
    state.on_cancel(a, 1.0)
    assert state.statistics().remaining == 1


def test_route_without_bucket_headers_becomes_global_only() -> None:
    state = BucketState()
    probe = grant(state, 0.0)
    state.on_response(None, 0.25, probe)
    grants = [grant(state, 0.25) for _ in range(100)]
    assert not any(g.counted or g.probe for g in grants)
    assert state.statistics().global_only
    state.on_response(headers(5, 4, 1.0), 0.5, grants[0])
    assert not state.statistics().global_only
    assert state.statistics().remaining == 0  # 5 - 99 still in flight, clamped


def test_user_429_zeroes_the_bucket_until_retry_after() -> None:
    state = learned(limit=5, reset_after=1.0)
    g = grant(state, 0.0)
    action = state.on_rate_limited(RateLimitScope.USER, 2.5, 0, 0.25, g)
    assert action == BucketBlock(2.75, RateLimitScope.USER, counts_as_invalid=True)
    assert state.statistics().remaining == 0
    assert state.try_acquire(0.25) == 2.5
    assert isinstance(state.try_acquire(2.75), Grant)
    assert state.statistics().remaining == 4


def test_shared_429_blocks_the_bucket_and_is_not_invalid() -> None:
    state = learned(limit=10, reset_after=1.0)
    g = grant(state, 0.0)
    action = state.on_rate_limited(RateLimitScope.SHARED, 1337.0, 9, 0.5, g)
    assert action == BucketBlock(1337.5, RateLimitScope.SHARED, counts_as_invalid=False)
    assert state.try_acquire(0.5) == 1337.0
    assert state.try_acquire(1000.0) == 337.5
    assert isinstance(state.try_acquire(1337.5), Grant)


def test_sublimit_429_blocks_only_the_request_class() -> None:
    state = learned(limit=10, reset_after=15.0)
    g = grant(state, 0.0)
    action = state.on_rate_limited(None, 600.0, 8, 0.5, g)
    assert action == SublimitBlock(600.5)
    assert isinstance(state.try_acquire(0.5), Grant)
    assert state.statistics().in_flight == 1


def test_global_429_leaves_the_bucket_alone() -> None:
    state = learned()
    g = grant(state, 0.0)
    assert state.on_rate_limited(RateLimitScope.GLOBAL, 0.5, None, 0.25, g) == GlobalFreeze(0.75)
    assert state.statistics().remaining == 4
    assert state.statistics().in_flight == 0


def test_user_429_on_an_unknown_bucket_blocks_and_releases_the_probe() -> None:
    state = BucketState()
    probe = grant(state, 0.0)
    state.on_rate_limited(RateLimitScope.USER, 1.0, 0, 0.25, probe)
    assert state.try_acquire(0.5) == 0.75
    assert grant(state, 1.25).probe


def test_giving_back_twice_is_an_error() -> None:
    state = learned()
    g = grant(state, 0.0)
    state.on_cancel(g, 0.0)
    with pytest.raises(ValueError, match="twice"):
        state.on_cancel(g, 0.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset-After": "1"},
            RateLimitHeaders(5, 4, 1.0),
        ),
        (
            {
                "x-ratelimit-limit": "10",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-reset": "1470173023.123",
                "x-ratelimit-reset-after": "64.57",
                "x-ratelimit-bucket": "abcd1234",
                "x-ratelimit-scope": "user",
            },
            RateLimitHeaders(10, 0, 64.57, "abcd1234", RateLimitScope.USER),
        ),
        (
            {"X-RateLimit-Limit": "5.0", "X-RateLimit-Remaining": "9", "X-RateLimit-Reset-After": "0.12345"},
            RateLimitHeaders(5, 5, 0.12345),
        ),
        ({"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4"}, None),
        ({"X-RateLimit-Limit": "x", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset-After": "1"}, None),
        ({"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset-After": "nan"}, None),
        ({"Content-Type": "application/json"}, None),
    ],
)
def test_parse_bucket_headers(raw: dict[str, str], expected: RateLimitHeaders | None) -> None:
    assert RateLimitHeaders.parse(raw) == expected


def test_parse_429_prefers_the_body_retry_after() -> None:
    raw = {"Retry-After": "65", "X-RateLimit-Scope": "shared", "X-RateLimit-Remaining": "9"}
    parsed = RateLimited.parse(raw, {"message": "You are being rate limited.", "retry_after": 64.57})
    assert parsed == RateLimited(64.57, RateLimitScope.SHARED, 9, is_global=False)
    assert RateLimited.parse(raw) == RateLimited(65.0, RateLimitScope.SHARED, 9, is_global=False)


def test_parse_global_429_without_scope_header() -> None:
    parsed = RateLimited.parse({"X-RateLimit-Global": "true", "Retry-After": "1"}, {"retry_after": 0.5})
    assert parsed == RateLimited(0.5, RateLimitScope.GLOBAL, None, is_global=True)
    parsed = RateLimited.parse({}, {"retry_after": 1, "global": True})
    assert parsed == RateLimited(1.0, RateLimitScope.GLOBAL, None, is_global=True)


def test_parse_429_without_any_retry_after_is_not_discord() -> None:
    assert RateLimited.parse({"Content-Type": "text/html"}) is None
    assert RateLimited.parse({}, {"retry_after": "soon"}) is None
