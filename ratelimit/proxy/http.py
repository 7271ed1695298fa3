"""The REST proxy's HTTP front (DESIGN 3.6): `http://PROXY_HTTP_ADDRESS/api/v10/...`, answers as they came.

Clients (discord.py with `Route.BASE`, hikari with `RESTApp(url=...)`, curl) use `http://ADDRESS/api/v10` as
their API base and send their own Authorization; the proxy sends the request to `DISCORD_API_URL` plus the
path after `/api[/vN]` (so the API version is `DISCORD_API_URL`'s) under the shared limits, and returns
Discord's status, headers (hop-by-hop ones removed, `content-length` recomputed) and body bytes as they
came (see `rest_proxy` for why the proxy asks Discord for identity encoding).

When the proxy answers itself, the answer says so with `X-Proxy-Error: <kind>` and a JSON body
`{"message", "code": 0, "proxy_error"}`: a ratelimit wait beyond the timeout is 503 with `Retry-After`
(`ratelimit-timeout`), refused credentials 401 (`token-revoked`), 404 (`webhook-dead`) or 503
(`invalid-budget`), a failure to reach Discord 502, no answer within the timeout 504, a bad request 400
(405 for a method Discord's API does not use, 413 for a body over the limit, 404 outside `/api/`).

Every worker serves the same port: each opens its own listening socket with SO_REUSEPORT set before bind,
and the kernel spreads new connections over them (Linux hashes the 4-tuple). The alternative, one process
accepting and passing sockets on, would need a process that is not a worker, or one worker more loaded
than the others; a socket inherited from the supervisor would not survive the supervisor's own restart.

Why not `supervisor.httpserver` (the simulator's and the metrics' server): the proxy needs the raw request
target and header list, a 413 before reading an oversized body, a deadline on each request head and body
(a slowloris client holds a connection for at most `head_timeout_s`), a cap on connections, and a drain
on stop; and `ratelimit/` does not depend on `workers/`. One connection, one task, requests in order;
keep-alive, no pipelining in parallel (h11 buffers a pipelined request until the previous one is answered).

Stopping (`stop(grace_s)`): the listener closes at once (the kernel sends new connections to the other
workers' sockets), idle keep-alive connections close, answers in progress get `connection: close`, and
requests in flight get `grace_s` to finish; those still in flight then get a 503 `stopping`.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import http
import json
import logging
import math
import re
import socket
from dataclasses import dataclass, field
from typing import Final

import h11
import trio

from ratelimit.proxy.errors import ProxyError, RpcStatus, bad_request, log_failure
from ratelimit.proxy.request import MAX_BODY_BYTES, METHODS, ProxyRequest, check_path, describe
from ratelimit.proxy.rest_proxy import ProxyResponse, RestProxy

__all__ = ["HttpLimits", "HttpProxyServer", "open_reuseport_listener"]

LOGGER: Final = logging.getLogger("ratelimit.proxy")

#: Head of a request (request line and headers): larger is a 431.
MAX_HEAD_BYTES: Final = 64 * 1024
RECEIVE_CHUNK_BYTES: Final = 65_536
_API_PREFIX: Final = re.compile(r"/api(?:/v\d+)?(?=/)")
_ACCEPT_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: After the grace period, how long the last 503s may take to write.
FINAL_WRITE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-worker bounds on what a client may hold."""

    #: A new connection must send a complete request head within this long, and a later request's head
    #: must be complete this long after its first byte.
    head_timeout_s: float = 10.0
    #: The whole body must arrive within this long after the head.
    body_timeout_s: float = 60.0
    #: A keep-alive connection with no request for this long is closed.
    idle_timeout_s: float = 60.0
    #: Writing an answer to a client that does not read fails after this long.
    write_timeout_s: float = 30.0
    max_connections: int = 1024
    max_body_bytes: int = MAX_BODY_BYTES
    listen_backlog: int = 1024


@dataclass(frozen=True, slots=True)
class HttpStatistics:
    accepted: int
    refused: int
    requests: int
    connections: int
    in_flight: int


class _ConnectionClosed(Exception):
    """The connection must close now (the answer, if any, was written)."""


@dataclass(eq=False)
class _Connection:
    stream: trio.SocketStream
    parser: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    )
    #: Set while waiting for the next request, so `stop()` can close an idle connection at once.
    idle_scope: trio.CancelScope | None = None


@dataclass(eq=False)
class _InFlight:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


async def open_reuseport_listener(host: str, port: int, *, backlog: int = 1024) -> trio.SocketListener:
    """A listening TCP socket on `host:port` with SO_REUSEPORT (and SO_REUSEADDR) set before bind, so
    several processes (or several listeners of one process) can share the port."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


#: The header that carries the shared secret (`PROXY_HTTP_SECRET`); stripped before forwarding.
SECRET_HEADER: Final = "x-proxy-secret"


def _secret_matches(headers: tuple[tuple[str, str], ...], secret: bytes) -> bool:
    given = [value for name, value in headers if name.lower() == SECRET_HEADER]
    # Constant-time: the comparison must not tell a prober how much of the secret it got right.
    return len(given) == 1 and hmac.compare_digest(given[0].encode("latin-1"), secret)


class HttpProxyServer:
    """Serves `proxy` over HTTP/1.1. Run `serve(host, port)` in a nursery; `stop()` drains it."""

    def __init__(
        self, proxy: RestProxy, *, limits: HttpLimits | None = None, secret: str | None = None
    ) -> None:
        """`secret` (`PROXY_HTTP_SECRET`): when set, every request must carry it in `X-Proxy-Secret` (407
        otherwise, before anything is read or sent); the header never travels on to Discord."""
        self.proxy = proxy
        self.limits = limits or HttpLimits()
        self._secret = secret.encode() if secret else None
        self._intake = trio.CancelScope()
        self._closing = False
        self._grace_s = 0.0
        self._connections: set[_Connection] = set()
        self._in_flight: set[_InFlight] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._accepted = self._refused = self._requests = 0

    def statistics(self) -> HttpStatistics:
        return HttpStatistics(
            self._accepted, self._refused, self._requests, len(self._connections), len(self._in_flight)
        )

    def stop(self, grace_s: float) -> None:
        """Stop accepting and drain (see the module note); `serve` returns once done. Not a checkpoint."""
        self._grace_s = grace_s
        self._closing = True
        self._intake.cancel()
        for connection in self._connections:
            if connection.idle_scope is not None:
                connection.idle_scope.cancel()

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections on `host:port` (SO_REUSEPORT) until `stop()` or cancellation; reports the
        bound port (useful with port 0)."""
        listener = await open_reuseport_listener(host, port, backlog=self.limits.listen_backlog)
        bound: int = listener.socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            task_status.started(bound)
            LOGGER.info("proxy.http_ready", extra={"host": host, "port": bound})
            with self._intake:
                async with listener:
                    await self._accept(listener, connections)
            with trio.move_on_after(self._grace_s):
                await self._idle.wait()
            for request in list(self._in_flight):
                request.scope.cancel()
            with trio.move_on_after(FINAL_WRITE_S):
                await self._idle.wait()
            connections.cancel_scope.cancel()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRORS:
                    raise
                LOGGER.warning(
                    "proxy.accept_failed", extra={"front": "http", "error": errno.errorcode[exc.errno]}
                )
                await trio.sleep(0.1)
                continue
            if len(self._connections) >= self.limits.max_connections:
                self._refused += 1
                nursery.start_soon(self._refuse, stream)
                continue
            self._accepted += 1
            connection = _Connection(stream)
            self._connections.add(connection)
            nursery.start_soon(self._serve_connection, connection)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(1.0):
            await _write_raw(stream, 503, "too many connections", "overloaded")
        await trio.aclose_forcefully(stream)

    async def _serve_connection(self, connection: _Connection) -> None:
        try:
            first = True
            while not self._closing:
                head = await self._read_head(connection, first)
                first = False
                if head is None:
                    return
                await self._exchange(connection, head)
                connection.parser.start_next_cycle()
        except (
            _ConnectionClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.LocalProtocolError,
        ):
            pass
        except Exception:
            # A bug must not take the server (and the worker) down: this connection closes, the rest go on.
            LOGGER.exception("proxy.internal_error", extra={"front": "http"})
        finally:
            self._connections.discard(connection)
            await trio.aclose_forcefully(connection.stream)

    async def _read_head(self, connection: _Connection, first: bool) -> h11.Request | None:
        """The next request's head, or None when the connection should close quietly."""
        conn = connection.parser
        limits = self.limits
        buffered, closed = conn.trailing_data
        if not buffered and not closed:
            # Idle between requests: closed at once by stop(). A fresh connection gets the head timeout.
            wait_s = limits.head_timeout_s if first else limits.idle_timeout_s
            with trio.CancelScope() as idle:
                connection.idle_scope = idle
                idle.deadline = trio.current_time() + wait_s
                if self._closing:
                    idle.cancel()
                data = await connection.stream.receive_some(RECEIVE_CHUNK_BYTES)
            connection.idle_scope = None
            if idle.cancelled_caught:
                return None
            conn.receive_data(data)
        try:
            with trio.fail_after(limits.head_timeout_s):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await connection.stream.receive_some(RECEIVE_CHUNK_BYTES))
                    elif isinstance(event, h11.Request):
                        return event
                    else:  # ConnectionClosed (or PAUSED, which cannot happen before a request)
                        return None
        except h11.RemoteProtocolError as exc:
            log_failure("http", _framing_error("not an HTTP/1.1 request"), "(unparsed)")
            status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
            await self._write_raw(connection, status, "malformed HTTP request", "bad-request")
            return None
        except trio.TooSlowError:
            log_failure("http", _framing_error("request head too slow"), "(unparsed)")
            await self._write_raw(connection, 408, "request head not received in time", "timeout")
            return None

    async def _exchange(self, connection: _Connection, head: h11.Request) -> None:
        """Read the body, relay the request, write the answer. Raises `_ConnectionClosed` when the connection
        cannot go on (the body was not read, or the client is too slow)."""
        self._requests += 1
        method = head.method.decode("ascii", "replace").upper()
        target = head.target.decode("ascii", "replace")
        headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers)
        match = _API_PREFIX.match(target)
        early: ProxyError | None = None
        if method not in METHODS:
            early = ProxyError(
                "bad-method",
                f"method must be one of {', '.join(sorted(METHODS))}",
                rpc_status=RpcStatus.BAD_METHOD,
                http_status=405,
            )
        elif match is None:
            early = ProxyError(
                "not-found", "the proxy serves /api/v10/...", rpc_status=RpcStatus.BAD_PATH, http_status=404
            )
        elif self._secret is not None and not _secret_matches(headers, self._secret):
            early = ProxyError(
                "proxy-auth",
                f"this proxy needs its shared secret in {SECRET_HEADER}",
                rpc_status=RpcStatus.BAD_HEADERS,
                http_status=407,
            )
        elif _declared_length(headers) > self.limits.max_body_bytes:
            early = _too_large(self.limits.max_body_bytes)
        if self._secret is not None:
            headers = tuple((name, value) for name, value in headers if name.lower() != SECRET_HEADER)
        if early is not None:
            log_failure("http", early, describe(method, target))
            await self._write_error(connection, early, close=True)
            raise _ConnectionClosed
        assert match is not None
        path = target[match.end() :]
        route = describe(method, path)
        body = await self._read_body(connection, route)
        try:
            request = ProxyRequest(method, check_path(method, path), (), headers, body)
        except ProxyError as exc:
            log_failure("http", exc, route)
            await self._write_error(connection, exc)
            return
        await self._relay(connection, request, route)

    async def _read_body(self, connection: _Connection, route: str) -> bytes:
        conn = connection.parser
        if conn.they_are_waiting_for_100_continue:
            await self._send(connection, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        try:
            with trio.fail_after(self.limits.body_timeout_s):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await connection.stream.receive_some(RECEIVE_CHUNK_BYTES))
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > self.limits.max_body_bytes:
                            error = _too_large(self.limits.max_body_bytes)
                            log_failure("http", error, route)
                            await self._write_error(connection, error, close=True)
                            raise _ConnectionClosed
                    elif isinstance(event, h11.EndOfMessage):
                        return bytes(body)
                    else:  # the client went away mid-body
                        raise _ConnectionClosed
        except h11.RemoteProtocolError:
            log_failure("http", _framing_error("malformed request body"), route)
            await self._write_raw(connection, 400, "malformed request body", "bad-request")
            raise _ConnectionClosed from None
        except trio.TooSlowError:
            log_failure("http", _framing_error("request body too slow"), route)
            await self._write_raw(connection, 408, "request body not received in time", "timeout")
            raise _ConnectionClosed from None

    async def _relay(self, connection: _Connection, request: ProxyRequest, route: str) -> None:
        entry = _InFlight()
        self._in_flight.add(entry)
        if self._idle.is_set():
            self._idle = trio.Event()
        response: ProxyResponse | None = None
        error: ProxyError | None = None
        try:
            with entry.scope:
                try:
                    response = await self.proxy.send(request)
                except ProxyError as exc:
                    error = exc
                except Exception:
                    LOGGER.exception("proxy.internal_error", extra={"front": "http", "route": route})
                    error = ProxyError(
                        "internal",
                        "internal error in the proxy",
                        rpc_status=RpcStatus.UNKNOWN,
                        http_status=500,
                    )
            if entry.scope.cancelled_caught:
                error = ProxyError(
                    "stopping",
                    "the proxy is stopping; the request may have reached Discord",
                    rpc_status=RpcStatus.UNKNOWN,
                    http_status=503,
                )
            if error is not None:
                log_failure("http", error, route)
                await self._write_error(connection, error, close=error.kind == "stopping")
            else:
                assert response is not None
                LOGGER.debug(
                    "proxy.response", extra={"front": "http", "route": route, "status": response.status}
                )
                await self._write_response(connection, response)
        finally:
            self._in_flight.discard(entry)
            if not self._in_flight:
                self._idle.set()

    async def _write_response(self, connection: _Connection, response: ProxyResponse) -> None:
        status = response.status
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            headers.append((b"content-length", str(len(response.body)).encode("ascii")))
        if self._closing and not any(name.lower() == b"connection" for name, _ in headers):
            headers.append((b"connection", b"close"))
        conn = connection.parser
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if response.body and not no_body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await self._send(connection, data)
        if self._closing:
            raise _ConnectionClosed

    async def _write_error(self, connection: _Connection, error: ProxyError, *, close: bool = False) -> None:
        body = json.dumps(
            {"message": error.message, "code": 0, "proxy_error": error.kind}
            | ({"retry_after": round(error.retry_after_s, 3)} if error.retry_after_s is not None else {})
        ).encode()
        headers = [("content-type", "application/json"), ("x-proxy-error", error.kind)]
        if error.retry_after_s is not None:
            headers.append(("retry-after", str(max(1, math.ceil(error.retry_after_s)))))
        if close:
            headers.append(("connection", "close"))
        await self._write_response(connection, ProxyResponse(error.http_status, tuple(headers), "", body))
        if close:
            raise _ConnectionClosed

    async def _write_raw(self, connection: _Connection, status: int, message: str, kind: str) -> None:
        with trio.move_on_after(self.limits.write_timeout_s):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await _write_raw(connection.stream, status, message, kind)

    async def _send(self, connection: _Connection, data: bytes) -> None:
        try:
            with trio.fail_after(self.limits.write_timeout_s):
                await connection.stream.send_all(data)
        except trio.TooSlowError:
            raise _ConnectionClosed from None


async def _write_raw(stream: trio.SocketStream, status: int, message: str, kind: str) -> None:
    """An answer written outside h11's state machine (the request could not be parsed), then the close."""
    body = json.dumps({"message": message, "code": 0, "proxy_error": kind}).encode()
    head = (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\ncontent-type: application/json\r\n"
        f"x-proxy-error: {kind}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode("ascii") + body)


def _declared_length(headers: tuple[tuple[str, str], ...]) -> int:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # h11 has already refused a malformed one
    return 0


def _too_large(limit: int) -> ProxyError:
    return bad_request(RpcStatus.BAD_FORMAT, f"body larger than {limit} bytes", http_status=413)


def _framing_error(message: str) -> ProxyError:
    return ProxyError("bad-request", message, rpc_status=RpcStatus.BAD_FORMAT, http_status=400)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
