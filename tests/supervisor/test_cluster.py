"""Cluster mode (`CLUSTER_MODE=redis`) as real processes: 2 and 3 supervisors (`benchmarks.cluster_nodes`)
against one simulator, judged by the simulator's ledger: every shard on exactly one connection (rule
`shard_served_twice`, counter `shard_overlaps`), failovers and hand-overs by RESUME (the `identifies`
counter does not move after the first start), split by the nodes' `WORKERS` weight.

Each test runs its own simulator and cluster (a unique `SHARD_STORE_PREFIX`) and reads the ledger as deltas
from a baseline. Waits are on conditions (the nodes' `/healthz`, the ledger, log lines) with generous
deadlines; the one time measured (a SIGKILL's failover) is asserted against a loose bound and printed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from benchmarks.children import free_port
from benchmarks.cluster_nodes import Cluster, NodeProcess, open_cluster
from benchmarks.simulator import GatewayConfig, Simulator, SimulatorConfig, open_simulator
from benchmarks.tcp_forwarder import TcpForwarder
from ratelimit.redis_client import open_redis_client
from supervisor.cluster import ClusterStore
from supervisor.cluster_plan import ClusterPlan
from tests.redis_servers import needs_redis_server, open_plain_redis

#: The shortest TTL allowed: each test waits a few TTLs (a start watches one, a failover waits one).
TTL_S = 2.0
#: Generous: a start is one TTL of watching plus one IDENTIFY round, on a loaded 2-core machine.
SERVE_TIMEOUT_S = 90.0
#: A failover after SIGKILL must finish within TTL + 5 s by design; this machine gets 10 s more.
FAILOVER_BOUND_S = TTL_S + 15.0
TEST_TIMEOUT_S = 240


def gateway(shards: int) -> SimulatorConfig:
    return SimulatorConfig(
        gateway=GatewayConfig(shard_count=shards, max_concurrency=shards, event_rate=5, guilds_per_shard=1)
    )


@contextlib.asynccontextmanager
async def cluster_of(tmp_path: Path, shards: int, **options: Any) -> AsyncIterator[tuple[Simulator, Cluster]]:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_simulator(gateway(shards)) as sim,
            open_cluster(sim.addresses.rest_url, tmp_path / "nodes", lease_ttl_s=TTL_S, **options) as cluster,
        ):
            yield sim, cluster


@dataclass(frozen=True)
class Counts:
    identifies: int
    resumes: int
    resumes_ok: int
    connections: int
    overlaps: int

    @classmethod
    def of(cls, sim: Simulator) -> Counts:
        counters = sim.gateway.ledger.counters
        return cls(
            identifies=counters.get("identifies", 0),
            resumes=counters.get("resumes", 0),
            resumes_ok=counters.get("resumes_ok", 0),
            connections=counters.get("connections", 0),
            overlaps=counters.get("shard_overlaps", 0),
        )


def served_once(sim: Simulator, shards: int) -> bool:
    """The simulator's own view: every shard has exactly one connection serving it."""
    servers = sim.gateway.ledger.servers
    return all(len(servers.get((shard, shards), {})) == 1 for shard in range(shards))


def assert_clean(sim: Simulator) -> None:
    """No shard was ever served twice, and no other rule of the simulator was broken."""
    ledger = sim.gateway.ledger
    assert ledger.counters.get("shard_overlaps", 0) == 0, ledger.violations
    assert ledger.rules_broken() == {}, ledger.violations


async def wait_split(
    cluster: Cluster, shards: int, groups: dict[str, int], timeout_s: float = SERVE_TIMEOUT_S
) -> dict[str, tuple[int, ...]]:
    """Until the cluster serves every shard once and READY with `groups[node]` shards on each node (one shard
    per group here: fewer than 32 shards)."""
    with trio.fail_after(timeout_s):
        while True:
            serving = await cluster.wait_serving(shards, timeout_s=timeout_s)
            if {node: len(ids) for node, ids in serving.items() if ids} == {
                node: count for node, count in groups.items() if count
            }:
                return serving
            await trio.sleep(0.2)


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = SERVE_TIMEOUT_S
) -> None:
    """Until `predicate()` (a bool, or an awaitable of one) is true; TooSlowError after `timeout_s`."""
    with trio.fail_after(timeout_s):
        while True:
            value = predicate()
            if await value if inspect.isawaitable(value) else value:
                return
            await trio.sleep(0.2)


def log_events(node: NodeProcess, event: str) -> list[dict[str, Any]]:
    found = []
    for line in node.log_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


# -- (a), (d) and (b): the split by weight, a node joining, a node killed --------------------------------


async def test_a_split_by_weight_a_join_by_resume_and_a_killed_nodes_shards_resumed_within_the_ttl(
    tmp_path: Path,
) -> None:
    async with cluster_of(tmp_path, 6) as (sim, cluster):
        await cluster.start("a", workers=1)
        await cluster.start("b", workers=2)
        serving = await wait_split(cluster, 6, {"a": 2, "b": 4})
        assert served_once(sim, 6)
        assert Counts.of(sim).identifies == 6
        print(f"\nsplit by weight 1:2 -> {serving}")

        # (d) a node joining takes its share by hand-over, fewest moves.
        before = Counts.of(sim)
        c = await cluster.start("c", workers=3)
        serving = await wait_split(cluster, 6, {"a": 1, "b": 2, "c": 3})
        after = Counts.of(sim)
        assert after.identifies == before.identifies  # the joiner RESUMEd what it took
        assert after.resumes_ok - before.resumes_ok >= 3
        assert served_once(sim, 6)
        print(f"joined 1:2:3 -> {serving}, {after.resumes_ok - before.resumes_ok} resumes")

        # (b) SIGKILL of the node holding half the shards: the others RESUME them once its leases expire.
        before = Counts.of(sim)
        started = trio.current_time()
        await c.kill9()
        await wait_split(cluster, 6, {"a": 2, "b": 4})
        took_s = trio.current_time() - started
        await wait_for(lambda: served_once(sim, 6))
        after = Counts.of(sim)
        print(f"failover after SIGKILL: {took_s:.1f} s (TTL {TTL_S:g} s)")
        assert took_s < FAILOVER_BOUND_S
        assert after.identifies == before.identifies
        assert after.resumes_ok - before.resumes_ok >= len(serving["c"])
        assert_clean(sim)


# -- (c): SIGTERM, and a rolling deploy --------------------------------------------------------------------


async def test_sigterm_hands_over_and_a_rolling_deploy_costs_no_identify(tmp_path: Path) -> None:
    async with cluster_of(tmp_path, 4) as (sim, cluster):
        a = await cluster.start("a")
        b = await cluster.start("b")
        await wait_split(cluster, 4, {"a": 2, "b": 2})
        assert Counts.of(sim).identifies == 4

        # One node at a time: the replacement joins and takes its share, then the old node leaves.
        for old, new in ((a, "a2"), (b, "b2")):
            before = Counts.of(sim)
            await cluster.start(new)
            live = {node.node_id for node in cluster.running()}
            await wait_for(functools.partial(_has_shards, cluster, new))
            held = await old.health()
            assert held is not None
            old_shards = held.serving
            assert await old.sigterm() == 0, old.log_tail()
            rest = live - {old.node_id}
            await wait_split(cluster, 4, dict.fromkeys(sorted(rest), 4 // len(rest)))
            after = Counts.of(sim)
            assert after.identifies == before.identifies == 4, (old.node_id, new)
            assert after.resumes_ok - before.resumes_ok >= len(old_shards)
            assert log_events(old, "cluster.leaving"), old.log_tail()
        await wait_for(lambda: served_once(sim, 4))
        assert {node.node_id for node in cluster.running()} == {"a2", "b2"}
        assert_clean(sim)


async def _has_shards(cluster: Cluster, node_id: str) -> bool:
    health = await cluster.node(node_id).health()
    return health is not None and bool(health.serving) and health.all_ready


# -- (e): Redis goes away and comes back empty -------------------------------------------------------------


@needs_redis_server
async def test_a_redis_outage_disconnects_nothing_and_the_leases_are_reasserted(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    folder = tmp_path / "redis"
    folder.mkdir()
    redis = contextlib.ExitStack()
    await trio.to_thread.run_sync(redis.enter_context, open_plain_redis(folder, port))
    try:
        async with cluster_of(tmp_path, 4, redis_url=url) as (sim, cluster):
            await cluster.start("a")
            await cluster.start("b")
            serving = await wait_split(cluster, 4, {"a": 2, "b": 2})
            before = Counts.of(sim)

            await trio.to_thread.run_sync(redis.close)  # Redis is gone: its keys with it
            await wait_for(lambda: _redis_state(cluster, "unreachable"))
            await trio.sleep(2.5 * TTL_S)  # the outage: every lease has long expired in the nodes' eyes
            assert Counts.of(sim) == before  # nothing reconnected
            await trio.to_thread.run_sync(redis.enter_context, open_plain_redis(folder, port))  # empty

            await wait_for(lambda: _redis_state(cluster, "connected"))
            holders = await _wait_leases(url, cluster.prefix, serving)
            await trio.sleep(1.5 * TTL_S)  # long enough for a wrong takeover to happen, if one were to
            assert await cluster.wait_serving(4) == serving
            assert await _lease_holders(url, cluster.prefix, 4) == holders
            assert Counts.of(sim) == before  # no connection, RESUME or IDENTIFY through it all
            assert served_once(sim, 4)
            assert_clean(sim)
    finally:
        await trio.to_thread.run_sync(redis.close)


async def _redis_state(cluster: Cluster, state: str) -> bool:
    health = await cluster.health()
    return all(h is not None and h.cluster is not None and h.cluster.redis == state for h in health.values())


async def _lease_holders(url: str, prefix: str, groups: int) -> dict[int, str | None]:
    async with open_redis_client(url) as client:
        store = ClusterStore(client, prefix, "reader")
        values = {group: await client.execute("GET", store.lease_key(group)) for group in range(groups)}
    return {group: value.decode() if isinstance(value, bytes) else None for group, value in values.items()}


async def _wait_leases(url: str, prefix: str, serving: dict[str, tuple[int, ...]]) -> dict[int, str | None]:
    """Until each group's lease (one shard per group) exists again, held by the node that serves it."""
    owner = {shard: node for node, shards in serving.items() for shard in shards}
    holders: dict[int, str | None] = {}

    async def reasserted() -> bool:
        nonlocal holders
        holders = await _lease_holders(url, prefix, len(owner))
        return all(value is not None and value.split()[0] == owner[g] for g, value in holders.items())

    await wait_for(reasserted)
    return holders


# -- (f): one node cut off from Redis ----------------------------------------------------------------------


async def test_a_node_cut_off_from_redis_loses_its_groups_to_the_other_by_resume(tmp_path: Path) -> None:
    forwarder = TcpForwarder(free_port(), 6379)
    async with cluster_of(tmp_path, 4) as (sim, cluster), trio.open_nursery() as nursery:
        await nursery.start(forwarder.serve)
        a = await cluster.start("a", redis_url=f"redis://127.0.0.1:{forwarder.port}/0")
        b = await cluster.start("b")
        serving = await wait_split(cluster, 4, {"a": 2, "b": 2})
        before = Counts.of(sim)

        forwarder.cut()
        # b takes a's groups once their leases expire; a, unable to renew, cannot reconnect its shards.
        await cluster.wait_serving(4, nodes=[b], timeout_s=SERVE_TIMEOUT_S)
        await wait_for(lambda: served_once(sim, 4))
        cut = Counts.of(sim)
        assert cut.identifies == before.identifies
        assert cut.resumes_ok - before.resumes_ok >= len(serving["a"])
        assert cut.overlaps == 0

        forwarder.restore()
        # a sees the groups are b's and stops their workers.
        await wait_for(lambda: len(log_events(a, "cluster.lease_lost")) >= len(serving["a"]))
        lost = {record["group"] for record in log_events(a, "cluster.lease_lost")}
        assert lost == set(serving["a"])  # one shard per group
        serving = await wait_split(cluster, 4, {"a": 2, "b": 2})  # and the cluster rebalances, by RESUME
        # What a runs now it took again after the heal, each group handed over by b (a new fence).
        healed_at = min(record["ts"] for record in log_events(a, "cluster.lease_lost"))
        retaken = [record for record in log_events(a, "cluster.group_taken") if record["ts"] > healed_at]
        assert {record["group"] for record in retaken} >= set(serving["a"])
        assert all(record["from"] == "b" for record in retaken), retaken
        await wait_for(lambda: served_once(sim, 4))
        after = Counts.of(sim)
        assert after.identifies == before.identifies
        assert_clean(sim)
        nursery.cancel_scope.cancel()


# -- (g): configurations refused ---------------------------------------------------------------------------


async def test_cluster_configurations_that_are_refused(tmp_path: Path) -> None:
    async with cluster_of(tmp_path, 4) as (_sim, cluster):
        memory = await cluster.start("memory", env={"SHARD_STORE_TYPE": "memory"})
        ids = await cluster.start("ids", "--shard-ids", "0-1")
        async with open_redis_client(cluster.redis_url) as client:
            await ClusterStore(client, cluster.prefix, "first").join(ClusterPlan(4, 1))
        other = await cluster.start("other", "--shards", "6")
        for node, named in ((memory, "SHARD_STORE_TYPE"), (ids, "--shard-ids"), (other, "--shards")):
            assert await node.wait_exit() == 2, node.log_tail()
            assert named in node.log_text() and "Traceback" not in node.log_text(), node.log_tail()
