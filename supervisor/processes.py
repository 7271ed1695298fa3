"""One worker process slot: spawn, serve its control channel, watch its heartbeats, restart it.

Design note. Workers are fresh interpreters started with `trio.lowlevel.open_process([sys.executable, "-m",
"workers"])` (never fork inside trio; anchors/style-and-ecosystem.md), each given one end of a Unix socketpair
(`SUPERVISOR_CONTROL_FD`, messages in workers/control_messages.py). The slot's first message to a worker is
its `Configure` (settings, token included, and shards): nothing of it is put in the worker's environment,
where any process of the same user could read it in /proc. The slot answers identify requests from the
supervisor's one gate, so IDENTIFYs of all processes follow one schedule, and (with `SHARD_STORE_TYPE=memory`)
holds the sessions its worker hands back, so the replacement of a dead worker RESUMEs every shard. A worker
whose heartbeats stop for `HEARTBEAT_TIMEOUT_S` (a stalled trio loop, a deadlock) is killed and replaced like
a crashed one. Exit status 3 from a worker (a fatal close code) is not a crash: the supervisor stops
everything, since no restart can succeed.

Live resharding (supervisor/reshard.py) runs two generations of slots at once: the session book keys a
session by shard id *and* shard count, a slot carries its worker's `ShardingRequired` (a 4011) to the
supervisor, sends it `Retire` and keeps the digests of its `Retired` answer, and `promote()` makes a shadow
slot's worker, and any replacement of it, live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from workers.config import WorkerConfig
from workers.control_messages import (
    CONTROL_FD_ENV,
    Configure,
    ConnectRequest,
    ControlMessage,
    ControlMessageError,
    GoLive,
    Heartbeat,
    Hello,
    IdentifyCancel,
    IdentifyRequest,
    Permit,
    Retire,
    Retired,
    SessionLoad,
    SessionReply,
    SessionsUpdate,
    ShardCommand,
    ShardingRequired,
    ShardStatistics,
    Uncovered,
    encode,
    read_messages,
)
from workers.identify import IdentifyGate
from workers.sessions import StoredSession

__all__ = ["HEARTBEAT_TIMEOUT_S", "SessionBook", "WorkerSlot"]

LOGGER: Final = logging.getLogger("supervisor.processes")
HEARTBEAT_TIMEOUT_S: Final = 10.0


@dataclass(slots=True)
class SessionBook:
    """Sessions handed back by workers (`SHARD_STORE_TYPE=memory`), keyed by (shard id, shard count): during
    a live reshard two generations' shards of one id are different shards."""

    sessions: dict[tuple[int, int], StoredSession] = field(default_factory=dict)

    def update(self, message: SessionsUpdate, shard_count: int) -> None:
        self.sessions.update(((shard, shard_count), session) for shard, session in message.save.items())
        for shard in message.delete:
            self.sessions.pop((shard, shard_count), None)

    def get(self, shard: int, shard_count: int) -> StoredSession | None:
        return self.sessions.get((shard, shard_count))


class WorkerSlot:
    """A place for one worker process and its shard range; `run` keeps a worker in it."""

    def __init__(
        self,
        index: int,
        shard_ids: tuple[int, ...],
        *,
        config: WorkerConfig,
        environment: Callable[[], dict[str, str]],
        gate: IdentifyGate,
        book: SessionBook | None,
        on_exit: Callable[[WorkerSlot, int | None], float | None],
        lease: Callable[[int], Awaitable[None]] | None = None,
        on_sharding_required: Callable[[WorkerSlot, int], None] | None = None,
    ) -> None:
        self.index = index
        self.shard_ids = shard_ids
        self._config = config
        self._environment = environment
        self._gate = gate
        self._book = book
        self._on_exit = on_exit
        #: Cluster mode: returns once this node holds a shard's lease (answers `ConnectRequest`).
        self._lease = lease
        #: RESHARD=auto: told when one of this worker's shards was closed with 4011.
        self._on_sharding_required = on_sharding_required
        #: Set when the worker answered `Retire` (live resharding); its digests in `retired_digests`.
        self.retired = trio.Event()
        self.retired_digests = b""
        self.process: trio.Process | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.last_heartbeat = -math.inf
        self.stats: Mapping[int, ShardStatistics] = {}
        self.connected = trio.Event()
        self.restarts = 0
        self.stopping = False
        #: Set when the slot killed its worker for missing heartbeats (the restart's cause).
        self.unresponsive = False
        self._identify_scopes: dict[int, trio.CancelScope] = {}
        self._heartbeat = trio.Event()
        #: Sends on the running worker's control channel; None while no worker is connected.
        self._send: Callable[[ControlMessage], Awaitable[None]] | None = None

    # -- queries -------------------------------------------------------------------------------------------

    async def wait_heartbeat(self) -> None:
        """Wait for the next heartbeat (new shard statistics) of this slot's worker, whichever it is."""
        await self._heartbeat.wait()

    def ready_shards(self) -> int:
        return sum(1 for stats in self.stats.values() if stats.state == "ready")

    def statistics(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "shards": f"{self.shard_ids[0]}-{self.shard_ids[-1]}",
            "ready": self.ready_shards(),
            "restarts": self.restarts,
        }

    @property
    def shard_count(self) -> int:
        return self._config.assignment.shard_count

    @property
    def role(self) -> str:
        return self._config.assignment.role

    def guilds_pending(self) -> int:
        return sum(stats.guilds_pending for stats in self.stats.values())

    async def send_command(self, command: ShardCommand) -> bool:
        """Forward a gateway command to this slot's worker; False when none is connected (restarting).
        A checkpoint (the control channel's send)."""
        return await self.send_control(command)

    async def send_control(self, message: ShardCommand | Retire | GoLive | Uncovered) -> bool:
        """Send `message` to the running worker; False when none is connected (restarting)."""
        send = self._send
        if send is None or not self.connected.is_set():
            return False
        await send(message)
        return True

    def promote(self) -> None:
        """A shadow generation's slot goes live: a replacement of its worker starts live too."""
        assignment = dataclasses.replace(self._config.assignment, role="live")
        self._config = dataclasses.replace(self._config, assignment=assignment)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker running until `stop()` or until the supervisor says not to restart (returns)."""
        started = False
        while True:
            returncode = await self._run_once(task_status if not started else trio.TASK_STATUS_IGNORED)
            started = True
            if self.stopping:
                return
            delay = self._on_exit(self, returncode)
            if delay is None:
                return
            self.restarts += 1
            await trio.sleep(delay)
            if self._stop_requested():
                return  # stopped while waiting to restart (cluster mode: the group was handed over)

    def _stop_requested(self) -> bool:
        # A method, not the attribute, so type checkers don't assume `stop()` cannot run during a sleep.
        return self.stopping

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the worker to stop (SIGTERM: resumable closes, flushed sessions); `run` then returns."""
        self.stopping = True
        self.signal(sig)

    def signal(self, sig: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(sig)

    async def _run_once(self, task_status: trio.TaskStatus[None]) -> int | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = self._environment()
        env[CONTROL_FD_ENV] = str(child.fileno())
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "workers"],
                env=env,
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.process = process
        self.pid = process.pid
        self.started_at = trio.current_time()
        self.last_heartbeat = self.started_at
        self.stats = {}
        self.connected = trio.Event()
        self.unresponsive = False
        LOGGER.info(
            "worker.started", extra={"worker": self.index, "pid": process.pid, "shards": len(self.shard_ids)}
        )
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_control, stream, nursery)
            nursery.start_soon(self._watch_heartbeats, process)
            task_status.started()
            await process.wait()
            nursery.cancel_scope.cancel()
        returncode = process.returncode
        level = logging.INFO if returncode == 0 or self.stopping else logging.WARNING
        LOGGER.log(
            level, "worker.exited", extra={"worker": self.index, "pid": process.pid, "code": returncode}
        )
        return returncode

    async def _watch_heartbeats(self, process: trio.Process) -> None:
        while process.returncode is None:
            await trio.sleep(1.0)
            silent = trio.current_time() - self.last_heartbeat
            if silent > HEARTBEAT_TIMEOUT_S and not self.stopping:
                LOGGER.error(
                    "worker.unresponsive", extra={"worker": self.index, "silent_s": round(silent, 1)}
                )
                process.kill()
                return

    # -- control channel -----------------------------------------------------------------------------------

    async def _serve_control(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        send_lock = trio.Lock()

        async def reply(message: ControlMessage) -> None:
            async with send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(encode(message))

        await reply(Configure(self._config))
        self._send = reply
        try:
            async for message in read_messages(stream):
                if isinstance(message, ControlMessageError):
                    LOGGER.warning(
                        "worker.bad_control_message", extra={"worker": self.index, "reason": message.reason}
                    )
                    continue
                self._handle(message, reply, nursery)
        finally:
            self._send = None

    def _handle(self, message: ControlMessage, reply: Any, nursery: trio.Nursery) -> None:
        if isinstance(message, Heartbeat):
            self.last_heartbeat = trio.current_time()
            self.stats = message.shards
            self._heartbeat.set()
            self._heartbeat = trio.Event()
        elif isinstance(message, Hello):
            self.last_heartbeat = trio.current_time()
            self.connected.set()
        elif isinstance(message, IdentifyRequest):
            permit = functools.partial(self._gate.wait_for_permit, message.shard)
            nursery.start_soon(self._grant, message.id, permit, reply)
        elif isinstance(message, ConnectRequest):
            lease = self._lease or _no_lease
            nursery.start_soon(self._grant, message.id, functools.partial(lease, message.shard), reply)
        elif isinstance(message, IdentifyCancel):
            scope = self._identify_scopes.pop(message.id, None)
            if scope is not None:
                scope.cancel()
        elif isinstance(message, SessionLoad):
            session = self._book.get(message.shard, self.shard_count) if self._book is not None else None
            nursery.start_soon(reply, SessionReply(message.id, session))
        elif isinstance(message, SessionsUpdate) and self._book is not None:
            self._book.update(message, self.shard_count)
        elif isinstance(message, ShardingRequired) and self._on_sharding_required is not None:
            self._on_sharding_required(self, message.shard)
        elif isinstance(message, Retired):
            self.retired_digests = message.digests
            self.retired.set()
        else:
            LOGGER.debug("worker.control_ignored", extra={"worker": self.index, "kind": message.TYPE})

    async def _grant(self, request_id: int, wait: Callable[[], Awaitable[None]], reply: Any) -> None:
        """Answer request `request_id` with a Permit once `wait` returns (an identify permit, or a lease in
        cluster mode); an `IdentifyCancel` of the same id cancels it."""
        with trio.CancelScope() as scope:
            self._identify_scopes[request_id] = scope
            try:
                await wait()
            finally:
                self._identify_scopes.pop(request_id, None)
            await reply(Permit(request_id))


async def _no_lease(_shard: int) -> None:
    """Outside cluster mode every connection may go ahead."""
    await trio.lowlevel.checkpoint()
