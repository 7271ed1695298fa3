"""A worker's shards against the simulator over real sockets: every dispatch delivered, faults handled.

The worker runs in-process (`run_worker`) with a recording sink behind the real publish pump, so each test can
compare what reached the sink with the simulator's ledger: for every session the published seqs must be
exactly 1..N without a gap (at-least-once: duplicates allowed, losses not).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio

from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator
from workers.config import ShardAssignment, WorkerConfig
from workers.exit_status import ExitStatus
from workers.main import run_worker
from workers.publish.base import OutboundEvent
from workers.settings import Settings
from workers.shard import ShardRunner

TIMEOUT_S = 40


class RecordingPublisher:
    """A sink that keeps every event; `blocked` makes it hold batches (a broker that stopped confirming)."""

    def __init__(self) -> None:
        self.events: list[OutboundEvent] = []
        self.unblocked = trio.Event()
        self.unblocked.set()

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        await self.unblocked.wait()
        self.events.extend(batch)

    def seqs(self) -> dict[tuple[int, str], set[int]]:
        by_session: dict[tuple[int, str], set[int]] = defaultdict(set)
        for event in self.events:
            by_session[(event.shard_id, event.session_id)].add(event.seq)
        return by_session


def assert_no_gaps(sink: RecordingPublisher, sim: Simulator) -> None:
    """Every session's published seqs are 1..max, and max reaches what the simulator sent to it."""
    for (shard, session_id), seqs in sink.seqs().items():
        assert seqs == set(range(1, max(seqs) + 1)), f"shard {shard} session {session_id} has gaps"
        view = sim.gateway.ledger.sessions[session_id]
        assert view.shard_id == shard
        assert max(seqs) >= view.last_seq - 600, "far behind what the simulator produced"


def worker_config(sim: Simulator, shards: int, **changes: Any) -> WorkerConfig:
    settings = Settings(
        token=DEFAULT_TOKEN, api_url=sim.addresses.rest_url, broker_type="null", compression="zlib-stream"
    )
    return WorkerConfig(replace(settings, **changes), ShardAssignment(tuple(range(shards)), shards))


@asynccontextmanager
async def running(
    gateway: GatewayConfig, shards: int, sink: RecordingPublisher, **worker: Any
) -> AsyncIterator[tuple[Simulator, dict[int, ShardRunner], list[int]]]:
    """The simulator and a worker on it; yields (sim, runners, [exit status once the worker ended])."""
    pump_capacity = worker.pop("pump_capacity", None)
    async with open_simulator(SimulatorConfig(gateway=gateway)) as sim, trio.open_nursery() as nursery:
        status: list[int] = []

        async def run(task_status: trio.TaskStatus[dict[int, ShardRunner]]) -> None:
            status.append(
                await run_worker(
                    worker_config(sim, shards, **worker),
                    publisher=sink,
                    pump_capacity=pump_capacity,
                    task_status=task_status,
                )
            )

        runners = await nursery.start(run)
        yield sim, runners, status
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Any, timeout: float = 15.0, step: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


def ready_count(runners: dict[int, ShardRunner]) -> int:
    return sum(1 for runner in runners.values() if runner.statistics().state == "ready")


def gateway(**changes: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "shard_count": 3,
        "max_concurrency": 16,
        "event_rate": 150.0,
        "guilds_per_shard": 1,
        "heartbeat_interval_ms": 45_000,
    }
    settings.update(changes)
    return GatewayConfig(**settings)


async def test_every_dispatch_of_every_shard_reaches_the_sink() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(), 3, sink, compression="zstd-stream") as (sim, runners, _):
            await wait_until(lambda: ready_count(runners) == 3)
            await wait_until(lambda: len(sink.events) >= 600)
            ledger = sim.gateway.ledger
            assert ledger.counters["identifies_accepted"] == 3
            assert not set(ledger.rules_broken()) - {"heartbeat_no_jitter"}
            assert_no_gaps(sink, sim)
            names = {event.name for event in sink.events}
            assert {"READY", "GUILD_CREATE", "MESSAGE_CREATE"} <= names
            stats = runners[0].statistics()
            assert stats.committed_seq > 0 and stats.session_id is not None


@pytest.mark.parametrize(
    ("fault", "body", "resumes"),
    [
        ("reconnect", {}, True),
        ("invalidate", {"resumable": True}, True),
        ("close", {"code": 4000}, True),
        ("drop", {}, True),
        ("corrupt", {}, True),
        ("invalidate", {"resumable": False}, False),
        ("close", {"code": 4009}, False),
        ("close", {"code": 4007}, False),
    ],
)
async def test_fault_on_one_shard_loses_nothing(fault: str, body: dict[str, Any], resumes: bool) -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(), 3, sink) as (sim, runners, _):
            await wait_until(lambda: ready_count(runners) == 3 and len(sink.events) >= 100)
            connections_before = sim.gateway.ledger.counters["connections"]
            await sim.gateway.control(fault, {"shards": [1], **body})
            ledger = sim.gateway.ledger
            if resumes:
                await wait_until(lambda: ledger.counters["resumes_ok"] == 1)
                record = ledger.resumes[0]
                assert record.shard == 1 and record.via_resume_url
                assert ledger.counters["identifies"] == 3
            else:
                await wait_until(lambda: ledger.counters["identifies_accepted"] == 4)
                assert ledger.counters.get("resumes", 0) == 0  # never a doomed RESUME
            await wait_until(lambda: ready_count(runners) == 3)
            await trio.sleep(0.3)
            # Only shard 1 reconnected.
            assert ledger.counters["connections"] == connections_before + 1, ledger.snapshot()
            assert_no_gaps(sink, sim)
            closes = set(ledger.closes_received) - {"4900", "None"}
            assert not closes, f"unexpected client close codes {closes}"
            # A jittered first beat lands in the first 1% of the interval one time in a hundred, which the
            # simulator reports as `heartbeat_no_jitter`; the jitter itself is tested exactly in the core.
            assert not set(ledger.rules_broken()) - {"heartbeat_no_jitter"}


async def test_zombie_connection_is_detected_and_resumed() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(heartbeat_interval_ms=1000, event_rate=50), 2, sink) as (sim, runners, _):
            await wait_until(lambda: ready_count(runners) == 2)
            await sim.gateway.control("blackhole", {"shards": [0]})
            started = trio.current_time()
            await wait_until(lambda: sim.gateway.ledger.counters["resumes_ok"] == 1)
            # Detection within one interval plus the ACK deadline (1 s each here), plus the 1 s attempt floor.
            assert trio.current_time() - started < 4.0
            await trio.sleep(0.3)
            assert_no_gaps(sink, sim)


async def test_fatal_close_code_stops_the_worker_with_status_3() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(event_rate=0), 2, sink) as (sim, runners, status):
            await wait_until(lambda: ready_count(runners) == 2)
            await sim.gateway.control("close", {"shards": [0], "code": 4004})
            await wait_until(lambda: bool(status))
            assert status == [ExitStatus.FATAL]
            assert sim.gateway.ledger.counters["connections"] == 2  # no reconnect loop


async def test_broker_backpressure_drops_and_resumes_without_loss() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(event_rate=400), 1, sink, pump_capacity=200) as (sim, runners, _):
            await wait_until(lambda: ready_count(runners) == 1 and len(sink.events) > 50)
            sink.unblocked = trio.Event()  # the broker stops confirming
            await wait_until(lambda: runners[0].statistics().backpressure_drops >= 1)
            queued = len(sink.events)
            await trio.sleep(0.5)
            assert (
                len(sink.events) == queued
            )  # nothing accepted while blocked, and the worker held at most 200
            sink.unblocked.set()
            await wait_until(lambda: sim.gateway.ledger.counters["resumes_ok"] >= 1)
            await wait_until(lambda: ready_count(runners) == 1)
            await trio.sleep(0.3)
            assert_no_gaps(sink, sim)


async def test_graceful_stop_closes_with_a_resumable_code() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with running(gateway(event_rate=0), 2, sink) as (sim, runners, status):
            await wait_until(lambda: ready_count(runners) == 2)
            async with trio.open_nursery() as nursery:
                for runner in runners.values():
                    nursery.start_soon(runner.stop)
            await wait_until(lambda: bool(status))
            assert status == [ExitStatus.OK]
            assert dict(sim.gateway.ledger.closes_received) == {"4900": 2}
            assert all(session.state == "detached" for session in sim.gateway.ledger.sessions.values())


async def test_events_filter_publishes_only_the_named_events_and_still_commits() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        only_messages = frozenset({"MESSAGE_CREATE"})
        async with running(gateway(event_rate=200), 1, sink, events=only_messages) as (_sim, runners, _):
            await wait_until(lambda: len(sink.events) >= 100)
            assert {event.name for event in sink.events} == {"MESSAGE_CREATE"}
            # Filtered events (READY, GUILD_CREATE, presences...) count as committed once all before them are.
            await wait_until(
                lambda: runners[0].statistics().committed_seq > max(e.seq for e in sink.events[:50])
            )
            seq = runners[0].statistics().committed_seq
            published = {event.seq for event in sink.events}
            assert any(s not in published for s in range(1, seq + 1))


@pytest.mark.parametrize("compression", ["zlib-stream", "zstd-stream"])
async def test_large_guild_create_split_across_frames(compression: str) -> None:
    sink = RecordingPublisher()
    settings = gateway(
        event_rate=40, large_guild_probability=0.1, large_guild_bytes=3_000_000, zlib_split_bytes=65_536
    )
    with trio.fail_after(TIMEOUT_S):
        async with running(settings, 1, sink, compression=compression) as (sim, _runners, _):
            await wait_until(
                lambda: sum(e.name == "GUILD_CREATE" and len(e.data) > 2_000_000 for e in sink.events) >= 1
            )
            assert_no_gaps(sink, sim)
            assert sim.gateway.ledger.counters["connections"] == 1  # no reconnect: nothing was too large
