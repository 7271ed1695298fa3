"""The one Redis client of the service: RESP2 on trio sockets, for the ratelimiter, sessions and the gate.

The ratelimiter's scripts (`redis_backend.py`), the session store (`workers/sessions.py`) and the identify
gate (`supervisor/identify_redis.py`) all talk to Redis through `RedisClient`, so every deployment option
reaches all three: `redis://` with an ACL user or a password, `rediss://` with the CA and client certificate
as redis-py's query parameters, `unix://` sockets, a database number (`redis_url.py` parses them), and
Redis Cluster.

The choice, by measurement (2026-12-07, the project's 2-core VM shared with four other engineers' test
runs, load average 4-8; Redis 7.0.15 on loopback; CPython 3.11.7). `python -m benchmarks.redis_clients`
(4 runs; coredis 6.9.0 from a scratch venv, not a dependency): 3,000 sequential calls from one trio
process, p50 wall and CPU of the process (all threads) per call, in us; "script" is a one-key
token-bucket-sized EVALSHA, "batch" the session store's shape (one script over 16 keys):

    client                                          script p50   CPU/call   batch p50   CPU/call
    this client (trio-native RESP2)                 96-141       101-122    164-216     115-141
    redis-py 8.1 on an asyncio (uvloop) thread      276-401      287-372    344-431     322-418
    coredis 6.9 on trio (through anyio)             372-442      363-406    427-492     390-436

`python -m benchmarks ratelimit --quick --backends redis --peers none` (8 client processes, the real
acquire and release scripts), runs interleaved on the same machine; "before" is main at 7207bb9 (the
ratelimit-only resp.py client), "after" this client; redis-py is branch h-redis's measurement (6bc20a0,
the ratelimiter on redis-py through the uvloop thread, same machine, same day):

    figure                      before (resp.py)        after (this client)   redis-py     target
    acquire p50                 209-320 us              210-253 us            653 us       <= 1 ms
    grants/s, 8 x 1 task        1,668-2,301             1,341-2,963           875          >= 5,000
    grants/s, 8 x 4 tasks       1,257-3,761             820-2,394             853
    hot-bucket utilization      0.967-0.974             0.972-0.973           0.970        >= 0.95
    avoidable 429s              0                       0                     0            0

Global 429s in the zipf workload show up before and after alike on this loaded machine (per run: 0, 1, 1,
14 before; 1, 4, 0 after; the run with 14 had Redis calls past their deadline and fell back to local
limits); the REST proxy test over TLS (tests/ratelimit/test_proxy_redis_tls.py) draws none. Neither
client reaches 5,000 grants/s here: with 8 processes, Redis and the simulator on 2 cores, CPU per call is
the bound (about 100 us of this process's CPU per script call, twice per grant).
Pipelining the calls of concurrent tasks on one connection (the "better" target, 20,000 grants/s) is not
done: `pipeline` batches only what one caller sends.

redis-py was the default (DESIGN 5: "keep redis-py unless it cannot meet the ratelimit targets"). It cannot:
driven from the asyncio thread that carries aio-pika, every call crosses threads twice and costs about 2.5x
this client's CPU, and the ratelimit throughput falls to a third of this client's. coredis is native trio
but costs more CPU per call still. So the service speaks RESP2 itself: no trio-asyncio, no asyncio thread
for Redis, one round trip per acquire and one per release.

Rules it keeps (anchors/trio-asyncio.md 5, 7):

- Scripts have `register_script()`'s semantics: EVALSHA, and on NOSCRIPT (a restarted, flushed or
  failed-over Redis) SCRIPT LOAD and EVALSHA again, pipelined in one round trip on the node that answered.
- Every call has a deadline (`timeout_s`) covering the wait for a connection to Redis, connecting (at most
  `connect_timeout_s` of it: TCP, TLS handshake, AUTH, SELECT), sending and reading. A slow Redis turns
  into `RedisConnectionError` quickly so that callers fall back (anchors/ratelimit.md R10).
- A connection whose command failed half-way (timeout, cancellation, a broken socket, bytes it cannot
  parse) is closed, never reused: its next reply could belong to the previous command.
- A failed call is not repeated unless the client was made with `retries` (only for callers whose commands
  are idempotent: the session store's writes and the identify gate's owner-tagged grants). The ratelimiter
  uses none: an EVALSHA that reached Redis may have taken a grant. A retry uses a fresh connection after
  a short backoff, so a pooled connection that died with a Redis restart costs no outage.

Redis Cluster needs no setting: MOVED and ASK are followed whenever they come, so the first call to a slot
that lives elsewhere costs one redirection and teaches the client the slot's node (MOVED; ASK is a one-off
`ASKING` + the command, pipelined, on the node named), at most `MAX_REDIRECTS` per call. Every key a call
sends carries one hash tag (`{prefix}`: the ratelimiter's, the session store's and the gate's keys all
do), so a script or a pipeline goes to one node. A pipeline is re-sent whole after a redirection, so it
must be idempotent. Sentinel is not supported (redis-py and coredis have it; this client does not): a
Sentinel-managed Redis is reached through its current primary's address or a proxy in front of it.

Secrets: the password is only ever sent in AUTH; no error message includes a command's arguments or the
password (`RedisAddress.redacted`).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeAlias

import trio

from ratelimit.redis_url import RedisAddress
from ratelimit.resp import (
    Arg,
    Incomplete,
    RedisConnectionError,
    RedisReplyError,
    Reply,
    RespProtocolError,
    encode_command,
    key_slot,
    parse_reply,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT_S",
    "MAX_REDIRECTS",
    "RedisClient",
    "Script",
    "is_hash_tag",
    "open_redis_client",
]

DEFAULT_TIMEOUT_S: Final = 0.5
DEFAULT_MAX_CONNECTIONS: Final = 4
#: Redirections (MOVED, ASK) one call follows before it counts as failed (a slot map in flux).
MAX_REDIRECTS: Final = 5
RETRY_BACKOFF_FIRST_S: Final = 0.05
RETRY_BACKOFF_CAP_S: Final = 0.5
_RECEIVE_BYTES: Final = 65536
# Commands whose first argument is not a key: they go to the node the URL names.
_KEYLESS: Final = frozenset(
    b"PING ECHO SCRIPT TIME INFO CLUSTER KEYS SCAN FLUSHDB FLUSHALL DBSIZE CLIENT CONFIG ACL HELLO AUTH "
    b"SELECT ASKING READONLY".split()
)


_Call: TypeAlias = Callable[[Sequence[Sequence[Arg]], Arg | None], Awaitable[list[Reply]]]


class _Connection:
    """One stream and its read buffer. Used by one task at a time (the pool hands it out).

    TCP and unix sockets are driven through the trio socket under the stream: `SocketStream`'s conflict
    detection and error translation cost about 5 us a command, a sixth of the client's share of a round
    trip, and the pool already guarantees one user at a time. A TLS stream goes through `SSLStream`.
    Errors arrive as OSError, `trio.BrokenResourceError` or `RedisConnectionError`.
    """

    def __init__(self, stream: trio.abc.Stream, node: str) -> None:
        self.stream = stream
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.node = node
        self.buffer = bytearray()

    async def command(self, args: Sequence[Arg]) -> Reply:
        """Send one command and read its reply (a `RedisReplyError` value for an error reply). The hot path
        of every script call, hence written out rather than as `pipeline([args])`."""
        await self._send(encode_command(args))
        buffer = self.buffer
        while True:
            if buffer:
                try:
                    reply, end = parse_reply(buffer)
                except Incomplete:
                    pass
                else:
                    del buffer[:end]
                    return reply
            await self._receive()

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Send every command at once, then read one reply each (a `RedisReplyError` value for errors)."""
        await self._send(b"".join(encode_command(args) for args in commands))
        replies: list[Reply] = []
        start = 0
        while len(replies) < len(commands):
            try:
                reply, start = parse_reply(self.buffer, start)
            except Incomplete:
                await self._receive()
                continue
            replies.append(reply)
        del self.buffer[:start]
        return replies

    async def _send(self, data: bytes) -> None:
        if self.socket is None:
            await self.stream.send_all(data)
            return
        sent = await self.socket.send(data)
        while sent < len(data):  # more than the socket's send buffer
            sent += await self.socket.send(memoryview(data)[sent:])

    async def _receive(self) -> None:
        if self.socket is None:
            received = await self.stream.receive_some(_RECEIVE_BYTES)
        else:
            received = await self.socket.recv(_RECEIVE_BYTES)
        if not received:
            raise RedisConnectionError("Redis closed the connection")
        self.buffer += received


class RedisClient:
    """Commands to Redis (or a Redis Cluster) over a small pool of connections, each call with a deadline.

    Connections open lazily (Redis may be down when the process starts) and are re-opened after any
    failure. Every method that talks to Redis is a checkpoint; cancelling one drops the connection it was
    using, and whether Redis applied the command is then unknown. Raises `ValueError` at construction for
    a URL it cannot use or TLS files it cannot read.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retries: int = 0,
    ) -> None:
        if not timeout_s > 0 or max_connections < 1 or retries < 0:
            raise ValueError("timeout_s must be positive, max_connections at least 1, retries not negative")
        self.address = address
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.retries = retries
        self._ssl_context = address.tls.context() if address.tls is not None else None
        self._idle: dict[str, list[_Connection]] = {}
        self._slots = trio.CapacityLimiter(max_connections)
        self._slot_nodes: dict[int, RedisAddress] = {}  # learned from MOVED
        self._closed = False
        self.connects = 0
        self.redirects = 0
        # One coroutine frame fewer on the hot path when there is nothing to retry (about 1 us a call).
        self._call: _Call = self._retrying if retries else self._follow_redirects

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retries: int = 0,
    ) -> RedisClient:
        return cls(
            RedisAddress.parse(url),
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            retries=retries,
        )

    async def execute(self, *args: Arg, key: Arg | None = None) -> Reply:
        """Run one command on the node of `key` (by default its first argument, unless the command takes
        no key). Raises `RedisReplyError` for an error reply and `RedisConnectionError` when Redis cannot
        be reached, breaks the connection, speaks something else, or takes longer than `timeout_s`."""
        if key is None and len(args) > 1:
            name = _name(args[0])
            if name in (b"EVALSHA", b"EVAL"):
                key = args[3] if len(args) > 3 and str(args[2]) != "0" else None
            elif name not in _KEYLESS:
                key = args[1]
        (reply,) = await self._call([args], key)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]], *, key: Arg | None = None) -> list[Reply]:
        """Send `commands` in one round trip to the node of `key` (all their keys share its hash tag) and
        return their replies, error replies as `RedisReplyError` values. Raises `RedisConnectionError`."""
        return await self._call(commands, key)

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """EVALSHA on the node of `keys[0]`; on NOSCRIPT, SCRIPT LOAD and EVALSHA in one round trip there.
        Raises like `execute`."""
        key = keys[0] if keys else None
        evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = await self._call([evalsha], key)
        if isinstance(reply, RedisReplyError) and reply.code == "NOSCRIPT":
            script.reloads += 1
            sha, reply = await self._call([("SCRIPT", "LOAD", script.source), evalsha], key)
            script.check_loaded(sha)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    @asynccontextmanager
    async def closing(self) -> AsyncIterator[RedisClient]:
        """This client, closed (shielded from cancellation) on exit."""
        try:
            yield self
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their command ends."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)

    # --- one call: redirections and retries -----------------------------------------------------------

    async def _retrying(self, commands: Sequence[Sequence[Arg]], key: Arg | None) -> list[Reply]:
        backoff_s = RETRY_BACKOFF_FIRST_S
        for _ in range(self.retries):
            try:
                return await self._follow_redirects(commands, key)
            except RedisConnectionError as error:
                if isinstance(error, _Timeout):
                    raise
            await trio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, RETRY_BACKOFF_CAP_S)
        return await self._follow_redirects(commands, key)

    async def _follow_redirects(self, commands: Sequence[Sequence[Arg]], key: Arg | None) -> list[Reply]:
        node = self.address
        if key is not None and self._slot_nodes:
            node = self._slot_nodes.get(key_slot(_key_bytes(key)), node)
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            if asking:
                asked, *replies = await self._on_node(node, [("ASKING",), *commands])
                if isinstance(asked, RedisReplyError):
                    raise RedisConnectionError(f"{node.node} refused ASKING: {asked.message}")
            else:
                replies = await self._on_node(node, commands)
            redirect = _redirection_among(replies)
            if redirect is None:
                return replies
            self.redirects += 1
            slot, node = self._redirection(redirect)
            asking = redirect.code == "ASK"
            if not asking:
                self._slot_nodes[slot] = node
        raise RedisConnectionError(f"more than {MAX_REDIRECTS} Cluster redirections in one call")

    def _redirection(self, reply: RedisReplyError) -> tuple[int, RedisAddress]:
        """`MOVED 3999 10.0.0.2:6381` (or `ASK ...`): the slot and the node that serves it now."""
        try:
            _, slot, where = reply.message.split(" ")
            host, port = where.rsplit(":", 1)
            return int(slot), self.address.at(host or self.address.host, int(port))
        except ValueError:
            raise RespProtocolError(f"unreadable redirection {reply.message[:64]!r}") from None

    # --- one node: the pool, the deadline, errors -------------------------------------------------------

    async def _on_node(self, node: RedisAddress, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        connection: _Connection | None = None
        replies: list[Reply] = []
        # Waiting for a pool slot is not part of the timeout: a busy pool is this process's congestion,
        # not Redis being unreachable (which would send the caller to its fallback for nothing). The
        # uncontended case takes a slot without a trip through the scheduler. A bare CancelScope rather
        # than `fail_after`: the same deadline without the generator-based context manager (about 8 us).
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        deadline = trio.CancelScope(deadline=trio.current_time() + self.timeout_s)
        try:
            with deadline:
                try:
                    idle = self._idle.get(node.node)
                    connection = idle.pop() if idle else await self._connect(node)
                    if len(commands) == 1:
                        replies = [await connection.command(commands[0])]
                    else:
                        replies = await connection.pipeline(commands)
                    # Complete replies, even error ones, leave the connection in step: keep it.
                    self._recycle(connection)
                    connection = None
                finally:
                    self._slots.release()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise RedisConnectionError(
                f"Redis at {node.redacted()} is unreachable: {_describe(error)}"
            ) from None
        finally:
            if connection is not None:
                await trio.aclose_forcefully(connection.stream)
        if deadline.cancelled_caught:
            raise _Timeout(f"Redis at {node.redacted()} did not answer within {self.timeout_s} s")
        return replies

    def _recycle(self, connection: _Connection) -> None:
        if not self._closed:
            self._idle.setdefault(connection.node, []).append(connection)
            return
        stream = connection.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if isinstance(transport, trio.SocketStream):
            transport.socket.close()  # no TLS close_notify: the client is going away

    async def _connect(self, node: RedisAddress) -> _Connection:
        with trio.move_on_after(self.connect_timeout_s) as scope:
            stream = await self._open_stream(node)
            connection = _Connection(stream, node.node)
            try:
                await self._log_in(connection, node)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            self.connects += 1
            return connection
        assert scope.cancelled_caught
        raise _Timeout(f"Redis at {node.redacted()}: no connection within {self.connect_timeout_s} s")

    async def _open_stream(self, node: RedisAddress) -> trio.abc.Stream:
        if node.path is not None:
            return await trio.open_unix_socket(node.path)
        if self._ssl_context is None:
            return await trio.open_tcp_stream(node.host, node.port)
        stream = await trio.open_ssl_over_tcp_stream(node.host, node.port, ssl_context=self._ssl_context)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _log_in(self, connection: _Connection, node: RedisAddress) -> None:
        """AUTH and SELECT, pipelined. Redis never echoes the password in its errors; we add only the
        redacted URL."""
        commands: list[tuple[Arg, ...]] = []
        if node.password is not None:
            login = (node.username, node.password) if node.username else (node.password,)
            commands.append(("AUTH", *login))
        if node.db:
            commands.append(("SELECT", node.db))
        if not commands:
            return
        for command, reply in zip(commands, await connection.pipeline(commands), strict=True):
            if isinstance(reply, RedisReplyError):
                raise RedisConnectionError(
                    f"Redis at {node.redacted()} refused {command[0]!s}: {reply.message}"
                )


class _Timeout(RedisConnectionError):
    """No answer within the deadline: not retried (the caller's deadline is spent)."""


class Script:
    """A Lua script called by SHA, loaded on demand: redis-py's `register_script()` semantics."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()
        self.reloads = 0  # NOSCRIPT answers that made it load the script again

    async def __call__(self, client: RedisClient, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """`client.run_script(self, keys, args)`."""
        return await client.run_script(self, keys, args)

    async def load(self, client: RedisClient, *, key: Arg | None = None) -> None:
        """SCRIPT LOAD (idempotent) on the node of `key` (the one that will run it, in a Cluster)."""
        (sha,) = await client.pipeline([("SCRIPT", "LOAD", self.source)], key=key)
        self.check_loaded(sha)

    def check_loaded(self, reply: Reply) -> None:
        if isinstance(reply, RedisReplyError):
            raise reply
        if reply != self.sha.encode():
            raise RespProtocolError(f"SCRIPT LOAD answered {reply!r}, expected {self.sha}")


@asynccontextmanager
async def open_redis_client(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_timeout_s: float | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    retries: int = 0,
) -> AsyncIterator[RedisClient]:
    """A `RedisClient` closed on exit. Doesn't connect up front: Redis may be down when the process
    starts. Raises ValueError for a URL it cannot use or TLS files it cannot read."""
    client = RedisClient.from_url(
        url,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_connections=max_connections,
        retries=retries,
    )
    async with client.closing():
        yield client


def is_hash_tag(prefix: str) -> bool:
    """Whether `{prefix}` is a usable Redis Cluster hash tag: non-empty and without braces."""
    return bool(prefix) and "{" not in prefix and "}" not in prefix


def _name(arg: Arg) -> bytes:
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()


def _key_bytes(key: Arg) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def _redirection_among(replies: list[Reply]) -> RedisReplyError | None:
    """The first MOVED or ASK error reply, if any."""
    for reply in replies:
        if isinstance(reply, RedisReplyError) and reply.message.startswith(("MOVED ", "ASK ")):
            return reply
    return None


def _describe(error: BaseException) -> str:
    """What went wrong, for the error message: the TLS verdict rather than trio's wrapper."""
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else error
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause.reason or cause})"
    if isinstance(cause, OSError) and cause.strerror:
        return f"{type(cause).__name__} ({cause.strerror})"
    return type(cause or error).__name__
