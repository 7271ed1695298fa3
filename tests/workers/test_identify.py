"""IdentifyGate under a MockClock: exact grant times, FIFO per key, key order, cancellation and budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.identify import IDENTIFY_INTERVAL_S, IdentifyGate, IdentifyGateStatistics, InMemoryIdentifyGate


class Grants(list[tuple[float, int]]):
    """(virtual time, shard id) of each permit, in the order the waiters returned."""


async def wait_and_record(gate: InMemoryIdentifyGate, shard_id: int, grants: Grants) -> None:
    await gate.wait_for_permit(shard_id)
    grants.append((trio.current_time(), shard_id))


async def arrive(
    nursery: trio.Nursery, gate: InMemoryIdentifyGate, shard_ids: list[int], grants: Grants
) -> None:
    """Start one waiter per shard in this order, each queued before the next starts (virtual time stands)."""
    for shard_id in shard_ids:
        nursery.start_soon(wait_and_record, gate, shard_id, grants)
        await trio.testing.wait_all_tasks_blocked()


async def test_interval_is_five_seconds() -> None:
    assert IDENTIFY_INTERVAL_S == 5.0
    gate: IdentifyGate = InMemoryIdentifyGate(1)  # mypy checks that it keeps the protocol
    await gate.wait_for_permit(0)


async def test_max_concurrency_1_releases_one_shard_every_5_s(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(1), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1, 2, 3], grants)
    assert grants == [(0.0, 0), (5.0, 1), (10.0, 2), (15.0, 3)]


async def test_max_concurrency_2_releases_two_shards_every_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, grants = InMemoryIdentifyGate(2), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1, 2, 3], grants)
    assert sorted(grants) == [(0.0, 0), (0.0, 1), (5.0, 2), (5.0, 3)]


async def test_max_concurrency_16_starts_buckets_in_order(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(16), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, list(range(48)), grants)
    assert sorted(grants) == [(5.0 * (shard // 16), shard) for shard in range(48)]


async def test_interval_counts_from_the_grant(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(1, interval_s=5.0), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0], grants)
        await trio.sleep(3.0)
        await arrive(nursery, gate, [1], grants)  # key busy until 5
        await trio.sleep_until(13.0)
        await arrive(nursery, gate, [2], grants)  # key free since 10: granted on arrival
        await arrive(nursery, gate, [3], grants)
    assert grants == [(0.0, 0), (5.0, 1), (13.0, 2), (18.0, 3)]


async def test_fifo_within_a_key(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(2), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [4, 0, 6, 2, 1, 3], grants)
    key_0 = [grant for grant in grants if grant[1] % 2 == 0]
    key_1 = [grant for grant in grants if grant[1] % 2 == 1]
    assert key_0 == [(0.0, 4), (5.0, 0), (10.0, 6), (15.0, 2)]
    assert key_1 == [(0.0, 1), (5.0, 3)]


async def test_cancelled_head_consumes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(1), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0], grants)
        with trio.move_on_after(2.0) as scope:
            await gate.wait_for_permit(1)
        assert scope.cancelled_caught and trio.current_time() == 2.0
        await arrive(nursery, gate, [2], grants)
    # Shard 1 was never granted: shard 2 gets the permit at 5, not at 10.
    assert grants == [(0.0, 0), (5.0, 2)]
    assert gate.statistics().granted == 2


async def test_cancelled_waiter_behind_the_head_consumes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, grants = InMemoryIdentifyGate(1), Grants()

    async def cancelled_at(shard_id: int, at: float) -> None:
        with trio.move_on_at(at):
            await gate.wait_for_permit(shard_id)
            grants.append((trio.current_time(), shard_id))

    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1], grants)
        nursery.start_soon(cancelled_at, 2, 7.0)  # behind 1 (granted at 5); would be granted at 10
        await trio.testing.wait_all_tasks_blocked()
        await arrive(nursery, gate, [3], grants)
    assert grants == [(0.0, 0), (5.0, 1), (10.0, 3)]


async def test_cancelled_before_waiting_is_never_queued(autojump_clock: trio.testing.MockClock) -> None:
    gate = InMemoryIdentifyGate(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await gate.wait_for_permit(0)
    assert scope.cancelled_caught
    assert gate.statistics() == IdentifyGateStatistics(1, 0, 0, None, None)
    await gate.wait_for_permit(0)  # the key is still free
    assert trio.current_time() == 0.0


async def test_grant_to_a_waiter_cancelled_in_the_same_instant_is_rolled_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, grants = InMemoryIdentifyGate(1), Grants()
    await gate.set_budget(0, reset_after_s=1000.0)  # nothing may start until someone raises the budget
    async with trio.open_nursery() as nursery:
        victim = trio.CancelScope()

        async def victim_waits() -> None:
            with victim:
                await gate.wait_for_permit(0)
                grants.append((trio.current_time(), 0))

        nursery.start_soon(victim_waits)
        await trio.testing.wait_all_tasks_blocked()
        await arrive(nursery, gate, [1], grants)
        await trio.sleep_until(10.0)
        # Cancel the victim, then (before it runs) raise the budget: the gate grants the victim, which is
        # still queued, and the victim only then sees its Cancelled.
        victim.cancel()
        await gate.set_budget(5, reset_after_s=1000.0)
        assert (gate.statistics().granted, gate.statistics().waiting) == (1, 1)  # the victim holds it
    assert victim.cancelled_caught
    assert grants == [(10.0, 1)]
    assert gate.statistics().budget_remaining == 4
    assert gate.statistics().granted == 1


async def test_budget_stops_grants_until_the_reset_and_keeps_key_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, grants = InMemoryIdentifyGate(4), Grants()
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1, 2, 3], grants)
        # Queued in reverse key order; all four keys free up together at 5 s with budget for two: keys 0 and 1
        # win (shards 4 and 5), whichever waiter happens to wake first.
        await arrive(nursery, gate, [7, 6, 5, 4], grants)
        await gate.set_budget(2, reset_after_s=60.0)
        await trio.sleep(6.0)
        assert sorted(grants)[4:] == [(5.0, 4), (5.0, 5)]
        assert gate.statistics().budget_remaining == 0
        assert gate.statistics().waiting == 2
    assert sorted(grants)[4:] == [(5.0, 4), (5.0, 5), (60.0, 6), (60.0, 7)]
    assert gate.statistics().budget_remaining is None  # unknown after the reset, until set again


async def test_budget_reserve_is_kept(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(1, budget_reserve=2), Grants()
    await gate.set_budget(4, reset_after_s=30.0)
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1, 2, 3], grants)
    assert grants == [(0.0, 0), (5.0, 1), (30.0, 2), (35.0, 3)]


async def test_raising_the_budget_wakes_waiters(autojump_clock: trio.testing.MockClock) -> None:
    gate, grants = InMemoryIdentifyGate(2), Grants()
    await gate.set_budget(0, reset_after_s=1000.0)
    async with trio.open_nursery() as nursery:
        await arrive(nursery, gate, [0, 1, 2], grants)
        await trio.sleep(7.5)
        await gate.set_budget(2, reset_after_s=1000.0)
    assert sorted(grants) == [(7.5, 0), (7.5, 1), (1007.5, 2)]  # budget spent; reset 1000 s after 7.5


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        InMemoryIdentifyGate(0)
    with pytest.raises(ValueError, match="interval_s"):
        InMemoryIdentifyGate(1, interval_s=0.0)
    with pytest.raises(ValueError, match="budget_reserve"):
        InMemoryIdentifyGate(1, budget_reserve=-1)
    with pytest.raises(ValueError, match="shard_id"):
        await InMemoryIdentifyGate(1).wait_for_permit(-1)
    with pytest.raises(ValueError, match="remaining"):
        await InMemoryIdentifyGate(1).set_budget(-1, 10.0)


# -- property: exact grant times against a model -------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float
    shard_id: int
    cancel_after: float | None


# Gaps are multiples of 1/64 and cancellations add 1/1024, so every time is exact in binary floating point and
# a cancellation can never coincide with a grant (which is always an arrival time plus multiples of 5 s).
GAPS = st.sampled_from([1 / 64, 1 / 8, 1.0, 2.5, 5.0, 7.25])
CANCELS = st.none() | st.sampled_from([1 / 1024, 2 + 1 / 1024, 4.75 + 1 / 1024, 5 + 1 / 1024, 12 + 1 / 1024])


def model(arrivals: list[Arrival], max_concurrency: int, interval_s: float) -> Grants:
    """Per key, FIFO: a waiter is granted at max(arrival, last grant + interval) unless cancelled first."""
    last_grant = [-math.inf] * max_concurrency
    expected = Grants()
    for arrival in arrivals:
        key = arrival.shard_id % max_concurrency
        at = max(arrival.at, last_grant[key] + interval_s)
        if arrival.cancel_after is not None and arrival.at + arrival.cancel_after < at:
            continue
        last_grant[key] = at
        expected.append((at, arrival.shard_id))
    return expected


@settings(max_examples=200, deadline=None)
@given(
    max_concurrency=st.integers(min_value=1, max_value=4),
    plan=st.lists(st.tuples(GAPS, st.integers(min_value=0, max_value=15), CANCELS), min_size=1, max_size=30),
)
def test_grants_match_the_model(max_concurrency: int, plan: list[tuple[float, int, float | None]]) -> None:
    arrivals, at = [], 0.0
    for gap, shard_id, cancel_after in plan:
        at += gap
        arrivals.append(Arrival(at, shard_id, cancel_after))
    grants = Grants()

    async def main() -> None:
        gate = InMemoryIdentifyGate(max_concurrency)

        async def waiter(arrival: Arrival) -> None:
            deadline = math.inf if arrival.cancel_after is None else arrival.at + arrival.cancel_after
            with trio.move_on_at(deadline):
                await gate.wait_for_permit(arrival.shard_id)
                grants.append((trio.current_time(), arrival.shard_id))

        async with trio.open_nursery() as nursery:
            for arrival in arrivals:
                await trio.sleep_until(arrival.at)
                nursery.start_soon(waiter, arrival)
                await trio.testing.wait_all_tasks_blocked()
        assert gate.statistics().waiting == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    expected = model(arrivals, max_concurrency, IDENTIFY_INTERVAL_S)
    assert sorted(grants) == sorted(expected)
    # The rule itself, independently of the model: no key twice within the interval.
    last: dict[int, float] = {}
    for at, shard_id in sorted(grants):
        key = shard_id % max_concurrency
        assert at - last.get(key, -math.inf) >= IDENTIFY_INTERVAL_S
        last[key] = at
