"""A server-side WebSocket connection on wsproto, shaped for a gateway simulator.

Why not trio-websocket's server: the simulator must misbehave on purpose (stop reading and writing while
the TCP connection stays open, reset the connection, send bytes that corrupt the client's decompressor) and
it must push a firehose of small messages cheaply. Owning the socket makes the faults one line each, and
outgoing data frames are built here by hand and written in batches (one `send_all` per batch), which is
several times cheaper than one wsproto call and one syscall per message. Server frames are never masked and
no extension is negotiated, so a data frame is a 2-10 byte header plus the payload (RFC 6455 section 5.2).
wsproto still parses everything the client sends and drives the closing handshake.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

RECEIVE_CHUNK_BYTES: Final = 65_536
HANDSHAKE_TIMEOUT_S: Final = 10.0
#: The most a client may send in one message before it is cut off; Discord's own limit is 4096 bytes and
#: is checked by the gateway, this only bounds memory.
MAX_CLIENT_MESSAGE_BYTES: Final = 1_048_576
OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2


class ConnectionEnded(Exception):
    """The peer closed (with `code`, None for a bare TCP close) or the socket broke.

    `reply` is true when the close frame only answered one that the server sent first.
    """

    def __init__(self, code: int | None, reason: str = "", *, reply: bool = False) -> None:
        super().__init__(f"connection ended with code {code}")
        self.code = code
        self.reason = reason
        self.reply = reply


class MessageTooLarge(Exception):
    """The client sent a message over `MAX_CLIENT_MESSAGE_BYTES`."""


@dataclass(frozen=True, slots=True)
class HandshakeInfo:
    path: str
    query: dict[str, str]


def encode_frame(payload: bytes, *, binary: bool) -> bytes:
    """One unmasked, final WebSocket frame carrying `payload`."""
    first = 0x80 | (OPCODE_BINARY if binary else OPCODE_TEXT)
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65_536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


class ServerWebSocket:
    """One accepted WebSocket connection. Sending is serialised by a lock; one task receives."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = trio.Lock()
        self._pending: list[TextMessage | BytesMessage | CloseConnection] = []
        self._partial: list[bytes | str] = []
        self._partial_size = 0
        self.closed = False
        self.close_code_received: int | None = None
        self._receiving = False
        self._ended = trio.Event()

    async def accept(self) -> HandshakeInfo | None:
        """Run the opening handshake; returns None (after answering 400) for a non-WebSocket request."""
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            while True:
                data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
                if not data:
                    raise ConnectionEnded(None)
                try:
                    self._ws.receive_data(data)
                except Exception:  # wsproto raises RemoteProtocolError and h11 errors for non-WS input
                    await self._reject()
                    return None
                for event in self._ws.events():
                    if isinstance(event, Request):
                        await self._stream.send_all(self._ws.send(AcceptConnection()))
                        path, _, query = event.target.partition("?")
                        return HandshakeInfo(path, dict(urllib.parse.parse_qsl(query)))
                    await self._reject()
                    return None

    async def _reject(self) -> None:
        with trio.move_on_after(1):
            await self._stream.send_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        await self.abort()

    async def receive(self) -> bytes | str:
        """The next complete message from the client.

        Raises `ConnectionEnded` when the peer closes or the socket breaks, `MessageTooLarge` for a message
        over the cap. Answers pings and the closing handshake itself.
        """
        self._receiving = True
        try:
            return await self._receive()
        except ConnectionEnded:
            self._ended.set()
            raise
        finally:
            self._receiving = False

    async def _receive(self) -> bytes | str:
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, CloseConnection):
                    reply = self._ws.state is not ConnectionState.REMOTE_CLOSING
                    if not reply:
                        self.close_code_received = event.code
                        with contextlib.suppress(ConnectionEnded):  # the client may reset right after closing
                            await self._send_raw(self._ws.send(event.response()))
                    self.closed = True
                    raise ConnectionEnded(event.code, event.reason or "", reply=reply)
                self._partial.append(event.data if isinstance(event.data, str) else bytes(event.data))
                self._partial_size += len(event.data)
                if self._partial_size > MAX_CLIENT_MESSAGE_BYTES:
                    raise MessageTooLarge
                if event.message_finished:
                    parts, self._partial, self._partial_size = self._partial, [], 0
                    if isinstance(parts[0], str):
                        return "".join(str(part) for part in parts)
                    return b"".join(bytes(part) for part in parts)  # type: ignore[arg-type]
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise ConnectionEnded(None) from exc
            if not data:
                self.closed = True
                raise ConnectionEnded(None)
            try:
                self._ws.receive_data(data)
            except Exception as exc:  # a protocol violation by the client ends the connection
                self.closed = True
                raise ConnectionEnded(1002, str(exc)) from exc
            for received in self._ws.events():
                if isinstance(received, Ping):
                    await self._send_raw(self._ws.send(received.response()))
                elif isinstance(received, TextMessage | BytesMessage | CloseConnection):
                    self._pending.append(received)

    async def send_messages(self, messages: Iterable[tuple[bytes, bool]]) -> None:
        """Send several `(payload, binary)` messages in one write."""
        await self._send_raw(b"".join(encode_frame(payload, binary=binary) for payload, binary in messages))

    async def _send_raw(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionEnded(None)
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise ConnectionEnded(None) from exc

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame with `code`, give the client a moment to answer, then close the socket."""
        if not self.closed and self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(ConnectionEnded):
                await self._send_raw(self._ws.send(CloseConnection(code=code, reason=reason)))
            with trio.move_on_after(1.0):
                if self._receiving:  # another task reads; it sees the client's reply
                    await self._ended.wait()
                else:
                    try:
                        while True:
                            await self.receive()
                    except (ConnectionEnded, MessageTooLarge):
                        pass
        await self.abort(reset=False)

    def abort_now(self) -> None:
        """Close the TCP connection at once, without a closing handshake or a checkpoint: the kernel sends
        what is already written, then FIN (RST if the client's data lies unread). The client sees 1006."""
        self.closed = True
        self._stream.socket.close()

    async def abort(self, *, reset: bool = False) -> None:
        """Close the TCP connection now, without a closing handshake; `reset` sends an RST."""
        self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self._stream)
