"""Cluster mode (`CLUSTER_MODE=redis`): one bot's shards spread over several supervisors, failing over by
themselves, with Redis as the only thing the nodes share (no protocol between nodes).

Design note.
- The plan. The first node fixes `shard_count:group_size` under ``{prefix}:cluster:plan``
  (`supervisor.cluster_plan`); a later node with another explicit `--shards` is refused (exit 2). A group of
  contiguous shards is the unit of a lease and of a worker process: a node runs one worker per group it owns.
- Leases. ``{prefix}:cluster:lease:<group>`` holds ``"<node> <fence>"`` with a PX expiry timed by the Redis
  server's clock. A fence is a number from one counter (INCR), issued at each acquisition; the group's last
  ``"<node> <fence>"`` is remembered in ``{prefix}:cluster:fences``. A lease is renewed, re-asserted or
  released only by the holder of its current fence, so a node that was away cannot renew a lease that has
  since changed hands; a re-assertion after Redis restarted empty also lifts the counter above the fence,
  so fences keep growing.
- The sync, every `ttl / 5`, is one Lua call: register this node (a ZSET scored by its expiry in server
  time), forget dead nodes, renew every lease this node holds, re-assert a held lease that Redis no longer has
  (Redis restarted empty, or it expired during an outage and nobody took it) when its fence is still the
  group's last, and return the plan, the live nodes with their weights (`--workers`) and every lease's holder.
- The local deadline of a lease is the *send* time of the last sync that renewed it plus the TTL: never later
  than the server's expiry, whatever the round trip took. A worker asks before every connection of a shard
  (`ConnectRequest`) and is answered only while that deadline is more than `LEASE_MARGIN_S` away.
- Taking. A node takes only free groups that the deterministic target (`cluster_plan.next_step`) gives it,
  and only once it has been connected to Redis without a break for one TTL: after a start, or after an
  outage, the owners re-assert their leases before anyone may take them.
- Giving. Rebalancing releases one group at a time, only a group whose shards are all READY: its worker is
  stopped with SIGTERM (resumable closes, sessions flushed to Redis), then the lease is deleted if still
  this node's, and the next release waits until the group has a new holder. SIGTERM of the node: it leaves
  the node set first (the others' target then excludes it) and hands every group over the same way.
- Losing Redis. Nothing is stopped: open connections stay (a Redis outage disconnects no shard). A shard
  whose connection drops cannot come back without a valid lease. If this node is cut off while the others
  still reach Redis, its leases expire and another node takes the groups and RESUMEs their sessions; Discord
  closes a session's old connection when it is resumed on a new one, so at no moment do two connections
  serve one shard, and this node, unable to get a lease, does not reconnect. When it reaches Redis again it
  sees the groups are someone else's and stops those workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from ratelimit.redis_client import RedisClient, Script
from ratelimit.resp import Arg, RedisError
from workers.exit_status import ExitStatus

from .cluster_plan import ClusterPlan, Node, next_step
from .errors import SupervisorError

__all__ = [
    "LEASE_MARGIN_S",
    "ClusterNode",
    "ClusterStatistics",
    "ClusterStore",
    "GroupRunner",
    "LeaseStore",
    "SyncResult",
    "epoch_base",
]

LOGGER: Final = logging.getLogger("supervisor.cluster")
#: A lease must have at least this long left for a shard to start a connection under it.
LEASE_MARGIN_S: Final = 1.0
#: Syncs per lease TTL.
SYNCS_PER_TTL: Final = 5
#: A release waits at most this many TTLs for the group to get a new holder before the next release.
RELEASE_WAIT_TTLS: Final = 3

_SYNC_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[1], tonumber(ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
else
  redis.call('ZADD', KEYS[1], now + ttl, me)
  redis.call('HSET', KEYS[2], me, ARGV[2])
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local plan = redis.call('GET', KEYS[4])
if not plan then
  redis.call('SET', KEYS[4], ARGV[5])
  plan = ARGV[5]
end
local owners = {}
for i = 6, #KEYS do
  local group = tostring(i - 6)
  local fence = ARGV[i]
  local value = redis.call('GET', KEYS[i])
  if fence ~= '' then
    local mine = me .. ' ' .. fence
    if value == mine then
      redis.call('PEXPIRE', KEYS[i], ttl)
    elseif not value then
      local last = redis.call('HGET', KEYS[3], group)
      if (not last) or last == mine then
        redis.call('SET', KEYS[i], mine, 'PX', ttl)
        redis.call('HSET', KEYS[3], group, mine)
        if tonumber(redis.call('GET', KEYS[5]) or '0') < tonumber(fence) then
          redis.call('SET', KEYS[5], fence)
        end
        value = mine
      end
    end
  end
  owners[#owners + 1] = value or ''
end
local nodes = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  nodes[#nodes + 1] = id
  nodes[#nodes + 1] = redis.call('HGET', KEYS[2], id) or '1'
end
return {plan, nodes, owners}
"""

_ACQUIRE_LUA: Final = """
local out = {}
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local fence = redis.call('INCR', KEYS[1])
    redis.call('SET', KEYS[i], ARGV[1] .. ' ' .. fence, 'PX', ARGV[2])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[1] .. ' ' .. fence)
    out[#out + 1] = fence
  else
    out[#out + 1] = 0
  end
end
return out
"""

_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def epoch_base(prefix: str, epoch: int) -> str:
    """The key prefix of one epoch's plan, nodes and leases: the first epoch's are issue 15's keys, a live
    reshard's new epoch gets keys of its own (supervisor/cluster_reshard.py)."""
    base = f"{{{prefix}}}:cluster"
    return base if epoch == 0 else f"{base}:e{epoch}"


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync saw: the plan's text, the live nodes, and each group's holder `(node, fence)`."""

    plan_text: str
    nodes: tuple[Node, ...]
    holders: Mapping[int, tuple[str, int]]

    def owners(self) -> dict[int, str]:
        return {group: node for group, (node, _fence) in self.holders.items()}


class ClusterStore:
    """The cluster's keys in Redis and the three scripts that change them (see the module note)."""

    def __init__(self, client: RedisClient, prefix: str, node_id: str, epoch: int = 0) -> None:
        self._client = client
        self.node_id = node_id
        #: Live resharding's epoch: each generation's plan, nodes and leases under keys of their own.
        self.epoch = epoch
        base = epoch_base(prefix, epoch)
        self.plan_key = f"{base}:plan"
        self.nodes_key = f"{base}:nodes"
        self.weights_key = f"{base}:node:workers"
        self.fence_key = f"{base}:fence"
        self.fences_key = f"{base}:fences"
        self._lease_prefix = f"{base}:lease:"
        self._sync = Script(_SYNC_LUA)
        self._acquire = Script(_ACQUIRE_LUA)
        self._release = Script(_RELEASE_LUA)

    def lease_key(self, group: int) -> str:
        return f"{self._lease_prefix}{group}"

    async def join(self, proposed: ClusterPlan) -> ClusterPlan:
        """The cluster's plan: the stored one, or `proposed` when there is none yet (the first node)."""
        await self._client.execute("SET", self.plan_key, proposed.to_text(), "NX")
        text = await self._client.execute("GET", self.plan_key)
        return ClusterPlan.from_text(_text(text))

    async def stored_plan(self) -> ClusterPlan | None:
        text = await self._client.execute("GET", self.plan_key)
        return None if text is None else ClusterPlan.from_text(_text(text))

    async def sync(
        self, plan: ClusterPlan, workers: int, ttl_ms: int, held: Mapping[int, int], *, leaving: bool
    ) -> SyncResult:
        keys: list[Arg] = [self.nodes_key, self.weights_key, self.fences_key, self.plan_key, self.fence_key]
        keys += [self.lease_key(group) for group in range(plan.groups)]
        args: list[Arg] = [self.node_id, workers, ttl_ms, "1" if leaving else "0", plan.to_text()]
        args += [str(held[group]) if group in held else "" for group in range(plan.groups)]
        reply = await self._sync(self._client, keys, args)
        if not isinstance(reply, list) or len(reply) != 3:
            raise RedisError(f"unexpected cluster sync reply {reply!r:.80}")
        plan_text, flat_nodes, owners = reply
        assert isinstance(flat_nodes, list) and isinstance(owners, list)
        nodes = tuple(
            Node(_text(flat_nodes[i]), max(1, int(_text(flat_nodes[i + 1]))))
            for i in range(0, len(flat_nodes), 2)
        )
        holders: dict[int, tuple[str, int]] = {}
        for group, value in enumerate(owners):
            text = _text(value)
            if text:
                node, _, fence = text.rpartition(" ")
                holders[group] = (node, int(fence))
        return SyncResult(_text(plan_text), nodes, holders)

    async def acquire(self, groups: Sequence[int], ttl_ms: int) -> dict[int, int]:
        """Take each of `groups` that has no lease; returns the fence of each group taken."""
        if not groups:
            return {}
        keys: list[Arg] = [self.fence_key, self.fences_key, *(self.lease_key(g) for g in groups)]
        args: list[Arg] = [self.node_id, ttl_ms, *(str(g) for g in groups)]
        reply = await self._acquire(self._client, keys, args)
        assert isinstance(reply, list)
        fences = [int(_text(fence)) for fence in reply]
        return {group: fence for group, fence in zip(groups, fences, strict=True) if fence}

    async def release(self, group: int, fence: int) -> bool:
        """Delete the lease of `group` if it is still this node's under `fence`."""
        reply = await self._release(self._client, [self.lease_key(group)], [f"{self.node_id} {fence}"])
        return reply == 1


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


class LeaseStore(Protocol):
    """What a node needs of the cluster's shared state: `ClusterStore` in Redis (tests keep it in memory)."""

    node_id: str

    async def sync(
        self, plan: ClusterPlan, workers: int, ttl_ms: int, held: Mapping[int, int], *, leaving: bool
    ) -> SyncResult: ...

    async def acquire(self, groups: Sequence[int], ttl_ms: int) -> dict[int, int]: ...

    async def release(self, group: int, fence: int) -> bool: ...


class GroupRunner(Protocol):
    """What the node asks of its supervisor: run, stop and report on the worker of one group."""

    async def start_group(self, group: int, shard_ids: tuple[int, ...]) -> None: ...

    async def stop_group(self, group: int) -> None:
        """Stop the group's worker gracefully (resumable closes, sessions flushed) and wait for its exit."""

    def group_ready(self, group: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class ClusterStatistics:
    node: str
    nodes: int
    groups: tuple[int, ...]
    shards: tuple[int, ...]
    connected: bool


@dataclass(slots=True)
class _Held:
    fence: int
    #: Local (trio clock) time until which the lease is certainly this node's.
    deadline: float
    stopping: bool = False


@dataclass(slots=True)
class _NodeState:
    held: dict[int, _Held] = field(default_factory=dict)
    #: Since when this node has reached Redis without a failed sync (None: it does not now).
    connected_since: float | None = None
    last: SyncResult | None = None
    releasing: int | None = None
    leaving: bool = False


class ClusterNode:
    """This supervisor as a node: syncs with Redis, takes and gives groups, answers connect permits."""

    def __init__(
        self,
        store: LeaseStore,
        plan: ClusterPlan,
        *,
        workers: int,
        ttl_s: float,
        runner: GroupRunner,
        on_change: Callable[[], None] = lambda: None,
        observe_s: float | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.workers = workers
        self.ttl_s = ttl_s
        self._runner = runner
        self._on_change = on_change
        self._state = _NodeState()
        self._changed = trio.Event()
        #: The last holder seen of each group (to tell a hand-over from a failover when a group is taken).
        self._last_holder: dict[int, str] = {}
        self.settled = trio.Event()
        #: How long the node watches the cluster before it takes a group (default one TTL: owners re-assert
        #: first); a reshard's new epoch, which nobody held before, needs only one sync period.
        self.observe_s = ttl_s if observe_s is None else observe_s
        #: Set when a reshard retires this node's generation: it takes and gives no more groups.
        self.frozen = False
        #: Whether this node's figures go to the cluster gauges (a reshard's shadow epoch's do not).
        self.reports = True
        self._outage_logged = False
        self._nursery: trio.Nursery | None = None

    @property
    def node_id(self) -> str:
        return self.store.node_id

    @property
    def period_s(self) -> float:
        return self.ttl_s / SYNCS_PER_TTL

    @property
    def ttl_ms(self) -> int:
        return math.ceil(self.ttl_s * 1000)

    # -- queries ---------------------------------------------------------------------------------------------

    def owned_groups(self) -> tuple[int, ...]:
        return tuple(sorted(group for group, held in self._state.held.items() if not held.stopping))

    def owned_shards(self) -> tuple[int, ...]:
        return tuple(shard for group in self.owned_groups() for shard in self.plan.shards_of(group))

    def statistics(self) -> ClusterStatistics:
        last = self._state.last
        return ClusterStatistics(
            node=self.node_id,
            nodes=len(last.nodes) if last is not None else 0,
            groups=self.owned_groups(),
            shards=self.owned_shards(),
            connected=self._state.connected_since is not None,
        )

    def holders(self) -> dict[int, str]:
        """Each group's lease holder as the last sync saw it."""
        last = self._state.last
        return {} if last is None else last.owners()

    async def release_all(self) -> None:
        """Release every lease this node holds (its workers already stopped): a retired generation's."""
        for group, held in list(self._state.held.items()):
            with contextlib.suppress(RedisError, trio.TooSlowError, OSError), trio.fail_after(self.period_s):
                await self.store.release(group, held.fence)
            self._state.held.pop(group, None)
        self._notify()

    def lease_valid(self, shard: int, now: float | None = None) -> bool:
        held = self._state.held.get(self.plan.group_of(shard))
        now = trio.current_time() if now is None else now
        return held is not None and not held.stopping and held.deadline - LEASE_MARGIN_S > now

    async def wait_lease(self, shard: int) -> None:
        """Return once this node certainly holds `shard`'s lease (a worker's `ConnectRequest`)."""
        while not self.lease_valid(shard):
            await self._changed.wait()

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync every `period_s` until cancelled; reports started after the first sync (even a failed one)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            started = False
            while True:
                await self._tick(nursery)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(self.period_s)

    async def leave(self, timeout_s: float) -> None:
        """SIGTERM: leave the node set, hand every group over (stop its worker, release its lease)."""
        state = self._state
        state.leaving = True
        with trio.move_on_after(min(timeout_s, self.period_s)):
            await self._sync_once()
        LOGGER.info("cluster.leaving", extra={"node": self.node_id, "groups": list(self.owned_groups())})
        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for group in list(state.held):
                    nursery.start_soon(self._hand_over, group)

    async def _tick(self, nursery: trio.Nursery) -> None:
        result = await self._sync_once()
        if self._state.leaving:
            return  # `leave` hands the groups over; the syncs go on renewing their leases meanwhile
        state = self._state
        if result is None or state.connected_since is None:
            return
        now = trio.current_time()
        if now - state.connected_since < self.observe_s:
            return  # still observing: owners re-assert their leases first
        if self.frozen:
            return
        owners = result.owners()
        live = {node.node_id for node in result.nodes}
        ready = {group for group in state.held if self._runner.group_ready(group)}
        step = next_step(self.node_id, result.nodes, owners, self.plan.groups, ready)
        if step.acquire:
            await self._acquire(step.acquire, live)
        if not self.settled.is_set():  # watched one TTL and took its first share
            self.settled.set()
            LOGGER.info(
                "cluster.settled",
                extra={"node": self.node_id, "nodes": len(result.nodes), "groups": list(self.owned_groups())},
            )
        if step.release is not None and state.releasing is None:
            state.releasing = step.release
            nursery.start_soon(self._rebalance, step.release)

    async def _sync_once(self) -> SyncResult | None:
        state = self._state
        sent_at = trio.current_time()
        held = {group: h.fence for group, h in state.held.items()}
        from workers import metric_defs as metrics

        try:
            with trio.fail_after(self.period_s):
                result = await self.store.sync(
                    self.plan, self.workers, self.ttl_ms, held, leaving=state.leaving
                )
        except (RedisError, trio.TooSlowError, OSError) as exc:
            metrics.CLUSTER_LEASE_FAILURES.inc()
            if state.connected_since is not None or not self._outage_logged:
                LOGGER.warning(
                    "cluster.redis_unreachable",
                    extra={"node": self.node_id, "error": str(exc) or type(exc).__name__},
                )
                self._outage_logged = True
            state.connected_since = None
            self._notify()
            return None
        metrics.CLUSTER_LEASE_RENEWALS.inc()
        if state.connected_since is None:
            if self._outage_logged:
                LOGGER.info("cluster.redis_back", extra={"node": self.node_id})
            self._outage_logged = False
            state.connected_since = sent_at
        if result.plan_text != self.plan.to_text():
            raise SupervisorError(
                f"the cluster's plan in Redis changed to {result.plan_text!r} under this node "
                f"(it runs {self.plan.to_text()!r}); restart it to join the new plan",
                ExitStatus.CONFIG,
            )
        for group, held_lease in list(state.held.items()):
            holder = result.holders.get(group)
            if holder == (self.node_id, held_lease.fence):
                held_lease.deadline = sent_at + self.ttl_s
            elif not held_lease.stopping:
                LOGGER.warning(
                    "cluster.lease_lost",
                    extra={"node": self.node_id, "group": group, "holder": holder[0] if holder else None},
                )
                metrics.CLUSTER_TAKEOVERS.labels(direction="out").inc()
                held_lease.stopping = True
                held_lease.deadline = -math.inf
                self._start(self._drop, group)
        state.last = result
        self._last_holder.update({group: node for group, (node, _fence) in result.holders.items()})
        if self.reports:
            metrics.CLUSTER_NODES.set(len(result.nodes))
        self._notify()
        return result

    async def _acquire(self, groups: Sequence[int], live: set[str]) -> None:
        from workers import metric_defs as metrics

        sent_at = trio.current_time()
        try:
            with trio.fail_after(self.period_s):
                won = await self.store.acquire(groups, self.ttl_ms)
        except (RedisError, trio.TooSlowError, OSError) as exc:
            LOGGER.warning("cluster.acquire_failed", extra={"node": self.node_id, "error": str(exc)})
            return
        for group, fence in won.items():
            self._state.held[group] = _Held(fence, sent_at + self.ttl_s)
            before = self._last_holder.get(group)
            if before is not None and before in live:
                metrics.CLUSTER_HANDOVERS.labels(direction="in").inc()
            elif before is not None:
                metrics.CLUSTER_TAKEOVERS.labels(direction="in").inc()
            LOGGER.info(
                "cluster.group_taken",
                extra={
                    "node": self.node_id,
                    "group": group,
                    "shards": _span(self.plan.shards_of(group)),
                    "fence": fence,
                    "from": before,
                },
            )
            await self._runner.start_group(group, self.plan.shards_of(group))
        self._notify()

    async def _rebalance(self, group: int) -> None:
        """Hand one group over to the node the target gives it to, then wait until that node has it."""
        try:
            await self._hand_over(group)
            with trio.move_on_after(RELEASE_WAIT_TTLS * self.ttl_s):
                while True:
                    last = self._state.last
                    holder = last.holders.get(group) if last is not None else None
                    if holder is not None and holder[0] != self.node_id:
                        break
                    await self._changed.wait()
        finally:
            self._state.releasing = None

    async def _hand_over(self, group: int) -> None:
        from workers import metric_defs as metrics

        held = self._state.held.get(group)
        if held is None:
            return
        held.stopping = True
        self._notify()
        LOGGER.info("cluster.handing_over", extra={"node": self.node_id, "group": group})
        await self._runner.stop_group(group)
        try:
            with trio.fail_after(self.period_s):
                await self.store.release(group, held.fence)
        except (RedisError, trio.TooSlowError, OSError) as exc:
            # The lease then expires by itself; its holder's fence keeps anyone else from renewing it.
            LOGGER.warning("cluster.release_failed", extra={"node": self.node_id, "error": str(exc)})
        self._state.held.pop(group, None)
        metrics.CLUSTER_HANDOVERS.labels(direction="out").inc()
        self._notify()

    async def _drop(self, group: int) -> None:
        """Another node holds `group` now: stop its worker here (its connections are already the other's)."""
        await self._runner.stop_group(group)
        self._state.held.pop(group, None)
        self._notify()

    def _start(self, function: Callable[[int], Awaitable[None]], group: int) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(function, group)

    def _notify(self) -> None:
        from workers import metric_defs as metrics

        if self.reports:
            metrics.CLUSTER_SHARDS_OWNED.set(len(self.owned_shards()))
        self._changed.set()
        self._changed = trio.Event()
        self._on_change()


def _span(shards: tuple[int, ...]) -> str:
    return f"{shards[0]}-{shards[-1]}" if len(shards) > 1 else str(shards[0])
