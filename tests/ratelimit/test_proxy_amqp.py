"""The REST proxy's AMQP RPC front against real RabbitMQ and the simulator: every status 0-8, CANCEL,
malformed messages, concurrency under the limits, and the drain on stop."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import orjson
import pytest
import trio

from benchmarks.simulator import DEFAULT_TOKEN
from ratelimit.backend import LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.proxy import RestProxy, open_rest_proxy
from ratelimit.proxy.amqp import RestRpcServer
from tests.ratelimit.proxy_helpers import (
    AMQP_URL,
    RpcClient,
    open_rpc_client,
    proxy_stack,
    unique_group,
)
from workers.amqp_bridge import Amqp, open_amqp

AUTH = {"Authorization": f"Bot {DEFAULT_TOKEN}"}


@asynccontextmanager
async def rpc_front(proxy: RestProxy, **options: Any) -> AsyncIterator[tuple[RestRpcServer, RpcClient, Amqp]]:
    """A running RPC front on a fresh group, and a client of it; the request queue is deleted afterwards."""
    group = unique_group()
    async with open_amqp(AMQP_URL) as amqp:
        server = RestRpcServer(amqp, proxy, group=group, **options)
        try:
            async with trio.open_nursery() as nursery, open_rpc_client(group) as client:
                await nursery.start(server.serve)
                yield server, client, amqp
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await amqp.delete_queue(server.queue)


def ok_body(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == 0, reply
    body: dict[str, Any] = reply["body"]
    return body


async def test_answers_of_discord_come_back_as_status_0() -> None:
    with trio.fail_after(20):
        async with proxy_stack() as stack, rpc_front(stack.proxy) as (_, client, _amqp):
            # The bot token is added when the caller sends none.
            me = ok_body(await client.call({"method": "GET", "path": "/users/@me", "headers": {}}))
            assert me["status"] == 200
            assert me["url"] == stack.harness.sim.addresses.rest_url + "/users/@me"
            assert orjson.loads(me["body"])["username"] == "simulator-bot"
            assert isinstance(me["body"], bytes)
            assert me["headers"]["content-type"].startswith("application/json")
            assert "content-length" not in me["headers"]

            # The JS client's shape: a JSON string body with its content type, its own Authorization.
            posted = ok_body(
                await client.call(
                    {
                        "method": "POST",
                        "path": "/channels/1/messages",
                        "body": orjson.dumps({"content": "hi"}).decode(),
                        "query": None,
                        "headers": {
                            **AUTH,
                            "content-type": "application/json",
                            "X-RateLimit-Precision": "millisecond",
                        },
                    }
                )
            )
            assert posted["status"] == 200
            assert orjson.loads(posted["body"])["content"] == "hi"
            assert posted["headers"]["x-ratelimit-limit"] == "5"

            # A map body is sent as JSON; a query is percent-encoded; rmp-serde's array form decodes too.
            mapped = ok_body(
                await client.call(
                    [
                        "POST",
                        "/channels/2/messages",
                        {"a b": "c&d", "n": [1, 2]},
                        {"content": "x"},
                        {},
                        [5, 0],
                    ]
                )
            )
            assert mapped["status"] == 200
            assert mapped["url"].endswith("/channels/2/messages?a%20b=c%26d&n=1&n=2")
            assert orjson.loads(mapped["body"])["content"] == "x"

            # Discord's errors are answers too (status 0, the HTTP status inside), not proxy failures.
            missing = ok_body(await client.call({"method": "GET", "path": "/guilds/1/audit-logs"}))
            assert missing["status"] == 404
            assert orjson.loads(missing["body"])["message"] == "404: Not Found"
            unauthorized = ok_body(
                await client.call(
                    {"method": "GET", "path": "/users/@me", "headers": {"Authorization": "Bot nope"}}
                )
            )
            assert unauthorized["status"] == 401


async def test_each_bad_field_gets_its_status_and_the_consumer_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit.proxy")
    injected = {"method": "GET", "path": "/users/@me", "headers": {**AUTH, "X-A": "a\r\nInjected: yes"}}
    cases: list[tuple[Any, int]] = [
        (b"\xc1", 2),  # not MessagePack
        (b"\x81\x91\x01\x01", 2),  # a map whose key is an array (msgpack raises TypeError)
        (msgpack.packb(5), 2),  # not a map
        (msgpack.packb({"method": "GET"}), 2),  # no path
        (msgpack.packb({"method": "GET", "path": "/users/@me", "timeout": "soon"}), 2),
        (msgpack.packb({"method": "GET", "path": "users/@me"}), 3),
        (msgpack.packb({"method": "GET", "path": "/users/../gateway"}), 3),
        (msgpack.packb({"method": "GET", "path": "/users/@me", "query": {"a": {"b": 1}}}), 4),
        (msgpack.packb({"method": "GET", "path": "/users/@me", "query": "a=1"}), 4),
        (msgpack.packb({"method": "FETCH", "path": "/users/@me"}), 5),
        (msgpack.packb(injected), 6),
        (msgpack.packb({"method": "GET", "path": "/users/@me", "headers": {"bad name": "x"}}), 6),
    ]
    with trio.fail_after(20):
        async with proxy_stack() as stack, rpc_front(stack.proxy) as (server, client, _amqp):
            for body, status in cases:
                reply = await client.call_raw(body)
                assert reply["status"] == status, (body, reply)
                if status:
                    assert isinstance(reply["body"], str) and reply["body"]
                    assert "Injected" not in reply["body"]
            # Undecodable and no reply_to: rejected without a reply; the next request is served.
            await client.publish("REQUEST", b"\xc1", correlation_id="no-reply")
            assert ok_body(await client.call({"method": "GET", "path": "/users/@me"}))["status"] == 200
            assert server.statistics().received == len(cases) + 2
            assert client.stray == []
    # One line per bad request, without the values that were refused or the token beside them.
    errors = [record for record in caplog.records if record.getMessage() == "proxy.error"]
    assert len(errors) == sum(1 for _, status in cases if status) + 1  # + the one without reply_to
    dumped = " ".join(str(vars(record)) for record in caplog.records)
    assert "Injected" not in dumped
    assert DEFAULT_TOKEN not in dumped


async def test_request_failed_and_timeouts() -> None:
    with trio.fail_after(20):
        async with (
            proxy_stack(latency_ms=400.0, bucket_time_scale=1.0) as stack,
            rpc_front(stack.proxy) as (
                _,
                client,
                _amqp,
            ),
        ):
            # 8: no answer within the caller's timeout (50 ms; Discord takes 400).
            slow = await client.call({"method": "GET", "path": "/users/@me", "timeout": 50})
            assert slow == {"status": 8, "body": "no answer from Discord within the timeout (0.05 s)"}
            # 8: the limits alone need longer than the timeout: refused at once, never sent.
            for n in range(5):
                assert (
                    ok_body(
                        await client.call(
                            {"method": "POST", "path": "/channels/7/messages", "body": {"content": n}}
                        )
                    )["status"]
                    == 200
                )
            with trio.fail_after(1):
                waiting = await client.call(
                    {
                        "method": "POST",
                        "path": "/channels/7/messages",
                        "body": {"content": 5},
                        "timeout": 1000,
                    }
                )
            assert waiting["status"] == 8 and waiting["body"].startswith("ratelimited (bucket)"), waiting
            ledger = await stack.ledger()
            assert "429" not in ledger["by_status"], ledger

        # 7: Discord cannot be reached. The port stays bound (not listening: connections are refused) for
        # the whole call, so the simulator that proxy_stack starts cannot be given it.
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
            limiter = Ratelimiter(LocalBackend())
            async with (
                open_rest_proxy(
                    limiter, api_url=f"http://127.0.0.1:{dead_port}/api/v10", bot_token="x" * 30
                ) as proxy,
                proxy_stack() as stack,
            ):
                stack.proxy = proxy
                async with rpc_front(stack.proxy) as (_, client, _amqp):
                    failed = await client.call({"method": "GET", "path": "/users/@me"})
                    assert failed == {"status": 7, "body": "request to Discord failed: ConnectError"}


async def test_cancel_before_and_during_the_request() -> None:
    with trio.fail_after(20):
        async with proxy_stack(latency_ms=1000.0) as stack, rpc_front(stack.proxy) as (server, client, _amqp):
            # During: Discord is answering (1 s latency) when the CANCEL (raw UTF-8 id) arrives.
            async with trio.open_nursery() as nursery:
                replies: list[Any] = []

                async def call() -> None:
                    replies.append(
                        await client.call(
                            {"method": "GET", "path": "/users/@me"}, correlation_id="01CANCELME"
                        )
                    )

                nursery.start_soon(call)
                while server.statistics().in_flight == 0:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)
                await client.publish("CANCEL", b"01CANCELME")
            during = "cancelled (CANCEL) while Discord was answering; the request may have taken effect"
            assert replies == [{"status": 1, "body": during}]
            # Before: the CANCEL (a MessagePack string, as the JS broker's publish sends) comes first.
            await client.publish("CANCEL", msgpack.packb("01EARLY"))
            while server.statistics().cancels < 2:
                await trio.sleep(0.01)
            early = await client.call({"method": "GET", "path": "/users/@me"}, correlation_id="01EARLY")
            assert early == {"status": 1, "body": "cancelled (CANCEL) before it was sent"}
            ledger = await stack.ledger()
            assert ledger["by_status"].get("200", 0) <= 1  # the early one never reached Discord


async def test_thirty_concurrent_posts_on_one_channel_draw_no_429() -> None:
    with trio.fail_after(30):
        async with (
            proxy_stack(bucket_time_scale=0.1) as stack,
            rpc_front(stack.proxy, max_in_flight=16) as (_, client, _amqp),
        ):
            statuses: list[int] = []

            async def post(n: int) -> None:
                reply = await client.call(
                    {"method": "POST", "path": "/channels/3/messages", "body": {"content": str(n)}},
                    timeout=20,
                )
                statuses.append(ok_body(reply)["status"])

            async with trio.open_nursery() as nursery:
                for n in range(30):
                    nursery.start_soon(post, n)
            ledger = await stack.ledger()
    assert statuses == [200] * 30
    assert ledger["by_status"] == {"200": 30}, ledger["by_category"]


async def test_stop_requeues_unsent_requests_and_answers_sent_ones() -> None:
    """On stop with no grace: a request Discord is answering gets status 1; one still waiting for its
    bucket goes back to the queue, where the next server (another worker) sends it."""
    post = {"method": "POST", "path": "/channels/9/messages", "body": {"content": "x"}}
    with trio.fail_after(20):
        # Messages: 5 per 2 s; every answer takes 300 ms.
        async with proxy_stack(latency_ms=300.0, bucket_time_scale=0.4, timeout_s=15.0) as stack:
            group = unique_group()
            async with open_amqp(AMQP_URL) as amqp, open_rpc_client(group) as client:
                first = RestRpcServer(amqp, stack.proxy, group=group)
                replies: dict[str, Any] = {}

                async def call(name: str, request: dict[str, Any]) -> None:
                    replies[name] = await client.call(request, correlation_id=name, timeout=15)

                try:
                    async with trio.open_nursery() as callers:
                        async with trio.open_nursery() as servers:
                            await servers.start(first.serve)
                            async with trio.open_nursery() as warm_up:  # the bucket is now empty
                                for n in range(5):
                                    warm_up.start_soon(call, f"warm-up {n}", post)
                            callers.start_soon(call, "sent", {"method": "GET", "path": "/users/@me"})
                            callers.start_soon(call, "queued", post)
                            while first.statistics().in_flight < 2:
                                await trio.sleep(0.01)
                            await trio.sleep(0.1)
                            first.stop(0.0)
                        assert first.statistics().requeued == 1
                        second = RestRpcServer(amqp, stack.proxy, group=group)
                        async with trio.open_nursery() as servers:
                            await servers.start(second.serve)
                            while "queued" not in replies:
                                await trio.sleep(0.01)
                            servers.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        await amqp.delete_queue(first.queue)
            ledger = await stack.ledger()
    assert replies["sent"] == {
        "status": 1,
        "body": "the proxy stopped while Discord was answering; the request may have taken effect",
    }
    assert ok_body(replies["queued"])["status"] == 200
    assert "429" not in ledger["by_status"]


def test_timeout_and_cancel_decoding() -> None:
    from ratelimit.proxy.errors import ProxyError
    from ratelimit.proxy.request import MAX_BODY_BYTES, make_request, timeout_seconds
    from ratelimit.proxy.rpc import decode_cancel

    assert timeout_seconds(1500) == 1.5
    assert timeout_seconds({"secs": 2, "nanos": 500_000_000}) == 2.5
    assert timeout_seconds([1, 0]) == 1.0
    for bad in (True, -1, math.inf, {"secs": "1"}, [1], "1s"):
        with pytest.raises(ProxyError) as info:
            timeout_seconds(bad)
        assert info.value.rpc_status == 2
    with pytest.raises(ProxyError) as info:
        make_request("POST", "/channels/1/messages", body=b"x" * (MAX_BODY_BYTES + 1))
    assert (info.value.rpc_status, info.value.http_status) == (2, 413)
    assert decode_cancel(b"01ARZ3NDEKTSV4RRFFQ69G5FAV") == "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    assert decode_cancel(msgpack.packb("abc")) == "abc"
    assert decode_cancel(msgpack.packb(b"abc")) == "abc"
    assert decode_cancel(b"\xff\xfe") is None
    assert decode_cancel(b"") is None
