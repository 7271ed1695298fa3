"""The shared HTTP server (supervisor.httpserver) over real sockets."""

from __future__ import annotations

import pytest
import trio

from supervisor import httpserver
from supervisor.httpserver import HttpRequest, HttpResponse, serve_http


async def answer(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, [("content-type", "text/plain")], request.path.encode())


async def get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        reply = bytearray()
        while chunk := await stream.receive_some(4096):
            reply += chunk
    return bytes(reply)


async def test_an_idle_keep_alive_connection_is_closed_and_the_server_stays_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that sends nothing for IDLE_TIMEOUT_S is closed by the server; the server keeps
    serving (the timeout once escaped the connection's task and ended the whole server)."""
    monkeypatch.setattr(httpserver, "IDLE_TIMEOUT_S", 0.2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, answer, "127.0.0.1", 0)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await idle.receive_some(4096) == b""  # closed by the server after 0.2 s
        await idle.aclose()
        with trio.fail_after(5):
            reply = await get(port, "/still-here")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"/still-here")
        nursery.cancel_scope.cancel()
