"""Live resharding benchmark: `python -m benchmarks reshard [--quick] [--smoke] [--json PATH] [--strict]`.

A supervisor with `--shards auto` (`RESHARD=auto`, `--workers 2`) grows from 4 shards to 8 while a bot-wide
stream of guild events runs, and every event must come out exactly once. The system: the simulator in
guild-stream mode (`--guild-count 64`: one fixed guild set whose events every generation of shards sees,
each delivered to every live session whose shard holds the guild under that session's own shard count;
`max_concurrency` 16, so identify pacing is one window), a consumer process (`benchmarks.reshard_consumer`,
aio-pika) on an exchange of the run's own (`BROKER_TYPE=amqp`, `BROKER_ENCODING=json`; RabbitMQ, as the
fault suite, because two generations of workers writing to one stdout pipe could interleave large
writes), and the supervisor. Once every shard is READY the guild stream starts; after `warmup_s` the
simulator recommends 8 shards and the supervisor gets SIGUSR1; the suite waits until `/healthz`'s
`detail.reshard.generation` has grown and its state is idle again, lets the stream run `settle_s` more,
stops it, waits for the consumer to drain, and audits what the consumer received against the simulator's
guild ledger (`audit_guild_events`, benchmarks/simulator/guild_ledger.py).

Figures (`reshard.*`):
- `lost` (target 0): guild events delivered to some session and never published.
- `duplicates` (target 0): publications of an event beyond its first (the cut-over skips what the old
  generation published by digest, so none are expected).
- `max_guild_gap_s` (target <= 2): the longest interval between two consecutive first publications of one
  guild's events, by the consumer's receive times; `guild_period_s` is what it is without a reshard (the
  stream goes round robin over the guilds: 64 guilds at 100 events/s, 0.64 s).
- `duration_s` and `ready_s`: the supervisor's `reshard.done` figures (the start of the reshard to the new
  generation live, and to every new shard READY with its guilds); `identify_bound_s`: ceil(8 /
  max_concurrency) x 5 s, the least time Discord lets 8 shards identify in; `duration_over_bound` their
  ratio (target <= 3: worker start-up and the cut-over come on top of the identify window).
- `identifies` (target == 8): IDENTIFYs the simulator accepted for 8 shards from the trigger on (each new
  shard identified once); `identifies_other`: accepted IDENTIFYs of any other shard count meanwhile.
- `resumes`, `overlaps` (target 0: a connection that began to serve a shard of a shard count another
  connection still served), `events`, `published`, `unknown` (published ids the ledger never generated).

`--nodes 2` runs the same measurement over a cluster: two supervisors with `CLUSTER_MODE=redis` (Redis on
127.0.0.1:6379, a key prefix of the run's own, `CLUSTER_LEASE_TTL=2s`), the reshard led by one of them
(supervisor/cluster_reshard.py); `duration_s` and `ready_s` are then the leader's.

The harness (`open_reshard_system`, `measure_reshard`) also runs the fault suite's reshard phase
(`benchmarks.faults.reshard`). Targets are informational unless `--strict`; the exit status is 1 when the run
produced no figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.children import free_port
from benchmarks.cluster_nodes import delete_prefix_keys
from benchmarks.faults.system import DRAIN_TIMEOUT_S, POLL_S, overlaps, supervisor_env
from benchmarks.harness import (
    BenchmarkError,
    ChildProcess,
    Progress,
    SimulatorProcess,
    add_amqp_url_argument,
    add_common_arguments,
    machine_info,
    open_child,
    open_simulator_process,
    read_json_line,
    write_results,
)
from benchmarks.reshard_consumer import parse_events
from benchmarks.simulator.config import IDENTIFY_INTERVAL_S
from benchmarks.simulator.guild_ledger import FIRST_EVENT_ID, GuildAudit, GuildLedger, audit_guild_events
from benchmarks.targets import (
    Target,
    format_figures,
    nest,
    strict_status,
    verdict_summary,
    verdicts,
    with_missing,
)

__all__ = [
    "DESCRIPTION",
    "ReshardRun",
    "ReshardSystem",
    "Settings",
    "add_arguments",
    "guild_ledger_of",
    "identifies_by_count",
    "measure_reshard",
    "open_reshard_system",
    "request_by_signal",
    "run",
    "target_keys",
]

DESCRIPTION: Final = "live resharding 4 -> 8 shards under a guild stream: lost, duplicates, gaps, identifies"
CONSUMER_START_TIMEOUT_S: Final = 30.0
#: How long the first generation may take to be READY (a start: interpreters, /gateway/bot, one window).
START_TIMEOUT_S: Final = 60.0
#: Beyond the identify bound, how long the suite waits for the new generation to go live (worker start-up,
#: READY, the guilds, the cut-over; a killed worker's restart). The supervisor's own limit is longer.
RESHARD_SLACK_S: Final = 60.0
#: The loosest `duration_over_bound` the target accepts.
DURATION_OVER_BOUND_MAX: Final = 3.0
MAX_GUILD_GAP_S: Final = 2.0
#: Guild-ledger records the simulator keeps: every event of a run (the audit rebuilds the ledger from them).
GUILD_LEDGER_RECORDS: Final = 1_000_000
#: The supervisor's log events of a reshard that end it without a new generation.
FAILED_EVENTS: Final = ("reshard.abandoned", "reshard.refused", "reshard.fatal")
SAMPLE_KEYS: Final = 10


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    #: The recommended shard count at start, and after the trigger.
    shards: int
    target: int
    workers: int
    max_concurrency: int
    guild_count: int
    #: Guild events per second for the whole bot while the stream runs.
    guild_event_rate: float
    #: Stream time before the trigger, and after the new generation is live.
    warmup_s: float
    settle_s: float

    @property
    def guild_period_s(self) -> float:
        """How often each guild has an event (the stream goes round robin over the guilds)."""
        return round(self.guild_count / self.guild_event_rate, 3)

    @property
    def identify_bound_s(self) -> float:
        """The least time Discord lets `target` shards identify in: one window per `max_concurrency`."""
        return math.ceil(self.target / self.max_concurrency) * IDENTIFY_INTERVAL_S


SETTINGS: Final = {
    "smoke": Settings("smoke", 4, 8, 2, 16, 64, 100.0, 1.0, 2.0),
    "quick": Settings("quick", 4, 8, 2, 16, 64, 100.0, 3.0, 3.0),
    "full": Settings("full", 4, 8, 2, 16, 64, 200.0, 5.0, 5.0),
}


@dataclass(slots=True)
class ReshardSystem:
    """The running simulator (guild-stream mode), consumer and supervisor (`--shards auto`)."""

    settings: Settings
    sim: SimulatorProcess
    supervisor: ChildProcess
    consumer: ChildProcess
    http: httpx.AsyncClient
    metrics_url: str
    events_path: Path
    log_dir: Path
    progress: Progress
    group: str
    #: What the running measurement adds to its figures (`figures`) and its reasons to fail (`failures`).
    notes: dict[str, Any] = field(default_factory=dict)
    #: Cluster mode: every node after the first (`supervisor`), with its metrics URL.
    others: list[tuple[ChildProcess, str]] = field(default_factory=list)
    #: Cluster mode: the nodes' Redis and key prefix (empty on one host).
    cluster_prefix: str = ""

    @property
    def nodes(self) -> list[tuple[ChildProcess, str]]:
        """Every supervisor with its metrics URL: one on one host, each node in cluster mode."""
        return [(self.supervisor, self.metrics_url), *self.others]

    async def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.sim.control(action, body)

    async def ledger(self) -> dict[str, Any]:
        """The simulator's whole `GET /_sim/ledger`: `gateway`, `rest` and `guilds`."""
        return await self.sim.ledger()

    async def health(self, url: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = (await self.http.get((url or self.metrics_url) + "/healthz")).json()
        return body

    async def reshard_detail(self, url: str | None = None) -> dict[str, Any] | None:
        """`/healthz`'s `detail.reshard` (of the node at `url`, default the first), or None while it does
        not answer or has none."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            detail: dict[str, Any] = (await self.health(url))["detail"]["reshard"]
            return detail
        return None

    def received(self) -> list[tuple[str, float, int | None]]:
        """Every MESSAGE_CREATE the consumer has written down: `(id, receive time, shard_id)`."""
        try:
            return parse_events(self.events_path.read_text(encoding="utf-8"))
        except OSError:
            return []

    def log_records(self, *events: str) -> list[dict[str, Any]]:
        """The supervisors' (and their workers') JSON log records whose event is one of `events`, node by
        node."""
        return [record for node, _ in self.nodes for record in log_records(node.log_path, events)]

    def check_alive(self) -> None:
        for child in (self.sim.child, self.consumer, *(node for node, _ in self.nodes)):
            child.check_alive()


def log_records(path: Path, events: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of a JSON-lines log whose `event` is one of `events`, in order."""
    wanted = [f'"{event}"'.encode() for event in events]
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return records
    for line in lines:
        if not any(name in line for name in wanted):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in events:
            records.append(record)
    return records


def simulator_args(settings: Settings) -> list[str]:
    return [
        *("--shard-count", str(settings.shards), "--max-concurrency", str(settings.max_concurrency)),
        *("--session-start-total", "1000", "--session-start-remaining", "1000"),
        *("--guild-count", str(settings.guild_count), "--guild-event-rate", "0"),
        *("--guild-ledger-records", str(GUILD_LEDGER_RECORDS)),
        *("--invalid-session-delay-s", "0", "--accept-any-token"),
    ]


@contextlib.asynccontextmanager
async def open_reshard_system(
    settings: Settings,
    log_dir: Path,
    progress: Progress,
    amqp_url: str,
    *,
    name: str = "reshard",
    nodes: int = 1,
    redis_url: str = "redis://127.0.0.1:6379",
    lease_ttl_s: float = 2.0,
) -> AsyncIterator[ReshardSystem]:
    """Simulator, consumer (bound before any event is published), then `python -m supervisor --shards auto`
    with RESHARD=auto (with `nodes` > 1: that many cluster nodes, `CLUSTER_MODE=redis` on `redis_url` under
    a prefix of the run's own, each with `settings.workers` as its weight); yields once every shard is READY
    and the reshard state is idle. Children stop in reverse order: the supervisors (their workers with
    them), the consumer (deleting the run's queues and exchange), the simulator."""
    group = f"reshard-{uuid.uuid4().hex[:12]}"
    await trio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    events_path = log_dir / f"{name}-events.tsv"
    await trio.Path(events_path).unlink(missing_ok=True)
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator_process(simulator_args(settings), log_dir=log_dir, name=f"{name}-simulator")
        )
        consumer = await stack.enter_async_context(
            open_child(
                f"{name}-consumer",
                [
                    *(sys.executable, "-m", "benchmarks.reshard_consumer"),
                    *(amqp_url, group, str(events_path), str(max(settings.shards, settings.target))),
                ],
                log_dir=log_dir,
                capture_stdout=True,
            )
        )
        await read_json_line(consumer, CONSUMER_START_TIMEOUT_S)
        shm_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="reshard-shm-"))
        argv = [sys.executable, "-m", "supervisor", "--shards", "auto", "--workers", str(settings.workers)]
        prefix = f"{group}-cluster" if nodes > 1 else ""
        if prefix:
            stack.push_async_callback(delete_prefix_keys, redis_url, prefix)
        started: list[tuple[ChildProcess, str]] = []
        for index in range(nodes):
            node_port = port if index == 0 else free_port()
            env = supervisor_env(sim, port=node_port, shm_dir=shm_dir, group=group, amqp_url=amqp_url)
            env.update(RESHARD="auto", BROKER_ENCODING="json")
            child_name = f"{name}-supervisor"
            if prefix:
                child_name = f"{name}-node{index + 1}"
                env.update(
                    CLUSTER_MODE="redis",
                    CLUSTER_NODE_ID=f"node{index + 1}",
                    CLUSTER_LEASE_TTL=f"{lease_ttl_s:g}s",
                    SHARD_STORE_TYPE="redis",
                    SHARD_STORE_PREFIX=prefix,
                    REDIS_URL=redis_url,
                )
            child = await stack.enter_async_context(open_child(child_name, argv, log_dir=log_dir, env=env))
            started.append((child, f"http://127.0.0.1:{node_port}"))
        supervisor = started[0][0]
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        system = ReshardSystem(
            settings,
            sim,
            supervisor,
            consumer,
            http,
            f"http://127.0.0.1:{port}",
            events_path,
            log_dir,
            progress,
            group,
            others=started[1:],
            cluster_prefix=prefix,
        )
        progress.say(f"{name}: waiting for {settings.shards} shards (exchange {group})")
        await wait_serving(system, settings.shards, START_TIMEOUT_S)
        yield system


async def wait_serving(system: ReshardSystem, shards: int, timeout_s: float) -> None:
    """Until `/healthz` counts `shards` shards READY (over every node, in cluster mode) and the reshard
    state is idle."""
    detail: dict[str, Any] = {}
    with trio.move_on_after(timeout_s):
        while True:
            system.check_alive()
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                details = [(await system.health(url))["detail"] for _, url in system.nodes]
                detail = details[0]
                ready = sum(int(d["ready_shards"]) for d in details)
                total = sum(int(d["shards"]) for d in details)
                if ready == shards and total == shards:
                    if any(d.get("reshard") is None for d in details):
                        raise BenchmarkError(
                            f"the supervisor's /healthz has no detail.reshard with RESHARD=auto: {details}"
                        )
                    if all(d["reshard"].get("state") == "idle" for d in details):
                        return
            await trio.sleep(POLL_S)
    raise BenchmarkError(
        f"{shards} shards not READY after {timeout_s:g} s (healthz detail {detail}); supervisor log:\n"
        f"{system.supervisor.log_tail()}"
    )


# -- the audit ---------------------------------------------------------------------------------------------


def guild_ledger_of(snapshot: Mapping[str, Any]) -> GuildLedger:
    """The simulator's guild ledger rebuilt from its `/_sim/ledger` snapshot (`guilds`), so that
    `audit_guild_events` can judge a consumer in this process. Exact only when the snapshot holds every
    event since the simulator started: BenchmarkError if the ledger was reset or its records capped."""
    records = snapshot["records"]
    generated = int(snapshot["counters"]["guild_events"])
    if str(snapshot["first_key"]) != str(FIRST_EVENT_ID):
        raise BenchmarkError("the simulator's guild ledger was reset: the audit needs every event")
    if len(records) != generated:
        raise BenchmarkError(
            f"the simulator's guild ledger kept {len(records)} of {generated} events: raise "
            "--guild-ledger-records"
        )
    ledger = GuildLedger(len(records))
    for record in records:
        delivered = [(int(shard), int(count)) for shard, count in record["delivered_to"]]
        ledger.record(int(record["key"]), int(record["guild_id"]), float(record["at"]), delivered)
    return ledger


def identifies_by_count(gateway: Mapping[str, Any], mark: int) -> Counter[int]:
    """Accepted IDENTIFYs after the first `mark` identify records, by shard count."""
    return Counter(int(r["shard_count"]) for r in gateway["identifies"][mark:] if r["accepted"])


def resumes_since(gateway: Mapping[str, Any], mark: int) -> int:
    return sum(1 for record in gateway["resumes"][mark:] if record["ok"])


async def drain(system: ReshardSystem) -> tuple[GuildAudit, dict[str, Any]]:
    """Stop the guild stream and wait until the consumer holds every delivered event (or stops making
    progress for DRAIN_TIMEOUT_S); the audit then and the simulator's whole ledger."""
    await system.control("guild_event_rate", {"rate": 0})
    await trio.sleep(0.5)  # a tick in flight
    best: int | None = None
    last_progress = trio.current_time()
    while True:
        system.check_alive()
        ledger = await system.ledger()
        audit = audit_guild_events(
            guild_ledger_of(ledger["guilds"]), ((k, t) for k, t, _ in system.received())
        )
        if not audit.lost:
            return audit, ledger
        if best is None or len(audit.lost) < best:
            best, last_progress = len(audit.lost), trio.current_time()
        if trio.current_time() - last_progress > DRAIN_TIMEOUT_S:
            return audit, ledger
        await trio.sleep(0.5)


# -- one reshard, measured ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ReshardRun:
    """One live reshard under the guild stream, judged against the simulator's ledgers."""

    shards: int
    target: int
    lost: int
    duplicates: int
    unknown: int
    max_guild_gap_s: float
    #: Guild events generated, those that reached no session, and the consumer's publications read.
    events: int
    undelivered: int
    published: int
    #: The supervisor's `reshard.done` figures (None if it logged none).
    duration_s: float | None
    ready_s: float | None
    #: Wall seconds from the trigger until /healthz showed the new generation, idle.
    observed_s: float
    identify_bound_s: float
    #: Seconds between two events of one guild without a reshard (the stream's round robin).
    guild_period_s: float
    #: Accepted IDENTIFYs from the trigger on: of the new shard count, and of any other.
    identifies: int
    identifies_other: int
    resumes: int
    overlaps: int
    generation: int
    #: How often the supervisor logged each `reshard.*` event during the measurement.
    log_events: dict[str, int]
    rules_broken: dict[str, int]
    #: Session appends per shard count (the simulator's, over the whole run).
    deliveries_by_shard_count: dict[int, int]
    #: The first lost and duplicated ids, with the guild's shard under each count.
    lost_sample: list[dict[str, Any]] = field(default_factory=list)
    duplicate_sample: dict[str, int] = field(default_factory=dict)

    @property
    def duration_over_bound(self) -> float | None:
        if self.duration_s is None:
            return None
        return round(self.duration_s / self.identify_bound_s, 3)


def _sample_lost(ledger: GuildLedger, audit: GuildAudit, counts: tuple[int, ...]) -> list[dict[str, Any]]:
    sample = []
    for key in audit.lost[:SAMPLE_KEYS]:
        guild = ledger.guild_of(key)
        shards = {} if guild is None else {str(count): (guild >> 22) % count for count in counts}
        sample.append({"id": key, "guild": guild, "shard_by_count": shards})
    return sample


async def measure_reshard(
    system: ReshardSystem,
    trigger: Callable[[ReshardSystem], Awaitable[None]],
    *,
    extra_timeout_s: float = 0.0,
) -> ReshardRun:
    """Run the guild stream `warmup_s`, `trigger` a reshard, wait for the new generation (healthz), let the
    stream run `settle_s` more, stop it, drain, audit. Raises BenchmarkError when no new generation comes
    (the supervisor logged an abandoned, refused or fatal reshard, or the wait ran out)."""
    settings = system.settings
    before = (await system.ledger())["gateway"]
    marks = len(before["identifies"]), len(before["resumes"])
    log_marks = Counter(r["event"] for r in system.log_records(*FAILED_EVENTS))
    detail = await system.reshard_detail()
    generation = int(detail["generation"]) if detail else 0
    done_before = len(system.log_records("reshard.done"))
    await system.control("guild_event_rate", {"rate": settings.guild_event_rate})
    await trio.sleep(settings.warmup_s)
    triggered = time.monotonic()
    await trigger(system)
    timeout_s = settings.identify_bound_s + RESHARD_SLACK_S + extra_timeout_s
    detail = await wait_generation(system, generation, log_marks, timeout_s)
    observed_s = time.monotonic() - triggered
    system.progress.say(f"  new generation live after {observed_s:.1f} s: {detail}")
    await trio.sleep(settings.settle_s)
    audit, ledger = await drain(system)
    gateway = ledger["gateway"]
    guilds = guild_ledger_of(ledger["guilds"])
    by_count = identifies_by_count(gateway, marks[0])
    done = system.log_records("reshard.done")[done_before:]
    record = done[-1] if done else {}
    logged = Counter(r["event"] for r in system.log_records(*RESHARD_EVENTS))
    before_rules: dict[str, int] = before.get("rules_broken", {})
    run = ReshardRun(
        shards=settings.shards,
        target=settings.target,
        lost=len(audit.lost),
        duplicates=audit.duplicate_count,
        unknown=len(audit.unknown),
        max_guild_gap_s=audit.max_guild_gap_s,
        events=audit.events,
        undelivered=audit.undelivered,
        published=audit.published,
        duration_s=_number(record.get("duration_s")),
        ready_s=_number(record.get("ready_s")),
        observed_s=round(observed_s, 3),
        identify_bound_s=settings.identify_bound_s,
        guild_period_s=settings.guild_period_s,
        identifies=by_count.get(settings.target, 0),
        identifies_other=sum(n for count, n in by_count.items() if count != settings.target),
        resumes=resumes_since(gateway, marks[1]),
        overlaps=overlaps(gateway["counters"], gateway.get("rules_broken", {}))
        - overlaps(before["counters"], before_rules),
        generation=int(detail["generation"]),
        log_events=dict(sorted(logged.items())),
        rules_broken={
            rule: count - before_rules.get(rule, 0)
            for rule, count in gateway.get("rules_broken", {}).items()
            if count > before_rules.get(rule, 0)
        },
        deliveries_by_shard_count=audit.deliveries_by_shard_count,
        lost_sample=_sample_lost(guilds, audit, (settings.shards, settings.target)),
        duplicate_sample=dict(list(audit.duplicates.items())[:SAMPLE_KEYS]),
    )
    system.progress.say(
        f"  lost {run.lost}, duplicates {run.duplicates}, unknown {run.unknown}, max guild gap "
        f"{run.max_guild_gap_s:.2f} s, reshard {run.duration_s} s (bound {run.identify_bound_s:g} s), "
        f"identifies {run.identifies} of {settings.target} shards (+{run.identifies_other} others), resumes "
        f"{run.resumes}, overlaps {run.overlaps}; {run.published} published of {run.events} events"
    )
    return run


#: Every `reshard.*` event the supervisor logs (counted into `ReshardRun.log_events`).
RESHARD_EVENTS: Final = (
    "reshard.requested",
    "reshard.starting",
    "reshard.switching",
    "reshard.done",
    "reshard.unchanged",
    "reshard.sharding_required",
    "reshard.go_live_missed",
    "reshard.no_retire_report",
    "reshard.worker_killed",
    *FAILED_EVENTS,
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def wait_generation(
    system: ReshardSystem, generation: int, failed_before: Counter[str], timeout_s: float
) -> dict[str, Any]:
    """Until `detail.reshard` shows a generation past `generation` and the state idle; its detail then.
    BenchmarkError, quoting the log line, when the supervisor logs a failed reshard first."""
    detail: dict[str, Any] | None = None
    with trio.move_on_after(timeout_s):
        while True:
            system.check_alive()
            records = system.log_records(*FAILED_EVENTS)
            seen = Counter(r["event"] for r in records)
            new = {event for event in FAILED_EVENTS if seen[event] > failed_before[event]}
            if new:
                last = [r for r in records if r["event"] in new][-1]
                raise BenchmarkError(f"the reshard failed: {json.dumps(last)}")
            details = [await system.reshard_detail(url) for _, url in system.nodes]
            detail = details[0]
            if all(
                d is not None and int(d["generation"]) > generation and d["state"] == "idle" for d in details
            ):
                return details[0] or {}
            await trio.sleep(POLL_S)
    raise BenchmarkError(
        f"no new generation within {timeout_s:g} s of the trigger (detail.reshard {detail}); supervisor "
        f"log:\n{system.supervisor.log_tail()}"
    )


async def request_by_signal(system: ReshardSystem) -> None:
    """The simulator recommends the target shard count; SIGUSR1 makes the supervisor ask at once."""
    await system.control("recommended_shards", {"shards": system.settings.target})
    system.supervisor.process.send_signal(signal.SIGUSR1)
    system.progress.say(f"  recommended {system.settings.target} shards; SIGUSR1 to the supervisor")


# -- the suite ---------------------------------------------------------------------------------------------


def targets_for(settings: Settings) -> dict[str, Target]:
    return {
        "reshard.lost": Target("==", 0),
        "reshard.duplicates": Target("==", 0),
        "reshard.max_guild_gap_s": Target("<=", MAX_GUILD_GAP_S),
        "reshard.identifies": Target("==", settings.target),
        "reshard.overlaps": Target("==", 0),
        "reshard.duration_over_bound": Target("<=", DURATION_OVER_BOUND_MAX),
    }


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` (the same at every size), without running it."""
    return tuple(targets_for(SETTINGS[size]))


FIGURE_KEYS: Final = (
    "lost",
    "duplicates",
    "max_guild_gap_s",
    "guild_period_s",
    "duration_s",
    "ready_s",
    "identify_bound_s",
    "duration_over_bound",
    "identifies",
    "identifies_other",
    "resumes",
    "overlaps",
    "events",
    "published",
    "unknown",
)


def figures_of(run: ReshardRun | None) -> dict[str, float | None]:
    if run is None:
        return {}
    values = {**asdict(run), "duration_over_bound": run.duration_over_bound}
    return {f"reshard.{key}": values[key] for key in FIGURE_KEYS}


async def run_bench(
    settings: Settings,
    log_dir: Path,
    progress: Progress,
    amqp_url: str,
    errors: dict[str, str],
    nodes: int = 1,
) -> ReshardRun | None:
    try:
        async with open_reshard_system(settings, log_dir, progress, amqp_url, nodes=nodes) as system:
            return await measure_reshard(system, request_by_signal)
    except (BenchmarkError, OSError, httpx.HTTPError) as exc:
        errors["reshard"] = f"{exc.__class__.__name__}: {exc}"
        progress.say(f"  FAILED: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, "reshard", "4 -> 8 shards at 100 guild events/s (about a minute); --nodes 2: over a cluster"
    )
    add_amqp_url_argument(parser, "for the workers and the consumer")
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="run the supervisor as this many cluster nodes (CLUSTER_MODE=redis on 127.0.0.1:6379, each "
        "with --workers as its weight; default 1: one host)",
    )


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    nodes: int = max(1, getattr(args, "nodes", 1))
    json_path: Path = args.json
    log_dir: Path = args.logs or json_path.parent / "reshard-logs"
    progress = Progress()
    machine = machine_info()
    progress.say(
        f"reshard benchmark ({settings.name}): {settings.shards} -> {settings.target} shards, "
        f"{settings.workers} workers, max_concurrency {settings.max_concurrency}, {settings.guild_count} "
        f"guilds at {settings.guild_event_rate:g} events/s, {nodes} node(s); logs in {log_dir}"
    )
    errors: dict[str, str] = {}
    result = trio.run(run_bench, settings, log_dir, progress, args.amqp_url, errors, nodes)
    targets = targets_for(settings)
    figures = with_missing(figures_of(result), targets)
    judged = verdicts(figures, targets)
    results: dict[str, Any] = {
        "suite": "reshard",
        "settings": {
            **asdict(settings),
            "identify_bound_s": settings.identify_bound_s,
            "guild_period_s": settings.guild_period_s,
            "nodes": nodes,
        },
        **nest(figures),
        "targets": {key: str(target) for key, target in targets.items()},
        "verdicts": judged,
        "errors": errors,
        "runs": {"grow": asdict(result) if result is not None else None},
        "notes": {
            "trigger": "recommended_shards then SIGUSR1",
            "broker": "amqp (BROKER_ENCODING=json), a consumer keyed by the MESSAGE_CREATE id",
            "duration_s": "the supervisor's reshard.done duration_s: the reshard's start to the new "
            "generation live",
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, results)
    print(format_figures(figures, targets, errors))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if result is not None else 1, judged, args.strict)
