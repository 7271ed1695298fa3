"""Pure bucket math and route catalogue of the REST simulator: no I/O, exact times."""

from __future__ import annotations

import re
from typing import Final

import pytest
import trio
import trio.testing

from benchmarks.simulator.buckets import EMPTY_STATE, BucketShape, BucketState, SlidingLog, peek, take
from benchmarks.simulator.config import BOT_USER_ID
from benchmarks.simulator.routes import (
    OLD_MESSAGE_DELETE_GROUP,
    ROUTES,
    RouteCatalogue,
    bucket_hash,
    is_old_message,
)

SLIDING_5_PER_5: Final = BucketShape(5, 5.0, sliding=True)
FIXED_5_PER_5: Final = BucketShape(5, 5.0, sliding=False)


def _run(shape: BucketShape, times: list[float]) -> list[tuple[bool, int, float, float]]:
    state: BucketState = EMPTY_STATE
    out = []
    for now in times:
        decision = take(shape, state, now)
        if decision.allowed:
            state = decision.state
        out.append(
            (decision.allowed, decision.view.remaining, decision.view.reset_after_s, decision.retry_after_s)
        )
    return out


def test_sliding_burst_then_one_slot_per_interval() -> None:
    results = _run(SLIDING_5_PER_5, [0.0] * 6 + [0.5, 1.0, 1.0])
    assert [r[1] for r in results[:5]] == [4, 3, 2, 1, 0]
    assert [r[2] for r in results[:5]] == [1.0, 2.0, 3.0, 4.0, 5.0]  # Reset-After: until fully refilled
    assert results[5] == (False, 0, 5.0, 1.0)  # Retry-After: until one slot frees
    assert results[6] == (False, 0, 4.5, pytest.approx(0.5))
    assert results[7] == (True, 0, 5.0, 0.0)  # one slot freed at t=1
    assert results[8][0] is False


def test_sliding_refills_gradually() -> None:
    state = EMPTY_STATE
    for _ in range(5):
        state = take(SLIDING_5_PER_5, state, 0.0).state
    assert peek(SLIDING_5_PER_5, state, 2.5).remaining == 2
    assert peek(SLIDING_5_PER_5, state, 2.5).reset_after_s == 2.5
    assert peek(SLIDING_5_PER_5, state, 5.0) == peek(SLIDING_5_PER_5, EMPTY_STATE, 5.0)
    assert peek(SLIDING_5_PER_5, state, 9.0).remaining == 5


def test_fixed_window_starts_at_first_request_and_does_not_refill() -> None:
    results = _run(FIXED_5_PER_5, [10.0, 10.5, 11.0, 11.0, 12.0, 13.0, 14.9, 15.0, 15.1])
    assert [r[1] for r in results[:5]] == [4, 3, 2, 1, 0]
    assert [r[2] for r in results[:5]] == [5.0, 4.5, 4.0, 4.0, 3.0]
    assert results[5] == (False, 0, 2.0, 2.0)
    assert results[6][0] is False
    assert results[6][3] == pytest.approx(0.1)
    assert results[7] == (True, 4, 5.0, 0.0)  # a new window opens at t=15
    assert results[8] == (True, 3, pytest.approx(4.9), 0.0)


def test_fixed_peek_after_window_is_full() -> None:
    state = take(FIXED_5_PER_5, EMPTY_STATE, 0.0).state
    assert peek(FIXED_5_PER_5, state, 1.0).remaining == 4
    assert peek(FIXED_5_PER_5, state, 5.0).remaining == 5


def test_sliding_log_is_exact_over_any_window() -> None:
    log = SlidingLog(3, 1.0)
    assert [log.try_add(t) for t in (0.0, 0.1, 0.2, 0.3)] == [True, True, True, False]
    assert log.retry_after(0.3) == pytest.approx(0.7)
    assert log.try_add(1.0) is True  # the event at 0.0 left the window
    assert log.count(1.0) == 3
    assert log.add(1.0) == 4


async def test_bucket_math_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    state = EMPTY_STATE
    allowed_at: list[float] = []
    while len(allowed_at) < 8:
        decision = take(SLIDING_5_PER_5, state, trio.current_time())
        if decision.allowed:
            state = decision.state
            allowed_at.append(trio.current_time())
        else:
            await trio.sleep(decision.retry_after_s)
    assert allowed_at == pytest.approx([0.0] * 5 + [1.0, 2.0, 3.0])


def test_catalogue_has_real_routes_and_hashes() -> None:
    catalogue = RouteCatalogue(seed=7)
    assert len(ROUTES) >= 30
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in catalogue.hashes.values())
    assert catalogue.hashes == RouteCatalogue(seed=7).hashes
    assert catalogue.hashes["reactions"] != RouteCatalogue(seed=8).hashes["reactions"]
    assert catalogue.hashes["message-create"] == catalogue.hashes["message-delete"]
    sliding = [g.shape.sliding for g in catalogue.groups.values()]
    assert 0.6 <= sum(sliding) / len(sliding) <= 0.8
    assert any(route.group is None for route in ROUTES)


def test_catalogue_matches_templates_and_majors() -> None:
    catalogue = RouteCatalogue(seed=0)
    put = catalogue.match("PUT", "/channels/11/messages/22/reactions/%F0%9F%91%8D/@me")
    delete = catalogue.match("DELETE", "/channels/11/messages/23/reactions/x/44")
    assert put is not None
    assert delete is not None
    assert put.route.group == delete.route.group == "reactions"
    assert put.major == "11"
    bulk = catalogue.match("POST", "/channels/11/messages/bulk-delete")
    assert bulk is not None
    assert bulk.route.group == "bulk-delete"
    webhook = catalogue.match("PATCH", f"/webhooks/{BOT_USER_ID}/tok/messages/@original")
    assert webhook is not None
    assert webhook.major == f"{BOT_USER_ID}/tok"
    assert catalogue.match("GET", "/channels/abc") is None
    assert catalogue.match("GET", "/nothing/here") is None


def test_old_message_delete_uses_its_own_counter() -> None:
    catalogue = RouteCatalogue(seed=0)
    old = catalogue.match("DELETE", "/channels/1/messages/175928847299117063")  # 2016
    assert old is not None
    now_ms = 1_800_000_000_000.0
    assert is_old_message("175928847299117063", now_ms)
    group = catalogue.group_for(old, now_ms)
    assert group is not None
    assert group.name == OLD_MESSAGE_DELETE_GROUP
    recent_id = str(int(now_ms - 1_420_070_400_000 - 1000) << 22)
    recent = catalogue.match("DELETE", f"/channels/1/messages/{recent_id}")
    assert recent is not None
    recent_group = catalogue.group_for(recent, now_ms)
    assert recent_group is not None
    assert recent_group.name == "message-delete"


def test_time_scale_and_random_shapes() -> None:
    scaled = RouteCatalogue(seed=0, time_scale=0.1)
    assert scaled.groups["message-create"].shape.window_s == pytest.approx(0.5)
    randomized = RouteCatalogue(seed=3, random_shapes=True)
    assert randomized.groups["message-create"].shape == randomized.groups["message-delete"].shape
    assert bucket_hash(3, "x") == bucket_hash(3, "x")
