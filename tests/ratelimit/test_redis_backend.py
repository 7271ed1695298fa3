"""RedisBackend against the real Redis on 127.0.0.1:6379: the RESP client, then the Lua port of the model.

The differential tests drive `RedisBackend(clock=...)` and `LocalBackend(clock=...)` (the model on a dict)
with the same asks, outcomes and explicit times and require the same answers: equal permits, waits equal
to 1e-6 with the same reason, equal refusals, and a ValueError from both or neither. Each test uses its own
key prefix (deleted afterwards); outages are simulated in front of Redis (a closed port, a listener that
never answers, a server that speaks something else), so the shared server is never stopped. The NOSCRIPT
test flushes the script cache of the shared server, which every client that reloads on NOSCRIPT survives.
"""

from __future__ import annotations

import math
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)

from benchmarks.children import free_port
from ratelimit.backend import BackendUnavailable, LocalBackend
from ratelimit.buckets import RateLimited, RateLimitHeaders, RateLimitScope
from ratelimit.global_limit import SLACK
from ratelimit.invalid import INVALID_WEBHOOK_TOKEN, TOKEN_REVOKED, UNKNOWN_WEBHOOK, WEBHOOK_DEAD
from ratelimit.model import INVALID_BUDGET, Ask, EngineConfig, Outcome, Permit, Refusal, Wait
from ratelimit.redis_backend import RedisBackend, open_redis_backend
from ratelimit.redis_client import RedisClient, Script
from ratelimit.redis_url import RedisAddress
from ratelimit.resp import (
    Incomplete,
    RedisConnectionError,
    RedisReplyError,
    Reply,
    RespProtocolError,
    encode_command,
    parse_reply,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
START = 1000.0
# Bucket scenarios: a global limit that never gets in the way.
FAST = EngineConfig(global_rate=1_000_000)
# Small numbers so that every expiry, budget level and lease end is reached in a few steps.
SMALL = EngineConfig(
    global_rate=4,
    jitter_margin_s=0.0,
    lease_s=3.0,
    map_ttl_s=40.0,
    global_only_ttl_s=15.0,
    idle_ttl_s=12.0,
    invalid_limit=10,
    invalid_window_s=20.0,
    invalid_sub_buckets=4,
    shed_at=0.5,
    stop_at=0.8,
    webhook_ttl_s=12.0,
    dead_token_s=8.0,
    ban_s=2.0,
)

Result = Permit | Wait | Refusal


def headers(limit: int, remaining: int, reset_after: float, bucket: str | None = "h1") -> RateLimitHeaders:
    return RateLimitHeaders(limit=limit, remaining=remaining, reset_after=reset_after, bucket=bucket)


def ok(limit: int, remaining: int, reset_after: float, bucket: str | None = "h1") -> Outcome:
    return Outcome("response", 200, headers(limit, remaining, reset_after, bucket))


def limited(retry_after: float, scope: RateLimitScope | None, remaining: int | None = 0) -> Outcome:
    return Outcome(
        "limited",
        429,
        limited=RateLimited(retry_after, scope, remaining, is_global=scope is RateLimitScope.GLOBAL),
    )


def assert_same(expected: Result, actual: Result) -> None:
    if isinstance(expected, Wait):
        assert isinstance(actual, Wait), (expected, actual)
        assert actual.reason == expected.reason, (expected, actual)
        assert actual.seconds == expected.seconds or abs(actual.seconds - expected.seconds) <= 1e-6, (
            expected,
            actual,
        )
    else:
        assert actual == expected


async def delete_prefix(client: RedisClient, prefix: str) -> None:
    cursor: Reply = b"0"
    while True:
        assert isinstance(cursor, bytes)
        reply = await client.execute("SCAN", cursor, "MATCH", f"{{{prefix}}}:*", "COUNT", 1000)
        assert isinstance(reply, list)
        cursor, keys = reply
        assert isinstance(keys, list)
        if keys:
            await client.execute("DEL", *[key for key in keys if isinstance(key, bytes)])
        if cursor == b"0":
            return


@pytest.fixture
async def redis() -> AsyncIterator[RedisClient]:
    client = RedisClient.from_url(REDIS_URL, timeout_s=5.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def prefix(redis: RedisClient) -> AsyncIterator[str]:
    prefix = f"test-rl-{secrets.token_hex(6)}"
    try:
        yield prefix
    finally:
        with trio.fail_after(5):
            await delete_prefix(redis, prefix)


class Twin:
    """The model (`LocalBackend`) and `RedisBackend`s on one explicit clock; every answer compared."""

    def __init__(self, config: EngineConfig, prefix: str, *, processes: int = 1) -> None:
        self.now = START
        self.local = LocalBackend(config, clock=self.clock)
        self.remote = [
            RedisBackend(REDIS_URL, config, prefix=prefix, clock=self.clock) for _ in range(processes)
        ]

    def clock(self) -> float:
        return self.now

    def at(self, now: float) -> Twin:
        assert now >= self.now
        self.now = now
        return self

    async def acquire(self, ask: Ask, process: int = 0) -> Result:
        with trio.fail_after(5):
            expected = await self.local.acquire(ask)
            actual = await self.remote[process].acquire(ask)
        assert_same(expected, actual)
        return expected

    async def release(self, permit: Permit, outcome: Outcome, process: int = 0) -> None:
        with trio.fail_after(5):
            errors: list[bool] = []
            for backend in (self.local, self.remote[process]):
                try:
                    await backend.release(permit, outcome)
                except ValueError:
                    errors.append(True)
                else:
                    errors.append(False)
        assert errors[0] == errors[1], f"model raised: {errors[0]}, Redis raised: {errors[1]}"

    async def grant(self, ask: Ask, process: int = 0) -> Permit:
        result = await self.acquire(ask, process)
        assert isinstance(result, Permit), result
        return result

    async def wait(self, ask: Ask, reason: str, process: int = 0) -> float:
        result = await self.acquire(ask, process)
        assert isinstance(result, Wait) and result.reason == reason, result
        return result.seconds

    async def refused(self, ask: Ask, reason: str) -> None:
        assert await self.acquire(ask) == Refusal(reason)

    async def aclose(self) -> None:
        await self.local.aclose()
        for backend in self.remote:
            await backend.aclose()


@pytest.fixture
async def twin_factory(prefix: str) -> AsyncIterator[Callable[..., Twin]]:
    twins: list[Twin] = []

    def make(config: EngineConfig = FAST, processes: int = 1) -> Twin:
        twins.append(Twin(config, prefix, processes=processes))
        return twins[-1]

    yield make
    for twin in twins:
        await twin.aclose()
        for backend in twin.remote:
            assert backend.statistics().errors == 0


# -- the RESP client -----------------------------------------------------------------------------------------


def test_parse_every_reply_type() -> None:
    data = (
        b"+OK\r\n-ERR bad thing\r\n:-42\r\n$5\r\nab\r\nc\r\n$-1\r\n*-1\r\n"
        b"*3\r\n:1\r\n*1\r\n$0\r\n\r\n-NOSCRIPT x\r\n"
    )
    replies = []
    position = 0
    while position < len(data):
        reply, position = parse_reply(data, position)
        replies.append(reply)
    assert replies == [
        "OK",
        RedisReplyError("ERR bad thing"),
        -42,
        b"ab\r\nc",
        None,
        None,
        [1, [b""], RedisReplyError("NOSCRIPT x")],
    ]
    assert RedisReplyError("NOSCRIPT x").code == "NOSCRIPT"


@pytest.mark.parametrize("partial", [b"", b"+OK", b"$5\r\nab", b"$2\r\nab", b"*2\r\n:1\r\n", b":12"])
def test_parse_incomplete_reply_asks_for_more(partial: bytes) -> None:
    with pytest.raises(Incomplete):
        parse_reply(partial)


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 400 Bad Request\r\n", b":x1\r\n", b"$2\r\nabcd\r\n"])
def test_parse_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(RespProtocolError):
        parse_reply(garbage)


def test_encode_command() -> None:
    assert encode_command(["SET", b"k\r\n", 12, 0.1]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n0.1\r\n"
    )
    with pytest.raises(ValueError, match="inf and nan"):
        encode_command([math.inf])


def test_url_parsing_hides_the_password() -> None:
    address = RedisAddress.parse("redis://alice:p%40ss-w0rd@redis.example:6380/3")
    assert (address.host, address.port, address.db, address.username, address.password) == (
        "redis.example",
        6380,
        3,
        "alice",
        "p@ss-w0rd",
    )
    assert "p@ss" not in repr(address) and "p%40ss" not in repr(address)
    assert address.redacted() == "redis://alice:***@redis.example:6380/3"
    assert RedisAddress.parse("redis://:pw@h").redacted() == "redis://:***@h:6379/0"
    assert RedisAddress.parse("redis://127.0.0.1") == RedisAddress("127.0.0.1", 6379, 0)
    for url in ("http://:hunter2@h:6380/0", "redis://:hunter2@h:port/0", "redis://:hunter2@h/x"):
        with pytest.raises(ValueError, match="redis://") as caught:
            RedisAddress.parse(url)
        assert "hunter2" not in str(caught.value)


async def test_client_round_trips_every_reply_type(redis: RedisClient, prefix: str) -> None:
    key = f"{{{prefix}}}:k"
    with trio.fail_after(5):
        assert await redis.execute("PING") == "PONG"
        assert await redis.execute("SET", key, b"\x00\xff\r\n") == "OK"
        assert await redis.execute("GET", key) == b"\x00\xff\r\n"
        assert await redis.execute("GET", key + "-missing") is None
        assert await redis.execute("INCRBY", key + "-n", -5) == -5
        script = "return {1, 'two', {redis.status_reply('THREE')}, false, redis.error_reply('FOUR five')}"
        assert await redis.execute("EVAL", script, 0) == [
            1,
            b"two",
            ["THREE"],
            None,
            RedisReplyError("FOUR five"),
        ]
        with pytest.raises(RedisReplyError) as caught:
            await redis.execute("INCR", key)
        assert caught.value.code == "ERR"
        assert await redis.execute("PING") == "PONG"  # an error reply leaves the connection usable
        assert redis.connects == 1


async def test_client_selects_the_database_of_the_url() -> None:
    client = RedisClient.from_url("redis://127.0.0.1:6379/3")
    with trio.fail_after(5):
        info = await client.execute("CLIENT", "INFO")
        await client.aclose()
    assert isinstance(info, bytes) and b" db=3 " in info


@pytest.mark.parametrize("login", [":s3cret-Pa55word", "nobody:s3cret-Pa55word"])
async def test_auth_failure_names_no_password(login: str, prefix: str) -> None:
    url = f"redis://{login}@127.0.0.1:6379/0"
    client = RedisClient.from_url(url)
    with trio.fail_after(5), pytest.raises(RedisConnectionError) as caught:
        await client.execute("PING")
    assert "refused AUTH" in str(caught.value)
    backend = RedisBackend(url, prefix=prefix)
    with trio.fail_after(5), pytest.raises(BackendUnavailable) as unavailable:
        await backend.acquire(Ask("t", "GET /a", "1"))
    await backend.aclose()
    for error in (caught.value, unavailable.value, unavailable.value.__cause__):
        assert "s3cret" not in str(error) and "s3cret" not in repr(error)
    assert "***" in str(unavailable.value)


async def test_script_reloads_after_noscript(redis: RedisClient) -> None:
    script = Script(f"return 'loaded-{secrets.token_hex(4)}'")
    with trio.fail_after(5):
        assert await script(redis, [], []) == script.source[8:-1]
        assert script.reloads == 1  # never loaded before: one NOSCRIPT
        assert await script(redis, [], []) == script.source[8:-1]
        assert script.reloads == 1
        await redis.execute("SCRIPT", "FLUSH")
        assert await script(redis, [], []) == script.source[8:-1]
        assert script.reloads == 2


async def test_backend_survives_a_script_flush(redis: RedisClient, prefix: str) -> None:
    ask = Ask("t", "GET /a", "1", exempt=True)
    with trio.fail_after(5):
        async with open_redis_backend(REDIS_URL, FAST, prefix=prefix) as backend:
            assert isinstance(await backend.acquire(ask), Permit)
            assert backend.statistics().reloads == 0  # loaded by open_redis_backend
            await redis.execute("SCRIPT", "FLUSH")
            assert isinstance(await backend.acquire(ask), Wait)
            stats = backend.statistics()
    assert (stats.calls, stats.reloads, stats.errors) == (4, 1, 0)


async def test_connection_refused_is_unavailable(prefix: str) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix)
    with trio.fail_after(5):
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await backend.acquire(Ask("t", "GET /a", "1"))
        with pytest.raises(BackendUnavailable):
            async with open_redis_backend(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix):
                pass
    assert backend.statistics().errors == 1
    await backend.aclose()


async def test_a_silent_server_times_out(prefix: str) -> None:
    # The kernel completes the connection from the listen backlog; nobody ever reads or answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix=prefix, timeout_s=0.2)
        with trio.fail_after(5):
            started = trio.current_time()
            with pytest.raises(BackendUnavailable, match=r"did not answer within 0\.2 s"):
                await backend.acquire(Ask("t", "GET /a", "1"))
            assert trio.current_time() - started < 1.0
        await backend.aclose()


async def test_a_foreign_server_is_a_protocol_error(prefix: str) -> None:
    async def http_server(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, http_server, 0)
        port = listeners[0].socket.getsockname()[1]
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix=prefix)
        with trio.fail_after(5), pytest.raises(BackendUnavailable) as caught:
            await backend.acquire(Ask("t", "GET /a", "1"))
        assert isinstance(caught.value.__cause__, RespProtocolError)
        await backend.aclose()
        nursery.cancel_scope.cancel()


async def test_client_reconnects_after_its_connection_dies(redis: RedisClient) -> None:
    client = RedisClient.from_url(REDIS_URL)
    with trio.fail_after(5):
        client_id = await client.execute("CLIENT", "ID")
        await redis.execute("CLIENT", "KILL", "ID", str(client_id))
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")  # the pooled connection was closed under it
        assert await client.execute("PING") == "PONG"
        await client.aclose()
    assert client.connects == 2


async def test_cancelled_command_drops_its_connection(redis: RedisClient) -> None:
    client = RedisClient.from_url(REDIS_URL)
    with trio.fail_after(5):
        with trio.move_on_after(0.05):
            await client.execute("BLPOP", f"nothing-{secrets.token_hex(4)}", 0.3)
        # The BLPOP's late nil must not be read as the answer to this PING.
        assert await client.execute("PING") == "PONG"
        await client.aclose()
    assert client.connects == 2


# -- differential: RedisBackend == the model --------------------------------------------------------------

A = Ask("t1", "GET /channels/{channel_id}/messages", "1", exempt=True)


async def test_probe_exhaustion_and_rollover(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    assert probe.grant is not None and probe.grant.probe
    assert await twin.wait(A, "probe") == FAST.lease_s  # capped by the probe's lease
    await twin.at(START + 0.1).release(probe, ok(3, 3, 1.0))
    permits = [await twin.grant(A) for _ in range(3)]
    assert {permit.bucket for permit in permits} == {"bkt|t1|h1|1"}
    assert await twin.wait(A, "bucket") == pytest.approx(1.0)
    await twin.at(START + 0.2).release(permits[0], ok(3, 2, 0.9))
    twin.at(START + 1.1)
    rolled = await twin.grant(A)  # refilled to limit - in flight = 1
    assert rolled.grant is not None and rolled.grant.window == 1
    await twin.wait(A, "probe")  # nothing left, no deadline yet: the next response tells
    await twin.release(permits[1], ok(3, 1, 0.05))  # granted in window 0, ends later: authoritative
    await twin.acquire(A)
    await twin.release(permits[2], ok(3, 0, 0.01))  # window 0 and ends earlier: stale
    await twin.release(rolled, ok(3, 2, 0.9))
    await twin.acquire(A)
    await twin.at(START + 3).acquire(A)


async def test_out_of_order_and_stale_responses(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, ok(5, 5, 2.0))
    old = [await twin.grant(A) for _ in range(3)]
    twin.at(START + 2.5)
    new = await twin.grant(A)
    assert new.grant is not None and new.grant.window == 1
    await twin.release(new, ok(5, 4, 1.9))  # the new window's deadline
    await twin.release(old[0], ok(5, 2, 0.01))  # stale: ended before the current window
    await twin.release(old[1], ok(5, 0, 3.0))  # granted earlier, but describes a later deadline
    for _ in range(3):
        await twin.acquire(A)
    await twin.release(old[2], ok(4, 4, 0.5))  # a shrinking limit clamps
    await twin.at(START + 6).acquire(A)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (limited(2.0, RateLimitScope.USER), "bucket"),
        (limited(2.0, None), "bucket"),
        (limited(2.0, RateLimitScope.SHARED, remaining=3), "blocked"),
        (limited(2.0, RateLimitScope.USER, remaining=2), "sublimit"),
    ],
)
async def test_bucket_429s(twin_factory: Callable[..., Twin], outcome: Outcome, reason: str) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, ok(5, 5, 10.0))
    permit = await twin.grant(A)
    other = await twin.grant(A)
    await twin.at(START + 0.5).release(permit, outcome)
    other_class = replace(A, signature="PATCH other")
    if reason == "sublimit":
        assert await twin.wait(A, "sublimit") == pytest.approx(2.0)
        await twin.grant(other_class)  # only the request class is blocked
    else:
        await twin.wait(A, reason)
        await twin.wait(other_class, reason)
    await twin.release(other, ok(5, 1, 9.0))
    await twin.at(START + 2.6).acquire(A)
    await twin.at(START + 11).acquire(A)


async def test_a_shorter_shared_429_does_not_shorten_a_block(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, ok(5, 5, 30.0))
    first, second = await twin.grant(A), await twin.grant(A)
    await twin.release(first, limited(5.0, RateLimitScope.SHARED, remaining=2))
    await twin.at(START + 1).release(second, limited(1.0, RateLimitScope.SHARED, remaining=2))
    assert await twin.at(START + 2.5).wait(A, "blocked") == pytest.approx(2.5)
    await twin.at(START + 5).grant(A)


async def test_429_on_an_unknown_bucket_blocks_it(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, limited(1.5, RateLimitScope.USER))
    assert await twin.wait(A, "blocked") == pytest.approx(1.5)
    await twin.at(START + 1.5).grant(A)


async def test_global_limit_pacing_freeze_and_refund(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(SMALL)
    ask = Ask("t1", "GET /a", "1")
    first = await twin.grant(ask)
    await twin.release(first, Outcome("response", 200, None))  # a global-only route
    # An interval (1 s / (4 - SLACK)), less the slack.
    assert await twin.wait(ask, "global") == pytest.approx((1.0 - SLACK) / (4 - SLACK))
    twin.at(START + (1.0 - SLACK) / (4 - SLACK) + 1e-9)  # (float rounding of TAT - tolerance)
    second = await twin.grant(ask)
    assert second.bucket is None and second.grant is None and second.global_counted
    await twin.release(second, Outcome("cancel"))  # the slot comes back
    third = await twin.grant(ask)
    await twin.release(third, limited(4.0, RateLimitScope.GLOBAL))
    assert await twin.wait(ask, "global") == pytest.approx(4.0)
    exempt = replace(ask, route="POST /interactions", exempt=True)
    await twin.grant(exempt)  # interactions are never asked of the global limit
    twin.at(START + (1.0 - SLACK) / (4 - SLACK) + 4.0 + 1e-9)
    fourth = await twin.grant(ask)
    await twin.release(fourth, limited(1.0, None, remaining=1))  # a sub-limit on a global-only route
    await twin.wait(ask, "sublimit")
    blocked = await twin.grant(exempt)
    await twin.release(blocked, limited(2.0, RateLimitScope.GLOBAL))  # exempt: no freeze
    await twin.at(START + 10).grant(ask)


async def test_cancel_and_lost(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, ok(2, 2, 1.0))
    one, two = await twin.grant(A), await twin.grant(A)
    await twin.wait(A, "bucket")
    await twin.release(one, Outcome("cancel"))  # capacity comes back
    three = await twin.grant(A)
    await twin.release(two, Outcome("lost"))  # stays spent
    await twin.wait(A, "bucket")
    twin.at(START + 1.5)
    await twin.release(three, Outcome("cancel"))  # after the rollover: the new window gets it back
    for _ in range(3):
        await twin.acquire(A)


async def test_lost_grants_are_held_back_from_the_next_refill_only(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory()
    probe = await twin.grant(A)
    await twin.release(probe, ok(3, 3, 1.0))
    lost, answered = await twin.grant(A), await twin.grant(A)
    await twin.release(lost, Outcome("lost"))  # may arrive in the next window
    await twin.at(START + 1.0).release(answered, ok(3, 1, 1.0))  # after the reset: rolls over first
    for _ in range(3):
        await twin.acquire(A)
    twin.at(START + 2.5)
    for _ in range(4):
        await twin.acquire(A)  # the next refill is whole again
    await twin.at(START + 30).release(
        await twin.grant(replace(A, major="2")), Outcome("lost")
    )  # a lost probe keeps its lease
    await twin.acquire(replace(A, major="2"))
    await twin.at(START + 41).acquire(replace(A, major="2"))


async def test_a_window_whose_answers_were_all_lost_ends_one_period_later(
    twin_factory: Callable[..., Twin],
) -> None:
    twin = twin_factory()
    route = replace(A, route="GET /no-hash")  # no bucket hash: every grant stays on the route's own key
    probe = await twin.grant(route)
    await twin.release(probe, ok(2, 2, 2.0, bucket=None))
    first, second = await twin.grant(route), await twin.grant(route)
    twin.at(START + 2.0)
    assert await twin.wait(route, "probe") == FAST.lease_s - 2.0  # rolled over, nothing left, no deadline
    await twin.release(first, Outcome("lost"))
    assert await twin.wait(route, "bucket") == pytest.approx(2.0)  # assumed: one observed period
    await twin.release(second, Outcome("lost"))
    await twin.at(START + 4.0).acquire(route)


async def test_lease_expiry_forgets_dead_holders(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(replace(FAST, lease_s=2.0))
    probe = await twin.grant(A)
    assert await twin.at(START + 0.5).wait(A, "probe") == pytest.approx(1.5)
    twin.at(START + 2.0)
    second_probe = await twin.grant(A)  # the first probe's holder is presumed dead
    assert second_probe.grant is not None and probe.grant is not None
    assert second_probe.grant.epoch == probe.grant.epoch + 1
    await twin.release(probe, ok(3, 3, 1.0))  # an old epoch: the bucket is learned, nothing given back
    await twin.release(second_probe, ok(3, 2, 1.0))
    await twin.release(second_probe, ok(3, 2, 1.0))  # given back twice: ValueError from both
    await twin.acquire(A)


async def test_route_learning_hash_change_and_global_only(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(processes=2)
    probe = await twin.grant(A, process=0)
    await twin.release(probe, ok(2, 2, 5.0, bucket="h1"), process=0)
    other_major = replace(A, major="2")
    await twin.grant(other_major, process=1)  # process 1 guessed "unknown": one redirect
    assert twin.remote[1].statistics().redirects == 1
    permit = await twin.grant(A, process=1)
    assert permit.bucket == "bkt|t1|h1|1" and twin.remote[1].statistics().redirects == 1
    await twin.release(permit, ok(2, 1, 5.0, bucket="h2"), process=1)  # Discord moved the route
    moved = await twin.grant(A, process=0)  # process 0 still guesses h1: redirect to h2
    assert moved.bucket == "bkt|t1|h2|1" and twin.remote[0].statistics().redirects == 1
    await twin.release(moved, Outcome("response", 204, None), process=0)  # a success without headers
    # (an error without headers would teach nothing: model.effective_kind)
    free = [await twin.grant(A, process=1) for _ in range(5)]
    assert {permit.bucket for permit in free} == {None}
    await twin.release(free[0], ok(2, 2, 5.0, bucket="h3"), process=1)  # headers again: learned
    await twin.acquire(A, process=0)
    await twin.acquire(A, process=1)
    await twin.release(free[1], Outcome("response", 502, None), process=1)  # 5xx: nothing learned
    await twin.at(START + 50).acquire(A, process=0)


async def test_invalid_budget_sheds_then_stops(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(replace(SMALL, global_rate=1_000_000, invalid_limit=6))
    optional = replace(A, route="GET /x", optional=True)
    for status in (401, 403, 429):
        permit = await twin.grant(replace(A, token=""))
        outcome = Outcome("response", status, headers(9, 9, 1.0)) if status != 429 else limited(0.0, None)
        await twin.release(permit, outcome)
    await twin.refused(optional, INVALID_BUDGET)  # 3 of 6: optional traffic is shed
    await twin.acquire(replace(optional, optional=False))
    shared = await twin.grant(replace(A, route="GET /s"))
    await twin.release(shared, limited(0.0, RateLimitScope.SHARED, remaining=5))  # does not count
    permit = await twin.grant(replace(A, route="GET /y"))
    await twin.release(permit, Outcome("response", 403, headers(9, 9, 1.0)))
    await twin.acquire(replace(A, route="GET /z"))
    permit = await twin.grant(replace(A, route="GET /w"))
    await twin.release(permit, Outcome("response", 403, headers(9, 9, 1.0)))
    await twin.refused(replace(A, route="GET /v"), INVALID_BUDGET)  # 5 of 6 >= 80 %: everything stops
    await twin.at(START + 10).acquire(replace(A, route="GET /v"))
    await twin.at(START + 25).acquire(optional)  # the window has moved on
    await twin.at(START + 30).acquire(optional)


async def test_dead_token_and_dead_webhook(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(SMALL)
    hook = Ask("t1", "POST /webhooks/{webhook_id}/{webhook_token}", "9|abc", webhook="9|abc", exempt=True)
    permit = await twin.grant(hook)
    await twin.release(permit, Outcome("response", 404, None, code=UNKNOWN_WEBHOOK))
    await twin.refused(hook, WEBHOOK_DEAD)
    bot = Ask("t1", "GET /a", "1")
    permit = await twin.grant(bot)  # the bot token is fine
    other_hook = replace(hook, major="8|def", webhook="8|def")
    second = await twin.grant(other_hook)
    await twin.release(second, Outcome("response", 401, None, code=INVALID_WEBHOOK_TOKEN))
    await twin.refused(other_hook, WEBHOOK_DEAD)
    await twin.release(permit, Outcome("response", 401, None))
    await twin.refused(bot, TOKEN_REVOKED)
    await twin.refused(replace(bot, route="GET /b"), TOKEN_REVOKED)
    await twin.at(START + 8.0).grant(bot)  # a dead token is retried after `dead_token_s`
    await twin.refused(hook, WEBHOOK_DEAD)
    await twin.at(START + 12.0).grant(hook)  # the dead-webhook cache expires


async def test_cloudflare_ban(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(SMALL)
    permit = await twin.grant(A)
    await twin.release(permit, Outcome("limited", 429, ban_s=5.0))
    assert await twin.wait(replace(A, token="other"), "ban") == 5.0
    await twin.at(START + 5.0).acquire(A)
    permit = await twin.grant(replace(A, route="GET /b"))
    await twin.release(permit, Outcome("limited", 429))  # no Retry-After: ban_s of the config
    assert await twin.wait(A, "ban") == SMALL.ban_s


async def test_max_in_flight(twin_factory: Callable[..., Twin]) -> None:
    twin = twin_factory(replace(FAST, max_in_flight=2, lease_s=4.0))
    probe = await twin.grant(A)
    await twin.release(probe, ok(10, 10, 30.0))
    held = [await twin.grant(A), await twin.grant(A)]
    assert await twin.at(START + 1).wait(A, "probe") == pytest.approx(3.0)
    await twin.release(held[0], ok(10, 8, 29.0))
    await twin.grant(A)
    # Past the leases the cap still counts the dead holders' grants (the model answers 0 s, see the report).
    await twin.at(START + 10).acquire(A)
    await twin.at(START + 11).acquire(A)


async def test_redis_time_mode(redis: RedisClient, prefix: str) -> None:
    config = replace(FAST, idle_ttl_s=30.0)
    with trio.fail_after(5):
        async with open_redis_backend(REDIS_URL, config, prefix=prefix) as backend:
            ask = Ask("t1", "GET /a", "1")
            probe = await backend.acquire(ask)
            assert isinstance(probe, Permit) and probe.granted_at > 1.6e9  # the Redis server's TIME
            wait = await backend.acquire(ask)
            assert isinstance(wait, Wait) and wait.reason == "probe"
            assert config.lease_s - 0.5 < wait.seconds <= config.lease_s
            await backend.release(probe, ok(1, 1, 60.0))
            granted = await backend.acquire(ask)
            assert isinstance(granted, Permit) and granted.granted_at >= probe.granted_at
            wait = await backend.acquire(ask)
            assert isinstance(wait, Wait) and wait.reason == "bucket" and 59.0 < wait.seconds <= 60.0
            await backend.release(granted, Outcome("response", 401, None))
        reply = await redis.execute("KEYS", f"{{{prefix}}}:*")
        assert isinstance(reply, list)
        keys = {key.decode() for key in reply if isinstance(key, bytes)}
        assert keys == {
            f"{{{prefix}}}:{name}"
            for name in ("map|t1|GET /a", "bkt|t1|?GET /a|1", "bkt|t1|h1|1", "glb|t1", "dead|t1", "inv|local")
        }
        ttls: dict[str, int] = {}
        for key in keys:
            ttl = await redis.execute("PTTL", key)
            assert isinstance(ttl, int)
            ttls[key] = ttl
    assert 3_590_000 < ttls.pop(f"{{{prefix}}}:dead|t1") <= 3_600_001  # dead_token_s
    # The 401 came without bucket headers, which teaches nothing: the route keeps its hash for a day.
    assert (FAST.map_ttl_s - 5) * 1000 < ttls.pop(f"{{{prefix}}}:map|t1|GET /a") <= 86_400_001
    assert 650_000 < ttls.pop(f"{{{prefix}}}:inv|local") <= 660_001  # the window and one sub-bucket
    for key, ttl in ttls.items():  # buckets: the reset + idle_ttl_s; global: TAT + 1 s
        assert 0 < ttl <= (60 + 30 + 1) * 1000, (key, ttl)


# -- differential, random: a Hypothesis state machine -----------------------------------------------------

# Repeated values weight the draw: most steps should meet on the same few records.
ASKS = st.builds(
    Ask,
    token=st.sampled_from(("t1", "t1", "t1", "t1", "")),
    route=st.sampled_from(("GET /a", "GET /a", "GET /a", "POST /b")),
    major=st.sampled_from(("1", "1", "1", "2")),
    exempt=st.booleans(),
    signature=st.sampled_from(("", "", "PATCH +name")),
    webhook=st.sampled_from((None, None, None, "w1")),
    ip=st.just("10.0.0.1"),
    optional=st.booleans(),
)
HEADERS = st.builds(
    lambda limit, used, reset_after, bucket: headers(limit, max(0, limit - used), reset_after, bucket),
    st.sampled_from((3, 5, 1, 0)),
    st.sampled_from((0, 1, 0, 2, 5)),
    st.sampled_from((1.0, 2.5, 0.5, 10.0, 0.0)),
    st.sampled_from(("h1", "h1", "h2", None)),
)
RATE_LIMITED = st.builds(
    RateLimited,
    retry_after=st.sampled_from((0.0, 0.3, 1.0, 4.0)),
    scope=st.sampled_from((None, *RateLimitScope)),
    remaining=st.sampled_from((None, 0, 1)),
    is_global=st.booleans(),
)
# A response without bucket headers makes its route global-only for a while: keep them rare.
SOME_HEADERS = st.one_of(HEADERS, HEADERS, HEADERS, HEADERS, st.none())
SUCCESS = st.builds(
    Outcome, kind=st.just("response"), status=st.sampled_from((200, 204)), headers=SOME_HEADERS
)
OUTCOMES = st.one_of(
    SUCCESS,
    st.builds(
        Outcome,
        kind=st.just("response"),
        status=st.sampled_from((200, 400, 401, 403, 404, 500, 502)),
        headers=SOME_HEADERS,
        code=st.sampled_from((None, INVALID_WEBHOOK_TOKEN, UNKNOWN_WEBHOOK, 10008)),
    ),
    st.builds(
        Outcome,
        kind=st.just("limited"),
        status=st.just(429),
        limited=st.one_of(RATE_LIMITED, RATE_LIMITED, RATE_LIMITED, RATE_LIMITED, st.none()),
        ban_s=st.sampled_from((None, 0.0, 1.5)),
    ),
    st.builds(Outcome, kind=st.sampled_from(("cancel", "lost"))),
)
# Most runs with a global limit out of the way, so that steps reach the buckets.
UNPACED = replace(SMALL, global_rate=1_000_000)
CONFIGS = (UNPACED, replace(UNPACED, max_in_flight=2), SMALL, replace(SMALL, max_in_flight=1), EngineConfig())


class Differential(RuleBasedStateMachine):
    """Random asks, outcomes and clock steps on the model and on two Redis "processes" sharing one prefix.

    Hypothesis runs in a worker thread; every backend call goes back to the trio run with `from_thread`.
    """

    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"test-rl-sm-{secrets.token_hex(6)}"
        self.twin: Twin | None = None

    @initialize(config=st.sampled_from(CONFIGS))
    def open(self, config: EngineConfig) -> None:
        self.twin = Twin(config, self.prefix, processes=2)

    # Mostly short steps: a long one (past leases, resets, TTLs) forgets most of the state.
    @rule(step=st.sampled_from((0.001, 0.1, 0.0, 0.25, 1.0 / 3, 0.001, 0.1, 1.0, 0.5, 2.5, 3.0, 7.0, 45.0)))
    def tick(self, step: float) -> None:
        assert self.twin is not None
        self.twin.now += step

    @rule(target=permits, ask=ASKS, process=st.integers(0, 1))
    def acquire(self, ask: Ask, process: int) -> Any:
        assert self.twin is not None
        result = trio.from_thread.run(self.twin.acquire, ask, process)
        return result if isinstance(result, Permit) else multiple()

    @rule(permit=consumes(permits), outcome=OUTCOMES, process=st.integers(0, 1))
    def release(self, permit: Permit, outcome: Outcome, process: int) -> None:
        assert self.twin is not None
        trio.from_thread.run(self.twin.release, permit, outcome, process)

    @rule(ask=ASKS, outcome=SUCCESS, process=st.integers(0, 1))
    def round_trip(self, ask: Ask, outcome: Outcome, process: int) -> None:
        """Acquire and answer at once: the buckets learn their limits in few steps."""
        assert self.twin is not None
        result = trio.from_thread.run(self.twin.acquire, ask, process)
        if isinstance(result, Permit):
            trio.from_thread.run(self.twin.release, result, outcome, 1 - process)

    def teardown(self) -> None:
        try:
            if self.twin is not None:
                trio.from_thread.run(self.twin.aclose)
                assert [backend.statistics().errors for backend in self.twin.remote] == [0, 0]
        finally:
            trio.from_thread.run(self._cleanup)

    async def _cleanup(self) -> None:
        client = RedisClient.from_url(REDIS_URL, timeout_s=5.0)
        await delete_prefix(client, self.prefix)
        await client.aclose()


async def test_random_operations_agree_with_the_model() -> None:
    await trio.to_thread.run_sync(
        lambda: run_state_machine_as_test(
            Differential,
            settings=settings(
                max_examples=150,
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    )
