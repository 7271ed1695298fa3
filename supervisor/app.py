"""The supervisor's run loop: plan, spawn a worker per core, coordinate IDENTIFY, restart, drain.

Lifetimes, outermost first: the metrics and health
endpoint, one `WorkerSlot` per shard range, the signal loop. Signals (gunicorn's table, written in trio):
- SIGTERM / SIGINT: drain. Workers get SIGTERM, close their shards with a resumable code, flush committed
  seqs and sessions; after `shutdown_timeout_s` whatever is left is killed. A second SIGINT kills at once.
- SIGHUP: rolling restart, one worker at a time; the next waits until the new one has RESUMEd its shards
  (0 identifies: the sessions stay with the supervisor or in Redis).
- SIGUSR1 (`RESHARD=auto`): ask Discord for the recommended shard count now and reshard live if it changed
  (supervisor/reshard.py); also every `RESHARD_CHECK_INTERVAL` and when a shard is closed with 4011.
Exit status: 0 clean stop, 3 a worker met a fatal close code (or the token was refused), 1 a crash loop or
any other failure (2, bad configuration, is decided before this module runs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import trio

from workers import logs
from workers.config import ShardAssignment, WorkerConfig
from workers.control_messages import DIGEST_BYTES, GoLive, Retire, Uncovered
from workers.dependencies import Dependency
from workers.exit_status import ExitStatus
from workers.gateway_bot import GatewayBot, GatewayBotError, fetch_gateway_bot
from workers.identify import (
    IDENTIFY_INTERVAL_S,
    IDENTIFY_MARGIN_S,
    BudgetedIdentifyGate,
    InMemoryIdentifyGate,
)
from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.settings import KNOWN_VARIABLES, Settings

from .cluster import SYNCS_PER_TTL, ClusterNode
from .cluster_plan import ClusterPlan
from .dependencies import needed_dependencies, wait_for_dependencies
from .errors import SupervisorError
from .metrics import HealthState, mark_worker_dead, prepare_multiprocess_dir, serve_metrics
from .planning import MS_PER_S, ShardRange, check_session_budget, plan_workers
from .processes import SessionBook, WorkerSlot
from .progress import StartProgress
from .reshard import ReshardDecision, ReshardState, Trigger, decide, merge_digests, ready_timeout_s
from .restart import HEALTHY_UPTIME_S, RestartPolicy
from .sdnotify import SystemdNotifier, child_environment
from .shard_status import ShardBoard, publish_build_info
from .stdin_commands import route_stdin_commands

if TYPE_CHECKING:
    from ratelimit.redis_client import RedisClient

    from .cluster import ClusterStore
    from .cluster_reshard import ReshardStore, ReshardView

LOGGER: Final = logging.getLogger("supervisor")
STATUS_PERIOD_S: Final = 2.0
ROLLING_READY_TIMEOUT_S: Final = 120.0
#: How long a retiring worker (live resharding) may take to report its digests; its exit then gets
#: `shutdown_timeout_s` more before it is killed.
RETIRE_REPORT_TIMEOUT_S: Final = 20.0
#: How often a reshard's new generation is checked for workers to tell of the uncovered shards.
UNCOVERED_POLL_S: Final = 0.2
#: The daily budget is fetched again this long after Discord's reset, at least every BUDGET_REFRESH_S, and
#: BUDGET_RETRY_S after a failed fetch; shards waiting on it are reported every BUDGET_WATCH_S.
BUDGET_RESET_MARGIN_S: Final = 1.0
BUDGET_REFRESH_S: Final = 900.0
BUDGET_RETRY_S: Final = 60.0
BUDGET_WATCH_S: Final = 1.0
#: How often the start's progress is looked at (the lines themselves are paced by `StartProgress`).
PROGRESS_POLL_S: Final = 0.5
#: While it waits for RabbitMQ or Redis, the supervisor asks systemd for this much more start time, every
#: half of it, so a slow broker after a reboot does not fail the unit's start (TimeoutStartSec).
START_EXTEND_S: Final = 60.0
#: Cluster mode: a group's worker slot index is `epoch * _GROUP_INDEX_STRIDE + group` (groups are < 32).
_GROUP_INDEX_STRIDE: Final = 1000
#: After a cluster cut-over, the retired epoch's keys are deleted this much later (every node has read its
#: digests by then: they poll every `cluster_reshard.POLL_S`).
FORGET_EPOCH_AFTER_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class _ClusterEnv:
    """What the groups' workers of every epoch are started with, in cluster mode."""

    client: RedisClient
    node_id: str
    workers: int
    info: GatewayBot
    gate: BudgetedIdentifyGate
    worker_env: dict[str, str]


@dataclass(eq=False)
class _Generation:
    """Cluster mode: this node in one epoch (`cluster_reshard`): its `ClusterNode` and the worker slots of
    the groups it holds; the node's `GroupRunner`."""

    supervisor: Supervisor
    epoch: int
    plan: ClusterPlan
    role: Literal["live", "shadow"]
    groups: dict[int, WorkerSlot] = field(default_factory=dict)
    node: ClusterNode | None = None
    #: Cancel the node's syncs, and a shadow epoch's keeping of the uncovered shards, when this node
    #: leaves the epoch (`close`).
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    side: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: A shadow epoch: the groups already marked READY in Redis.
    marked: set[int] = field(default_factory=set)
    #: A retiring epoch: the groups retired and their digests, and whether Redis has them.
    report: tuple[list[int], bytes] | None = None
    reported: bool = False

    async def start_group(self, group: int, shard_ids: tuple[int, ...]) -> None:
        await self.supervisor.start_group(self, group, shard_ids)

    async def stop_group(self, group: int) -> None:
        await self.supervisor.stop_group(self, group)

    def group_ready(self, group: int) -> bool:
        slot = self.groups.get(group)
        return slot is not None and slot.ready_shards() == len(slot.shard_ids)

    def close(self) -> None:
        """This node leaves the epoch: it takes and gives no group, its syncs stop."""
        if self.node is not None:
            self.node.frozen = True
        self.scope.cancel()
        self.side.cancel()


class Supervisor:
    def __init__(self, settings: Settings, environ: dict[str, str]) -> None:
        self.settings = settings
        self.environ = environ
        self.slots: list[WorkerSlot] = []
        self.notifier = SystemdNotifier.from_environ(environ)
        self.policy = RestartPolicy(crash_limit=settings.restart_max, window_s=settings.restart_window_s)
        self.status = ExitStatus.OK
        self.shard_total = 0
        #: The running generation's shard count (the `shard_count` of every worker in `slots`).
        self.shard_count = 0
        #: A live reshard's new generation while it identifies in the shadow (not in `slots` yet).
        self._next: list[WorkerSlot] = []
        self.reshard_state = ReshardState.IDLE
        #: Live reshards completed by this supervisor.
        self.generation = 0
        self._reshard_send, self._reshard_requests = trio.open_memory_channel[Trigger](math.inf)
        #: Shards of the running generation closed with 4011: nobody publishes their guilds' events.
        self._uncovered: set[int] = set()
        #: What a new generation's workers are started with: the gate, the session book, the environment.
        self._serving: tuple[BudgetedIdentifyGate, SessionBook | None, dict[str, str]] | None = None
        self._stop = trio.Event()
        self._crash_loop = False
        self._rolling = False
        self._nursery: trio.Nursery | None = None
        self.board = ShardBoard(self.slots)
        #: The dependency the supervisor is waiting for before it spawns workers (None: not waiting).
        self._waiting_for: Dependency | None = None
        self._progress: StartProgress | None = None
        #: Cluster mode: this supervisor as a node of the cluster (None with CLUSTER_MODE=off).
        self._cluster: ClusterNode | None = None
        #: Cluster mode: what each group's worker is started with (Redis, node, /gateway/bot, gate, env).
        self._cluster_env: _ClusterEnv | None = None
        #: Cluster mode: the running epoch (its node and this node's groups), and a reshard's new one.
        self._gen: _Generation | None = None
        self._shadow: _Generation | None = None

    # -- health ----------------------------------------------------------------------------------------------

    def ready_shards(self) -> int:
        return sum(slot.ready_shards() for slot in self.slots)

    def running_shards(self) -> int:
        """The shards this supervisor runs: its plan's, or in cluster mode those whose lease it holds."""
        node = self._cluster
        return len(node.owned_shards()) if node is not None else self.shard_total

    def health(self) -> HealthState:
        node = self._cluster
        total = self.running_shards()
        # A node may own no group (more nodes than groups): it is ready once it has watched the cluster.
        has_shards = node.settled.is_set() if node is not None else total > 0
        detail: dict[str, Any] = {
            "waiting_for": self._waiting_for,
            "shards": total,
            "ready_shards": self.ready_shards(),
            "workers": [slot.statistics() for slot in self.slots],
        }
        if self.settings.reshard == "auto" or self._gen is not None:
            detail["reshard"] = {
                "state": self.reshard_state.name.lower(),
                "generation": self.generation,
                "shards": self.shard_count,
                "next_shards": self._next[0].shard_count if self._next else None,
                "next_ready": sum(slot.ready_shards() for slot in self._next),
                "next_workers": [slot.statistics() for slot in self._next],
                "uncovered": sorted(self._uncovered),
            }
            if self._gen is not None:
                detail["reshard"]["epoch"] = self._gen.epoch
                detail["reshard"]["next_epoch"] = self._shadow.epoch if self._shadow is not None else None
        if node is not None:
            stats = node.statistics()
            detail["cluster"] = {
                "node": stats.node,
                "nodes": stats.nodes,
                "redis": "connected" if stats.connected else "unreachable",
                "groups": list(stats.groups),
                "shards": list(stats.shards),
            }
        return HealthState(
            live=not self._crash_loop,
            ready=self._waiting_for is None and has_shards and self.ready_shards() == total,
            detail=detail,
        )

    # -- worker exits ----------------------------------------------------------------------------------------

    def _on_worker_exit(self, slot: WorkerSlot, returncode: int | None) -> float | None:
        if slot.pid is not None:
            mark_worker_dead(slot.pid)
        if self._stop.is_set():
            return None
        from workers import metric_defs as metrics

        if returncode == 0:
            metrics.WORKER_RESTARTS.labels(cause="rolling_restart" if self._rolling else "clean_exit").inc()
            return 0.0  # asked to stop (a rolling restart): replace it at once, not a crash
        if returncode == ExitStatus.FATAL:
            LOGGER.error("supervisor.fatal_close_code", extra={"worker": slot.index})
            self.status = ExitStatus.FATAL
            self._stop.set()
            return None
        now = trio.current_time()
        if now - slot.started_at >= HEALTHY_UPTIME_S:
            self.policy.on_healthy(slot.index, now)
        decision = self.policy.on_exit(slot.index, now, clean=returncode == 0)
        if decision.give_up:
            LOGGER.error("supervisor.crash_loop", extra={"worker": slot.index, "code": returncode})
            self._crash_loop = True
            self.status = ExitStatus.ERROR
            self._stop.set()
            return None
        metrics.WORKER_RESTARTS.labels(cause="unresponsive" if slot.unresponsive else "crash").inc()
        LOGGER.warning(
            "worker.restarting",
            extra={"worker": slot.index, "code": returncode, "delay_s": round(decision.delay_s, 3)},
        )
        return decision.delay_s

    # -- run -------------------------------------------------------------------------------------------------

    async def run(self) -> int:
        # First: prometheus_client must see this directory before anything imports it (metric_defs).
        named_dir = self.environ.get(MULTIPROC_DIR_ENV) or None
        metrics_dir = prepare_multiprocess_dir(named_dir)
        try:
            return await self._run(metrics_dir)
        finally:
            if named_dir is None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    async def _run(self, metrics_dir: Path) -> int:
        settings = self.settings
        logs.SECRETS.add(settings.token)
        if settings.proxy_http_secret:
            logs.SECRETS.add(settings.proxy_http_secret)
        logs.SECRETS.add_url(settings.amqp_url)
        logs.SECRETS.add_url(settings.redis_url)
        try:
            info = await fetch_gateway_bot(settings.api_url, settings.token)
        except GatewayBotError as exc:
            raise SupervisorError(str(exc), ExitStatus.FATAL if exc.refused else ExitStatus.ERROR) from exc
        cluster = settings.cluster_mode == "redis"
        shard_count = settings.shards or info.shards
        shard_ids = settings.shard_ids or tuple(range(shard_count))
        if max(shard_ids) >= shard_count:
            raise SupervisorError(f"shard ids go up to {max(shard_ids)} but there are {shard_count} shards")
        plan: list[ShardRange] = []
        if not cluster:  # in cluster mode the plan is the cluster's, read from Redis once it is reachable
            self.shard_total = len(shard_ids)
            plan = plan_workers(shard_ids, settings.workers, len(os.sched_getaffinity(0)) or 1)
            LOGGER.info(
                "supervisor.plan",
                extra={
                    "shards": shard_count,
                    "running": len(shard_ids),
                    "workers": len(plan),
                    "max_concurrency": info.max_concurrency,
                },
            )
            self._progress = StartProgress(len(shard_ids), info.max_concurrency)
        book = SessionBook() if settings.shard_store_type == "memory" else None
        # The metrics and health endpoint and the systemd watchdog run from here on, so /readyz answers (not
        # ready, and why) while the supervisor waits for RabbitMQ or Redis.
        refused: SupervisorError | None = None
        async with trio.open_nursery() as outer:
            if settings.prometheus_address:
                await outer.start(
                    functools.partial(serve_metrics, directory=metrics_dir, shards=self.board.rows),
                    settings.prometheus_address,
                    settings.prometheus_endpoint,
                    self.health,
                )
            outer.start_soon(self._watchdog)
            try:
                if await self._wait_for_dependencies():
                    async with (
                        self._own_ratelimit_segment(),
                        self._open_gate(info.max_concurrency) as gate,
                    ):
                        if cluster:
                            await self._serve_cluster(gate, info, shard_count, metrics_dir)
                        else:
                            await self._spend_budget_check(gate, info, shard_ids, shard_count)
                            async with trio.open_nursery() as nursery:
                                await self._serve(nursery, gate, info, plan, shard_count, book, metrics_dir)
            except* SupervisorError as group:
                # Raised below, outside the nursery, bare: the refusals of cluster mode (and of the budget
                # check) come through the Redis identify gate's nursery, inside an ExceptionGroup.
                refused = _first_leaf(group)
            outer.cancel_scope.cancel()
        if refused is not None:
            raise refused
        return self.status

    async def _wait_for_dependencies(self) -> bool:
        """Wait until RabbitMQ and Redis (those the settings use) answer, before anything connects to them
        (why here: `workers.dependencies`). False when SIGTERM or SIGINT came first: then the supervisor
        stops, cleanly, having started nothing."""
        needed = needed_dependencies(self.settings)
        if not needed:
            return True

        def on_wait(dependency: Dependency | None) -> None:
            self._waiting_for = dependency
            if dependency is not None:
                self.notifier.status(f"waiting for {dependency} at {logs.redact_url(needed[dependency])}")

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        LOGGER.info("supervisor.stopping", extra={"signal": signal.Signals(signum).name})
                        self._stop.set()
                        nursery.cancel_scope.cancel()

                async def extend_start() -> None:
                    while True:
                        self.notifier.extend_timeout(START_EXTEND_S)
                        await trio.sleep(START_EXTEND_S / 2)

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(extend_start)
                await wait_for_dependencies(needed, on_wait)
                nursery.cancel_scope.cancel()
        return not self._stop.is_set()

    async def _spend_budget_check(
        self, gate: BudgetedIdentifyGate, info: GatewayBot, shard_ids: tuple[int, ...], shard_count: int
    ) -> None:
        """Refuse a start whose IDENTIFYs would eat into `SESSION_START_RESERVE` (F13); shards with a session
        in the Redis store will RESUME and spend nothing. Then hand the budget to the gate, which never
        grants an IDENTIFY the budget does not cover (exceeding it resets the token)."""
        settings = self.settings
        resuming: frozenset[int] = frozenset()
        if settings.shard_store_type == "redis":
            from workers.sessions import stored_session_shards

            resuming = await stored_session_shards(
                settings.redis_url, settings.shard_store_prefix, shard_ids, shard_count
            )
        identifying = len(shard_ids) - len(resuming)
        budget = check_session_budget(
            identifying, info.remaining, info.total, info.reset_after_ms, settings.identify_reserve
        )
        if not budget.ok:
            raise SupervisorError(budget.message)
        LOGGER.info(
            "supervisor.session_budget",
            extra={"identifying": identifying, "resuming": len(resuming), "remaining": info.remaining},
        )
        await gate.set_budget(info.remaining, info.reset_after_ms / MS_PER_S)

    async def _refresh_budget(self, gate: BudgetedIdentifyGate, reset_after_s: float) -> None:
        """Ask Discord for the budget again when it resets (and at least every BUDGET_REFRESH_S), so the gate
        keeps limiting with today's figure instead of none."""
        while True:
            await trio.sleep(min(reset_after_s + BUDGET_RESET_MARGIN_S, BUDGET_REFRESH_S))
            try:
                info = await fetch_gateway_bot(self.settings.api_url, self.settings.token)
            except GatewayBotError as exc:
                LOGGER.warning("supervisor.budget_refresh_failed", extra={"error": str(exc)})
                reset_after_s = BUDGET_RETRY_S
                continue
            reset_after_s = info.reset_after_ms / MS_PER_S
            await gate.set_budget(info.remaining, reset_after_s)

    async def _watch_budget(self, gate: BudgetedIdentifyGate) -> None:
        """Alert (an error log line, once per exhaustion) while shards wait for an IDENTIFY the daily budget
        does not cover, instead of spending it (F13); and keep the budget gauges current."""
        from workers import metric_defs as metrics

        alerted = False
        while True:
            stats = gate.statistics()
            left = stats.budget_remaining
            metrics.IDENTIFY_BUDGET_REMAINING.set(math.nan if left is None else left)
            metrics.IDENTIFY_WAITING.set(stats.waiting)
            exhausted = stats.waiting > 0 and left is not None and left <= 0
            if exhausted and not alerted:
                resets_at = stats.budget_resets_at
                LOGGER.error(
                    "supervisor.identify_budget_exhausted",
                    extra={
                        "waiting": stats.waiting,
                        "resets_in_s": None if resets_at is None else round(resets_at - trio.current_time()),
                    },
                )
            alerted = exhausted
            await trio.sleep(BUDGET_WATCH_S)

    async def _serve(
        self,
        nursery: trio.Nursery,
        gate: BudgetedIdentifyGate,
        info: GatewayBot,
        plan: list[ShardRange],
        shard_count: int,
        book: SessionBook | None,
        metrics_dir: Path,
    ) -> None:
        self._nursery = nursery
        self._serving = (gate, book, self._worker_environment(metrics_dir))
        self.shard_count = shard_count
        self.slots.extend(await self._start_generation(nursery, info, plan, shard_count, "live"))
        await self._supervise(nursery, gate, info, shard_count)

    async def _start_generation(
        self,
        nursery: trio.Nursery,
        info: GatewayBot,
        plan: list[ShardRange],
        shard_count: int,
        role: Literal["live", "shadow"],
    ) -> list[WorkerSlot]:
        """Start one worker slot per range of `plan` (a start, or a live reshard's new generation)."""
        assert self._serving is not None
        gate, book, worker_env = self._serving
        first_index = max((slot.index + 1 for slot in self.slots), default=0)
        slots: list[WorkerSlot] = []
        for worker_range in plan:
            ids = worker_range.shard_ids
            assignment = ShardAssignment(
                ids,
                shard_count,
                gateway_url=info.url,
                max_concurrency=info.max_concurrency,
                # While Redis is away each worker paces its own share of the global limit (R10).
                ratelimit_fallback_share=len(plan),
                role=role,
                reshard=self.settings.reshard == "auto",
            )
            slot = WorkerSlot(
                first_index + worker_range.worker_index,
                ids,
                config=WorkerConfig(self.settings, assignment),
                environment=worker_env.copy,
                gate=gate,
                book=book,
                on_exit=self._on_worker_exit,
                on_sharding_required=self._on_sharding_required,
            )
            slots.append(slot)
            await nursery.start(slot.run)
        return slots

    async def _supervise(
        self, nursery: trio.Nursery, gate: BudgetedIdentifyGate, info: GatewayBot, shard_count: int
    ) -> None:
        """Beside the workers (a plan's slots, or a cluster node's): the daily budget's refresh and watch,
        stdin commands, status and progress; then the signal loop until the supervisor stops."""
        nursery.start_soon(self._refresh_budget, gate, info.reset_after_ms / MS_PER_S)
        nursery.start_soon(self._watch_budget, gate)
        if self.settings.broker_type == "stdio":
            nursery.start_soon(route_stdin_commands, self.slots, lambda: self.shard_count)
        if self.settings.reshard == "auto" and self._cluster is None:  # a cluster's: _cluster_reshard_loop
            nursery.start_soon(self._reshard_loop, nursery)
        nursery.start_soon(self._report_status)
        nursery.start_soon(self._report_progress)  # returns at once without a plan's progress (cluster mode)
        await self._control_loop(nursery)

    def _worker_environment(self, metrics_dir: Path) -> dict[str, str]:
        """The workers' settings, token included, travel over their control channels: their environment is
        the supervisor's without any setting, so no secret is readable in a worker's /proc/PID/environ."""
        worker_env = {
            name: value
            for name, value in child_environment(self.environ).items()
            if name not in KNOWN_VARIABLES
        }
        worker_env[MULTIPROC_DIR_ENV] = str(metrics_dir)
        return worker_env

    # -- cluster mode ----------------------------------------------------------------------------------------

    async def _serve_cluster(
        self, gate: BudgetedIdentifyGate, info: GatewayBot, shard_count: int, metrics_dir: Path
    ) -> None:
        """Join the cluster (its running epoch's plan, from Redis), then run the groups this node holds, and
        follow (and, with RESHARD=auto, maybe lead) the cluster's live reshards, until stopped."""
        from ratelimit.redis_client import open_redis_client
        from ratelimit.resp import RedisError

        from .cluster import ClusterStore
        from .cluster_plan import plan_cluster
        from .cluster_reshard import ReshardStore

        settings = self.settings
        node_id = settings.cluster_node_id or f"{socket.gethostname()}-{os.getpid()}"
        workers = settings.workers or len(os.sched_getaffinity(0)) or 1
        async with open_redis_client(settings.redis_url, max_connections=3) as client:
            reshards = ReshardStore(client, settings.shard_store_prefix, node_id)
            try:
                epoch, self.generation = await reshards.current()
                store = ClusterStore(client, settings.shard_store_prefix, node_id, epoch)
                stored = await store.stored_plan()
                if (
                    stored is not None
                    and settings.shards is not None
                    and stored.shard_count != settings.shards
                ):
                    raise SupervisorError(
                        f"--shards (DISCORD_SHARD_COUNT): the cluster under prefix "
                        f"{settings.shard_store_prefix!r} runs {stored.shard_count} shards, this node was "
                        f"given {settings.shards} (leave it auto, or use another SHARD_STORE_PREFIX)",
                        ExitStatus.CONFIG,
                    )
                plan = stored or await store.join(plan_cluster(shard_count))
            except (RedisError, ValueError) as exc:
                raise SupervisorError(f"cluster plan in Redis: {exc}") from exc
            LOGGER.info(
                "cluster.joined",
                extra={
                    "node": node_id,
                    "shards": plan.shard_count,
                    "groups": plan.groups,
                    "workers": workers,
                    "lease_ttl_s": settings.cluster_lease_ttl_s,
                    "epoch": epoch,
                },
            )
            await self._spend_budget_check(gate, info, tuple(range(plan.shard_count)), plan.shard_count)
            self.shard_count = plan.shard_count
            self._cluster_env = _ClusterEnv(
                client, node_id, workers, info, gate, self._worker_environment(metrics_dir)
            )
            self.board.node = node_id
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                generation = await self._open_generation(epoch, plan, "live", store)
                self._gen = generation
                self._cluster = generation.node
                nursery.start_soon(self._cluster_reshard_loop, reshards)
                await self._supervise(nursery, gate, info, plan.shard_count)

    async def _open_generation(
        self,
        epoch: int,
        plan: ClusterPlan,
        role: Literal["live", "shadow"],
        store: ClusterStore | None = None,
    ) -> _Generation:
        """This node in one epoch of the cluster: its `ClusterNode`, running in the supervisor's nursery."""
        from .cluster import ClusterNode, ClusterStore

        assert self._nursery is not None and self._cluster_env is not None
        env = self._cluster_env
        if store is None:
            store = ClusterStore(env.client, self.settings.shard_store_prefix, env.node_id, epoch)
        generation = _Generation(self, epoch, plan, role)
        ttl_s = self.settings.cluster_lease_ttl_s
        node = ClusterNode(
            store,
            plan,
            workers=env.workers,
            ttl_s=ttl_s,
            runner=generation,
            # A new epoch has no owners to re-assert: one sync period lets every node register first.
            observe_s=None if role == "live" else ttl_s / SYNCS_PER_TTL,
        )
        node.reports = role == "live"
        generation.node = node

        async def run_node(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with generation.scope:
                await node.run(task_status=task_status)

        await self._nursery.start(run_node)
        return generation

    async def start_group(self, generation: _Generation, group: int, shard_ids: tuple[int, ...]) -> None:
        """Run a worker for a group whose lease this node has just taken in `generation`'s epoch."""
        assert self._nursery is not None and self._cluster_env is not None and generation.node is not None
        env = self._cluster_env
        assignment = ShardAssignment(
            shard_ids,
            generation.plan.shard_count,
            gateway_url=env.info.url,
            max_concurrency=env.info.max_concurrency,
            ratelimit_fallback_share=max(1, len(generation.groups) + 1),
            leased=True,
            role=generation.role,
            reshard=self.settings.reshard == "auto",
        )
        slot = WorkerSlot(
            _GROUP_INDEX_STRIDE * generation.epoch + group,
            shard_ids,
            config=WorkerConfig(self.settings, assignment),
            environment=env.worker_env.copy,
            gate=env.gate,
            book=None,
            on_exit=self._on_worker_exit,
            lease=generation.node.wait_lease,
            on_sharding_required=self._on_sharding_required,
        )
        generation.groups[group] = slot
        (self.slots if generation.role == "live" else self._next).append(slot)
        await self._nursery.start(slot.run)

    async def stop_group(self, generation: _Generation, group: int) -> None:
        """Stop a group's worker gracefully (resumable closes, sessions flushed) and wait for its exit; killed
        after SHUTDOWN_TIMEOUT."""
        slot = generation.groups.pop(group, None)
        if slot is None:
            return
        await slot.stop(signal.SIGTERM)
        await self._wait_exit(slot, "cluster.worker_killed", group=group)
        for slots in (self.slots, self._next):
            if slot in slots:
                slots.remove(slot)

    # -- live resharding in cluster mode (supervisor/cluster_reshard.py) -------------------------------------

    async def _cluster_reshard_loop(self, reshards: ReshardStore) -> None:
        """Every POLL_S: pass this node's reshard requests on to the leader, follow the cluster's reshard, and
        lead it while this node holds the leader lease (RESHARD=auto only)."""
        from ratelimit.resp import RedisError

        from .cluster_reshard import POLL_S, SWITCH_POLL_S

        settings = self.settings
        ttl_ms = math.ceil(settings.cluster_lease_ttl_s * 1000)
        pending: Trigger | None = None
        leading = False
        next_check = math.inf
        failing = False
        period = POLL_S
        while True:
            await trio.sleep(period)
            while True:
                try:
                    pending = self._reshard_requests.receive_nowait()
                except trio.WouldBlock:
                    break
            try:
                if pending is not None:
                    assert self._gen is not None
                    await reshards.request(pending, self._gen.epoch, self._uncovered)
                    pending = None
                view = await reshards.poll(ttl_ms, may_lead=settings.reshard == "auto")
                # The switch's steps follow each other at once: no event is published between them.
                switching = view.underway is not None and view.underway.phase == "switching"
                period = SWITCH_POLL_S if switching else POLL_S
                await self._follow_reshard(view, reshards)
                if view.leader and not leading:
                    LOGGER.info("reshard.leading", extra={"node": reshards.node_id})
                    next_check = trio.current_time() + settings.reshard_check_interval_s
                leading = view.leader
                if leading:
                    next_check = await self._lead_reshard(view, reshards, next_check)
                failing = False
            except (RedisError, OSError, trio.TooSlowError, ValueError) as exc:
                # ValueError: a reshard state in Redis this node cannot read (a plan written by hand).
                if not failing:
                    LOGGER.warning("reshard.redis_failed", extra={"error": str(exc) or type(exc).__name__})
                failing = True

    async def _follow_reshard(self, view: ReshardView, reshards: ReshardStore) -> None:
        """This node's part of the cluster's reshard: join the new epoch in the shadow, mark its groups READY,
        retire the running groups at the switch, go live at the cut-over; drop the shadow if abandoned."""
        from workers import metric_defs as metrics

        running = self._gen
        assert running is not None and running.node is not None
        metrics.RESHARD_GENERATION.set(view.generation)
        self.generation = view.generation
        if view.epoch != running.epoch:
            await self._cluster_go_live(view, reshards)
            return
        self._uncovered |= set(view.uncovered)  # and those of this node's not reported yet
        underway = view.underway
        shadow = self._shadow
        if shadow is not None and (underway is None or underway.epoch != shadow.epoch):
            await self._drop_shadow(shadow)
            shadow = None
        if underway is None:
            self._set_reshard_state(ReshardState.IDLE)
            return
        if shadow is None:
            LOGGER.info(
                "reshard.joining",
                extra={
                    "epoch": underway.epoch,
                    "shards": underway.plan.shard_count,
                    "groups": underway.plan.groups,
                },
            )
            self._set_reshard_state(ReshardState.STARTING)
            metrics.RESHARD_SHARDS.labels(generation="next").set(underway.plan.shard_count)
            shadow = self._shadow = await self._open_generation(underway.epoch, underway.plan, "shadow")
            assert self._nursery is not None
            self._nursery.start_soon(self._keep_shadow_uncovered, shadow)
        ready = [
            group
            for group, slot in shadow.groups.items()
            if group not in shadow.marked and _generation_slot_ready(slot)
        ]
        await reshards.mark_ready(shadow.epoch, ready)
        shadow.marked.update(ready)
        metrics.RESHARD_READY.labels(generation="next").set(sum(slot.ready_shards() for slot in self._next))
        if underway.phase == "switching":
            self._set_reshard_state(ReshardState.SWITCHING)
            if running.report is None:
                running.node.frozen = True  # it takes no group of the retiring epoch from now on
                groups = sorted(running.groups)
                LOGGER.info("reshard.retiring", extra={"epoch": running.epoch, "groups": groups})
                assert self._nursery is not None
                running.report = (groups, await self._retire(self._nursery, list(running.groups.values())))
            if not running.reported:
                groups, digests = running.report
                await reshards.mark_retired(running.epoch, groups, digests)
                running.reported = True

    async def _keep_shadow_uncovered(self, shadow: _Generation) -> None:
        """Tell the shadow epoch's workers which running shards were closed with 4011, while it is shadow."""
        with shadow.side:
            await self._keep_uncovered(self._next)

    async def _cluster_go_live(self, view: ReshardView, reshards: ReshardStore) -> None:
        """The cluster moved to `view.epoch`: this node's new groups go live with every node's digests, its
        old epoch's node stops (its retired workers exiting, its leases released)."""
        from workers import metric_defs as metrics

        from .cluster import ClusterStore

        old, new = self._gen, self._shadow
        assert old is not None and old.node is not None and self._cluster_env is not None
        _, reports = await reshards.retired(old.epoch)
        try:
            digests = merge_digests(reports)
        except ValueError as exc:
            LOGGER.error("reshard.bad_retire_report", extra={"error": str(exc)})
            digests = b""
        if new is not None and new.epoch == view.epoch:
            self._shadow = None
            new.role = "live"
            assert new.node is not None
            new.node.reports = True
            self.slots.extend(self._next)
            self._next.clear()
            for slot in new.groups.values():
                slot.promote()
                if not await slot.send_control(GoLive(digests)):
                    LOGGER.warning("reshard.go_live_missed", extra={"worker": slot.index})
        else:  # this node had no part in the new epoch's shadow (it joined late): it joins it live
            env = self._cluster_env
            store = ClusterStore(env.client, self.settings.shard_store_prefix, env.node_id, view.epoch)
            plan = await store.stored_plan()
            if plan is None:
                return  # its nodes have not written it yet: the next poll
            if new is not None:
                await self._drop_shadow(new)
            new = await self._open_generation(view.epoch, plan, "live", store)
        self._gen = new
        self._cluster = new.node
        self.shard_count = self.shard_total = new.plan.shard_count
        self._uncovered = set()
        old.close()
        new.side.cancel()
        assert self._nursery is not None
        for group, slot in list(old.groups.items()):
            if slot in self.slots:
                self.slots.remove(slot)
            if not slot.stopping:  # never retired (it missed the switch): stopped, its events may repeat
                await slot.stop(signal.SIGTERM)
                self._nursery.start_soon(
                    functools.partial(self._wait_exit, slot, "cluster.worker_killed", group=group)
                )
        await old.node.release_all()
        metrics.RESHARD_SHARDS.labels(generation="current").set(self.shard_count)
        metrics.RESHARD_SHARDS.labels(generation="next").set(0)
        LOGGER.info(
            "reshard.live",
            extra={
                "epoch": new.epoch,
                "shards": self.shard_count,
                "generation": view.generation,
                "groups": sorted(new.groups),
                "digests": len(digests) // DIGEST_BYTES,
            },
        )
        self._set_reshard_state(ReshardState.IDLE)

    async def _drop_shadow(self, shadow: _Generation) -> None:
        """An abandoned reshard: the shadow epoch's workers retire (sessions closed, nothing published), its
        node stops and releases its leases."""
        assert self._nursery is not None and shadow.node is not None
        if self._shadow is shadow:
            self._shadow = None
        shadow.close()
        LOGGER.warning(
            "reshard.shadow_dropped", extra={"epoch": shadow.epoch, "groups": sorted(shadow.groups)}
        )
        await self._retire(self._nursery, list(shadow.groups.values()))
        self._next.clear()
        await shadow.node.release_all()
        self._set_reshard_state(ReshardState.IDLE)

    async def _lead_reshard(self, view: ReshardView, reshards: ReshardStore, next_check: float) -> float:
        """The leader's step (`cluster_reshard.leader_step`); returns when it next asks Discord unasked."""
        from workers import metric_defs as metrics

        from .cluster_reshard import leader_step

        running = self._gen
        assert running is not None and running.node is not None and self._cluster_env is not None
        underway = view.underway
        if underway is None:
            trigger = await reshards.take_request()
            now = trio.current_time()
            if trigger is None and now < next_check:
                return next_check
            await self._begin_cluster_reshard(
                cast(Trigger, trigger) if trigger in ("signal", "4011", "interval") else "interval", reshards
            )
            return now + self.settings.reshard_check_interval_s
        starting = underway.phase == "starting"
        ready = await reshards.ready_groups(underway.epoch) if starting else frozenset()
        retired = frozenset() if starting else (await reshards.retired(running.epoch))[0]
        info = self._cluster_env.info
        action = leader_step(
            underway,
            view.now_ms,
            ready=ready,
            old_groups=running.plan.groups,
            retired=retired,
            holders=running.node.holders(),
            ready_timeout_s=ready_timeout_s(underway.plan.shard_count, info.max_concurrency),
        )
        extra = {
            "epoch": underway.epoch,
            "shards": running.plan.shard_count,
            "target": underway.plan.shard_count,
        }
        if action == "switch" and await reshards.switch(underway.epoch):
            ready_s = (view.now_ms - underway.started_ms) / MS_PER_S
            LOGGER.info("reshard.switching", extra={**extra, "ready_s": round(ready_s, 2)})
        elif action == "abandon" and await reshards.abandon(underway.epoch):
            LOGGER.error("reshard.abandoned", extra=extra)
            metrics.RESHARDS.labels(outcome="abandoned").inc()
        elif action == "cut_over":
            generation = await reshards.cut_over(running.epoch, underway.epoch)
            if generation:
                metrics.RESHARDS.labels(outcome="done").inc()
                LOGGER.info(
                    "reshard.done",
                    extra={
                        **extra,
                        "trigger": underway.trigger,
                        "previous": running.plan.shard_count,
                        "shards": underway.plan.shard_count,
                        "generation": generation,
                        "duration_s": round((view.now_ms - underway.started_ms) / MS_PER_S, 2),
                        "ready_s": round((underway.switched_ms - underway.started_ms) / MS_PER_S, 2),
                        "retired": len(retired),
                    },
                )
                assert self._nursery is not None
                self._nursery.start_soon(self._forget_epoch, reshards, running.epoch)
        return next_check

    async def _begin_cluster_reshard(self, trigger: Trigger, reshards: ReshardStore) -> None:
        """The leader asks Discord for the recommended count and, if it differs, starts a reshard."""
        from workers import metric_defs as metrics

        from .cluster_plan import plan_cluster

        running = self._gen
        assert running is not None and self._cluster_env is not None
        checked = await self._check_recommended(trigger, running.plan.shard_count)
        if checked is None:
            return
        decision, info, extra = checked
        if decision.action in ("fatal", "refuse"):
            # In a cluster a 4011 with nothing to move to stops that one shard, not every node.
            LOGGER.error(f"reshard.{decision.action}", extra={**extra, "reason": decision.reason})
            metrics.RESHARDS.labels(outcome="refused" if decision.action == "refuse" else "fatal").inc()
            return
        await self._cluster_env.gate.set_budget(info.remaining, info.reset_after_ms / MS_PER_S)
        plan = plan_cluster(decision.target)
        epoch = await reshards.begin(running.epoch, plan, trigger)
        if epoch:
            LOGGER.info(
                "reshard.starting",
                extra={**extra, "epoch": epoch, "groups": plan.groups, "reason": decision.reason},
            )

    async def _check_recommended(
        self, trigger: Trigger, current: int
    ) -> tuple[ReshardDecision, GatewayBot, dict[str, Any]] | None:
        """Ask Discord for the recommended count and decide (`reshard.decide`) against `current`; None, with
        its log line, when the check failed or there is nothing to do; else the decision, what Discord
        said, and the log fields."""
        settings = self.settings
        try:
            info = await fetch_gateway_bot(settings.api_url, settings.token)
        except GatewayBotError as exc:
            LOGGER.warning("reshard.check_failed", extra={"trigger": trigger, "error": str(exc)})
            return None
        decision = decide(
            current,
            info.shards,
            trigger,
            remaining=info.remaining,
            total=info.total,
            reset_after_ms=info.reset_after_ms,
            reserve=settings.identify_reserve,
        )
        extra: dict[str, Any] = {"trigger": trigger, "shards": decision.current, "recommended": info.shards}
        if decision.action == "none":
            LOGGER.info("reshard.unchanged", extra={**extra, "reason": decision.reason})
            return None
        return decision, info, extra

    async def _forget_epoch(self, reshards: ReshardStore, epoch: int) -> None:
        """After a cut-over, once every node has read the retired epoch's digests: delete its keys."""
        from ratelimit.resp import RedisError

        await trio.sleep(FORGET_EPOCH_AFTER_S)
        with contextlib.suppress(RedisError, OSError):
            await reshards.forget_epoch(epoch)

    # -- live resharding (supervisor/reshard.py) -------------------------------------------------------------

    def _on_sharding_required(self, slot: WorkerSlot, shard: int) -> None:
        """A worker's shard was closed with 4011 (RESHARD=auto): reshard now (coalesced with any pending)."""
        LOGGER.warning(
            "reshard.sharding_required",
            extra={"worker": slot.index, "shard": shard, "shard_count": slot.shard_count},
        )
        if slot.shard_count == self.shard_count:  # a shadow generation's 4011 is the reshard's own failure
            self._uncovered.add(shard)
            self.request_reshard("4011")

    def request_reshard(self, trigger: Trigger) -> None:
        self._reshard_send.send_nowait(trigger)

    async def _reshard_loop(self, nursery: trio.Nursery) -> None:
        """RESHARD=auto: check Discord's recommended shard count every RESHARD_CHECK_INTERVAL and on each
        request (SIGUSR1, a 4011); one reshard at a time, requests that came in meanwhile coalesced."""
        from workers import metric_defs as metrics

        metrics.RESHARD_STATE.set(ReshardState.IDLE.value)
        metrics.RESHARD_SHARDS.labels(generation="current").set(self.shard_count)
        while not self._stop.is_set():
            trigger: Trigger = "interval"
            with trio.move_on_after(self.settings.reshard_check_interval_s):
                trigger = await self._reshard_requests.receive()
            await self._reshard(nursery, trigger)
            while True:  # what was asked during that reshard has been answered by it
                try:
                    self._reshard_requests.receive_nowait()
                except trio.WouldBlock:
                    break

    def _set_reshard_state(self, state: ReshardState) -> None:
        from workers import metric_defs as metrics

        self.reshard_state = state
        metrics.RESHARD_STATE.set(state.value)

    async def _reshard(self, nursery: trio.Nursery, trigger: Trigger) -> None:
        """One check and, if Discord's recommended count differs, one live reshard (supervisor/reshard.py)."""
        from workers import metric_defs as metrics

        settings = self.settings
        checked = await self._check_recommended(trigger, self.shard_count)
        if checked is None:
            return
        decision, info, extra = checked
        if decision.action == "fatal":
            LOGGER.error("reshard.fatal", extra={**extra, "reason": decision.reason})
            self.status = ExitStatus.FATAL
            self._stop.set()
            return
        if decision.action == "refuse":
            LOGGER.error("reshard.refused", extra={**extra, "reason": decision.reason})
            metrics.RESHARDS.labels(outcome="refused").inc()
            return
        assert self._serving is not None
        gate = self._serving[0]
        await gate.set_budget(info.remaining, info.reset_after_ms / MS_PER_S)
        started = trio.current_time()
        target = decision.target
        plan = plan_workers(range(target), settings.workers, len(os.sched_getaffinity(0)) or 1)
        LOGGER.info("reshard.starting", extra={**extra, "workers": len(plan), "reason": decision.reason})
        self._set_reshard_state(ReshardState.STARTING)
        metrics.RESHARD_SHARDS.labels(generation="next").set(target)
        keeping = trio.CancelScope()
        try:
            self._next = await self._start_generation(nursery, info, plan, target, "shadow")

            async def keep_uncovered(slots: list[WorkerSlot]) -> None:
                with keeping:
                    await self._keep_uncovered(slots)

            nursery.start_soon(keep_uncovered, self._next)
            timeout = ready_timeout_s(target, info.max_concurrency)
            if not await self._wait_generation_ready(self._next, timeout):
                if self._stop.is_set():
                    return  # the drain stops the shadow generation with the rest (its sessions kept)
                LOGGER.error("reshard.abandoned", extra={**extra, "timeout_s": timeout})
                metrics.RESHARDS.labels(outcome="abandoned").inc()
                await self._retire(nursery, self._next)  # shadow workers: sessions closed, none published
                return
            ready_s = trio.current_time() - started
            LOGGER.info("reshard.switching", extra={**extra, "ready_s": round(ready_s, 2)})
            self._set_reshard_state(ReshardState.SWITCHING)
            old = list(self.slots)
            keeping.cancel()
            digests = await self._retire(nursery, old)
            for slot in self._next:
                slot.promote()
                if not await slot.send_control(GoLive(digests)):
                    LOGGER.warning("reshard.go_live_missed", extra={"worker": slot.index})
            self.slots[:] = self._next
            self.shard_count = self.shard_total = target
            self._uncovered = set()
            self.generation += 1
            metrics.RESHARD_GENERATION.set(self.generation)
            metrics.RESHARDS.labels(outcome="done").inc()
            metrics.RESHARD_SHARDS.labels(generation="current").set(target)
            LOGGER.info(
                "reshard.done",
                extra={
                    **extra,
                    "shards": target,
                    "previous": decision.current,
                    "generation": self.generation,
                    "duration_s": round(trio.current_time() - started, 2),
                    "ready_s": round(ready_s, 2),
                    "digests": len(digests) // DIGEST_BYTES,
                },
            )
        finally:
            keeping.cancel()
            if not self._stop.is_set():  # else the drain stops them with the rest
                self._next = []
            metrics.RESHARD_SHARDS.labels(generation="next").set(0)
            self._set_reshard_state(ReshardState.IDLE)

    async def _wait_generation_ready(self, slots: list[WorkerSlot], timeout_s: float) -> bool:
        """Wait until every shard of `slots` is READY with its guilds arrived; False on timeout or stop."""
        from workers import metric_defs as metrics

        with trio.move_on_after(timeout_s):
            while not self._stop.is_set():
                ready = sum(slot.ready_shards() for slot in slots)
                metrics.RESHARD_READY.labels(generation="next").set(ready)
                if all(_generation_slot_ready(slot) for slot in slots):
                    return True
                with trio.move_on_after(1.0):
                    await self._stop.wait()
        return False

    async def _retire(self, nursery: trio.Nursery, slots: list[WorkerSlot]) -> bytes:
        """Tell each worker of `slots` to retire (supervisor/reshard.py, step 4) and wait for its digests; the
        union of the digests. The workers' exits are waited for in `nursery` (killed after SHUTDOWN_TIMEOUT):
        the new generation goes live as soon as the reports are in, not after the old processes are gone."""
        reports: list[bytes] = []

        async def report(slot: WorkerSlot) -> None:
            slot.stopping = True  # its exit is the end of this slot, not a crash to restart
            if await slot.send_control(Retire()):
                with trio.move_on_after(RETIRE_REPORT_TIMEOUT_S):
                    await slot.retired.wait()
            if slot.retired.is_set():
                reports.append(slot.retired_digests)
            else:
                LOGGER.warning("reshard.no_retire_report", extra={"worker": slot.index})
                slot.signal(signal.SIGTERM)
            nursery.start_soon(
                functools.partial(self._wait_exit, slot, "reshard.worker_killed", worker=slot.index)
            )

        async with trio.open_nursery() as reporting:
            for slot in slots:
                reporting.start_soon(report, slot)
        try:
            return merge_digests(reports)
        except ValueError as exc:
            LOGGER.error("reshard.bad_retire_report", extra={"error": str(exc)})
            return b""

    async def _wait_exit(self, slot: WorkerSlot, killed_event: str, **extra: int) -> None:
        """Wait for the exit of a worker asked to stop; SIGKILL it (logging `killed_event`) after
        SHUTDOWN_TIMEOUT."""
        with trio.move_on_after(self.settings.shutdown_timeout_s) as deadline:
            while slot.process is not None and slot.process.returncode is None:
                await slot.process.wait()
        if deadline.cancelled_caught:
            LOGGER.warning(killed_event, extra=extra)
            slot.signal(signal.SIGKILL)

    async def _keep_uncovered(self, slots: list[WorkerSlot]) -> None:
        """While a new generation is in the shadow: tell each of its workers (again after a restart, and when
        the set changes) which shards of the running generation no longer publish (closed with 4011), so
        they keep those guilds' events until they go live instead of letting them age out."""
        told: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        while True:
            shards = tuple(sorted(self._uncovered))
            for slot in slots:
                stale = (slot.pid, shards) != told.get(slot.index, (None, ()))
                if stale and await slot.send_control(Uncovered(self.shard_count, shards)):
                    told[slot.index] = (slot.pid, shards)
            await trio.sleep(UNCOVERED_POLL_S)

    @contextlib.asynccontextmanager
    async def _own_ratelimit_segment(self) -> AsyncIterator[None]:
        """With the shm ratelimit backend, the supervisor creates the host's segment before any worker starts
        (replacing a stale one from a crashed run) and removes it when it stops; workers find it by name."""
        if self.settings.ratelimit_backend != "shm":
            yield
            return
        from ratelimit.configured import engine_config, shm_segment_name
        from ratelimit.shm import ShmBackend, ShmError

        try:
            backend = ShmBackend.open(
                shm_segment_name(self.settings.token),
                engine_config(self.settings.global_limit),
                create=True,
                directory=self.settings.ratelimit_shm_dir,
                unlink_on_close=True,
            )
        except ShmError as exc:
            raise SupervisorError(f"ratelimit segment: {exc}") from exc
        LOGGER.info("supervisor.ratelimit_segment", extra={"path": str(backend.path), "owner": backend.owns})
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()

    @contextlib.asynccontextmanager
    async def _open_gate(self, max_concurrency: int) -> AsyncIterator[BudgetedIdentifyGate]:
        interval = IDENTIFY_INTERVAL_S + IDENTIFY_MARGIN_S
        if self.settings.shard_store_type == "redis":
            from supervisor.identify_redis import open_redis_identify_gate

            async with open_redis_identify_gate(
                self.settings.redis_url,
                prefix=self.settings.shard_store_prefix,
                max_concurrency=max_concurrency,
                interval_s=interval,
            ) as gate:
                yield gate
        else:
            yield InMemoryIdentifyGate(max_concurrency, interval)

    async def _control_loop(self, nursery: trio.Nursery) -> None:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*handled) as signals:
            if await self._wait_workers_connected():
                self.notifier.ready()
                # Not "supervisor.ready": that line waits for the shards (`_report_progress`).
                LOGGER.info("supervisor.workers_started", extra={"workers": len(self.slots)})
            async with trio.open_nursery() as waiting:

                async def stop_requested() -> None:
                    await self._stop.wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(stop_requested)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        waiting.start_soon(self._rolling_restart)
                        continue
                    if signum == signal.SIGUSR1:
                        if self.settings.reshard == "auto":
                            LOGGER.info("reshard.requested", extra={"trigger": "signal"})
                            self.request_reshard("signal")
                        else:
                            LOGGER.warning("reshard.off", extra={"reason": "SIGUSR1 with RESHARD=off"})
                        continue
                    LOGGER.info("supervisor.stopping", extra={"signal": signal.Signals(signum).name})
                    break
                waiting.cancel_scope.cancel()
            await self._drain(signals)
            nursery.cancel_scope.cancel()

    async def _wait_workers_connected(self) -> bool:
        """Wait for every worker's Hello; False if the supervisor must stop first (workers that die before
        they say Hello, every time, are a crash loop too)."""
        async with trio.open_nursery() as nursery:

            async def stop_requested() -> None:
                await self._stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_requested)
            for slot in self.slots:
                await slot.connected.wait()
            nursery.cancel_scope.cancel()
        return not self._stop.is_set()

    async def _drain(self, signals: Any) -> None:
        """Stop every worker gracefully within the deadline; a second SIGINT kills at once. A cluster node
        first leaves the cluster and hands its groups over (their leases released once their sessions are
        saved), so other nodes RESUME them."""
        self._stop.set()
        self.notifier.stopping()
        nodes = [gen.node for gen in (self._gen, self._shadow) if gen is not None and gen.node is not None]
        async with trio.open_nursery() as leaving:  # the running epoch's groups, and a reshard's new ones
            for node in nodes:
                leaving.start_soon(node.leave, self.settings.shutdown_timeout_s)
        self.slots.extend(self._next)  # a reshard's shadow generation stops with the rest
        self._next = []
        for slot in self.slots:
            await slot.stop(signal.SIGTERM)
        with trio.move_on_after(self.settings.shutdown_timeout_s) as deadline:
            async with trio.open_nursery() as nursery:

                async def wait_all() -> None:
                    for slot in self.slots:
                        if slot.process is not None:
                            await slot.process.wait()
                    nursery.cancel_scope.cancel()

                async def fast_stop() -> None:
                    async for signum in signals:
                        if signum == signal.SIGINT:
                            LOGGER.warning("supervisor.fast_stop")
                            break
                    nursery.cancel_scope.cancel()

                nursery.start_soon(wait_all)
                nursery.start_soon(fast_stop)
        if deadline.cancelled_caught:
            LOGGER.warning(
                "supervisor.drain_deadline", extra={"deadline_s": self.settings.shutdown_timeout_s}
            )
        for slot in self.slots:
            slot.signal(signal.SIGKILL)

    async def _rolling_restart(self) -> None:
        """SIGHUP: replace workers one at a time, each after the previous one's shards are back."""
        self.notifier.reloading()
        LOGGER.info("supervisor.rolling_restart")
        self._rolling = True
        for slot in self.slots:
            if self._stop.is_set():
                return
            old = slot.process
            slot.signal(signal.SIGTERM)
            if old is not None:
                await old.wait()
            with trio.move_on_after(ROLLING_READY_TIMEOUT_S):
                while slot.process is old or slot.ready_shards() < len(slot.shard_ids):
                    await slot.wait_heartbeat()
        self._rolling = False
        self.notifier.ready()
        LOGGER.info("supervisor.rolling_restart_done")

    async def _report_status(self) -> None:
        from workers import metric_defs as metrics

        publish_build_info()
        while True:
            self.board.publish_gauges()
            if self.settings.reshard == "auto":
                metrics.RESHARD_READY.labels(generation="current").set(self.ready_shards())
            metrics.WORKERS.set(
                sum(1 for slot in self.slots if slot.process and slot.process.returncode is None)
            )
            self.notifier.status(
                f"{self.ready_shards()}/{self.running_shards()} shards ready, {len(self.slots)} workers"
            )
            await trio.sleep(STATUS_PERIOD_S)

    async def _report_progress(self) -> None:
        """`N/M shards ready` lines while the start goes on, then one `supervisor.ready` (see
        `supervisor.progress`)."""
        progress = self._progress
        while progress is not None and not progress.done:
            line = progress.observe(self.ready_shards(), trio.current_time())
            if line is not None and line.done:
                LOGGER.info("supervisor.ready", extra={"progress": "all shards ready", "shards": line.total})
            elif line is not None:
                LOGGER.info(
                    "supervisor.progress",
                    extra={
                        "progress": f"{line.ready}/{line.total} shards ready",
                        "ready": line.ready,
                        "shards": line.total,
                        "eta_s": line.eta_s,
                    },
                )
            await trio.sleep(PROGRESS_POLL_S)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


def _generation_slot_ready(slot: WorkerSlot) -> bool:
    """Every shard of the slot's worker is READY and has its guilds (a reshard's new generation)."""
    return slot.ready_shards() == len(slot.shard_ids) and slot.guilds_pending() == 0


def _first_leaf(group: BaseExceptionGroup[SupervisorError]) -> SupervisorError:
    """The first SupervisorError of a (possibly nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, SupervisorError)
    return first


async def run_supervisor(settings: Settings, environ: dict[str, str]) -> int:
    try:
        status = await Supervisor(settings, environ).run()
    except SupervisorError as exc:
        LOGGER.error("supervisor.failed", extra={"error": str(exc)})
        status = exc.status
    LOGGER.info("supervisor.stopped", extra={"status": int(status), "exit": ExitStatus(status).name.lower()})
    return status
