"""The worker's end of the supervisor's control channel (messages and framing: `workers.control_messages`).

Heartbeats come from the worker's own trio loop (a stalled loop stops them, and the supervisor replaces the
worker); identify permits come from the supervisor's gate, so every process of the bot shares one schedule;
with `SHARD_STORE_TYPE=memory` sessions are held by the supervisor, so a replaced worker RESUMEs. Session
writes are coalesced per shard and sent at most every `SESSION_FLUSH_S`. EOF on the channel means the
supervisor is gone: the worker stops (it would otherwise keep sessions nobody supervises).

The worker's first message is Hello; the supervisor's first is Configure, the worker's settings and shards
(`SupervisorLink.config`), which the worker waits for before it does anything else.

A live reshard's `Retire`, `GoLive` and `Uncovered` are queued, in order, for whatever runs the cut-over
(`SupervisorLink.cutover_messages`, read by `workers.main` into `workers.reshard.Cutover`); the worker answers
with `Retired`, and reports a shard closed with 4011 with `ShardingRequired`, through `send`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Final, TypeAlias

import trio

from .commands import GatewayCommand
from .config import WorkerConfig
from .control_messages import (
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
    SessionLoad,
    SessionReply,
    SessionsUpdate,
    ShardCommand,
    ShardStatistics,
    Uncovered,
    encode,
    read_messages,
)
from .sessions import StoredSession

__all__ = [
    "CutoverMessage",
    "SupervisorGone",
    "SupervisorLink",
    "control_fd_from_env",
    "open_supervisor_link",
]

#: What the link queues for the cut-over (`SupervisorLink.cutover_messages`).
CutoverMessage: TypeAlias = Retire | GoLive | Uncovered

LOGGER: Final = logging.getLogger("workers.control")
HEARTBEAT_INTERVAL_S: Final = 1.0
SESSION_FLUSH_S: Final = 0.1
SESSION_LOAD_TIMEOUT_S: Final = 5.0
#: How long a new worker waits for its Configure before it gives up (the supervisor sends it at once).
CONFIGURE_TIMEOUT_S: Final = 30.0
#: Commands from the supervisor's stdin waiting for their shard; beyond this they are dropped and logged (a
#: reader that stalled the control channel would stall heartbeats, and the worker would be replaced).
COMMAND_BACKLOG: Final = 1024
#: Retire/GoLive/Uncovered messages waiting for the cut-over (the supervisor sends a few per worker: Uncovered
#: again only when its set changes).
CUTOVER_BACKLOG: Final = 16


class SupervisorGone(Exception):
    """The control channel closed: the supervisor exited or was killed."""


class SupervisorLink:
    """Identify gate, session store and heartbeat over the control channel (see the module note)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[ControlMessage]] = {}
        self._pending_saves: dict[int, StoredSession | None] = {}
        self._dirty = trio.Event()
        self._configured = trio.Event()
        self._config: WorkerConfig | None = None
        self.gone = trio.Event()
        self._commands_in, self._commands_out = trio.open_memory_channel[GatewayCommand](COMMAND_BACKLOG)
        self._cutover_in, self._cutover_out = trio.open_memory_channel[CutoverMessage](CUTOVER_BACKLOG)
        #: What each heartbeat reports; the worker sets it once its shards exist.
        self.stats: Callable[[], Mapping[int, ShardStatistics]] = dict

    async def config(self) -> WorkerConfig:
        """The settings and shards the supervisor sent (waits for its Configure); SupervisorGone if it left
        first."""
        with trio.move_on_after(CONFIGURE_TIMEOUT_S):
            async with trio.open_nursery() as nursery:

                async def gone() -> None:
                    await self.gone.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(gone)
                await self._configured.wait()
                nursery.cancel_scope.cancel()
        if self._config is None:
            raise SupervisorGone
        return self._config

    def commands(self) -> trio.MemoryReceiveChannel[GatewayCommand]:
        """The commands the supervisor forwards from its stdin (`ShardCommand`), until the link closes."""
        return self._commands_out

    def cutover_messages(self) -> trio.MemoryReceiveChannel[CutoverMessage]:
        """The supervisor's `Retire`, `GoLive` and `Uncovered` messages, in arrival order, until the link
        closes."""
        return self._cutover_out

    # -- IdentifyGate ----------------------------------------------------------------------------------

    async def wait_for_permit(self, shard_id: int) -> None:
        request_id = next(self._ids)
        await self._request(IdentifyRequest(request_id, shard_id))

    async def wait_for_lease(self, shard_id: int) -> None:
        """Cluster mode: return once the supervisor says this node holds `shard_id`'s lease (before every
        connection, so a node that lost the lease never reconnects the shard)."""
        request_id = next(self._ids)
        await self._request(ConnectRequest(request_id, shard_id))

    # -- SessionStore ----------------------------------------------------------------------------------

    async def load(self, shard_id: int) -> StoredSession | None:
        if shard_id in self._pending_saves:
            return self._pending_saves[shard_id]  # newer than what the supervisor holds
        request_id = next(self._ids)
        with trio.move_on_after(SESSION_LOAD_TIMEOUT_S):
            reply = await self._request(SessionLoad(request_id, shard_id))
            return reply.session if isinstance(reply, SessionReply) else None
        LOGGER.warning("control.session_load_timeout", extra={"shard": shard_id})
        return None

    def save(self, shard_id: int, session: StoredSession) -> None:
        self._pending_saves[shard_id] = session
        self._dirty.set()

    def delete(self, shard_id: int) -> None:
        self._pending_saves[shard_id] = None
        self._dirty.set()

    async def flush(self) -> None:
        if self._pending_saves:
            await self._send_sessions()

    # -- plumbing --------------------------------------------------------------------------------------

    async def _request(self, message: IdentifyRequest | ConnectRequest | SessionLoad) -> ControlMessage:
        request_id = message.id
        send, receive = trio.open_memory_channel[ControlMessage](1)
        self._waiting[request_id] = send
        try:
            await self.send(message)
            with receive:
                return await receive.receive()
        except trio.EndOfChannel:
            raise SupervisorGone from None
        except BaseException:
            if isinstance(message, IdentifyRequest | ConnectRequest) and not self.gone.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self.send(IdentifyCancel(request_id))
            raise
        finally:
            self._waiting.pop(request_id, None)

    async def send(self, message: ControlMessage) -> None:
        data = encode(message)
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.gone.set()
                raise SupervisorGone from exc

    async def _send_sessions(self) -> None:
        pending, self._pending_saves = self._pending_saves, {}
        save = {shard: session for shard, session in pending.items() if session is not None}
        delete = tuple(shard for shard, session in pending.items() if session is None)
        await self.send(SessionsUpdate(save, delete))

    async def _read(self) -> None:
        async for message in read_messages(self._stream):
            if isinstance(message, ControlMessageError):
                LOGGER.warning("control.bad_message", extra={"reason": message.reason})
            elif isinstance(message, Configure):
                self._config = message.config
                self._configured.set()
            elif isinstance(message, Permit | SessionReply):
                waiter = self._waiting.get(message.id)
                if waiter is not None:
                    waiter.send_nowait(message)
            elif isinstance(message, ShardCommand):
                self._queue_command(GatewayCommand(message.shard, message.op, message.d))
            elif isinstance(message, Retire | GoLive | Uncovered):
                try:
                    self._cutover_in.send_nowait(message)
                except trio.WouldBlock:
                    LOGGER.warning("control.cutover_dropped", extra={"type": message.TYPE})
        self.gone.set()
        self._commands_in.close()
        self._cutover_in.close()
        for waiter in self._waiting.values():
            waiter.close()

    def _queue_command(self, command: GatewayCommand) -> None:
        try:
            self._commands_in.send_nowait(command)
        except trio.WouldBlock:
            LOGGER.warning("command.dropped", extra={"shard": command.shard_id, "backlog": COMMAND_BACKLOG})

    async def _flush_sessions(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await trio.sleep(SESSION_FLUSH_S)
            await self._send_sessions()

    async def _heartbeat(self) -> None:
        while True:
            await self.send(Heartbeat(self.stats()))
            await trio.sleep(HEARTBEAT_INTERVAL_S)


def control_fd_from_env(environ: dict[str, str] | None = None) -> int | None:
    value = (os.environ if environ is None else environ).get(CONTROL_FD_ENV, "").strip()
    return int(value) if value.isdigit() else None


@asynccontextmanager
async def open_supervisor_link(fd: int) -> AsyncIterator[SupervisorLink]:
    """Run the link (reader, heartbeats, session flushes) for the duration of the block.

    When the supervisor goes away the block's scope is cancelled: the worker stops with it.
    """
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    stream = trio.SocketStream(sock)
    link = SupervisorLink(stream)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(link._read)
        await link.send(Hello(os.getpid()))
        nursery.start_soon(link._heartbeat)
        nursery.start_soon(link._flush_sessions)

        async def stop_when_gone() -> None:
            await link.gone.wait()
            LOGGER.error("control.supervisor_gone")
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_when_gone)
        try:
            yield link
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0), contextlib.suppress(SupervisorGone):
                await link.flush()
            nursery.cancel_scope.cancel()
