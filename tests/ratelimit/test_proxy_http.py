"""The REST proxy's HTTP front over real sockets, against the simulator: pass-through, limits with
discord.py's and hikari's own REST clients pointed at it, the proxy's own error answers, SO_REUSEPORT, and
hostile clients (garbage, oversized bodies, slowloris)."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from benchmarks.simulator import DEFAULT_TOKEN
from ratelimit.backend import LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.proxy import RestProxy, open_rest_proxy
from ratelimit.proxy.http import HttpLimits, HttpProxyServer
from tests.ratelimit.proxy_helpers import proxy_stack
from tests.simulator.rest_helpers import AUTH

PEERS = Path(__file__).resolve().parent.parent / "peers"


@asynccontextmanager
async def http_front(
    proxy: RestProxy, *, limits: HttpLimits | None = None, port: int = 0, secret: str | None = None
) -> AsyncIterator[tuple[HttpProxyServer, str]]:
    """A running HTTP front on loopback; yields it and its base URL (`http://127.0.0.1:PORT/api/v10`)."""
    server = HttpProxyServer(proxy, limits=limits, secret=secret)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, "127.0.0.1", port)
        yield server, f"http://127.0.0.1:{bound}/api/v10"
        nursery.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if data:
                await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


def port_of(base: str) -> int:
    return httpx.URL(base).port or 80


async def test_answers_pass_through_as_they_came() -> None:
    with trio.fail_after(20):
        async with proxy_stack() as stack, http_front(stack.proxy) as (server, base):
            sim = stack.harness.sim.addresses.rest_url
            async with httpx.AsyncClient(headers=AUTH) as client:
                direct = await client.get(f"{sim}/users/@me")
                proxied = await client.get(f"{base}/users/@me")
                assert proxied.status_code == 200
                assert proxied.content == direct.content
                assert proxied.headers["content-type"] == direct.headers["content-type"]
                assert "x-proxy-error" not in proxied.headers
                posted = await client.post(f"{base}/channels/1/messages", json={"content": "hi"})
                assert posted.status_code == 200
                assert posted.json()["content"] == "hi"
                assert posted.headers["x-ratelimit-limit"] == "5"
                assert posted.headers["x-ratelimit-bucket"]
                # Discord's own errors come back as they are, unmarked.
                missing = await client.get(f"{base}/guilds/1/audit-logs")
                assert (missing.status_code, missing.json()["code"]) == (404, 0)
                assert "x-proxy-error" not in missing.headers
                # The client's Authorization is used; the proxy never adds the bot's.
                anonymous = await client.get(f"{base}/users/@me", headers={"Authorization": ""})
                assert anonymous.status_code == 401
                assert "x-proxy-error" not in anonymous.headers
            # One keep-alive connection carried all of it.
            assert server.statistics().accepted == 1
            assert server.statistics().requests == 4


async def test_a_concurrent_burst_through_the_proxy_draws_no_429() -> None:
    with trio.fail_after(20):
        async with proxy_stack() as stack, http_front(stack.proxy) as (_, base):
            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=base, headers=AUTH) as client:

                async def post(n: int) -> None:
                    response = await client.post("/channels/5/messages", json={"content": str(n)})
                    statuses.append(response.status_code)

                async with trio.open_nursery() as nursery:
                    for n in range(15):
                        nursery.start_soon(post, n)
            ledger = await stack.ledger()
    assert statuses == [200] * 15
    assert ledger["by_status"] == {"200": 15}


async def run_peer(script: str, *args: str) -> dict[str, Any]:
    with trio.fail_after(40):
        process = await trio.run_process(
            [sys.executable, str(PEERS / script), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = process.stderr.decode(errors="replace")[-4000:]
    assert process.returncode == 0, f"{script} exited {process.returncode}:\n{stderr}"
    report: dict[str, Any] = orjson.loads(process.stdout.decode().strip().splitlines()[-1])
    return report


@pytest.mark.peer
async def test_discordpy_and_hikari_through_the_proxy_draw_no_429() -> None:
    """Both clients' own REST stacks, pointed at the proxy and run at once with the same bot token: 8
    sequential message creates, then a warm-up and a burst of 10 concurrent ones, each client in its own
    channels. Directly against the simulator discord.py draws avoidable 429s in such a burst
    (tests/peers/test_peers.py); through the proxy nobody does, since the proxy queues what the bucket
    cannot take, and both clients see Discord's headers as they came."""
    channels = {"discordpy_rest.py": ("1200000000000000001", "1200000000000000002")}
    channels["hikari_rest.py"] = ("1200000000000000003", "1200000000000000004")
    reports: dict[str, dict[str, Any]] = {}
    with trio.fail_after(50):
        async with proxy_stack() as stack, http_front(stack.proxy) as (_, base):

            async def peer(script: str) -> None:
                channel, burst = channels[script]
                reports[script] = await run_peer(
                    script,
                    "--rest-url",
                    base,
                    "--token",
                    DEFAULT_TOKEN,
                    "--channel",
                    channel,
                    "--burst-channel",
                    burst,
                    "--sequential",
                    "8",
                    "--concurrent",
                    "10",
                )

            async with trio.open_nursery() as nursery:
                for script in channels:
                    nursery.start_soon(peer, script)
            ledger = await stack.ledger()
    for script, report in reports.items():
        assert report["errors"] == [], script
        assert report["user"]["username"] == "simulator-bot"
        assert report["sequential"]["sent"] == 8
        assert report["concurrent"]["sent"] == 10
    assert reports["discordpy_rest.py"]["rate_limited_logs"] == 0
    assert ledger["by_status"] == {"200": 2 * (1 + 8 + 1 + 10)}
    assert sum(ledger["by_category"].values()) == 0


async def test_the_proxys_own_answers_are_marked() -> None:
    with trio.fail_after(20):
        async with (
            proxy_stack(bucket_time_scale=1.0, timeout_s=1.0) as stack,
            http_front(stack.proxy) as (_, base),
            httpx.AsyncClient(base_url=base, headers=AUTH) as client,
        ):
            # The bucket (5 per 5 s) is spent: the sixth would wait longer than the 1 s timeout.
            for n in range(5):
                assert (await client.post("/channels/6/messages", json={"content": n})).status_code == 200
            waited = await client.post("/channels/6/messages", json={"content": 5})
            assert waited.status_code == 503
            assert waited.headers["x-proxy-error"] == "ratelimit-timeout"
            assert 1 <= int(waited.headers["retry-after"]) <= 5
            assert waited.json()["proxy_error"] == "ratelimit-timeout"

            # A token Discord refused (401, passed on as it came) is not sent again: 401 from the proxy.
            bad = {"Authorization": "Bot " + "x" * 40}
            first = await client.get("/users/@me", headers=bad)
            assert first.status_code == 401 and "x-proxy-error" not in first.headers
            again = await client.get("/users/@me", headers=bad)
            assert again.status_code == 401 and again.headers["x-proxy-error"] == "token-revoked"

            # A method Discord's API does not use, a path outside /api/, a path that names nothing.
            assert (await client.request("OPTIONS", "/users/@me")).status_code == 405
            outside = await client.get("http://" + httpx.URL(base).netloc.decode() + "/metrics")
            assert (outside.status_code, outside.headers["x-proxy-error"]) == (404, "not-found")
            nothing = await client.get("/")
            assert (nothing.status_code, nothing.headers["x-proxy-error"]) == (400, "bad-path")
            ledger = await stack.ledger()
            assert ledger["by_status"] == {"200": 5, "401": 1}

        # Discord unreachable: 502; no answer within the timeout: 504.
        # The port stays bound, not listening, through the call, so the front cannot be given it.
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
            limiter = Ratelimiter(LocalBackend())
            async with (
                open_rest_proxy(limiter, api_url=f"http://127.0.0.1:{dead}/api/v10") as proxy,
                http_front(proxy) as (_, base),
                httpx.AsyncClient(base_url=base, headers=AUTH) as client,
            ):
                failed = await client.get("/users/@me")
                assert (failed.status_code, failed.headers["x-proxy-error"]) == (502, "upstream-failed")
        async with (
            proxy_stack(latency_ms=2000.0, timeout_s=0.3) as stack,
            http_front(stack.proxy) as (_, base),
            httpx.AsyncClient(base_url=base, headers=AUTH) as client,
        ):
            slow = await client.get("/users/@me")
            assert (slow.status_code, slow.headers["x-proxy-error"]) == (504, "timeout")


async def test_a_configured_shared_secret_is_required_and_not_forwarded() -> None:
    secret = "s3cret-proxy-key-0123"
    with trio.fail_after(20):
        async with (
            proxy_stack() as stack,
            http_front(stack.proxy, secret=secret) as (_, base),
            httpx.AsyncClient(base_url=base, headers=AUTH) as client,
        ):
            refused = await client.get("/users/@me")
            wrong = await client.get("/users/@me", headers={"X-Proxy-Secret": secret[:-1] + "x"})
            allowed = await client.get("/users/@me", headers={"X-Proxy-Secret": secret})
            ledger = await stack.ledger()
    assert refused.status_code == 407 and refused.headers["x-proxy-error"] == "proxy-auth"
    assert wrong.status_code == 407
    assert allowed.status_code == 200
    assert ledger["total"] == 1  # the refused ones never reached Discord
    assert secret not in refused.text


async def test_two_servers_share_one_port_with_so_reuseport() -> None:
    with trio.fail_after(20):
        async with proxy_stack() as stack, http_front(stack.proxy) as (first, base):
            port = port_of(base)
            async with http_front(stack.proxy, port=port) as (second, _):
                for _ in range(40):
                    answer = await raw_exchange(port, b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n")
                    assert answer.startswith(b"HTTP/1.1 404 ")
    # The kernel spread 40 connections over both sockets (each side has a chance of 2**-40 of none).
    assert first.statistics().accepted > 0
    assert second.statistics().accepted > 0
    assert first.statistics().accepted + second.statistics().accepted == 40


async def test_garbage_oversized_bodies_and_slow_clients_get_an_answer_and_a_close() -> None:
    limits = HttpLimits(head_timeout_s=0.3, body_timeout_s=0.3, max_body_bytes=1024)
    with trio.fail_after(20):
        async with proxy_stack() as stack, http_front(stack.proxy, limits=limits) as (server, base):
            port = port_of(base)
            garbage = await raw_exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400 ")
            assert b"x-proxy-error: bad-request" in garbage
            # A declared body over the limit: 413 before a byte of it is read.
            declared = await raw_exchange(
                port,
                b"POST /api/v10/channels/1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 30000000\r\n\r\n",
            )
            assert declared.startswith(b"HTTP/1.1 413 ")
            assert b"x-proxy-error: body-too-large" in declared
            # A chunked body that grows past it.
            chunk = b"800\r\n" + b"a" * 0x800 + b"\r\n"
            chunked = await raw_exchange(
                port,
                b"POST /api/v10/channels/1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                + chunk,
            )
            assert chunked.startswith(b"HTTP/1.1 413 ")
            # Slowloris: half a head, then nothing: 408 after the head timeout.
            started = trio.current_time()
            slow = await raw_exchange(port, b"GET /api/v10/users/@me HTTP/1.1\r\nhost: x\r\n")
            assert slow.startswith(b"HTTP/1.1 408 ")
            assert 0.25 <= trio.current_time() - started < 2
            # A head but only part of its body.
            partial = await raw_exchange(
                port,
                b"POST /api/v10/channels/1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
            )
            assert partial.startswith(b"HTTP/1.1 408 ")
            # A connection that says nothing is closed without an answer.
            assert await raw_exchange(port, b"") == b""
            # A header with a non-ASCII value cannot be sent on: 400, the connection stays usable.
            async with httpx.AsyncClient(base_url=base) as client:
                odd = await client.get("/users/@me", headers={"X-Audit-Log-Reason": "café".encode("latin-1")})
                assert (odd.status_code, odd.headers["x-proxy-error"]) == (400, "bad-headers")
                ok = await client.get("/users/@me", headers=AUTH)
                assert ok.status_code == 200
            ledger = await stack.ledger()
            assert ledger["by_status"] == {"200": 1}
            assert server.statistics().connections <= 1


async def test_stop_drains_and_answers_what_is_left() -> None:
    """stop(): the listener closes; a request Discord is still answering after the grace gets a 503
    `stopping` with `connection: close`."""
    with trio.fail_after(20):
        async with proxy_stack(latency_ms=1500.0) as stack:
            server = HttpProxyServer(stack.proxy)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}/api/v10", headers=AUTH
                ) as client:
                    answers: list[httpx.Response] = []

                    async def call() -> None:
                        answers.append(await client.get("/users/@me"))

                    nursery.start_soon(call)
                    while server.statistics().in_flight == 0:
                        await trio.sleep(0.01)
                    server.stop(0.2)
                    while not answers:
                        await trio.sleep(0.01)
            with pytest.raises(OSError, match=r"refused|connect"):
                await trio.open_tcp_stream("127.0.0.1", port)
    assert answers[0].status_code == 503
    assert answers[0].headers["x-proxy-error"] == "stopping"
    assert answers[0].headers["connection"] == "close"


async def test_log_lines_name_routes_never_tokens(caplog: pytest.LogCaptureFixture) -> None:
    """Bad requests and failures log one line each, with the route template: no Authorization value, no
    webhook token from the path, no body."""
    webhook_token = "wEbHoOkToKeN-" + "s" * 50
    secret = "Bot " + "z" * 40
    caplog.set_level(logging.DEBUG, logger="ratelimit.proxy")
    limits = HttpLimits(max_body_bytes=1024)
    with trio.fail_after(20):
        async with (
            proxy_stack() as stack,
            http_front(stack.proxy, limits=limits) as (_, base),
            httpx.AsyncClient(base_url=base, headers={"Authorization": secret}) as client,
        ):
            path = f"/webhooks/123/{webhook_token}"
            assert (await client.request("OPTIONS", path)).status_code == 405
            assert (await client.post(path, content=b"b" * 2000)).status_code == 413
            odd = await client.post(
                path, headers={"X-Note": "caf\xe9".encode("latin-1")}, json={"content": "x"}
            )
            assert odd.status_code == 400
            assert (await client.get("/users/@me")).status_code == 401  # Discord's answer, then remembered
            assert (await client.get("/users/@me")).headers["x-proxy-error"] == "token-revoked"
    records = [record for record in caplog.records if record.name.startswith("ratelimit.proxy")]
    errors = [record for record in records if record.getMessage() == "proxy.error"]
    assert [getattr(record, "kind", None) for record in errors] == [
        "bad-method",
        "body-too-large",
        "bad-headers",
        "token-revoked",
    ]
    assert {getattr(record, "route", None) for record in errors[:3]} == {
        "OPTIONS /webhooks/{webhook_id}/{webhook_token}",
        "POST /webhooks/{webhook_id}/{webhook_token}",
    }
    dumped = " ".join(str(vars(record)) for record in records)
    assert webhook_token not in dumped
    assert "z" * 40 not in dumped
