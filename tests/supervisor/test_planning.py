"""Shard planning (DESIGN.md 3.1) and the session-start budget (anchors/gateway.md C3)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.planning import BudgetDecision, ShardRange, check_session_budget, plan_workers

shard_lists = st.lists(st.integers(min_value=0, max_value=10_000), unique=True, max_size=300)
worker_counts = st.none() | st.integers(min_value=1, max_value=64)
cpu_counts = st.integers(min_value=1, max_value=256)


@given(shard_ids=shard_lists, workers=worker_counts, cpu_count=cpu_counts)
def test_every_shard_is_planned_once_in_order(
    shard_ids: list[int], workers: int | None, cpu_count: int
) -> None:
    ranges = plan_workers(shard_ids, workers, cpu_count)
    flattened = [shard_id for shard_range in ranges for shard_id in shard_range.shard_ids]
    assert flattened == shard_ids  # each shard exactly once, order preserved, each range a contiguous slice


@given(shard_ids=shard_lists, workers=worker_counts, cpu_count=cpu_counts)
def test_worker_count_and_balance(shard_ids: list[int], workers: int | None, cpu_count: int) -> None:
    ranges = plan_workers(shard_ids, workers, cpu_count)
    assert len(ranges) == min(cpu_count if workers is None else workers, len(shard_ids))
    assert [shard_range.worker_index for shard_range in ranges] == list(range(len(ranges)))
    sizes = [len(shard_range) for shard_range in ranges]
    if sizes:
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the larger ranges come first


@given(
    shard_count=st.integers(min_value=1, max_value=2048),
    workers=worker_counts,
    cpu_count=cpu_counts,
)
def test_a_full_shard_set_gives_ranges_of_consecutive_ids(
    shard_count: int, workers: int | None, cpu_count: int
) -> None:
    ranges = plan_workers(range(shard_count), workers, cpu_count)
    assert ranges[0].first == 0 and ranges[-1].last == shard_count - 1
    for shard_range in ranges:
        assert shard_range.shard_ids == tuple(range(shard_range.first, shard_range.last + 1))
        assert str(shard_range) == f"{shard_range.first}-{shard_range.last}"
    for before, after in itertools.pairwise(ranges):
        assert after.first == before.last + 1


def test_examples() -> None:
    assert plan_workers(range(16), None, 8) == [ShardRange(i, (2 * i, 2 * i + 1)) for i in range(8)]
    assert [str(r) for r in plan_workers(range(10), 4, 2)] == ["0-2", "3-5", "6-7", "8-9"]
    assert [str(r) for r in plan_workers(range(3), None, 16)] == ["0-0", "1-1", "2-2"]  # never more workers
    assert plan_workers([], None, 4) == []
    # A multi-host subset keeps its gaps in the range's name.
    assert [str(r) for r in plan_workers([0, 1, 2, 3, 8, 9, 10, 11], 1, 4)] == ["0-3,8-11"]


@pytest.mark.parametrize(
    ("shard_ids", "workers", "cpu_count", "message"),
    [
        ([0, 1], 0, 4, "workers must be at least 1"),
        ([0, 1], None, 0, "cpu_count must be at least 1"),
        ([0, 1, 1], None, 4, "must not repeat"),
        ([-1, 0], None, 4, "must not be negative"),
    ],
)
def test_bad_plans_are_refused(
    shard_ids: list[int], workers: int | None, cpu_count: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_workers(shard_ids, workers, cpu_count)


def test_a_range_needs_shards() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        ShardRange(0, ())


# -- session budget ----------------------------------------------------------------------------------------


def test_budget_allows_a_start_that_leaves_exactly_the_reserve() -> None:
    decision = check_session_budget(
        shards_to_start=16, remaining=26, total=1000, reset_after_ms=5000, reserve=10
    )
    assert decision == BudgetDecision(
        ok=True,
        wait_s=0.0,
        message="session budget: starting 16 shards leaves 10 of 1000 identifies (reserve 10)",
    )


def test_budget_refuses_one_identify_short_of_the_reserve() -> None:
    decision = check_session_budget(
        shards_to_start=16, remaining=25, total=1000, reset_after_ms=14_400_000, reserve=10
    )
    assert not decision.ok
    assert decision.wait_s == 14_400.0
    assert decision.message == (
        "session budget: 16 shards to identify plus a reserve of 10 need 26 identifies, but only 25 of 1000 "
        "remain; the budget resets in 14400 s"
    )


def test_budget_with_no_reserve_may_spend_everything() -> None:
    assert check_session_budget(4, remaining=4, total=1000, reset_after_ms=1, reserve=0).ok
    assert not check_session_budget(5, remaining=4, total=1000, reset_after_ms=1, reserve=0).ok


def test_resumes_only_cost_nothing() -> None:
    assert check_session_budget(0, remaining=0, total=1000, reset_after_ms=1000, reserve=0).ok
    # Already inside the reserve: a start whose shards all RESUME spends nothing of it and goes ahead.
    decision = check_session_budget(0, remaining=3, total=1000, reset_after_ms=1500, reserve=5)
    assert (decision.ok, decision.wait_s) == (True, 0.0)
    decision = check_session_budget(1, remaining=3, total=1000, reset_after_ms=1500, reserve=5)
    assert (decision.ok, decision.wait_s) == (False, 1.5)


def test_a_start_larger_than_the_daily_total_can_never_wait_its_way_through() -> None:
    decision = check_session_budget(995, remaining=1000, total=1000, reset_after_ms=0, reserve=10)
    assert not decision.ok
    assert decision.wait_s == math.inf
    assert "more than the daily total of 1000" in decision.message


@given(
    shards=st.integers(0, 3000),
    remaining=st.integers(0, 3000),
    total=st.integers(0, 3000),
    reset_after_ms=st.integers(0, 86_400_000),
    reserve=st.integers(0, 100),
)
def test_budget_decision_rule(
    shards: int, remaining: int, total: int, reset_after_ms: int, reserve: int
) -> None:
    decision = check_session_budget(shards, remaining, total, reset_after_ms, reserve)
    assert decision.ok == (remaining - shards >= reserve or shards == 0)
    if decision.ok:
        assert decision.wait_s == 0.0
    elif shards + reserve > total:
        assert decision.wait_s == math.inf
    else:
        assert decision.wait_s == reset_after_ms / 1000


def test_negative_budget_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="remaining must not be negative"):
        check_session_budget(1, remaining=-1, total=1000, reset_after_ms=0, reserve=0)
