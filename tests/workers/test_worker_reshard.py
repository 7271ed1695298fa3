"""Live resharding through the control channel: the new messages' wire format, SupervisorLink's dispatch of
Retire/GoLive/Uncovered, and a worker (in-process, `run_worker`, on a real socketpair with this test as its
supervisor) against the simulator: a shadow publishes nothing until GoLive, a Retire answers Retired, closes
with 1000 and exits 0, close 4011 under `reshard` stops only its shard, and a shadow saves its session at
READY (killed within its 5 s buffer, it RESUMEs)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio

from benchmarks.simulator import GatewayConfig, Simulator, SimulatorConfig, open_simulator
from tests.workers.test_worker_gateway import (
    RecordingPublisher,
    gateway,
    ready_count,
    wait_until,
    worker_config,
)
from workers.config import ShardAssignment, WorkerConfig
from workers.control import open_supervisor_link
from workers.control_messages import (
    MAX_LINE_BYTES,
    MAX_WIRE_DIGESTS,
    Configure,
    ControlMessage,
    ControlMessageError,
    GoLive,
    Heartbeat,
    IdentifyRequest,
    Permit,
    Retire,
    Retired,
    SessionLoad,
    SessionReply,
    SessionsUpdate,
    ShardingRequired,
    ShardStatistics,
    Uncovered,
    decode,
    encode,
    read_messages,
)
from workers.errors import ConfigError
from workers.exit_status import ExitStatus
from workers.main import run_worker
from workers.reshard import event_digest, pack_digests, unpack_digests
from workers.sessions import StoredSession
from workers.settings import Settings
from workers.shard import ShardRunner

TIMEOUT_S = 30

# -- wire format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Retire(),
        Retired(b""),
        Retired(pack_digests([1, 2**64 - 1, 12345])),
        GoLive(pack_digests(range(1000))),
        ShardingRequired(7),
        Uncovered(4, (0, 3)),
        Uncovered(8, ()),
    ],
)
def test_the_reshard_messages_round_trip(message: ControlMessage) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


def test_digests_travel_as_base64_and_a_full_line_fits() -> None:
    assert encode(Retired(b"\x00" * 8)) == b'{"digests":"AAAAAAAAAAA=","type":"retired"}\n'
    assert MAX_WIRE_DIGESTS > 350_000
    assert len(encode(GoLive(b"\xff" * 8 * MAX_WIRE_DIGESTS))) < MAX_LINE_BYTES
    assert len(encode(Retired(b"\xff" * 8 * 100_000))) < 1_100_000


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"retired","digests":"AAAA"}',  # 3 bytes: not whole digests
        b'{"type":"go_live","digests":"not base64!"}',
        b'{"type":"go_live","digests":12}',
        b'{"type":"go_live"}',
        b'{"type":"sharding_required","shard":"x"}',
        b'{"type":"uncovered","shard_count":4,"shards":[4]}',  # not a shard of 4
        b'{"type":"uncovered","shard_count":0,"shards":[]}',
        b'{"type":"uncovered","shard_count":4,"shards":7}',
        b'{"type":"uncovered","shard_count":4}',
        b'{"type":"resign"}',  # unknown: still refused, and the reader logs and skips it
    ],
)
def test_malformed_reshard_messages_are_refused(line: bytes) -> None:
    with pytest.raises(ControlMessageError):
        decode(line)


def test_uncovered_on_the_wire() -> None:
    assert encode(Uncovered(4, (0, 2))) == b'{"shard_count":4,"shards":[0,2],"type":"uncovered"}\n'


async def test_the_link_queues_uncovered_in_order_with_retire_and_go_live() -> None:
    ours, theirs = socket.socketpair()
    supervisor = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    sent: list[ControlMessage] = [Uncovered(4, (1,)), GoLive(b""), Uncovered(4, ()), Retire()]
    with trio.fail_after(TIMEOUT_S):
        async with supervisor, open_supervisor_link(theirs.detach()) as link:
            for message in sent:
                await supervisor.send_all(encode(message))
            received = link.cutover_messages()
            assert [await received.receive() for _ in sent] == sent


def test_the_assignment_carries_role_and_reshard() -> None:
    settings = Settings(token="t0ken")
    default = ShardAssignment((0,), 2)
    assert default.role == "live" and default.reshard is False
    for assignment in (default, ShardAssignment((1, 3), 4, role="shadow", reshard=True)):
        message = decode(encode(Configure(WorkerConfig(settings, assignment))))
        assert isinstance(message, Configure) and message.config.assignment == assignment
    # A supervisor of the previous version sends neither: today's behaviour.
    line = encode(Configure(WorkerConfig(settings, default))).replace(b',"role":"live","reshard":false', b"")
    assert b"role" not in line
    old = decode(line)
    assert isinstance(old, Configure) and old.config.assignment == default
    with pytest.raises(ControlMessageError):
        decode(encode(Configure(WorkerConfig(settings, default))).replace(b'"live"', b'"ghost"'))
    with pytest.raises(ConfigError, match="role"):
        ShardAssignment((0,), 1, role="ghost")  # type: ignore[arg-type]


def test_heartbeats_carry_guilds_pending_and_role() -> None:
    stats = ShardStatistics(0, "ready", 5, 4, "s", 0.1, 1, 0, {}, 5, 5, 0, 0, guilds_pending=3, role="shadow")
    message = decode(encode(Heartbeat({0: stats})))
    assert message == Heartbeat({0: stats})
    line = encode(Heartbeat({0: replace(stats, guilds_pending=0, role="live")}))
    old = decode(line.replace(b',"guilds_pending":0,"role":"live"', b""))
    assert isinstance(old, Heartbeat) and old.shards[0].role == "live" and old.shards[0].guilds_pending == 0


# -- a worker on a control channel -------------------------------------------------------------------------


class FakeSupervisor:
    """The supervisor's end: permits every identify, holds the sessions (`sessions`, which a test may share
    with a later worker's), records what the worker says."""

    def __init__(self, stream: trio.SocketStream, sessions: dict[int, StoredSession] | None = None) -> None:
        self.stream = stream
        self.received: list[ControlMessage] = []
        self.heartbeat: Heartbeat | None = None
        self.sessions: dict[int, StoredSession] = {} if sessions is None else sessions

    async def serve(self) -> None:
        async for message in read_messages(self.stream):
            if isinstance(message, IdentifyRequest):
                await self.send(Permit(message.id))
            elif isinstance(message, SessionLoad):
                await self.send(SessionReply(message.id, self.sessions.get(message.shard)))
            elif isinstance(message, SessionsUpdate):
                self.sessions.update(message.save)
                for shard in message.delete:
                    self.sessions.pop(shard, None)
                self.received.append(message)
            elif isinstance(message, Heartbeat):
                self.heartbeat = message
            elif not isinstance(message, ControlMessageError):
                self.received.append(message)

    async def send(self, message: ControlMessage) -> None:
        await self.stream.send_all(encode(message))

    def of_type(self, kind: type[Any]) -> list[Any]:
        return [message for message in self.received if isinstance(message, kind)]

    def roles(self) -> set[str]:
        return {stats.role for stats in self.heartbeat.shards.values()} if self.heartbeat else set()


@asynccontextmanager
async def supervised_worker(
    sim: Simulator,
    shards: int,
    sink: RecordingPublisher,
    sessions: dict[int, StoredSession] | None = None,
    **assignment: Any,
) -> AsyncIterator[tuple[FakeSupervisor, dict[int, ShardRunner], list[int]]]:
    """A worker on `sim` under a FakeSupervisor (holding `sessions`); cancelled (not stopped) at the end."""
    async with trio.open_nursery() as nursery:
        ours, theirs = socket.socketpair()
        supervisor = FakeSupervisor(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), sessions)
        nursery.start_soon(supervisor.serve)
        config = worker_config(sim, shards)
        config = replace(config, assignment=replace(config.assignment, **assignment))
        status: list[int] = []

        async def run(task_status: trio.TaskStatus[dict[int, ShardRunner]]) -> None:
            async with open_supervisor_link(theirs.detach()) as link:
                status.append(await run_worker(config, link=link, publisher=sink, task_status=task_status))

        async with supervisor.stream:
            runners = await nursery.start(run)
            yield supervisor, runners, status
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def supervised(
    gateway_config: GatewayConfig, shards: int, sink: RecordingPublisher, **assignment: Any
) -> AsyncIterator[tuple[Simulator, FakeSupervisor, dict[int, ShardRunner], list[int]]]:
    async with (
        open_simulator(SimulatorConfig(gateway=gateway_config)) as sim,
        supervised_worker(sim, shards, sink, **assignment) as (supervisor, runners, status),
    ):
        yield sim, supervisor, runners, status


async def test_a_shadow_publishes_nothing_until_go_live_then_retires_with_1000() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with supervised(gateway(event_rate=100), 2, sink, role="shadow", reshard=True) as (
            sim,
            supervisor,
            runners,
            status,
        ):
            await wait_until(lambda: ready_count(runners) == 2 and supervisor.roles() == {"shadow"})
            await wait_until(lambda: all(r.statistics().dispatches >= 20 for r in runners.values()))
            assert sink.events == []
            assert all(runner.statistics().committed_seq == 0 for runner in runners.values())  # < 5 s old
            # The old generation published the first event in shard 0's buffer (its READY).
            skipped = next(event for event, _ in runners[0].outlet._buffer)
            await supervisor.send(GoLive(pack_digests([event_digest(skipped.name, skipped.data)])))
            await wait_until(lambda: supervisor.roles() == {"live"} and len(sink.events) >= 100)
            published = {(event.shard_id, event.seq) for event in sink.events}
            assert (0, skipped.seq) not in published and (0, skipped.seq + 1) in published
            assert (1, 1) in published  # shard 1's buffer came out whole, from its first event
            assert runners[0].outlet.suppressed == 1

            await supervisor.send(Retire())
            await wait_until(lambda: bool(status))
            assert status == [ExitStatus.OK]
            (retired,) = supervisor.of_type(Retired)
            digests = unpack_digests(retired.digests)
            assert {event_digest(event.name, event.data) for event in sink.events} == digests
            assert dict(sim.gateway.ledger.closes_received) == {"1000": 2}


async def test_close_4011_under_reshard_stops_only_that_shard() -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with supervised(gateway(event_rate=100), 2, sink, reshard=True) as (
            sim,
            supervisor,
            runners,
            status,
        ):
            await wait_until(lambda: ready_count(runners) == 2)
            await sim.gateway.control("close", {"shards": [0], "code": 4011})
            await wait_until(lambda: bool(supervisor.of_type(ShardingRequired)))
            before = runners[1].statistics().dispatches
            await trio.sleep(1.0)
            assert supervisor.of_type(ShardingRequired) == [ShardingRequired(0)]
            assert runners[1].statistics().dispatches > before + 20  # the other shard runs on
            assert runners[0].statistics().state == "fatal"
            assert sim.gateway.ledger.counters["connections"] == 2  # no reconnect loop
            assert status == []  # the worker runs on


async def test_close_4011_without_reshard_still_exits_3_naming_shards(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingPublisher()
    with trio.fail_after(TIMEOUT_S):
        async with supervised(gateway(event_rate=0), 2, sink) as (sim, supervisor, runners, status):
            await wait_until(lambda: ready_count(runners) == 2)
            await sim.gateway.control("close", {"shards": [0], "code": 4011})
            await wait_until(lambda: bool(status))
            assert status == [ExitStatus.FATAL]
            assert supervisor.of_type(ShardingRequired) == []
    [record] = [r for r in caplog.records if r.getMessage() == "shard.sharding_required"]
    assert "--shards" in record.hint  # type: ignore[attr-defined]


async def test_a_shadow_saves_its_session_at_ready_and_resumes_when_killed_within_5_s() -> None:
    sink = RecordingPublisher()
    sessions: dict[int, StoredSession] = {}
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(SimulatorConfig(gateway=gateway(event_rate=50))) as sim:
            async with supervised_worker(sim, 2, sink, sessions, role="shadow", reshard=True) as (
                _,
                runners,
                _,
            ):
                await wait_until(lambda: ready_count(runners) == 2 and len(sessions) == 2)
                # Saved at READY, before anything left the 5 s buffer: seq 0, of the sessions READY began.
                assert all(runner.statistics().committed_seq == 0 for runner in runners.values())
                assert {shard: (stored.session_id, stored.seq) for shard, stored in sessions.items()} == {
                    shard: (runner.statistics().session_id, 0) for shard, runner in runners.items()
                }
                assert all(stored.shard_count == 2 for stored in sessions.values())
                first = {shard: runner.statistics().session_id for shard, runner in runners.items()}
            # Killed (cancelled, no stop) well within the 5 s; the next worker RESUMEs both sessions.
            async with supervised_worker(sim, 2, sink, sessions, role="shadow", reshard=True) as (
                _,
                runners,
                _,
            ):
                await wait_until(lambda: ready_count(runners) == 2)
                stats = {shard: runner.statistics() for shard, runner in runners.items()}
                assert {shard: stat.session_id for shard, stat in stats.items()} == first
                assert all(stat.identifies == 0 and stat.resumes == 1 for stat in stats.values())
                await wait_until(lambda: all(r.statistics().dispatches >= 10 for r in runners.values()))
            assert sink.events == []  # a shadow publishes nothing, replayed or not
