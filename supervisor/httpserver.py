"""A small HTTP/1.1 server on trio and h11, for every HTTP endpoint we serve: the simulator's REST API,
the supervisor's metrics and health, the HTTP REST proxy.

Why not a framework: the simulator must answer in exactly Discord's shape (headers, non-JSON ban pages,
keep-alive under load) and add latency per request, which is simplest with the sans-io h11 core driven by a
thin trio loop; the other endpoints need nothing more. Each connection is served by one task; requests on it
are answered in order (no pipelining), so clients that want parallel requests open several connections, as
httpx and aiohttp do.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import h11
import trio

LOGGER: Final = logging.getLogger("supervisor.httpserver")
#: Largest request body accepted (Discord accepts 25 MiB uploads; the simulator needs far less).
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: A connection that sends nothing for this long is closed.
IDLE_TIMEOUT_S: Final = 120.0
RECEIVE_CHUNK_BYTES: Final = 65_536


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One parsed request. Header names are lower-cased; `path` is percent-decoded only where noted."""

    method: str
    #: The raw path (still percent-encoded), without the query string.
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    #: The peer's address, used as the source IP when no `X-Fake-Source-IP` header is present.
    client_host: str


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on `host:port` until cancelled; reports the bound port through `task_status`."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port: int = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(bound_port)

        async def serve_one(stream: trio.SocketStream) -> None:
            await _serve_connection(stream, handler)

        await trio.serve_listeners(serve_one, listeners, handler_nursery=nursery)


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY_BYTES)
    peer = stream.socket.getpeername()
    client_host = str(peer[0]) if isinstance(peer, tuple) else "127.0.0.1"
    try:
        while True:
            request = await _read_request(stream, connection, client_host)
            if request is None:
                return
            try:
                response = await handler(request)
            except Exception:
                LOGGER.exception("http.handler_failed", extra={"path": request.path})
                response = HttpResponse(500, [("content-type", "text/plain")], b"internal error")
            await _write_response(stream, connection, response)
            if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
                return
            try:
                connection.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, trio.TooSlowError):
        # TooSlowError: an idle keep-alive connection (IDLE_TIMEOUT_S). It is not a TimeoutError, and what
        # escapes here ends serve_listeners and with it the whole server.
        return
    finally:
        await trio.aclose_forcefully(stream)


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection, client_host: str
) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    with trio.fail_after(IDLE_TIMEOUT_S):
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - h11 has no other client events
                return None
    assert head is not None
    target = head.target.decode("latin-1")
    path, _, query_string = target.partition("?")
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers}
    return HttpRequest(
        method=head.method.decode("ascii").upper(),
        path=path,
        query=urllib.parse.parse_qs(query_string, keep_blank_values=True),
        headers=headers,
        body=bytes(body),
        client_host=client_host,
    )


async def _write_response(
    stream: trio.SocketStream, connection: h11.Connection, response: HttpResponse
) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    out = connection.send(h11.Response(status_code=response.status, headers=headers))
    data = connection.send(h11.Data(data=response.body)) if response.body else b""
    end = connection.send(h11.EndOfMessage())
    await stream.send_all(b"".join(part for part in (out, data, end) if part))
