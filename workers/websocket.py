"""The shard's WebSocket client connection: the opening handshake, reads on the caller's task, the close.

Design. trio-websocket ran a reader task per connection that fed wsproto's pure-Python parser and handed
each message to the shard through a memory channel: a task switch, a channel hop and several cancel scopes
per message. Here the shard's own task reads. `receive()` does one `receive_some` (64 KiB), parses every
complete frame in it (`workers.wsframes`) and returns the whole batch, so the decompressor and the protocol
core run on a list of messages with one scheduler round per socket read, not per event. Pings are answered
in passing; a server's close frame is answered (its code echoed) and reported as `ConnectionClosed`.

- Opening handshake (RFC 6455 section 4.1), written here over `trio.open_tcp_stream` (ws://) or
  `trio.open_ssl_over_tcp_stream` (wss://, the default SSL context, as trio-websocket used): a GET with
  `Upgrade: websocket`, a random `Sec-WebSocket-Key`, no extension and no subprotocol; the answer must be 101
  with the matching `Sec-WebSocket-Accept`, `Upgrade: websocket`, `Connection: upgrade` and no extension.
  Bytes after the response's headers are the first frames. A failure raises `HandshakeError` (or `OSError`
  from the dial); the caller bounds the whole connect with its own timeout.
- Sends (`send_message`, pongs, the close frame) go through one `trio.Lock`: the heartbeat timer, the
  identify task, the command sender and the reader may all send.
- Close (`close`): send a close frame, then wait for the server's close frame (or the end of the stream).
  Whoever is reading sees it: when another task is blocked in `receive()`, `close()` waits for that task to
  report the end; otherwise it reads (and discards) itself. Either way, once a close frame has been sent,
  data messages are discarded and `receive()` ends with `ConnectionClosed(1000)`, as trio-websocket's did
  after a local close. The caller bounds the wait and then calls `abort()`.
- Abort (`abort`): close the stream without a handshake (a zombie, or after a close timed out); a task in
  `receive()` wakes with `ConnectionClosed(1006)`.
- What the shard saw from trio-websocket, kept: a server close reports the server's code (1005 when the
  frame had none), a bare TCP end 1006, a protocol error (the parser's `FrameError`) answers with a close
  frame of its code (1002, 1007) and reports 1006; a message over the limit answers and reports 1009.
  `send_message` on a closed connection raises `ConnectionClosed`.

Measured (`python -m benchmarks gateway --quick --only events_per_cpu_s.zlib.null --only
events_per_cpu_s.zstd.null`: events per client CPU-second, null sink, 16 shards, the simulator's 1.1 KB
MESSAGE_CREATEs). Before (trio-websocket, 8ada6d0) and after (7a39e90), run alternately three times each on
the shared 2-core VM while other work loaded it (load average 5-6: the client got 20-70% of a core, so
absolute figures are low and noisy; each run is the median of its two repeats):

| events_per_cpu_s | before, runs 1 / 2 / 3   | median | after, runs 1 / 2 / 3       | median  | ratio |
|------------------|--------------------------|--------|-----------------------------|---------|-------|
| zlib.null        | 33,480 / 42,779 / 39,963 | 39,963 | 75,807 / 56,799 / 87,912    | 75,807  | 1.90x |
| zstd.null        | 68,370 / 65,637 / 83,300 | 68,370 | 130,676 / 133,781 / 140,699 | 133,781 | 1.96x |

cProfile of the worker in the same benchmark (`--profile`, zlib, one repeat each; time in each function
itself, idle epoll waits left out; the profiler inflates every figure, the shares are what count):

| where the worker's CPU went          | before µs/event | share | after µs/event | share |
|--------------------------------------|-----------------|-------|----------------|-------|
| trio: scheduler, channels, scopes    | 28.4            | 24%   | 8.0            | 11%   |
| wsproto + h11 (frame parsing)        | 21.6            | 18%   | 0              | 0%    |
| trio-websocket                       | 5.4             | 5%    | 0              | 0%    |
| wsframes + this module               | -               | -     | 2.5            | 3%    |
| zlib + orjson                        | 5.2             | 4%    | 7.2            | 10%   |
| shard, protocol core, pump, sessions | 34.0            | 28%   | 41.5           | 58%   |
| everything else (builtins, startup)  | 25.1            | 21%   | 12.6           | 18%   |
| total                                | 119.9           |       | 71.7           |       |

Framing now costs about 2.5 µs an event where wsproto, trio-websocket and their per-message scheduling cost
about 50; what is left is the shard's own per-event work (`_dispatch`, `decode_payload`, the committed-seq
bookkeeping), which is the next place to look.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import ssl
import urllib.parse
from typing import Final

import trio

from . import wsframes
from .wsframes import Close, FrameError, FrameParser, Ping

#: RFC 6455 section 1.3: appended to the key before hashing.
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The most a handshake response's status line and headers may take.
MAX_HANDSHAKE_BYTES: Final = 65_536
#: What `receive()` reports after this side sent a close frame (trio-websocket reported the same).
LOCAL_CLOSE_CODE: Final = 1000


class HandshakeError(Exception):
    """The opening handshake failed: the server refused the upgrade or answered something else."""


class ConnectionClosed(Exception):
    """The connection is closed: `code` is the server's close code, 1005 for a close frame without one,
    1006 for a connection that ended without a closing handshake, 1000 after this side closed."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


async def connect(
    url: str,
    *,
    max_message_bytes: int = wsframes.DEFAULT_MAX_MESSAGE_BYTES,
    receive_bytes: int = 65_536,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocket:
    """Dial `url` (ws:// or wss://) and run the opening handshake."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    stream: trio.abc.Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context or ssl.create_default_context()
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        rest = await _handshake(stream, parts, receive_bytes)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return WebSocket(stream, FrameParser(max_message_bytes), rest, receive_bytes=receive_bytes)


async def _handshake(stream: trio.abc.Stream, parts: urllib.parse.SplitResult, receive_bytes: int) -> bytes:
    """Send the upgrade request, check the answer; returns the bytes that followed the answer's headers."""
    key = base64.b64encode(os.urandom(16))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        await stream.send_all(request.encode())
        buffer = b""
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError(f"the handshake response is over {MAX_HANDSHAKE_BYTES} bytes")
            data = await stream.receive_some(receive_bytes)
            if not data:
                raise HandshakeError("the server closed the connection during the handshake")
            buffer += data
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HandshakeError(f"the connection broke during the handshake: {exc!r}") from exc
    head, rest = buffer[:end], buffer[end + 4 :]
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = status_line.split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "101":
        raise HandshakeError(f"the server refused the upgrade: {status_line!r}")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeError(f"a malformed header line: {line!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    tokens = {
        name: {token.strip().lower() for value in values for token in value.split(",")}
        for name, values in headers.items()
    }
    if "websocket" not in tokens.get("upgrade", set()):
        raise HandshakeError("the response lacks Upgrade: websocket")
    if "upgrade" not in tokens.get("connection", set()):
        raise HandshakeError("the response lacks Connection: upgrade")
    expected = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != [expected]:
        raise HandshakeError("the response's Sec-WebSocket-Accept does not match the key")
    for offered_none in ("sec-websocket-extensions", "sec-websocket-protocol"):
        if any(headers.get(offered_none, ())):
            raise HandshakeError(f"the server chose a {offered_none} the client did not offer")
    return rest


class WebSocket:
    """One open client connection. One task at a time calls `receive()`; any task may send or close."""

    def __init__(
        self, stream: trio.abc.Stream, parser: FrameParser, initial: bytes = b"", *, receive_bytes: int
    ) -> None:
        self.stream = stream
        self._parser = parser
        self._initial = initial
        self._receive_bytes = receive_bytes
        self._send_lock = trio.Lock()
        #: Why the connection ended, once it has (`receive()` raises it from then on).
        self._closed: ConnectionClosed | None = None
        #: A close frame was sent: nothing more may be sent, and data messages are discarded.
        self._close_sent = False
        #: A task is inside `receive_some`; a second reader would raise `BusyResourceError`, so it waits.
        self._reading = False
        #: Set once `_closed` is.
        self._ended = trio.Event()

    @property
    def closed(self) -> ConnectionClosed | None:
        return self._closed

    async def receive(self) -> list[bytes | str]:
        """The next messages (at least one), in order: binary as bytes, text as str.

        Raises `ConnectionClosed` once the connection has ended (after the messages that preceded the
        end)."""
        while True:
            if self._closed is not None:
                raise self._closed
            if self._reading:  # close() is reading on another task
                await self._ended.wait()
                continue
            messages = await self._read_once()
            if messages and not self._close_sent:
                return messages

    async def _read_once(self) -> list[bytes | str]:
        """One socket read: the messages it completed (may be none). Ends the connection on EOF, a close
        frame or a protocol error."""
        data: bytes | bytearray = self._initial
        if data:
            self._initial = b""
        else:
            self._reading = True
            try:
                data = await self.stream.receive_some(self._receive_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self._reading = False
            if not data:
                self._end(wsframes.CLOSE_ABNORMAL, "")
                return []
        parser = self._parser
        try:
            messages = parser.feed(data if type(data) is bytes else bytes(data))
        except FrameError as exc:
            await self._fail(exc)
            return []
        if parser.controls:
            await self._handle_controls()
        return messages

    async def _handle_controls(self) -> None:
        controls = self._parser.controls
        self._parser.controls = []
        for control in controls:
            if isinstance(control, Ping):
                if not self._close_sent:
                    with contextlib.suppress(ConnectionClosed):  # the read that follows sees the end
                        await self._send_frame(wsframes.encode_pong(control.payload))
            elif isinstance(control, Close):
                code = wsframes.CLOSE_NO_STATUS if control.code is None else control.code
                if self._close_sent:
                    self._end(LOCAL_CLOSE_CODE, "")  # the server's answer to our close
                else:
                    with contextlib.suppress(ConnectionClosed):
                        await self._send_frame(wsframes.encode_close(control.code, control.reason))
                    self._close_sent = True
                    self._end(code, control.reason)
            # a pong answers nothing this client sent: ignored

    async def _fail(self, exc: FrameError) -> None:
        """The server broke the protocol: answer with a close frame of its code and drop the stream."""
        if not self._close_sent:
            self._close_sent = True
            with trio.move_on_after(1.0):
                with contextlib.suppress(ConnectionClosed):
                    await self._send_frame(wsframes.encode_close(exc.code, str(exc)), closing=True)
        reported = wsframes.CLOSE_MESSAGE_TOO_BIG if exc.code == wsframes.CLOSE_MESSAGE_TOO_BIG else None
        self._end(reported or wsframes.CLOSE_ABNORMAL, str(exc))
        await trio.aclose_forcefully(self.stream)

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            self._ended.set()

    async def send_message(self, message: str | bytes) -> None:
        """Send one text (str) or binary (bytes) message. Raises `ConnectionClosed` once closed."""
        if isinstance(message, str):
            frame = wsframes.encode_text(message)
        else:
            frame = wsframes.encode_frame(wsframes.OP_BINARY, message)
        await self._send_frame(frame)

    async def _send_frame(self, frame: bytes, *, closing: bool = False) -> None:
        if (self._close_sent and not closing) or self._closed is not None:
            raise self._closed or ConnectionClosed(LOCAL_CLOSE_CODE)
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._end(wsframes.CLOSE_ABNORMAL, "")
                raise self._closed or ConnectionClosed(wsframes.CLOSE_ABNORMAL) from None

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame with `code` and wait for the server's (or the stream's end). Returns at once
        when the connection already ended. The caller bounds the wait, then calls `abort()`."""
        if self._closed is not None:
            return
        if not self._close_sent:
            self._close_sent = True
            try:
                await self._send_frame(wsframes.encode_close(code, reason), closing=True)
            except ConnectionClosed:
                return
        while self._closed is None:
            if self._reading:
                await self._ended.wait()
            else:
                await self._read_once()

    async def abort(self) -> None:
        """Close the stream now, without a closing handshake."""
        self._end(wsframes.CLOSE_ABNORMAL if not self._close_sent else LOCAL_CLOSE_CODE, "")
        await trio.aclose_forcefully(self.stream)
