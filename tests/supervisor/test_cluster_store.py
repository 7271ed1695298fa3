"""`supervisor.cluster.ClusterStore`'s Redis scripts against the shared Redis (127.0.0.1:6379), each test
under a prefix of its own whose keys are deleted afterwards: the plan (join), the sync (node registry, lease
renewal, lost leases, re-assertion of an absent lease by the holder of the group's last fence), acquire
(fresh increasing fences, held groups skipped) and release (only one's own lease).

Timing: lease expiries are read with PTTL (a renewal is a PTTL above what the lease was created with), and a
node's expiry is moved into the past with ZADD instead of waiting for it, except in the one test that
watches a real expiry, which waits with a generous deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from benchmarks.cluster_nodes import delete_prefix_keys
from ratelimit.redis_client import RedisClient, open_redis_client
from supervisor.cluster import ClusterStore
from supervisor.cluster_plan import ClusterPlan, Node, plan_cluster

REDIS_URL = "redis://127.0.0.1:6379/0"
PLAN = ClusterPlan(8, 2)  # groups 0-3
SHORT_MS = 2_000  # a lease's TTL when it is created
LONG_MS = 60_000  # the TTL a renewal gives it: a PTTL above SHORT_MS proves the renewal
TIMEOUT_S = 20


@dataclass
class Redis:
    client: RedisClient
    prefix: str

    def store(self, node_id: str) -> ClusterStore:
        return ClusterStore(self.client, self.prefix, node_id)

    async def get(self, key: str) -> str | None:
        value = await self.client.execute("GET", key)
        assert value is None or isinstance(value, bytes)
        return None if value is None else value.decode()

    async def pttl(self, key: str) -> int:
        value = await self.client.execute("PTTL", key)
        assert isinstance(value, int)
        return value

    async def last_holder(self, store: ClusterStore, group: int) -> str | None:
        """The group's last `"node fence"` (the fences hash)."""
        value = await self.client.execute("HGET", store.fences_key, str(group))
        assert value is None or isinstance(value, bytes)
        return None if value is None else value.decode()

    async def server_ms(self) -> int:
        reply = await self.client.execute("TIME")
        assert isinstance(reply, list) and all(isinstance(part, bytes) for part in reply)
        seconds, micros = (int(part) for part in reply if isinstance(part, bytes))
        return seconds * 1000 + micros // 1000


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    prefix = f"test-cluster-store-{uuid.uuid4().hex[:10]}"
    with trio.fail_after(TIMEOUT_S):
        async with open_redis_client(REDIS_URL, timeout_s=5.0) as client:
            try:
                yield Redis(client, prefix)
            finally:
                await delete_prefix_keys(REDIS_URL, prefix)


async def test_join_keeps_the_first_plan(redis: Redis) -> None:
    first, second = redis.store("a"), redis.store("b")
    assert await first.stored_plan() is None
    assert await first.join(plan_cluster(4)) == ClusterPlan(4, 1)
    # A later node proposing another plan gets the stored one (the supervisor refuses an explicit other N).
    assert await second.join(plan_cluster(100)) == ClusterPlan(4, 1)
    assert await second.stored_plan() == ClusterPlan(4, 1)
    assert await redis.get(first.plan_key) == "4:1"


async def test_sync_registers_the_node_and_renews_its_lease(redis: Redis) -> None:
    a = redis.store("a")
    won = await a.acquire([1], SHORT_MS)
    assert list(won) == [1]
    assert 0 < await redis.pttl(a.lease_key(1)) <= SHORT_MS
    before = await redis.server_ms()
    result = await a.sync(PLAN, 3, LONG_MS, won, leaving=False)
    assert result.plan_text == PLAN.to_text()  # the sync stores the plan when there is none
    assert result.nodes == (Node("a", 3),)
    assert result.holders == {1: ("a", won[1])}
    assert result.owners() == {1: "a"}
    assert await redis.pttl(a.lease_key(1)) > SHORT_MS  # renewed to the sync's TTL
    assert await redis.get(a.lease_key(1)) == f"a {won[1]}"
    score = await redis.client.execute("ZSCORE", a.nodes_key, "a")
    assert isinstance(score, bytes)
    assert before + LONG_MS <= float(score) <= await redis.server_ms() + LONG_MS  # expiry in server time
    assert await redis.client.execute("HGET", a.weights_key, "a") == b"3"


async def test_a_lease_held_under_another_fence_is_reported_and_not_renewed(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    won = await a.acquire([0], SHORT_MS)
    # Another node that believes it holds group 0 (under some fence) does not renew a's lease.
    seen = await b.sync(PLAN, 1, LONG_MS, {0: won[0] + 7}, leaving=False)
    assert seen.holders[0] == ("a", won[0])
    # Nor does a itself under a stale fence (it lost the group and took it again since).
    stale = await a.sync(PLAN, 1, LONG_MS, {0: won[0] - 1}, leaving=False)
    assert stale.holders[0] == ("a", won[0])
    assert 0 < await redis.pttl(a.lease_key(0)) <= SHORT_MS
    assert await redis.get(a.lease_key(0)) == f"a {won[0]}"
    assert await redis.last_holder(a, 0) == f"a {won[0]}"


async def test_an_absent_lease_is_reasserted_only_under_the_groups_last_fence(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    won = await a.acquire([0, 1, 2], SHORT_MS)
    # The lease expired during an outage and nobody took it: a's fence is still the group's last.
    await redis.client.execute("DEL", a.lease_key(0))
    result = await a.sync(PLAN, 1, LONG_MS, won, leaving=False)
    assert result.holders[0] == ("a", won[0])
    assert await redis.get(a.lease_key(0)) == f"a {won[0]}"
    assert await redis.pttl(a.lease_key(0)) > SHORT_MS
    # The group changed hands meanwhile (b took it, then b's lease went too): a must not re-assert.
    await redis.client.execute("DEL", a.lease_key(1))
    taken = await b.acquire([1], SHORT_MS)
    assert taken[1] > won[2]
    await redis.client.execute("DEL", b.lease_key(1))
    result = await a.sync(PLAN, 1, LONG_MS, won, leaving=False)
    assert 1 not in result.holders
    assert await redis.get(a.lease_key(1)) is None
    assert await redis.last_holder(a, 1) == f"b {taken[1]}"
    # The same fence number remembered for another node is not a's either.
    await redis.client.execute("DEL", a.lease_key(2))
    await redis.client.execute("HSET", a.fences_key, "2", f"b {won[2]}")
    result = await a.sync(PLAN, 1, LONG_MS, won, leaving=False)
    assert 2 not in result.holders
    assert await redis.get(a.lease_key(2)) is None


async def test_after_redis_restarted_empty_the_holders_reassert_and_fences_keep_growing(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    won = await a.acquire([0, 1], SHORT_MS)
    assert await delete_prefix_keys(REDIS_URL, redis.prefix) > 0  # Redis restarted empty
    result = await a.sync(PLAN, 1, LONG_MS, won, leaving=False)
    assert result.holders == {0: ("a", won[0]), 1: ("a", won[1])}
    for group in (0, 1):
        assert await redis.get(a.lease_key(group)) == f"a {won[group]}"
        assert await redis.pttl(a.lease_key(group)) > SHORT_MS
        assert await redis.last_holder(a, group) == f"a {won[group]}"
    # The fence counter was lifted above the re-asserted fences: the next acquisition's fence is higher.
    later = await b.acquire([2], SHORT_MS)
    assert later[2] > max(won.values())


async def test_acquire_gives_each_free_group_a_new_increasing_fence_and_skips_held_ones(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    first = await a.acquire([0, 1], SHORT_MS)
    assert list(first) == [0, 1] and 0 < first[0] < first[1]
    second = await b.acquire([1, 2, 3], SHORT_MS)
    assert list(second) == [2, 3]  # 1 is a's
    assert first[1] < second[2] < second[3]
    assert await redis.get(a.lease_key(1)) == f"a {first[1]}"
    assert await redis.get(b.lease_key(2)) == f"b {second[2]}"
    for node, won in (("a", first), ("b", second)):
        for group, fence in won.items():
            assert await redis.last_holder(a, group) == f"{node} {fence}"
            assert 0 < await redis.pttl(a.lease_key(group)) <= SHORT_MS
    assert await b.acquire([], SHORT_MS) == {}
    assert await b.acquire([0, 1, 2, 3], SHORT_MS) == {}


async def test_release_deletes_only_the_callers_own_lease(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    won = await a.acquire([0], SHORT_MS)
    assert not await b.release(0, won[0])  # another node, same fence
    assert not await a.release(0, won[0] + 1)  # this node, another fence
    assert await redis.get(a.lease_key(0)) == f"a {won[0]}"
    assert await a.release(0, won[0])
    assert await redis.get(a.lease_key(0)) is None
    assert not await a.release(0, won[0])  # already gone
    assert await redis.last_holder(a, 0) == f"a {won[0]}"  # the history stays


async def test_a_node_whose_record_expired_disappears_from_nodes(redis: Redis) -> None:
    a, b = redis.store("a"), redis.store("b")
    await a.sync(PLAN, 2, LONG_MS, {}, leaving=False)
    seen = await b.sync(PLAN, 1, LONG_MS, {}, leaving=False)
    assert seen.nodes == (Node("a", 2), Node("b", 1))
    # a's record expires (its expiry moved into the past, not waited for): the next sync forgets it.
    await redis.client.execute("ZADD", a.nodes_key, "XX", await redis.server_ms() - 1, "a")
    seen = await b.sync(PLAN, 1, LONG_MS, {}, leaving=False)
    assert seen.nodes == (Node("b", 1),)
    assert await redis.client.execute("HGET", a.weights_key, "a") is None
    # A node leaving (SIGTERM) takes itself out at once.
    await a.sync(PLAN, 2, LONG_MS, {}, leaving=False)
    gone = await a.sync(PLAN, 2, LONG_MS, {}, leaving=True)
    assert gone.nodes == (Node("b", 1),)


async def test_a_real_expiry_of_a_node_record(redis: Redis) -> None:
    """The same, with the server's clock: a node registered for 300 ms is gone once that has passed."""
    a, b = redis.store("a"), redis.store("b")
    await a.sync(PLAN, 1, 300, {}, leaving=False)
    with trio.fail_after(10):  # generous: the deadline is the server's, 300 ms after a's sync
        while True:
            seen = await b.sync(PLAN, 1, LONG_MS, {}, leaving=False)
            if [node.node_id for node in seen.nodes] == ["b"]:
                break
            await trio.sleep(0.1)
    assert await redis.client.execute("ZSCORE", a.nodes_key, "a") is None
