"""`supervisor.cluster.ClusterNode`'s timing and decisions under `MockClock`, exact virtual times.

The Redis scripts themselves are tested against the real Redis (test_cluster_store.py) and the whole cluster
over real processes (test_cluster.py). Here the node talks to `SharedLeases`, which keeps the scripts' rules
(server-clock expiry, fences, re-assertion only by the group's last holder) in memory on trio's clock, so the
node's own rules can be checked to the instant: it watches one TTL before taking, a lease's local deadline is
the renewing sync's send time plus the TTL, a Redis outage stops nothing, a lost lease stops its worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from ratelimit.resp import RedisConnectionError
from supervisor.cluster import LEASE_MARGIN_S, ClusterNode, SyncResult
from supervisor.cluster_plan import ClusterPlan, Node

TTL_S = 10.0
PERIOD_S = TTL_S / 5
PLAN = ClusterPlan(4, 1)


@dataclass
class SharedLeases:
    """The cluster's Redis state, on trio's clock; `down` makes every call fail like an unreachable Redis."""

    nodes: dict[str, tuple[int, float]] = field(default_factory=dict)  # node -> (workers, expires at)
    leases: dict[int, tuple[str, int, float]] = field(default_factory=dict)  # group -> (node, fence, expiry)
    last: dict[int, tuple[str, int]] = field(default_factory=dict)
    counter: int = 0
    down: bool = False
    calls: int = 0

    def check(self) -> float:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Redis is down (test)")
        now = trio.current_time()
        self.leases = {g: lease for g, lease in self.leases.items() if lease[2] > now}
        self.nodes = {n: info for n, info in self.nodes.items() if info[1] > now}
        return now


@dataclass
class MemoryStore:
    world: SharedLeases
    node_id: str

    async def sync(
        self, plan: ClusterPlan, workers: int, ttl_ms: int, held: Mapping[int, int], *, leaving: bool
    ) -> SyncResult:
        await trio.lowlevel.checkpoint()
        world = self.world
        now = world.check()
        ttl = ttl_ms / 1000
        if leaving:
            world.nodes.pop(self.node_id, None)
        else:
            world.nodes[self.node_id] = (workers, now + ttl)
        for group, fence in held.items():
            lease = world.leases.get(group)
            if lease is not None and lease[:2] == (self.node_id, fence):
                world.leases[group] = (self.node_id, fence, now + ttl)
            elif lease is None and world.last.get(group, (self.node_id, fence)) == (self.node_id, fence):
                world.leases[group] = (self.node_id, fence, now + ttl)
                world.last[group] = (self.node_id, fence)
        return SyncResult(
            plan.to_text(),
            tuple(Node(node, info[0]) for node, info in sorted(world.nodes.items())),
            {group: (lease[0], lease[1]) for group, lease in world.leases.items()},
        )

    async def acquire(self, groups: Sequence[int], ttl_ms: int) -> dict[int, int]:
        await trio.lowlevel.checkpoint()
        world = self.world
        now = world.check()
        won = {}
        for group in groups:
            if group not in world.leases:
                world.counter += 1
                world.leases[group] = (self.node_id, world.counter, now + ttl_ms / 1000)
                world.last[group] = (self.node_id, world.counter)
                won[group] = world.counter
        return won

    async def release(self, group: int, fence: int) -> bool:
        await trio.lowlevel.checkpoint()
        world = self.world
        world.check()
        lease = world.leases.get(group)
        if lease is not None and lease[:2] == (self.node_id, fence):
            del world.leases[group]
            return True
        return False


@dataclass
class Workers:
    """A `GroupRunner` that records when each group's worker started and stopped (stopping takes 1 s)."""

    log: list[tuple[float, str, int]] = field(default_factory=list)
    running: set[int] = field(default_factory=set)
    ready: bool = True

    async def start_group(self, group: int, shard_ids: tuple[int, ...]) -> None:
        assert shard_ids == PLAN.shards_of(group)
        self.log.append((trio.current_time(), "start", group))
        self.running.add(group)

    async def stop_group(self, group: int) -> None:
        self.log.append((trio.current_time(), "stop", group))
        await trio.sleep(1.0)
        self.running.discard(group)

    def group_ready(self, group: int) -> bool:
        return self.ready and group in self.running


def make_node(world: SharedLeases, name: str, workers: Workers, weight: int = 1) -> ClusterNode:
    return ClusterNode(MemoryStore(world, name), PLAN, workers=weight, ttl_s=TTL_S, runner=workers)


async def test_a_node_watches_one_ttl_then_takes_every_free_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, workers = SharedLeases(), Workers()
    node = make_node(world, "a", workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert trio.current_time() == 0.0 and not workers.log  # the first sync took nothing
        await node.settled.wait()
        assert trio.current_time() == TTL_S
        assert workers.log == [(TTL_S, "start", group) for group in range(4)]
        assert node.owned_shards() == (0, 1, 2, 3)
        nursery.cancel_scope.cancel()


async def test_a_lease_is_valid_until_the_last_renewals_send_time_plus_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, workers = SharedLeases(), Workers()
    node = make_node(world, "a", workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await trio.sleep_until(TTL_S + 0.5)  # taken at 10.0, renewed at 12.0
        assert node.lease_valid(0)
        await trio.sleep_until(13.0)
        world.down = True  # the syncs at 14.0, 16.0 ... fail: the last renewal was sent at 12.0
        await trio.sleep_until(12.0 + TTL_S - LEASE_MARGIN_S - 0.001)
        assert node.lease_valid(0)
        await trio.sleep_until(12.0 + TTL_S - LEASE_MARGIN_S)
        assert not node.lease_valid(0)
        # A Redis outage stops no worker: open connections stay.
        await trio.sleep_until(60.0)
        assert [entry for entry in workers.log if entry[1] == "stop"] == []
        assert node.owned_groups() == (0, 1, 2, 3)
        assert not node.statistics().connected
        nursery.cancel_scope.cancel()


async def test_a_connection_waits_for_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, workers = SharedLeases(), Workers()
    node = make_node(world, "a", workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.wait_lease(2)  # granted once the node has taken the group, after watching one TTL
        assert trio.current_time() == TTL_S
        world.down = True
        await trio.sleep(30.0)
        granted_at = math.nan

        async def connect() -> None:
            nonlocal granted_at
            await node.wait_lease(2)
            granted_at = trio.current_time()

        nursery.start_soon(connect)
        await trio.sleep(10.0)
        assert math.isnan(granted_at)  # no lease, no reconnect
        world.down = False  # Redis back (nothing expired in it here): the next sync renews at 50.0
        await trio.sleep(5.0)
        assert granted_at == 50.0
        nursery.cancel_scope.cancel()


async def test_a_lease_taken_by_another_node_stops_the_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, workers = SharedLeases(), Workers()
    node = make_node(world, "a", workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await node.settled.wait()
        await trio.sleep(1.0)  # 11.0
        world.leases[3] = ("b", 99, 100.0)  # another node took group 3 while this one was away
        await trio.sleep(1.5)  # the sync at 12.0 sees it
        assert (12.0, "stop", 3) in workers.log
        assert node.owned_groups() == (0, 1, 2)
        assert not node.lease_valid(3)
        nursery.cancel_scope.cancel()


async def test_a_joining_node_gets_its_share_one_group_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, a_workers, b_workers = SharedLeases(), Workers(), Workers()
    a = make_node(world, "a", a_workers)
    b = make_node(world, "b", b_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.settled.wait()
        await trio.sleep_until(20.5)
        await nursery.start(b.run)
        await b.settled.wait()
        assert trio.current_time() == 30.5
        with trio.fail_after(60):
            while len(b.owned_groups()) < 2 or len(a.owned_groups()) > 2:
                await trio.sleep(0.5)
        # a keeps its lowest groups; b takes the two others, which a gave up one at a time: the second stop
        # only after b had taken the first.
        assert a.owned_groups() == (0, 1) and b.owned_groups() == (2, 3)
        stops = [(at, group) for at, kind, group in a_workers.log if kind == "stop"]
        takes = [(at, group) for at, kind, group in b_workers.log if kind == "start"]
        assert [group for _at, group in stops] == [2, 3]
        assert [group for _at, group in takes] == [2, 3]
        assert stops[0][0] < takes[0][0] < stops[1][0] < takes[1][0]
        nursery.cancel_scope.cancel()


async def test_groups_not_ready_are_not_handed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, a_workers, b_workers = SharedLeases(), Workers(ready=False), Workers()
    a = make_node(world, "a", a_workers)
    b = make_node(world, "b", b_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await trio.sleep(40.0)
        assert len(a.owned_groups()) + len(b.owned_groups()) == 4
        owned_before = a.owned_groups()
        await trio.sleep(40.0)
        assert a.owned_groups() == owned_before  # its shards never got READY: nothing moves
        a_workers.ready = True
        await trio.sleep(40.0)
        assert len(a.owned_groups()) == len(b.owned_groups()) == 2
        nursery.cancel_scope.cancel()


async def test_leaving_hands_every_group_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, a_workers, b_workers = SharedLeases(), Workers(), Workers()
    a = make_node(world, "a", a_workers)
    b = make_node(world, "b", b_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        with trio.fail_after(120):
            while len(b.owned_groups()) < 2:
                await trio.sleep(0.5)
        left_at = trio.current_time()
        await a.leave(timeout_s=30.0)
        assert trio.current_time() == left_at + 1.0  # the workers stop together (1 s each, in parallel)
        assert a.owned_groups() == () and "a" not in world.nodes
        assert all(lease[0] == "b" for lease in world.leases.values())
        with trio.fail_after(PERIOD_S + 0.001):
            while len(b.owned_groups()) < 4:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_after_an_outage_owners_reassert_before_anyone_takes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, a_workers, b_workers = SharedLeases(), Workers(), Workers()
    a = make_node(world, "a", a_workers)
    b = make_node(world, "b", b_workers)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        with trio.fail_after(120):
            while len(a.owned_groups()) != 2 or len(b.owned_groups()) != 2:
                await trio.sleep(0.5)
        await trio.sleep(0.5)
        before = (a.owned_groups(), b.owned_groups())
        world.down = True
        await trio.sleep(60.0)  # every lease expires in "Redis" meanwhile
        world.leases.clear()
        world.nodes.clear()
        world.last.clear()  # restarted empty
        world.down = False
        await trio.sleep(3 * TTL_S)
        assert (a.owned_groups(), b.owned_groups()) == before
        assert [entry for entry in a_workers.log + b_workers.log if entry[1] == "stop"] == []
        assert {group: lease[0] for group, lease in world.leases.items()} == {
            **dict.fromkeys(before[0], "a"),
            **dict.fromkeys(before[1], "b"),
        }
        nursery.cancel_scope.cancel()
