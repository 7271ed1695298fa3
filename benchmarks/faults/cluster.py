"""The fault suite's cluster phase: several supervisors in cluster mode (`CLUSTER_MODE=redis`) share one bot's
shards, and whole nodes die, leave, join or lose Redis.

The system: the simulator, a redis-server of the suite's own (an outage must not hit other users of the
machine's Redis), a TCP forwarder in front of it (`benchmarks.tcp_forwarder`), the suite's deduplicating
consumer, and `ClusterSettings.nodes` cluster nodes (`benchmarks.cluster_nodes`: supervisors in process
groups of their own, `--workers 1` each, so equal weights) publishing to RabbitMQ on an exchange of the run's
own. One node at a time reaches Redis through the forwarder: the node a partition cuts off. The lease TTL is
`CLUSTER_LEASE_TTL=5s` (the default is 10 s): a failover waits for a dead node's leases to expire, and a
node watches Redis one TTL before it takes anything, so the TTL sets most of the phase's run time.

Before each fault the suite brings the cluster to the population the fault needs (3 nodes; 2 for node_join)
and waits until every shard runs exactly once, READY, and every node owns its quota of groups (nodes' own
`/healthz`); that is not measured. Then `runner.run_fault` measures the fault as it does the others (lost,
duplicates, identifies, resumes, recover_s), and `overlaps`: the simulator's `shard_overlaps`, connections
that began to serve a shard another connection still served (bound 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.children import free_port
from benchmarks.cluster_nodes import Cluster, NodeHealth, NodeProcess, open_cluster
from benchmarks.faults.injections import CONSUMER_SLACK_S, OUTAGE_BOUND_S, Fault
from benchmarks.faults.runner import FaultResult, run_fault
from benchmarks.faults.system import (
    CONSUMER_START_TIMEOUT_S,
    POLL_S,
    Restartable,
    Settings,
    read_consumed,
    redis_server,
    simulator_args,
)
from benchmarks.harness import (
    BenchmarkError,
    ChildProcess,
    Progress,
    SimulatorProcess,
    open_child,
    open_simulator_process,
    read_json_line,
    wait_sessions_ready,
)
from benchmarks.tcp_forwarder import TcpForwarder
from supervisor.cluster_plan import Node, plan_cluster, quotas

__all__ = [
    "CLUSTER_FAULTS",
    "CLUSTER_SETTINGS",
    "ClusterSettings",
    "ClusterSystem",
    "cluster_faults_for",
    "failover_s",
    "open_cluster_system",
    "run_cluster_suite",
    "wait_balanced",
]

#: The faults of this phase, in their running order.
CLUSTER_FAULTS: Final = (
    "node_kill9",
    "node_join",
    "node_sigterm",
    "node_partitioned_from_redis",
    "redis_outage_cluster",
)
#: A node's start: the interpreter, /gateway/bot, Redis, the plan; before it watches the cluster one TTL.
NODE_START_S: Final = 10.0
#: A hand-over of one group: the worker stopped (sessions flushed), the lease deleted, the taker's next sync,
#: its worker's start and the RESUME.
HANDOVER_S: Final = 10.0
#: After the lease expired: the others' next sync (TTL / 5), a worker started and the RESUME (5 s, as the
#: issue bounds a failover: TTL + 5 s).
TAKEOVER_S: Final = 5.0
#: How long the cluster may take to run every shard exactly once, READY and balanced.
SETTLE_TIMEOUT_S: Final = 120.0
#: How often healthz is read during the Redis outage (a shard on two nodes is a failure).
OUTAGE_POLL_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    #: Nodes running before each fault (node_join starts with one fewer and adds one).
    nodes: int
    lease_ttl_s: float
    #: How long the suite's Redis stays down in redis_outage_cluster.
    outage_s: float


CLUSTER_SETTINGS: Final = {
    "smoke": ClusterSettings(3, 5.0, 5.0),
    "quick": ClusterSettings(3, 5.0, 10.0),
    "full": ClusterSettings(3, 5.0, 30.0),
}


@dataclass(slots=True)
class ClusterSystem:
    """The running simulator, redis-server, forwarder, consumer and cluster nodes (see the module note)."""

    #: The suite's settings, with `outage_s` the cluster's (`ClusterSettings.outage_s`).
    settings: Settings
    cluster_settings: ClusterSettings
    sim: SimulatorProcess
    redis: Restartable
    consumer: ChildProcess
    cluster: Cluster
    forwarder: TcpForwarder
    state_path: Path
    progress: Progress
    log_dir: Path
    group: str
    #: The nodes that must be running: a fault that stops one takes it out first.
    expected: list[NodeProcess] = field(default_factory=list)
    #: What the running fault's injection hands to its finish (ledger marks, the node it stopped).
    pending: dict[str, Any] = field(default_factory=dict)
    #: What the running fault adds to its figures (`figures`) and its reasons to fail (`failures`).
    notes: dict[str, Any] = field(default_factory=dict)
    starts: int = 0

    @property
    def forwarded_url(self) -> str:
        return f"redis://127.0.0.1:{self.forwarder.port}"

    @property
    def groups(self) -> int:
        return plan_cluster(self.settings.shards).groups

    def consumed(self) -> dict[str, Any]:
        return read_consumed(self.state_path)

    def check_alive(self) -> None:
        for child in (self.sim.child, self.consumer):
            child.check_alive()
        for node in self.expected:
            if not node.running:
                raise BenchmarkError(
                    f"node {node.node_id} exited with status {node.returncode}; log {node.log_path}:\n"
                    f"{node.log_tail()}"
                )

    def forwarded(self) -> NodeProcess | None:
        """The running node whose Redis goes through the forwarder, if one does."""
        return next((node for node in self.expected if node.redis_url == self.forwarded_url), None)

    async def start_node(self) -> NodeProcess:
        """Start a node (`node-<nn>`); it reaches Redis through the forwarder if no running node does."""
        self.starts += 1
        redis_url = self.forwarded_url if self.forwarded() is None else self.cluster.redis_url
        node = await self.cluster.start(
            f"node-{self.starts:02d}", "--shards", str(self.settings.shards), redis_url=redis_url
        )
        self.expected.append(node)
        return node

    async def health(self) -> dict[str, NodeHealth | None]:
        return await self.cluster.health(self.expected)

    async def shards_of(self, node: NodeProcess) -> tuple[int, ...]:
        health = await node.health()
        if health is None or health.cluster is None:
            raise BenchmarkError(f"node {node.node_id} does not answer /healthz")
        return health.serving

    async def victim(self) -> tuple[NodeProcess, tuple[int, ...]]:
        """The node a fault stops: the one with the most shards among those not behind the forwarder (kept
        for the partition), and its shards."""
        candidates = [node for node in self.expected if node is not self.forwarded()]
        if not candidates:
            raise BenchmarkError("no node to stop but the one behind the forwarder")
        owned = {node.node_id: await self.shards_of(node) for node in candidates}
        node = max(candidates, key=lambda node: (len(owned[node.node_id]), node.node_id))
        if not owned[node.node_id]:
            raise BenchmarkError(f"no node holds a shard ({owned})")
        return node, owned[node.node_id]

    def quotas(self, nodes: Collection[NodeProcess]) -> dict[str, int]:
        """Groups each of `nodes` should own once the cluster is balanced (equal weights)."""
        return quotas([Node(node.node_id, 1) for node in nodes], self.groups)

    async def wait_balanced(self, timeout_s: float = SETTLE_TIMEOUT_S) -> dict[str, tuple[int, ...]]:
        self.check_alive()
        return await wait_balanced(self.cluster, self.expected, self.settings.shards, timeout_s)

    async def populate(self, nodes: int) -> None:
        """Bring the cluster to `nodes` running nodes (start new ones, or SIGTERM the newest ones not behind
        the forwarder), then wait until it is balanced."""
        changed = len(self.expected) != nodes
        while len(self.expected) < nodes:
            node = await self.start_node()
            self.progress.say(
                f"  started {node.node_id}{' (Redis through the forwarder)' * self._behind(node)}"
            )
        while len(self.expected) > nodes:
            node = [node for node in self.expected if node is not self.forwarded()][-1]
            self.expected.remove(node)
            status = await node.sigterm()
            self.progress.say(f"  stopped {node.node_id} (exit status {status})")
        serving = await self.wait_balanced()
        if changed:
            self.progress.say(f"  cluster: {', '.join(f'{k} {list(v)}' for k, v in serving.items())}")

    def _behind(self, node: NodeProcess) -> bool:
        return node.redis_url == self.forwarded_url


async def wait_balanced(
    cluster: Cluster, nodes: Collection[NodeProcess], shard_count: int, timeout_s: float = SETTLE_TIMEOUT_S
) -> dict[str, tuple[int, ...]]:
    """Until every shard runs exactly once and READY on `nodes` (equal weights: `--workers 1` each) and
    each owns its quota of groups, so no hand-over is pending; the shards of each node, by node id."""
    quota = quotas([Node(node.node_id, 1) for node in nodes], plan_cluster(shard_count).groups)
    last: dict[str, NodeHealth | None] = {}
    with trio.move_on_after(timeout_s):
        while True:
            serving = await cluster.wait_serving(shard_count, timeout_s=timeout_s, nodes=nodes)
            last = await cluster.health(nodes)
            owned = {
                node_id: len(health.cluster.groups) if health and health.cluster else -1
                for node_id, health in last.items()
            }
            if owned == quota:
                return serving
            await trio.sleep(POLL_S)
    report = "; ".join(f"{k}: {'no answer' if v is None else v.summary()}" for k, v in last.items())
    raise BenchmarkError(f"the cluster did not balance to {quota} within {timeout_s:g} s: {report}")


@contextlib.asynccontextmanager
async def open_cluster_system(
    settings: Settings, log_dir: Path, progress: Progress, amqp_url: str
) -> AsyncIterator[ClusterSystem]:
    """Simulator, redis-server, forwarder, consumer, then `ClusterSettings.nodes` nodes; balanced and every
    shard streaming. The nodes are SIGKILLed (whole process groups) when it exits, then the consumer stops
    (deleting the run's queues and exchange)."""
    cluster_settings = CLUSTER_SETTINGS[settings.name if settings.name in CLUSTER_SETTINGS else "full"]
    settings = dataclasses.replace(settings, outage_s=cluster_settings.outage_s)
    group = f"faults-cluster-{uuid.uuid4().hex[:12]}"
    state_path = log_dir / "cluster-consumer-state.json"
    state_path.unlink(missing_ok=True)
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    redis = redis_server(redis_port, log_dir, "cluster-redis-server")
    forwarder = TcpForwarder(free_port(), redis_port)
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator_process(simulator_args(settings), log_dir=log_dir, name="cluster-simulator")
        )
        stack.push_async_callback(redis.close)
        await redis.open()
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(forwarder.serve)
        consumer = await stack.enter_async_context(
            open_child(
                "cluster-consumer",
                [
                    *(sys.executable, "-m", "benchmarks.faults.consumer"),
                    *(amqp_url, group, str(state_path), str(settings.shards)),
                ],
                log_dir=log_dir,
                capture_stdout=True,
            )
        )
        await read_json_line(consumer, CONSUMER_START_TIMEOUT_S)
        env: dict[str, str | None] = {
            "BROKER_TYPE": "amqp",
            "BROKER_GROUP": group,
            "AMQP_URL": amqp_url,
            "LOG_LEVEL": "info",
        }
        cluster = await stack.enter_async_context(
            open_cluster(
                sim.rest_url,
                log_dir / "cluster-nodes",
                prefix=group,
                redis_url=redis_url,
                lease_ttl_s=cluster_settings.lease_ttl_s,
                env=env,
                cleanup=False,  # the redis-server is the suite's own
            )
        )
        system = ClusterSystem(
            settings,
            cluster_settings,
            sim,
            redis,
            consumer,
            cluster,
            forwarder,
            state_path,
            progress,
            log_dir,
            group,
        )
        progress.say(
            f"cluster: {cluster_settings.nodes} nodes, {settings.shards} shards, lease TTL "
            f"{cluster_settings.lease_ttl_s:g} s (exchange {group}, Redis {redis_url})"
        )
        await system.populate(cluster_settings.nodes)
        await wait_sessions_ready(sim, settings.shards, min_sent=2, within_s=60.0, watch=[consumer])
        yield system


# -- the ledger --------------------------------------------------------------------------------


def ledger_marks(ledger: dict[str, Any]) -> tuple[int, int]:
    """Where the ledger's close and resume records stand now (records are only appended)."""
    return len(ledger["closes"]), len(ledger["resumes"])


def failover_s(ledger: dict[str, Any], shards: Collection[int], marks: tuple[int, int]) -> float | None:
    """From the first connection of `shards` the client closed (or lost: a killed process's sockets) after
    `marks` to the last of those shards' first successful RESUME after it, in the simulator's clock; None
    if a shard has not resumed (or nothing was closed)."""
    wanted = set(shards)
    closes_mark, resumes_mark = marks
    closed = [
        float(record["at"])
        for record in ledger["closes"][closes_mark:]
        if record["by"] == "client" and record["shard"] in wanted
    ]
    resumed: dict[int, float] = {}
    for record in ledger["resumes"][resumes_mark:]:
        if record["ok"] and record["shard"] in wanted:
            resumed.setdefault(int(record["shard"]), float(record["at"]))
    if not closed or set(resumed) != wanted:
        return None
    return round(max(resumed.values()) - min(closed), 3)


# -- the faults --------------------------------------------------------------------------------


def _fail(system: ClusterSystem, reason: str) -> None:
    system.notes.setdefault("failures", []).append(reason)


def _figures(system: ClusterSystem, **values: Any) -> None:
    system.notes.setdefault("figures", {}).update(values)


async def kill_node(system: ClusterSystem) -> int:
    """SIGKILL a node's whole process group (the supervisor and its workers, as a host dies): its leases
    expire after the TTL and the other nodes take its groups and RESUME their sessions."""
    node, shards = await system.victim()
    system.pending.update(node=node, shards=shards, marks=ledger_marks(await system.sim.gateway_ledger()))
    system.expected.remove(node)
    await node.kill9()
    system.progress.say(f"  killed {node.node_id} (shards {list(shards)})")
    return len(shards)


async def judge_failover(system: ClusterSystem, bound_s: float, figure: str) -> None:
    """`figure` from the ledger (see `failover_s`) within `bound_s`."""
    node: NodeProcess = system.pending["node"]
    shards: tuple[int, ...] = system.pending["shards"]
    value = failover_s(await system.sim.gateway_ledger(), shards, system.pending["marks"])
    _figures(system, node=node.node_id, node_shards=list(shards), **{figure: value})
    if value is None:
        _fail(system, f"{figure}: not every shard of {node.node_id} RESUMED")
    elif value > bound_s:
        _fail(system, f"{figure} {value:.2f} s > {bound_s:g} s")


async def after_kill(system: ClusterSystem) -> None:
    """The failover from the ledger (within TTL + 5 s); then the two others balance the groups."""
    await judge_failover(system, system.cluster_settings.lease_ttl_s + TAKEOVER_S, "failover_s")
    await system.wait_balanced()


async def sigterm_node(system: ClusterSystem) -> int:
    """SIGTERM a node: it leaves the cluster, hands every group over (worker stopped with resumable closes,
    sessions flushed, lease deleted) and exits 0; the others RESUME the sessions."""
    node, shards = await system.victim()
    system.pending.update(node=node, shards=shards, marks=ledger_marks(await system.sim.gateway_ledger()))
    system.expected.remove(node)
    node.process.send_signal(signal.SIGTERM)
    system.progress.say(f"  SIGTERM to {node.node_id} (shards {list(shards)})")
    return len(shards)


async def after_sigterm(system: ClusterSystem) -> None:
    node: NodeProcess = system.pending["node"]
    status = await node.wait_exit()
    _figures(system, exit_status=status)
    if status != 0:
        _fail(system, f"{node.node_id} exited with status {status}, not 0")
    await judge_failover(system, HANDOVER_S, "handover_s")
    await system.wait_balanced()


async def join_node(system: ClusterSystem) -> int:
    """Start one more node: after watching the cluster one TTL it takes its share, each group handed over
    by its owner (worker stopped, sessions flushed) and RESUMEd by the newcomer."""
    node = await system.start_node()
    share = system.quotas(system.expected)[node.node_id]
    system.pending.update(node=node, share=share)
    system.progress.say(f"  started {node.node_id}: it should take {share} groups")
    plan = plan_cluster(system.settings.shards)
    return min(share * plan.group_size, system.settings.shards)


async def after_join(system: ClusterSystem) -> None:
    node: NodeProcess = system.pending["node"]
    serving = await system.wait_balanced()
    _figures(system, node=node.node_id, node_shards=list(serving[node.node_id]))


async def partition_node(system: ClusterSystem) -> int:
    """Cut the Redis connections of the node behind the forwarder (and refuse new ones) while the others
    still reach Redis: its leases expire, the others take its groups and RESUME the sessions (the
    simulator drops the cut-off node's connections as Discord does), and it cannot reconnect them without a
    lease."""
    node = system.forwarded()
    if node is None:
        raise BenchmarkError("no node reaches Redis through the forwarder")
    shards = await system.shards_of(node)
    if not shards:
        raise BenchmarkError(f"{node.node_id}, behind the forwarder, holds no shard")
    system.pending.update(node=node, shards=shards, lost_logged=lease_lost_logged(node))
    system.forwarder.cut()
    system.progress.say(f"  cut {node.node_id} off from Redis (shards {list(shards)})")
    return len(shards)


async def after_partition(system: ClusterSystem) -> None:
    """Heal the partition: the node sees its groups are the others', stops those workers, and gets its
    share back by hand-over."""
    node: NodeProcess = system.pending["node"]
    system.forwarder.restore()
    serving = await system.wait_balanced()
    _figures(
        system,
        node=node.node_id,
        node_shards=list(system.pending["shards"]),
        leases_lost_logged=lease_lost_logged(node) - int(system.pending["lost_logged"]),
        node_shards_after=list(serving.get(node.node_id, ())),
    )


def lease_lost_logged(node: NodeProcess) -> int:
    """How often the node logged that a group it held is another node's (`cluster.lease_lost`)."""
    return node.log_text().count('"cluster.lease_lost"')


async def redis_outage_cluster(system: ClusterSystem) -> int:
    """Stop the suite's redis-server for `outage_s` and start it again, empty: no node stops anything, so no
    shard disconnects (leases lapse only locally: a shard that dropped could not reconnect); once Redis is
    back the owners re-assert their leases before anyone may take one, so no group changes hands. Healthz
    is read all along: a shard on two nodes fails the fault."""
    before = await system.health()
    system.pending["owned"] = {k: v.serving for k, v in before.items() if v is not None}
    twice = 0
    await system.redis.close()
    try:
        with trio.move_on_after(system.settings.outage_s):
            while True:
                twice = max(twice, shards_on_two_nodes(await system.health()))
                await trio.sleep(OUTAGE_POLL_S)
    finally:
        await system.redis.open()
    _figures(system, outage_s=system.settings.outage_s, healthz_shards_on_two_nodes=twice)
    if twice:
        _fail(system, f"{twice} shards on two nodes at once (healthz) during the outage")
    return 0


async def after_redis_outage(system: ClusterSystem) -> None:
    """Every node reaches Redis again and runs what it ran before; no shard moved."""
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while True:
            health = await system.health()
            if all(
                h is not None and h.cluster is not None and h.cluster.redis == "connected"
                for h in health.values()
            ):
                break
            await trio.sleep(POLL_S)
    await system.wait_balanced()
    after = {k: v.serving for k, v in (await system.health()).items() if v is not None}
    moved = sorted(
        shard
        for node_id, shards in system.pending["owned"].items()
        for shard in shards
        if shard not in after.get(node_id, ())
    )
    _figures(system, shards_moved=moved)
    if moved:
        _fail(system, f"shards {moved} changed node across the outage")


def shards_on_two_nodes(health: dict[str, NodeHealth | None]) -> int:
    seen: dict[int, int] = {}
    for node in health.values():
        for shard in node.serving if node is not None else ():
            seen[shard] = seen.get(shard, 0) + 1
    return sum(1 for count in seen.values() if count > 1)


def cluster_faults_for(settings: Settings) -> list[Fault[ClusterSystem]]:
    """Every cluster fault with its bound for `settings` (its shard count and the cluster's TTL)."""
    cluster = CLUSTER_SETTINGS[settings.name if settings.name in CLUSTER_SETTINGS else "full"]
    ttl = cluster.lease_ttl_s
    groups = plan_cluster(settings.shards).groups
    # node_join: the newcomer's share, released by the others one group each at a time.
    joiners = [Node(f"node-{n}", 1) for n in range(cluster.nodes)]
    share = quotas(joiners, groups)[joiners[-1].node_id]
    join_bound = NODE_START_S + ttl + HANDOVER_S * math.ceil(share / (cluster.nodes - 1)) + CONSUMER_SLACK_S
    faults: list[Fault[ClusterSystem]] = [
        Fault(
            "node_kill9",
            kill_node,
            True,
            ttl + TAKEOVER_S + CONSUMER_SLACK_S,
            "cluster",
            finish=after_kill,
        ),
        Fault("node_join", join_node, True, join_bound, "cluster", finish=after_join),
        Fault(
            "node_sigterm", sigterm_node, True, HANDOVER_S + CONSUMER_SLACK_S, "cluster", finish=after_sigterm
        ),
        Fault(
            "node_partitioned_from_redis",
            partition_node,
            True,
            ttl + TAKEOVER_S + CONSUMER_SLACK_S,
            "cluster",
            finish=after_partition,
        ),
        Fault(
            "redis_outage_cluster",
            redis_outage_cluster,
            True,
            OUTAGE_BOUND_S,
            "cluster F12",
            after_outage=True,
            finish=after_redis_outage,
        ),
    ]
    return faults


def nodes_before(fault: Fault[ClusterSystem], cluster: ClusterSettings) -> int:
    """node_join starts one node short; every other fault with the full population."""
    return cluster.nodes - 1 if fault.name == "node_join" else cluster.nodes


async def run_cluster_suite(
    settings: Settings,
    faults: list[Fault[ClusterSystem]],
    log_dir: Path,
    progress: Progress,
    amqp_url: str,
) -> tuple[list[FaultResult], dict[str, str]]:
    """The cluster phase: one cluster system, each fault after the population it needs; stops at the first
    fault that errors (the system may be in any state after it)."""
    results: list[FaultResult] = []
    errors: dict[str, str] = {}
    try:
        async with open_cluster_system(settings, log_dir, progress, amqp_url) as system:
            for fault in faults:
                try:
                    await system.populate(nodes_before(fault, system.cluster_settings))
                    system.pending.clear()
                    results.append(await run_fault(system, fault))
                except (BenchmarkError, OSError, httpx.HTTPError) as exc:
                    errors[fault.name] = f"{exc.__class__.__name__}: {exc}"
                    progress.say(f"  {fault.name}: ERROR {str(exc).splitlines()[0] if str(exc) else exc!r}")
                    break
    except (BenchmarkError, OSError, httpx.HTTPError) as exc:
        # The system did not start: every fault not run is an error.
        for fault in faults:
            if fault.name not in errors and all(r.name != fault.name for r in results):
                errors[fault.name] = f"{exc.__class__.__name__}: {exc}"
        progress.say(f"  cluster system: ERROR {str(exc).splitlines()[0] if str(exc) else exc!r}")
    return results, errors
