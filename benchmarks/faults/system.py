"""The fault suite's system under test: simulator, redis-server, consumer and supervisor, as processes,
and the accounting that judges loss (see the package docstring for what `lost` means).

The supervisor and the redis-server are `Restartable`: a fault may kill or stop them and start them again
on the same address. Children stop in reverse order when the system closes: the supervisor (its workers
with it) before the consumer, which then deletes what the run left on the shared broker.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import trio

from benchmarks.children import free_port, worker_env
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
from benchmarks.ratelimit.state import wait_redis_ready

CONSUMER_START_TIMEOUT_S: Final = 30.0
POLL_S: Final = 0.1
#: How long the consumer may take to catch up with the ledger once the firehose stops.
DRAIN_TIMEOUT_S: Final = 20.0
#: The simulator's invalid requests (401, 403, 429) per IP per 10 minutes before a ban (Discord: 10,000).
INVALID_REQUEST_LIMIT: Final = 200
#: The simulator's heartbeat interval: shorter than Discord's 41.25 s, so a blackholed connection is detected
#: sooner (I + 10 s, B6), but long enough that a worker stalled past the supervisor's 10 s heartbeat timeout
#: and replaced (about 13 s in all) is back before the simulator's 1.5 I + 1 s after its last beat, whatever
#: the beat's phase: 0.5 I + 1 s > 13 s. With 10 s a stall right before a beat ended the session (4009).
HEARTBEAT_INTERVAL_MS: Final = 30_000


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    shards: int
    workers: int
    #: Dispatches per second per session while the firehose runs.
    event_rate: float
    #: Firehose time after recovery, before it stops and the consumer drains.
    settle_s: float
    #: The faults run (None: every one).
    faults: tuple[str, ...] | None
    #: How long RabbitMQ and Redis stay down.
    outage_s: float


SETTINGS: Final = {
    "smoke": Settings(
        "smoke",
        4,
        2,
        50.0,
        1.0,
        ("worker_kill9", "op7_storm", "corrupt", "oversized_command", "close_4010_fatal"),
        5.0,
    ),
    "quick": Settings("quick", 4, 2, 100.0, 2.0, None, 30.0),
    "full": Settings("full", 8, 2, 200.0, 5.0, None, 30.0),
}


@dataclass(slots=True)
class Restartable:
    """A child the suite stops and starts again (the supervisor, redis-server): its own exit stack."""

    name: str
    start: Callable[[contextlib.AsyncExitStack], Awaitable[ChildProcess]]
    child: ChildProcess | None = None
    stack: contextlib.AsyncExitStack | None = None

    async def open(self) -> ChildProcess:
        self.stack = contextlib.AsyncExitStack()
        self.child = await self.start(self.stack)
        return self.child

    async def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) unless it already exited, and wait for it."""
        if self.stack is not None:
            await self.stack.aclose()
        self.stack = None

    def running(self) -> ChildProcess:
        if self.child is None:
            raise BenchmarkError(f"{self.name} is not running")
        return self.child


@dataclass(slots=True)
class System:
    """The running simulator, supervisor, redis-server and consumer."""

    settings: Settings
    sim: SimulatorProcess
    supervisor: Restartable
    redis: Restartable
    consumer: ChildProcess
    state_path: Path
    metrics_url: str
    amqp_url: str
    http: httpx.AsyncClient
    progress: Progress
    shm_dir: str
    log_dir: Path
    proxy_url: str
    #: The exchange (BROKER_GROUP) of this run.
    group: str
    #: The supervisor's environment: a fault may change it before it restarts the supervisor.
    supervisor_env: dict[str, str]
    #: What the running fault adds to its figures (`figures`) and its reasons to fail (`failures`).
    notes: dict[str, Any] = field(default_factory=dict)

    async def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.sim.control(action, body)

    def consumed(self) -> dict[str, Any]:
        """The consumer's latest snapshot (empty before its first)."""
        return read_consumed(self.state_path)

    async def health(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self.http.get(self.metrics_url + "/healthz")).json()
        return body

    async def worker_pids(self) -> list[int]:
        with trio.fail_after(10.0):
            while True:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    detail = (await self.health())["detail"]
                    pids = [int(worker["pid"]) for worker in detail["workers"] if worker["pid"]]
                    if len(pids) == self.settings.workers:
                        return pids
                await trio.sleep(POLL_S)

    def supervisor_log_count(self, event: str) -> int:
        """How often the running supervisor's log (its workers' included) names `event`."""
        return self.supervisor.running().log_path.read_text(errors="replace").count(event)

    async def restart_supervisor(self) -> None:
        """Stop the supervisor (SIGTERM: sessions saved) and start it again with `supervisor_env`."""
        await self.supervisor.close()
        await self.supervisor.open()

    async def publish_commands(self, routing_key: str, count: int, body: dict[str, Any]) -> None:
        """Publish `count` copies of the gateway command `body` on this run's exchange (DESIGN 3.5)."""
        argv = [sys.executable, "-m", "benchmarks.faults.commands", self.amqp_url, self.group, routing_key]
        argv += [str(count), json.dumps(body)]
        async with open_child("commands", argv, log_dir=self.log_dir, capture_stdout=True) as child:
            await read_json_line(child, CONSUMER_START_TIMEOUT_S)

    def check_alive(self) -> None:
        for child in (self.sim.child, self.supervisor.running(), self.consumer):
            child.check_alive()


def read_consumed(state_path: Path) -> dict[str, Any]:
    """The consumer's latest snapshot at `state_path` (empty before its first)."""
    try:
        value: dict[str, Any] = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return {"sessions": {}, "duplicates": 0, "last_new_at": {}, "received": 0}
    return value


def redis_server(port: int, log_dir: Path, name: str = "redis-server") -> Restartable:
    """A redis-server of the suite's own on `port`, without persistence (a restart is empty, as after a
    failover to a cold replica); its logs are `<name>-<n>.log`, one per start."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchmarkError("no redis-server on PATH (the suite runs one of its own)")
    url = f"redis://127.0.0.1:{port}"
    starts = 0

    async def start_redis(stack: contextlib.AsyncExitStack) -> ChildProcess:
        nonlocal starts
        starts += 1
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        child = await stack.enter_async_context(open_child(f"{name}-{starts}", argv, log_dir=log_dir))
        await wait_redis_ready(url, child)
        return child

    return Restartable(name, start_redis)


def simulator_args(settings: Settings) -> list[str]:
    return [
        *("--shard-count", str(settings.shards), "--max-concurrency", str(settings.shards)),
        *("--session-start-total", "1000", "--session-start-remaining", "1000"),
        *("--guilds-per-shard", "1", "--event-rate", "0"),
        *("--heartbeat-interval-ms", str(HEARTBEAT_INTERVAL_MS)),
        *("--invalid-session-delay-s", "0"),
        # A scaled ban threshold, so that a proxy without an invalid-request budget would cross half of it.
        *("--invalid-request-limit", str(INVALID_REQUEST_LIMIT), "--accept-any-token"),
    ]


def supervisor_env(
    sim: SimulatorProcess, *, port: int, shm_dir: str, group: str, amqp_url: str
) -> dict[str, str]:
    return worker_env(
        sim.rest_url,
        BROKER_TYPE="amqp",
        BROKER_GROUP=group,
        AMQP_URL=amqp_url,
        SHARD_STORE_TYPE="memory",
        PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        RATELIMIT_SHM_DIR=shm_dir,
        SHUTDOWN_TIMEOUT="10s",
        LOG_LEVEL="info",
    )


@contextlib.asynccontextmanager
async def open_system(
    settings: Settings, log_dir: Path, progress: Progress, amqp_url: str
) -> AsyncIterator[System]:
    """Simulator, redis-server, consumer (bound before any event is published), then the supervisor; all
    ready."""
    group = f"faults-{uuid.uuid4().hex[:12]}"
    state_path = log_dir / "consumer-state.json"
    state_path.unlink(missing_ok=True)
    port, redis_port, proxy_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}"
    redis = redis_server(redis_port, log_dir)
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator_process(simulator_args(settings), log_dir=log_dir)
        )
        stack.push_async_callback(redis.close)
        await redis.open()
        consumer = await stack.enter_async_context(
            open_child(
                "consumer",
                [
                    *(sys.executable, "-m", "benchmarks.faults.consumer"),
                    *(amqp_url, group, str(state_path), str(settings.shards)),
                ],
                log_dir=log_dir,
                capture_stdout=True,
            )
        )
        await read_json_line(consumer, CONSUMER_START_TIMEOUT_S)
        shm_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-shm-"))
        env = supervisor_env(sim, port=port, shm_dir=shm_dir, group=group, amqp_url=amqp_url)
        env.update({"SHARD_STORE_TYPE": "redis", "SHARD_STORE_PREFIX": group, "REDIS_URL": redis_url})
        env["PROXY_HTTP_ADDRESS"] = f"127.0.0.1:{proxy_port}"
        argv = [sys.executable, "-m", "supervisor", "--shards", str(settings.shards)]
        argv += ["--workers", str(settings.workers)]
        supervisor_starts = 0

        async def start_supervisor(stack: contextlib.AsyncExitStack) -> ChildProcess:
            nonlocal supervisor_starts
            supervisor_starts += 1
            name = f"supervisor-{supervisor_starts}"
            return await stack.enter_async_context(open_child(name, argv, log_dir=log_dir, env=env))

        supervisor = Restartable("supervisor", start_supervisor)
        stack.push_async_callback(supervisor.close)
        await supervisor.open()
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        system = System(
            settings,
            sim,
            supervisor,
            redis,
            consumer,
            state_path,
            f"http://127.0.0.1:{port}",
            amqp_url,
            http,
            progress,
            shm_dir,
            log_dir,
            f"http://127.0.0.1:{proxy_port}/api/v10",
            group,
            env,
        )
        progress.say(f"waiting for {settings.shards} shards (exchange {group}, Redis {redis_url})")
        await wait_sessions_ready(
            sim, settings.shards, min_sent=2, within_s=60.0, watch=[supervisor.running(), consumer]
        )
        yield system


# -- accounting --------------------------------------------------------------------------------

#: The simulator's rule for two connections serving one shard at once, and its counter.
OVERLAP_RULE: Final = "shard_served_twice"
OVERLAP_COUNTER: Final = "shard_overlaps"


class Observed(Protocol):
    """What the accounting and the runner read of a system under test: the single supervisor's `System` or
    the cluster's (`benchmarks.faults.cluster.ClusterSystem`)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def sim(self) -> SimulatorProcess: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def notes(self) -> dict[str, Any]: ...

    def consumed(self) -> dict[str, Any]: ...

    def check_alive(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Tally:
    """Cumulative loss and duplicates, and the simulator's counters, at one quiet moment."""

    lost: int
    duplicates: int
    identifies: int
    resumes: int
    missing: dict[str, int]
    #: Discord rules the simulator saw broken, by rule (cumulative).
    rules_broken: dict[str, int] = field(default_factory=dict)
    #: Times a connection began to serve a shard another connection still served (cumulative).
    overlaps: int = 0

    def rules_broken_since(self, before: Tally) -> dict[str, int]:
        return {
            rule: count - before.rules_broken.get(rule, 0)
            for rule, count in self.rules_broken.items()
            if count > before.rules_broken.get(rule, 0)
        }


def current_sessions(ledger: dict[str, Any]) -> set[str]:
    """Per shard, its newest session (ledger order is creation order) if that is still attached or
    resumable. An older session the shard gave up stays superseded when the newest one ends (a fatal close
    after a fresh IDENTIFY): what the gateway queued for it after it was given up is not owed."""
    newest: dict[int, str] = {}
    for session_id, session in ledger["sessions"].items():
        newest[int(session["shard"])] = session_id
    sessions = ledger["sessions"]
    return {session_id for session_id in newest.values() if sessions[session_id]["state"] != "ended"}


def tally(ledger: dict[str, Any], consumed: dict[str, Any]) -> Tally:
    current = current_sessions(ledger)
    received = consumed["sessions"]
    lost = 0
    missing: dict[str, int] = {}
    for session_id, session in ledger["sessions"].items():
        got = received.get(session_id)
        distinct = int(got["distinct"]) if got else 0
        if session_id in current:
            gone = int(session["last_seq"]) - distinct
        else:
            gone = (int(got["highest"]) - distinct) if got else 0
        if gone > 0:
            missing[session_id] = gone
            lost += gone
    counters = ledger["counters"]
    rules_broken = dict(ledger.get("rules_broken", {}))
    return Tally(
        lost,
        int(consumed.get("duplicates", 0)),
        int(counters.get("identifies_accepted", 0)),
        int(counters.get("resumes_ok", 0)),
        missing,
        rules_broken,
        overlaps(counters, rules_broken),
    )


def overlaps(counters: dict[str, Any], rules_broken: dict[str, int]) -> int:
    """Two connections serving one shard at once: the simulator's `shard_overlaps` counter, or where a
    simulator predates it, its `shard_served_twice` violations (0 where it has neither)."""
    if OVERLAP_COUNTER in counters:
        return int(counters[OVERLAP_COUNTER])
    return int(rules_broken.get(OVERLAP_RULE, 0))


async def drain(system: Observed) -> Tally:
    """Stop the firehose and wait until the consumer holds every seq of every current session (or stops
    making progress for DRAIN_TIMEOUT_S); returns the tally then."""
    await system.sim.set_event_rate(0)
    await trio.sleep(0.5)  # a firehose tick in flight
    last_progress = trio.current_time()
    best = None
    while True:
        system.check_alive()
        ledger = await system.sim.gateway_ledger()
        result = tally(ledger, system.consumed())
        if result.lost == 0 and len(current_sessions(ledger)) >= system.settings.shards:
            return result
        if best is None or result.lost < best:
            best, last_progress = result.lost, trio.current_time()
        if trio.current_time() - last_progress > DRAIN_TIMEOUT_S:
            return result
        await trio.sleep(0.25)


async def wait_recovered(
    system: Observed, before: Tally, affected: int, fault_at: float, bound_s: float
) -> float | None:
    """Seconds from `fault_at` (wall) until `affected` shards came back and the consumer saw new events
    from every shard after that; None if that took longer than 3 * bound_s + 10 s."""
    deadline = time.time() + 3 * bound_s + 10.0
    back_at: float | None = None
    while time.time() < deadline:
        system.check_alive()
        ledger = await system.sim.gateway_ledger()
        counters = ledger["counters"]
        returned = (
            int(counters.get("identifies_accepted", 0))
            - before.identifies
            + int(counters.get("resumes_ok", 0))
            - before.resumes
        )
        attached = {int(s["shard"]) for s in ledger["sessions"].values() if s["state"] == "attached"}
        if back_at is None and returned >= affected and len(attached) >= system.settings.shards:
            back_at = time.time()
        if back_at is not None:
            last_new = system.consumed().get("last_new_at", {})
            if all(float(last_new.get(str(shard), 0)) > back_at for shard in range(system.settings.shards)):
                return time.time() - fault_at
        await trio.sleep(POLL_S)
    return None
