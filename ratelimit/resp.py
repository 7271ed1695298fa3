"""A small RESP2 client on trio: the one Redis connection the ratelimit hot path uses.

Why not redis-py (DESIGN 5 otherwise prefers it behind trio-asyncio): the ratelimit engine makes one EVALSHA
per acquire and per release, and redis-py over trio-asyncio cost about 280 us p50 and 300 us of CPU per
EVALSHA on the project machine, against about 77 us p50 and 60 us of CPU for a raw trio socket
(anchors/trio-asyncio.md section 1, item 3: "replace only that call with a small trio-native RESP
client"). The targets (p50 <= 1 ms, >= 5,000 grants/s from 8 processes on 2 cores) leave no room for the
bridge. So this module speaks just enough RESP2 for scripts: commands are arrays of bulk strings; replies
are simple strings, errors, integers, bulk strings, arrays and nil.

What it keeps from redis-py, and why:

- `Script` has `register_script()`'s semantics: EVALSHA, and on NOSCRIPT one SCRIPT LOAD and one retry. A
  bare EVALSHA never recovers from a Redis restart or a SCRIPT FLUSH; an EVAL on every call would send the
  whole script each time.
- Every command has a deadline (`timeout_s`, 0.5 s by default, a trio cancel scope) that covers waiting for a
  pooled connection, connecting, AUTH/SELECT, sending and reading the reply. A slow Redis must turn into
  `RedisConnectionError` quickly so that the caller falls back to local limits (anchors/ratelimit.md R10).
- A connection whose command failed half-way (timeout, cancellation, a broken socket, a reply it cannot
  parse) is closed, never reused: its next reply could belong to the previous command. The next command
  opens a fresh one, which is all "reconnect" needs to mean here; backoff belongs to the caller. A failed
  command is not retried: an EVALSHA that reached Redis may have been applied (a grant taken), and sending
  it again could apply it twice.

What it leaves out: pipelining, pub/sub, RESP3, TLS and Cluster redirections (MOVED/ASK). The ratelimit keys
all carry one hash tag, so a Cluster node that owns that slot serves every script; following a failover of
that slot is the caller's fallback path today.

Secrets: the password of a `redis://user:password@host` URL is only ever sent in AUTH. `RedisAddress` hides
it from `repr`, `redacted()` prints `***`, and no error message includes a command's arguments.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias
from urllib.parse import unquote, urlsplit

import trio

from ratelimit.errors import RatelimitError

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT_S",
    "Arg",
    "RedisAddress",
    "RedisConnectionError",
    "RedisReplyError",
    "Reply",
    "RespClient",
    "RespProtocolError",
    "Script",
    "encode_command",
    "parse_reply",
]

DEFAULT_TIMEOUT_S: Final = 0.5
DEFAULT_MAX_CONNECTIONS: Final = 4
DEFAULT_PORT: Final = 6379
_RECEIVE_BYTES: Final = 65536
_CRLF: Final = b"\r\n"

#: A decoded reply. Errors inside an array stay values (`RedisReplyError`); a top-level error is raised.
Reply: TypeAlias = "str | int | bytes | RedisReplyError | list[Reply] | None"
Arg: TypeAlias = bytes | str | int | float


class RedisConnectionError(RatelimitError):
    """Redis could not be reached or did not answer in time; the connection was dropped."""


class RespProtocolError(RedisConnectionError):
    """The server's bytes are not RESP2 (or not what this client speaks); the connection was dropped."""


class RedisReplyError(RatelimitError):
    """Redis answered the command with an error reply (`-ERR ...`). The connection stays usable."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The error's first word: `ERR`, `NOSCRIPT`, `WRONGPASS`, `BUSY`, ..."""
        return self.message.split(" ", 1)[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedisReplyError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is and how to log in, from a `redis://[[username]:password@]host[:port][/db]` URL."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Raises ValueError (whose message never contains the password) for anything but redis:// URLs."""
        parts = urlsplit(url)
        redacted = _redact(url)
        if parts.scheme != "redis":
            raise ValueError(f"a redis:// URL is needed (no TLS, no unix socket), got {redacted!r}")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"bad port in {redacted!r}") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the path of {redacted!r} must be a database number")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def redacted(self) -> str:
        """The URL with the password replaced by `***`: what logs and errors may show."""
        user = self.username or ""
        login = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{login}{host}:{self.port}/{self.db}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()


# --- the wire format ----------------------------------------------------------------------------------


def _arg_bytes(arg: Arg) -> bytes:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, float):
        if not math.isfinite(arg):
            raise ValueError("inf and nan have no RESP spelling; pack them (struct 'd') instead")
        return repr(arg).encode()
    return str(arg).encode()


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (floats as `repr`, the shortest exact decimal)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else _arg_bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply: read more."""


def parse_reply(buffer: bytes | bytearray, start: int = 0) -> tuple[Reply, int]:
    """Parse one RESP2 reply at `start`: (the reply, the offset just after it).

    Raises `_Incomplete` when more bytes are needed and `RespProtocolError` when they are not RESP2.
    Simple strings decode as `str`, bulk strings stay `bytes`, error replies become `RedisReplyError`
    values (the caller decides whether to raise them).
    """
    end = buffer.find(_CRLF, start)
    if end < 0:
        raise _Incomplete
    kind = buffer[start : start + 1]
    line = bytes(buffer[start + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), after
    if kind == b"-":
        return RedisReplyError(line.decode(errors="replace")), after
    if kind == b":":
        return _length(line), after
    if kind == b"$":
        size = _length(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        if buffer[after + size : after + size + 2] != _CRLF:
            raise RespProtocolError("a bulk string does not end with CRLF")
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == b"*":
        count = _length(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            item, after = parse_reply(buffer, after)
            items.append(item)
        return items, after
    raise RespProtocolError(f"unexpected RESP2 type byte {kind!r}")


def _length(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RespProtocolError(f"bad RESP2 number {line[:32]!r}") from None


# --- connections --------------------------------------------------------------------------------------


class _Connection:
    """One socket and its read buffer. Used by one task at a time (the pool hands it out).

    Talks to the trio socket under the stream directly: `SocketStream`'s conflict detection and error
    translation cost about 5 us a command, a sixth of the client's share of a round trip, and the pool
    already guarantees one user at a time. Socket errors arrive as OSError.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.buffer = bytearray()

    async def command(self, args: Sequence[Arg]) -> Reply:
        """Send one command and read its reply (a `RedisReplyError` value for an error reply)."""
        data = encode_command(args)
        sent = await self.socket.send(data)
        while sent < len(data):  # a command larger than the socket's send buffer
            sent += await self.socket.send(memoryview(data)[sent:])
        while True:
            try:
                reply, end = parse_reply(self.buffer)
            except _Incomplete:
                received = await self.socket.recv(_RECEIVE_BYTES)
                if not received:
                    raise RedisConnectionError("Redis closed the connection") from None
                self.buffer += received
                continue
            del self.buffer[:end]
            return reply


class RespClient:
    """Commands to one Redis over a small pool of connections, each with a deadline.

    Connections open lazily (Redis may be down when the process starts) and are re-opened after any failure.
    Every method that talks to Redis is a checkpoint; cancelling one drops the connection it was using.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not timeout_s > 0 or max_connections < 1:
            raise ValueError("timeout_s must be positive and max_connections at least 1")
        self.address = address
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = trio.CapacityLimiter(max_connections)
        self._closed = False
        self.connects = 0

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> RespClient:
        return cls(RedisAddress.parse(url), timeout_s=timeout_s, max_connections=max_connections)

    async def execute(self, *args: Arg) -> Reply:
        """Run one command. Raises `RedisReplyError` for an error reply and `RedisConnectionError` when Redis
        cannot be reached, breaks the connection, speaks something else, or takes longer than `timeout_s`."""
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        connection: _Connection | None = None
        reply: Reply = None
        # A bare CancelScope rather than `fail_after`: the same deadline without the generator-based context
        # manager, which cost about 8 us a command.
        # The uncontended case takes a slot without a trip through the scheduler. Waiting for a slot is not
        # part of the timeout: a busy pool is this process's congestion, not Redis being unreachable (which
        # would send the caller to its fallback for nothing).
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        deadline = trio.CancelScope(deadline=trio.current_time() + self.timeout_s)
        try:
            with deadline:
                try:
                    connection = self._idle.pop() if self._idle else await self._connect()
                    reply = await connection.command(args)
                    # A complete reply, even an error one, leaves the connection in step: keep it.
                    self._recycle(connection)
                    connection = None
                finally:
                    self._slots.release()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise RedisConnectionError(
                f"Redis at {self.address.redacted()} is unreachable: {type(error).__name__}"
                + (f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else "")
            ) from None
        finally:
            if connection is not None:
                await trio.aclose_forcefully(connection.stream)
        if deadline.cancelled_caught:
            raise RedisConnectionError(
                f"Redis at {self.address.redacted()} did not answer within {self.timeout_s} s"
            )
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def _recycle(self, connection: _Connection) -> None:
        if self._closed:
            connection.stream.socket.close()
        else:
            self._idle.append(connection)

    async def _connect(self) -> _Connection:
        stream = await trio.open_tcp_stream(self.address.host, self.address.port)
        connection = _Connection(stream)
        try:
            if self.address.password is not None:
                login: list[Arg] = ["AUTH"]
                if self.address.username:
                    login.append(self.address.username)
                login.append(self.address.password)
                reply = await connection.command(login)
                if isinstance(reply, RedisReplyError):
                    # Redis never echoes the password in its AUTH errors; we add only the redacted URL.
                    raise RedisConnectionError(
                        f"Redis at {self.address.redacted()} refused AUTH: {reply.message}"
                    )
            if self.address.db:
                reply = await connection.command(["SELECT", self.address.db])
                if isinstance(reply, RedisReplyError):
                    raise RedisConnectionError(
                        f"Redis at {self.address.redacted()} refused SELECT: {reply.message}"
                    )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.connects += 1
        return connection

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their command ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)


class Script:
    """A Lua script called by SHA, loaded on demand: redis-py's `register_script()` semantics."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()
        self.reloads = 0  # NOSCRIPT answers that made it load the script again

    async def __call__(self, client: RespClient, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """EVALSHA; on NOSCRIPT (a restarted or flushed Redis) SCRIPT LOAD and EVALSHA once more."""
        try:
            return await client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as error:
            if error.code != "NOSCRIPT":
                raise
        self.reloads += 1
        await self.load(client)
        return await client.execute("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, client: RespClient) -> None:
        """SCRIPT LOAD (idempotent)."""
        sha = await client.execute("SCRIPT", "LOAD", self.source)
        if sha != self.sha.encode():
            raise RespProtocolError(f"SCRIPT LOAD answered {sha!r}, expected {self.sha}")
