"""The restart policy under MockClock: exact respawn times from a twin Random, the crash-loop cap, resets."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from supervisor.restart import RestartDecision, RestartPolicy


async def crash_and_respawn(policy: RestartPolicy, worker_index: int) -> RestartDecision:
    """The supervisor's loop, minus processes: the worker dies now; wait the delay if it is respawned."""
    decision = policy.on_exit(worker_index, trio.current_time(), clean=False)
    if decision.restart:
        await trio.sleep(decision.delay_s)
    return decision


async def test_a_worker_that_keeps_crashing_backs_off_then_the_loop_is_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy, twin = RestartPolicy(rng=random.Random(7)), random.Random(7)
    expected_time = 0.0
    for crash, cap in enumerate([0.5, 1.0, 2.0, 4.0, 8.0], start=1):
        decision = await crash_and_respawn(policy, 0)
        delay = twin.uniform(0.0, cap)
        assert decision == RestartDecision(False, delay, worker_crashes=crash, crashes_in_window=crash)
        expected_time += delay
        assert trio.current_time() == expected_time
    # The sixth crash inside 60 s (all six took under 15.5 s) is a crash loop.
    decision = await crash_and_respawn(policy, 0)
    assert decision == RestartDecision(True, 0.0, worker_crashes=6, crashes_in_window=6)
    assert trio.current_time() == expected_time


async def test_the_delay_cap_is_max_s(autojump_clock: trio.testing.MockClock) -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=30.0, crash_limit=1_000, rng=random.Random(3))
    twin = random.Random(3)
    expected_time = 0.0
    for cap in [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]:
        decision = await crash_and_respawn(policy, 2)
        expected_time += twin.uniform(0.0, cap)
        assert (decision.restart, trio.current_time()) == (True, expected_time)
    assert policy.statistics(trio.current_time()).worker_crashes == {2: 9}


async def test_crashes_leave_the_window_after_exactly_window_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RestartPolicy(crash_limit=2, window_s=60.0, rng=random.Random(1))
    assert policy.on_exit(0, trio.current_time(), clean=False).crashes_in_window == 1  # t = 0
    await trio.sleep(30.0)
    assert policy.on_exit(1, trio.current_time(), clean=False).crashes_in_window == 2  # t = 30
    await trio.sleep(30.0)
    assert trio.current_time() == 60.0
    # The crash at t = 0 is exactly 60 s old and has left the window: two crashes, not a loop.
    decision = policy.on_exit(2, trio.current_time(), clean=False)
    assert (decision.give_up, decision.crashes_in_window) == (False, 2)
    await trio.sleep(29.5)
    # t = 89.5: the crashes at 30 and 60 are inside (29.5, 89.5], so this third one is a loop.
    decision = policy.on_exit(0, trio.current_time(), clean=False)
    assert (decision.give_up, decision.crashes_in_window) == (True, 3)


async def test_a_loop_moving_between_workers_is_still_a_loop(autojump_clock: trio.testing.MockClock) -> None:
    policy, twin = RestartPolicy(rng=random.Random(11)), random.Random(11)
    for worker_index in range(5):
        decision = await crash_and_respawn(policy, worker_index)
        # Each worker crashed once, so each backoff is the first one.
        assert decision == RestartDecision(False, twin.uniform(0.0, 0.5), 1, worker_index + 1)
    assert (await crash_and_respawn(policy, 5)).give_up
    assert trio.current_time() < 2.5


async def test_healthy_resets_the_backoff_but_not_the_window(autojump_clock: trio.testing.MockClock) -> None:
    policy, twin = RestartPolicy(rng=random.Random(5)), random.Random(5)
    for cap in [0.5, 1.0, 2.0]:
        assert (await crash_and_respawn(policy, 0)).delay_s == twin.uniform(0.0, cap)
    await trio.sleep(30.0)
    policy.on_healthy(0, trio.current_time())
    decision = await crash_and_respawn(policy, 0)
    assert decision == RestartDecision(False, twin.uniform(0.0, 0.5), worker_crashes=1, crashes_in_window=4)
    stats = policy.statistics(trio.current_time())
    assert (stats.crashes_in_window, stats.crash_limit, dict(stats.worker_crashes)) == (4, 5, {0: 1})
    await trio.sleep(60.0)
    assert policy.statistics(trio.current_time()).crashes_in_window == 0


async def test_clean_exits_are_respawned_but_never_counted(autojump_clock: trio.testing.MockClock) -> None:
    policy, twin = RestartPolicy(crash_limit=1, rng=random.Random(9)), random.Random(9)
    assert (await crash_and_respawn(policy, 0)).delay_s == twin.uniform(0.0, 0.5)
    for _ in range(10):
        decision = policy.on_exit(0, trio.current_time(), clean=True)
        # Backed off at the worker's current crash count (1), which the clean exit does not raise.
        assert decision == RestartDecision(
            False, twin.uniform(0.0, 1.0), worker_crashes=1, crashes_in_window=1
        )
        await trio.sleep(decision.delay_s)
    assert (await crash_and_respawn(policy, 0)).give_up


def test_crash_limit_zero_gives_up_on_the_first_crash() -> None:
    policy = RestartPolicy(crash_limit=0, rng=random.Random(0))
    assert policy.on_exit(0, 0.0, clean=True).restart
    assert policy.on_exit(0, 0.0, clean=False).give_up


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_s": 0.0}, "initial_s must be positive"),
        ({"initial_s": 2.0, "max_s": 1.0}, "max_s must be at least initial_s"),
        ({"crash_limit": -1}, "crash_limit must not be negative"),
        ({"window_s": 0.0}, "window_s must be positive"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RestartPolicy(**kwargs)
