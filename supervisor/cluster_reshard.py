"""Live resharding in cluster mode: one node leads through a Redis lease, every node takes its share.

The one-host reshard (supervisor/reshard.py) runs a new generation of shards in the shadow beside the running
one, waits until every new shard is READY with its guilds, then retires the old generation (its digests of
what it published last) and lets the new one go live with those digests. In a cluster the same steps are
spread over the nodes, and Redis holds every decision, so any node can die at any point:

- **Epochs.** Each generation's groups and leases live under their own keys: the first generation under
  ``{prefix}:cluster`` (issue 15's keys, unchanged), a later one under ``{prefix}:cluster:e<epoch>``, with
  `epoch` from a counter that only grows, so an abandoned attempt's leases never meet a later one's.
  ``{prefix}:cluster:current`` says which epoch runs and how many reshards the cluster has completed
  (`generation`); a node that starts reads it and joins that epoch.
- **The leader** holds ``{prefix}:cluster:reshard:leader`` (`SET NX PX`, renewed by every poll, TTL the
  cluster's lease TTL). Only nodes with `RESHARD=auto` may lead. The leader asks Discord for the recommended
  count every `RESHARD_CHECK_INTERVAL`, and at once when any node asks (SIGUSR1 to any node, or a shard of
  the running generation closed with 4011, writes ``{prefix}:cluster:reshard:request``). It decides as one
  host does (`reshard.decide`: the budget guard, a 4011 with nothing to move to) and writes the reshard
  (``{prefix}:cluster:reshard``: the new epoch, its plan, phase `starting`, the server time).
- **Every node** polls that state every `POLL_S` (`SWITCH_POLL_S` during a switch) and follows it:
  `starting`: it joins the new epoch as a second `ClusterNode` whose groups run in the *shadow* role
  (identify through the shared gate, publish nothing) and marks each of its new groups whose shards are all
  READY with their guilds in ``...:e<epoch>:ready``.
  `switching` (set by the leader once every new group is marked): it freezes the running epoch's node (it
  takes no more groups), retires its running groups (`Retire`; they stop publishing and report digests) and
  writes the digests and the groups retired to ``...:retired`` of the running epoch. The retired groups keep
  their leases, so no node restarts them.
  The leader cuts over once every running group has retired (or has no holder left: its node died) or after
  `RETIRE_WAIT_S`: ``current`` moves to the new epoch and the reshard key goes, in one script.
  Each node then tells its new groups to go live with the union of every node's digests, stops its old
  epoch's node (leases released) and runs the new epoch's node as its own.
- **Abandoning.** A new epoch not READY within `reshard.ready_timeout_s` is abandoned by the leader (the
  reshard key deleted); each node then retires its shadow groups (sessions closed, nothing published) and
  stops that node. The running epoch never stopped.

Crashes: a node that dies loses its leases in both epochs; the others take its groups by RESUME (shadow
sessions are stored per shard count, so the two generations never mix). The leader's death passes the lease
to another `auto` node, which continues from what Redis holds. Before the cut-over the old epoch runs; after
it, the new one: never neither.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from ratelimit.redis_client import RedisClient, Script
from ratelimit.resp import Arg, RedisError

from .cluster import epoch_base
from .cluster_plan import ClusterPlan

__all__ = [
    "POLL_S",
    "RETIRE_WAIT_S",
    "SWITCH_POLL_S",
    "Phase",
    "ReshardStore",
    "ReshardView",
    "Underway",
    "leader_step",
]

#: How often every node reads the cluster's reshard state (and the leader renews its lease), and how often
#: while a switch is underway (from the leader's switch to every node live, nobody publishes the guilds
#: of the retired groups: each poll's wait is part of the cut-over's gap).
POLL_S: Final = 0.2
SWITCH_POLL_S: Final = 0.05
#: How long the leader waits for the running groups to retire before it cuts over regardless (their
#: events of the last seconds may then come out twice; none is lost).
RETIRE_WAIT_S: Final = 20.0

Phase = Literal["starting", "switching"]


@dataclass(frozen=True, slots=True)
class Underway:
    """A reshard in progress, as the reshard key holds it."""

    epoch: int
    plan: ClusterPlan
    phase: Phase
    #: Server times (ms) of the start and of the switch (0 before it).
    started_ms: int
    switched_ms: int
    trigger: str


@dataclass(frozen=True, slots=True)
class ReshardView:
    """One poll: whether this node leads, the running epoch, the reshard underway, the server's time."""

    leader: bool
    epoch: int
    generation: int
    underway: Underway | None
    now_ms: int
    #: Shards of the running epoch closed with 4011.
    uncovered: tuple[int, ...]


_POLL_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leader = 0
if ARGV[3] == '1' then
  local holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    leader = 1
  elseif not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    leader = 1
  end
end
local current = redis.call('HMGET', KEYS[2], 'epoch', 'generation')
local underway = redis.call('HMGET', KEYS[3], 'epoch', 'plan', 'phase', 'started', 'switched', 'trigger')
local uncovered = redis.call('SMEMBERS', KEYS[4] .. (current[1] or '0'))
return {leader, current[1] or '0', current[2] or '0', underway, now, uncovered}
"""

_BEGIN_LUA: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
if (redis.call('HGET', KEYS[1], 'epoch') or '0') ~= ARGV[1] then
  return 0
end
local epoch = redis.call('INCR', KEYS[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'epoch', epoch, 'plan', ARGV[2], 'phase', 'starting', 'started', now,
  'switched', 0, 'trigger', ARGV[3])
return epoch
"""

_SWITCH_LUA: Final = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'phase', 'switching', 'switched', now)
return 1
"""

_CUT_OVER_LUA: Final = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[2] then
  return 0
end
if (redis.call('HGET', KEYS[1], 'epoch') or '0') ~= ARGV[1] then
  return 0
end
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') + 1
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'generation', generation)
redis.call('DEL', KEYS[2])
return generation
"""

_ABANDON_LUA: Final = """
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_TAKE_REQUEST_LUA: Final = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('DEL', KEYS[1])
end
return value
"""


class ReshardStore:
    """The cluster's reshard keys in Redis (see the module note); all share the `{prefix}` hash tag."""

    def __init__(self, client: RedisClient, prefix: str, node_id: str) -> None:
        self._client = client
        self._prefix = prefix
        self.node_id = node_id
        base = f"{{{prefix}}}:cluster"
        self.leader_key = f"{base}:reshard:leader"
        self.current_key = f"{base}:current"
        self.reshard_key = f"{base}:reshard"
        self.request_key = f"{base}:reshard:request"
        self.epochs_key = f"{base}:epochs"
        self._uncovered_prefix = f"{base}:uncovered:"
        self._poll = Script(_POLL_LUA)
        self._begin = Script(_BEGIN_LUA)
        self._switch = Script(_SWITCH_LUA)
        self._cut_over = Script(_CUT_OVER_LUA)
        self._abandon = Script(_ABANDON_LUA)
        self._take_request = Script(_TAKE_REQUEST_LUA)

    def ready_key(self, epoch: int) -> str:
        return f"{epoch_base(self._prefix, epoch)}:ready"

    def retired_key(self, epoch: int) -> str:
        return f"{epoch_base(self._prefix, epoch)}:retired"

    async def current(self) -> tuple[int, int]:
        """The running epoch and the number of completed reshards."""
        reply = await self._client.execute("HMGET", self.current_key, "epoch", "generation")
        assert isinstance(reply, list)
        return int(_text(reply[0]) or 0), int(_text(reply[1]) or 0)

    async def poll(self, ttl_ms: int, *, may_lead: bool) -> ReshardView:
        keys: list[Arg] = [self.leader_key, self.current_key, self.reshard_key, self._uncovered_prefix]
        reply = await self._poll(self._client, keys, [self.node_id, ttl_ms, "1" if may_lead else "0"])
        if not isinstance(reply, list) or len(reply) != 6:
            raise RedisError(f"unexpected reshard poll reply {reply!r:.80}")
        leader, epoch, generation, fields, now, uncovered = reply
        assert isinstance(fields, list) and isinstance(uncovered, list)
        return ReshardView(
            leader=leader == 1,
            epoch=int(_text(epoch)),
            generation=int(_text(generation)),
            underway=_underway([_text(value) for value in fields]),
            now_ms=int(_text(now)),
            uncovered=tuple(sorted(int(_text(shard)) for shard in uncovered)),
        )

    async def request(self, trigger: str, epoch: int = 0, uncovered: Collection[int] = ()) -> None:
        """Ask the leader to check the recommended count (`trigger`); `uncovered`: shards of the running
        `epoch` closed with 4011. One round trip."""
        commands: list[list[Arg]] = [["SET", self.request_key, trigger]]
        if uncovered:
            commands.append(["SADD", f"{self._uncovered_prefix}{epoch}", *sorted(uncovered)])
        await self._client.pipeline(commands, key=self.request_key)

    async def take_request(self) -> str | None:
        reply = await self._take_request(self._client, [self.request_key], [])
        return None if reply is None else _text(reply)

    async def begin(self, running_epoch: int, plan: ClusterPlan, trigger: str) -> int:
        """Start a reshard to `plan` from `running_epoch`; its new epoch, or 0 if one is underway or the
        running epoch moved meanwhile."""
        keys: list[Arg] = [self.current_key, self.reshard_key, self.epochs_key]
        reply = await self._begin(self._client, keys, [running_epoch, plan.to_text(), trigger])
        return int(_text(reply) or 0)

    async def switch(self, epoch: int) -> bool:
        return await self._switch(self._client, [self.reshard_key], [epoch]) == 1

    async def cut_over(self, old_epoch: int, new_epoch: int) -> int:
        """Make `new_epoch` the running one; the cluster's generation count then, or 0 if the state moved."""
        keys: list[Arg] = [self.current_key, self.reshard_key]
        reply = await self._cut_over(self._client, keys, [old_epoch, new_epoch])
        return int(_text(reply) or 0)

    async def abandon(self, epoch: int) -> bool:
        return await self._abandon(self._client, [self.reshard_key], [epoch]) == 1

    async def mark_ready(self, epoch: int, groups: Collection[int]) -> None:
        if groups:
            await self._client.execute("HSET", self.ready_key(epoch), *(x for g in groups for x in (g, 1)))

    async def ready_groups(self, epoch: int) -> frozenset[int]:
        reply = await self._client.execute("HKEYS", self.ready_key(epoch))
        assert isinstance(reply, list)
        return frozenset(int(_text(group)) for group in reply)

    async def mark_retired(self, epoch: int, groups: Collection[int], digests: bytes) -> None:
        """This node's groups of `epoch` have retired, having published the events of `digests` last."""
        fields: list[Arg] = [f"d:{self.node_id}", digests.hex()]
        for group in groups:
            fields += [f"g:{group}", 1]
        await self._client.execute("HSET", self.retired_key(epoch), *fields)

    async def retired(self, epoch: int) -> tuple[frozenset[int], list[bytes]]:
        """The groups of `epoch` retired so far, and each node's digests."""
        reply = await self._client.execute("HGETALL", self.retired_key(epoch))
        assert isinstance(reply, list)
        groups: set[int] = set()
        digests: list[bytes] = []
        for name, value in zip(reply[::2], reply[1::2], strict=True):
            field = _text(name)
            if field.startswith("g:"):
                groups.add(int(field[2:]))
            elif field.startswith("d:"):
                digests.append(bytes.fromhex(_text(value)))
        return frozenset(groups), digests

    async def forget_epoch(self, epoch: int) -> None:
        """Delete what an epoch that no longer runs left behind (its plan, nodes, fences, marks)."""
        base = epoch_base(self._prefix, epoch)
        names = ("plan", "nodes", "node:workers", "fence", "fences", "ready", "retired")
        await self._client.execute(
            "DEL", *(f"{base}:{name}" for name in names), f"{self._uncovered_prefix}{epoch}"
        )


def _underway(fields: list[str]) -> Underway | None:
    epoch, plan, phase, started, switched, trigger = fields
    if not epoch or phase not in ("starting", "switching"):
        return None
    return Underway(
        epoch=int(epoch),
        plan=ClusterPlan.from_text(plan),
        phase="switching" if phase == "switching" else "starting",
        started_ms=int(started or 0),
        switched_ms=int(switched or 0),
        trigger=trigger,
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


LeaderAction = Literal["wait", "switch", "cut_over", "abandon"]


def leader_step(
    underway: Underway,
    now_ms: int,
    *,
    ready: Collection[int],
    old_groups: int,
    retired: Collection[int],
    holders: Mapping[int, str],
    ready_timeout_s: float,
) -> LeaderAction:
    """What the leader does next with the reshard underway (pure; the module note has the steps).

    `ready`: the new epoch's groups marked READY; `old_groups`: the running epoch's group count, `retired`
    those retired, `holders` the running epoch's lease holders (a group without one has nobody to retire it).
    """
    if underway.phase == "starting":
        if len(set(ready) & set(range(underway.plan.groups))) == underway.plan.groups:
            return "switch"
        if now_ms - underway.started_ms > ready_timeout_s * 1000:
            return "abandon"
        return "wait"
    pending = [group for group in range(old_groups) if group not in retired and group in holders]
    if not pending or now_ms - underway.switched_ms > RETIRE_WAIT_S * 1000:
        return "cut_over"
    return "wait"
