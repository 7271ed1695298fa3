"""Live resharding in cluster mode (supervisor/cluster_reshard.py).

- `leader_step`, the leader's decisions, without I/O;
- `ReshardStore`'s scripts against the real Redis: one leader at a time, a reshard begun once per epoch, the
  switch, the cut-over and the abandon each only from the state they expect;
- two real nodes (`benchmarks.reshard`'s harness with `nodes=2`: events to RabbitMQ, every MESSAGE_CREATE
  audited against the simulator's guild ledger): 4 -> 8 by SIGUSR1 to the node that does not lead (the
  request goes through Redis), both nodes taking a share of the new generation, 0 lost and 0 duplicated;
  then 8 -> 4 with the leader SIGKILLed (its workers with it) once its shadow shards are READY: the other
  node takes over the lead and the dead node's groups by RESUME, 0 lost, each new shard identified once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from benchmarks.cluster_nodes import delete_prefix_keys
from benchmarks.harness import Progress
from benchmarks.reshard import ReshardSystem, log_records, measure_reshard, open_reshard_system
from ratelimit.redis_client import RedisClient, open_redis_client
from supervisor.cluster_plan import ClusterPlan
from supervisor.cluster_reshard import RETIRE_WAIT_S, ReshardStore, Underway, leader_step
from tests.supervisor.test_reshard import SETTINGS as ONE_HOST

REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PLAN_8 = ClusterPlan(8, 1)


def underway(phase: str = "starting", *, started_ms: int = 0, switched_ms: int = 0) -> Underway:
    return Underway(
        epoch=1,
        plan=PLAN_8,
        phase="switching" if phase == "switching" else "starting",
        started_ms=started_ms,
        switched_ms=switched_ms,
        trigger="signal",
    )


def starting(now_ms: int, ready: range | list[int]) -> str:
    return leader_step(
        underway(), now_ms, ready=ready, old_groups=4, retired=(), holders={}, ready_timeout_s=10.0
    )


def switching(now_ms: int, retired: set[int], holders: dict[int, str]) -> str:
    return leader_step(
        underway("switching", switched_ms=1_000),
        now_ms,
        ready=(),
        old_groups=4,
        retired=retired,
        holders=holders,
        ready_timeout_s=10.0,
    )


def test_the_leader_switches_once_every_new_group_is_ready_and_abandons_after_the_timeout() -> None:
    assert starting(5_000, range(7)) == "wait"
    assert starting(5_000, range(8)) == "switch"
    assert starting(5_000, [*range(7), 9]) == "wait"  # a mark of a group the plan does not have
    assert starting(10_000, range(7)) == "wait"
    assert starting(10_001, range(7)) == "abandon"


def test_the_leader_cuts_over_once_every_held_running_group_retired_or_after_the_retire_wait() -> None:
    holders = {0: "a", 1: "a", 2: "b", 3: "b"}
    assert switching(2_000, {0, 1, 2}, holders) == "wait"
    assert switching(2_000, {0, 1, 2, 3}, holders) == "cut_over"
    # Group 3's node died (its lease expired): nobody is left to retire it.
    assert switching(2_000, {0, 1, 2}, {0: "a", 1: "a", 2: "b"}) == "cut_over"
    late = 1_000 + int(RETIRE_WAIT_S * 1000)
    assert switching(late, set(), holders) == "wait"
    assert switching(late + 1, set(), holders) == "cut_over"


@pytest.fixture
async def client() -> AsyncIterator[RedisClient]:
    async with open_redis_client(REDIS_URL) as redis:
        yield redis


async def test_reshard_store_one_leader_one_reshard_per_epoch_and_each_step_from_its_state(
    client: RedisClient,
) -> None:
    prefix = f"test-reshard-{uuid.uuid4().hex[:8]}"
    a, b = ReshardStore(client, prefix, "a"), ReshardStore(client, prefix, "b")
    try:
        assert await a.current() == (0, 0)
        first = await a.poll(5_000, may_lead=True)
        assert (first.leader, first.epoch, first.generation, first.underway) == (True, 0, 0, None)
        assert not (await b.poll(5_000, may_lead=True)).leader
        assert (await a.poll(5_000, may_lead=True)).leader  # renewed, still a's

        await b.request("signal", 0, {3})
        assert await a.take_request() == "signal"
        assert await a.take_request() is None
        assert (await a.poll(5_000, may_lead=True)).uncovered == (3,)

        epoch = await a.begin(0, PLAN_8, "signal")
        assert epoch >= 1
        assert await a.begin(0, PLAN_8, "signal") == 0  # one at a time
        view = await b.poll(5_000, may_lead=False)
        assert view.underway is not None and view.underway.phase == "starting"
        assert (view.underway.epoch, view.underway.plan, view.underway.trigger) == (epoch, PLAN_8, "signal")

        await a.mark_ready(epoch, [0, 1])
        await b.mark_ready(epoch, [1, 2])
        assert await a.ready_groups(epoch) == {0, 1, 2}
        assert await a.cut_over(5, epoch) == 0  # from an epoch that does not run: nothing

        await a.mark_retired(0, [0, 1], bytes(range(16)))
        await b.mark_retired(0, [2], b"")
        groups, digests = await a.retired(0)
        assert groups == {0, 1, 2}
        assert sorted(digests) == [b"", bytes(range(16))]
        await a.forget_epoch(0)
        assert await a.retired(0) == (frozenset(), [])
    finally:
        await delete_prefix_keys(REDIS_URL, prefix)


async def test_reshard_store_switch_cut_over_and_abandon(client: RedisClient) -> None:
    prefix = f"test-reshard-{uuid.uuid4().hex[:8]}"
    store = ReshardStore(client, prefix, "a")
    try:
        epoch = await store.begin(0, PLAN_8, "interval")
        assert await store.switch(epoch + 1) is False
        assert await store.switch(epoch) is True
        view = await store.poll(5_000, may_lead=False)
        assert view.underway is not None and view.underway.phase == "switching"
        assert view.underway.switched_ms >= view.underway.started_ms
        assert await store.cut_over(0, epoch) == 1
        assert await store.current() == (epoch, 1)
        view = await store.poll(5_000, may_lead=False)
        assert (view.epoch, view.generation, view.underway) == (epoch, 1, None)
        # A reshard from an epoch that no longer runs is refused; an abandon removes only its own epoch.
        assert await store.begin(0, PLAN_8, "interval") == 0
        second = await store.begin(epoch, ClusterPlan(4, 1), "4011")
        assert second > epoch
        assert await store.abandon(epoch) is False
        assert await store.abandon(second) is True
        assert (await store.poll(5_000, may_lead=False)).underway is None
        assert await store.current() == (epoch, 1)
    finally:
        await delete_prefix_keys(REDIS_URL, prefix)


# -- two nodes ---------------------------------------------------------------------------------------------

#: test_reshard's system, each node of weight 1 (a worker per group either way).
SETTINGS = dataclasses.replace(ONE_HOST, workers=1)
TIMEOUT_S = 240


def leader_of(system: ReshardSystem) -> int:
    """The index in `system.nodes` of the node that last logged `reshard.leading`."""
    last: tuple[float, int] | None = None
    for index, (node, _) in enumerate(system.nodes):
        for record in log_records(node.log_path, ("reshard.leading",)):
            if last is None or float(record["ts"]) > last[0]:
                last = (float(record["ts"]), index)
    assert last is not None, "no node leads"
    return last[1]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


async def test_two_nodes_reshard_by_a_followers_request_and_survive_the_leaders_death(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_reshard_system(
            SETTINGS, tmp_path, Progress(), AMQP_URL, name="cr", nodes=2
        ) as system:
            # 1. 4 -> 8, SIGUSR1 to the node that does not lead.
            with trio.fail_after(30):
                while True:
                    try:
                        leader = leader_of(system)
                        break
                    except AssertionError:
                        await trio.sleep(0.1)
            follower = system.nodes[1 - leader][0]

            async def ask_the_follower(system: ReshardSystem) -> None:
                await system.control("recommended_shards", {"shards": system.settings.target})
                follower.process.send_signal(signal.SIGUSR1)

            run = await measure_reshard(system, ask_the_follower)
            assert (run.target, run.generation) == (8, 1)
            assert (run.lost, run.duplicates, run.unknown, run.overlaps) == (0, 0, 0, 0), run
            assert run.identifies == 8 and run.identifies_other == 0, run
            assert run.max_guild_gap_s <= 2.0
            assert run.log_events.get("reshard.done") == 1
            shares = [set(await _live_groups(system, url)) for _, url in system.nodes]
            assert shares[0] and shares[1] and not shares[0] & shares[1], shares
            assert shares[0] | shares[1] == set(range(8))

            # 2. 8 -> 4, the leader SIGKILLed (with its workers) once its shadow shards are READY.
            leader = leader_of(system)
            victim, _ = system.nodes[leader]
            system.settings = dataclasses.replace(SETTINGS, shards=8, target=4)

            async def kill_the_leader(system: ReshardSystem) -> None:
                await system.control("recommended_shards", {"shards": 4})
                victim.process.send_signal(signal.SIGUSR1)
                with trio.fail_after(60):
                    while not await _shadow_ready(system, leader):
                        await trio.sleep(0.05)
                await trio.sleep(0.5)  # the shadow sessions reach Redis
                workers = children_of(victim.pid)
                victim.process.kill()
                for pid in workers:
                    with _gone():
                        os.kill(pid, signal.SIGKILL)
                await victim.process.wait()
                if leader == 0:
                    system.supervisor, system.metrics_url = system.others[0]
                system.others = []

            run = await measure_reshard(system, kill_the_leader, extra_timeout_s=30)
            assert run.lost == 0, run.lost_sample
            assert run.unknown == 0 and run.overlaps == 0, run
            assert run.identifies == 4 and run.identifies_other == 0, run  # the dead node's shards RESUMEd
            assert run.generation == 2
            gap = run.max_guild_gap_s
            print(f"leader killed: {run.duplicates} duplicates, {run.resumes} resumes, max gap {gap} s")


async def _live_groups(system: ReshardSystem, url: str) -> list[int]:
    body = await system.health(url)
    groups: list[int] = body["detail"]["cluster"]["groups"]
    return groups


async def _shadow_ready(system: ReshardSystem, index: int) -> bool:
    """Whether node `index` runs shadow workers and all their shards are READY."""
    detail = await system.reshard_detail(system.nodes[index][1])
    if detail is None or not detail.get("next_workers"):
        return False
    return all(w["ready"] > 0 for w in detail["next_workers"])


class _gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        return kind is ProcessLookupError
