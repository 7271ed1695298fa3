"""The worker's end of the supervisor's control channel.

Design note. The supervisor starts each worker with one end of a Unix socketpair (its fd number in
`SUPERVISOR_CONTROL_FD`). Both ends speak JSON lines; every message has a `type`:

    worker -> supervisor                                supervisor -> worker
    {"type": "hello", "pid", "shards"}                  {"type": "permit", "id"}
    {"type": "heartbeat", "shards": {id: stats}}        {"type": "session", "id", "session": {...} | null}
    {"type": "identify", "id", "shard"}
    {"type": "identify_cancel", "id"}
    {"type": "session_load", "id", "shard"}
    {"type": "sessions", "save": {shard: {...}}, "delete": [shard, ...]}

Heartbeats come from the worker's own trio loop (a stalled loop stops them, and the supervisor replaces the
worker); identify permits come from the supervisor's gate, so every process of the bot shares one schedule;
with `SHARD_STORE_TYPE=memory` sessions are held by the supervisor, so a replaced worker RESUMEs. Session
writes are coalesced per shard and sent at most every `SESSION_FLUSH_S`. EOF on the channel means the
supervisor is gone: the worker stops (it would otherwise keep sessions nobody supervises).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, Final

import orjson
import trio

from .sessions import StoredSession

LOGGER: Final = logging.getLogger("workers.control")
CONTROL_FD_ENV: Final = "SUPERVISOR_CONTROL_FD"
HEARTBEAT_INTERVAL_S: Final = 1.0
SESSION_FLUSH_S: Final = 0.1
MAX_LINE_BYTES: Final = 4 * 1024 * 1024
SESSION_LOAD_TIMEOUT_S: Final = 5.0


class SupervisorGone(Exception):
    """The control channel closed: the supervisor exited or was killed."""


class SupervisorLink:
    """Identify gate, session store and heartbeat over the control channel (see the module note)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._pending_saves: dict[int, StoredSession | None] = {}
        self._flushed = trio.Event()
        self._dirty = trio.Event()
        self.gone = trio.Event()

    # -- IdentifyGate ----------------------------------------------------------------------------------

    async def wait_for_permit(self, shard_id: int) -> None:
        request_id = next(self._ids)
        reply = await self._request({"type": "identify", "id": request_id, "shard": shard_id}, request_id)
        del reply

    # -- SessionStore ----------------------------------------------------------------------------------

    async def load(self, shard_id: int) -> StoredSession | None:
        if shard_id in self._pending_saves:
            return self._pending_saves[shard_id]  # newer than what the supervisor holds
        request_id = next(self._ids)
        with trio.move_on_after(SESSION_LOAD_TIMEOUT_S):
            reply = await self._request(
                {"type": "session_load", "id": request_id, "shard": shard_id}, request_id
            )
            session = reply.get("session")
            return StoredSession(**session) if isinstance(session, dict) else None
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

    async def _request(self, message: dict[str, Any], request_id: int) -> dict[str, Any]:
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        try:
            await self.send(message)
            with receive:
                return await receive.receive()
        except trio.EndOfChannel:
            raise SupervisorGone from None
        except BaseException:
            if message["type"] == "identify" and not self.gone.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self.send({"type": "identify_cancel", "id": request_id})
            raise
        finally:
            self._waiting.pop(request_id, None)

    async def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message) + b"\n"
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.gone.set()
                raise SupervisorGone from exc

    async def _send_sessions(self) -> None:
        pending, self._pending_saves = self._pending_saves, {}
        save = {str(shard): asdict(session) for shard, session in pending.items() if session is not None}
        delete = [shard for shard, session in pending.items() if session is None]
        await self.send({"type": "sessions", "save": save, "delete": delete})

    async def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                if len(buffer) > MAX_LINE_BYTES:
                    LOGGER.error("control.line_too_long")
                    break
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._dispatch(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.gone.set()
        for waiter in self._waiting.values():
            waiter.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            message = orjson.loads(line)
            waiter = self._waiting.get(int(message["id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            LOGGER.warning("control.bad_message", extra={"line": line[:200].decode("utf-8", "replace")})
            return
        if waiter is not None:
            waiter.send_nowait(message)

    async def _flush_sessions(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await trio.sleep(SESSION_FLUSH_S)
            await self._send_sessions()

    async def _heartbeat(self, stats: Callable[[], dict[str, Any]]) -> None:
        while True:
            await self.send({"type": "heartbeat", "shards": stats()})
            await trio.sleep(HEARTBEAT_INTERVAL_S)


def control_fd_from_env(environ: dict[str, str] | None = None) -> int | None:
    value = (os.environ if environ is None else environ).get(CONTROL_FD_ENV, "").strip()
    return int(value) if value.isdigit() else None


@asynccontextmanager
async def open_supervisor_link(
    fd: int, shards: tuple[int, ...], stats: Callable[[], dict[str, Any]]
) -> AsyncIterator[SupervisorLink]:
    """Run the link (reader, heartbeats, session flushes) for the duration of the block.

    When the supervisor goes away the block's scope is cancelled: the worker stops with it.
    """
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    stream = trio.SocketStream(sock)
    link = SupervisorLink(stream)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(link._read)
        await link.send({"type": "hello", "pid": os.getpid(), "shards": list(shards)})
        nursery.start_soon(link._heartbeat, stats)
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
