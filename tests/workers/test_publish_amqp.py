"""The AMQP publisher and bridge against the real RabbitMQ on loopback (AMQP_URL, default guest@127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import msgpack
import orjson
import pytest
import trio

from workers.amqp_bridge import Amqp, AmqpConnectError, BridgeKind, open_amqp
from workers.errors import PublishError
from workers.publish import OutboundEvent
from workers.publish.amqp import AmqpPublisher

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/")
EXCHANGE = "test-gateway"


def ev(seq: int, name: str = "MESSAGE_CREATE", data: bytes | None = None) -> OutboundEvent:
    return OutboundEvent(2, "sess-1", seq, name, data if data is not None else b'{"seq":%d}' % seq)


@pytest.fixture
def queue_name() -> str:
    return f"test-gateway:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def amqp(queue_name: str) -> AsyncIterator[Amqp]:
    with trio.fail_after(20):
        async with open_amqp(URL, reconnect_interval_s=0.5, confirm_timeout_s=5) as connection:
            yield connection
            await connection.delete_queue(queue_name)


async def plain_aio_pika_get(
    queue_name: str, count: int, timeout_s: float = 10, stop_at_seq: int | None = None
) -> list[dict[str, Any]]:
    """Read ``count`` messages (or up to the one with header ``seq == stop_at_seq``) with a plain aio-pika
    client (no code of ours), on an asyncio loop in a thread of its own."""

    async def run() -> list[dict[str, Any]]:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, passive=True)
            out: list[dict[str, Any]] = []
            deadline = time.monotonic() + timeout_s
            while len(out) < count and time.monotonic() < deadline:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.01)
                    continue
                out.append(
                    {
                        "body": message.body,
                        "routing_key": message.routing_key,
                        "headers": message.headers,
                        "content_type": message.content_type,
                        "expiration": message.expiration,
                        "raw_expiration": message.properties.expiration,
                        "delivery_mode": message.delivery_mode,
                    }
                )
                if stop_at_seq is not None and (message.headers or {}).get("seq") == stop_at_seq:
                    break
            return out

    result: list[dict[str, Any]] = await trio.to_thread.run_sync(asyncio.run, run())
    return result


async def plain_aio_pika_drain_seqs(
    queue_name: str, wanted: set[int], timeout_s: float = 10
) -> tuple[list[int], int]:
    """The ``seq`` header of the messages in ``queue_name``, in queue order, consumed with a plain aio-pika
    client (no code of ours), and how many messages the queue held when the read began. Reads until every seq
    in ``wanted`` has been seen or all those messages have been read, or ``timeout_s`` passes.

    Call it once the publisher has stopped: a confirmed message is in the queue before its confirm is sent,
    so every confirmed message is among those the queue held. Reading a fixed *count* instead is wrong after
    a broker restart: a batch whose confirms were lost with the connection (its publish failed) may still
    have reached the queue, and a count-limited read then stops before the newest confirmed messages."""

    async def run() -> tuple[list[int], int]:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, passive=True)
            assert queue.declaration_result.message_count is not None
            held = queue.declaration_result.message_count
            seqs: list[int] = []
            missing = set(wanted)
            done = asyncio.Event()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if done.is_set():  # delivered before the cancel took effect
                    return
                seq = (message.headers or {})["seq"]
                assert isinstance(seq, int)
                seqs.append(seq)
                missing.discard(seq)
                if not missing or len(seqs) >= held:
                    done.set()

            if missing and held:
                tag = await queue.consume(on_message, no_ack=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout_s)
                done.set()
                await queue.cancel(tag)
            return seqs, held

    drained: tuple[list[int], int] = await trio.to_thread.run_sync(asyncio.run, run())
    return drained


async def test_publish_a_batch_and_read_it_with_plain_aio_pika(amqp: Amqp, queue_name: str) -> None:
    big = orjson.dumps({"members": ["x" * 100] * 3000})  # ~310 KB: split over several body frames
    events = [ev(1), ev(2, "GUILD_CREATE", big), ev(3, "TYPING_START")]
    with trio.fail_after(20):
        await amqp.declare_queue(queue_name, ["MESSAGE_CREATE", "GUILD_CREATE"], EXCHANGE)
        spectacles = AmqpPublisher(amqp, group=EXCHANGE, encoding="spectacles", message_ttl_s=120.0)
        await spectacles.publish(events)  # TYPING_START is not bound: dropped by the broker, still confirmed
        await AmqpPublisher(amqp, group=EXCHANGE, encoding="msgpack", message_ttl_s=1.5).publish([ev(4)])
        await AmqpPublisher(amqp, group=EXCHANGE, encoding="json", message_ttl_s=None).publish([ev(5)])
        got = await plain_aio_pika_get(queue_name, 4)
    assert [m["routing_key"] for m in got] == [
        "MESSAGE_CREATE",
        "GUILD_CREATE",
        "MESSAGE_CREATE",
        "MESSAGE_CREATE",
    ]
    assert [m["headers"] for m in got] == [
        {"shard_id": 2, "seq": s, "session_id": "sess-1"} for s in (1, 2, 4, 5)
    ]
    assert got[0]["body"] == b"\xa9" + b'{"seq":1}'  # fixstr of 9 bytes
    assert len(big) > 0xFFFF and got[1]["body"] == b"\xdb" + len(big).to_bytes(4, "big") + big
    assert msgpack.unpackb(got[1]["body"], raw=False) == big.decode()
    assert msgpack.unpackb(got[2]["body"]) == {"seq": 4}
    assert got[3]["body"] == b'{"seq":5}'
    assert [m["content_type"] for m in got] == ["application/msgpack"] * 3 + ["application/json"]
    assert [m["raw_expiration"] for m in got] == ["120000", "120000", "1500", None]
    assert {m["delivery_mode"] for m in got} == {aio_pika.DeliveryMode.PERSISTENT}


async def test_consume_ack_reject_and_publish_raw(amqp: Amqp, queue_name: str) -> None:
    with trio.fail_after(20):
        async with amqp.consume(
            queue_name, ["SEND", "7"], EXCHANGE, prefetch=10, durable=False
        ) as deliveries:
            await amqp.publish_raw(EXCHANGE, "SEND", b"one", {"k": "v"}, content_type="application/json")
            await amqp.publish_raw(EXCHANGE, "7", b"two")
            await amqp.publish_raw(EXCHANGE, "UNBOUND", b"nobody")
            first = await deliveries.receive()
            second = await deliveries.receive()
            assert (first.body, first.routing_key, dict(first.headers), first.content_type) == (
                b"one",
                "SEND",
                {"k": "v"},
                "application/json",
            )
            assert (second.body, second.routing_key, second.redelivered) == (b"two", "7", False)
            assert await first.ack()
            assert await second.reject(requeue=True)
            again = await deliveries.receive()
            assert (again.body, again.redelivered) == (b"two", True)
            assert await again.reject()
            with trio.move_on_after(0.2):
                extra = await deliveries.receive()
                pytest.fail(f"unexpected delivery {extra!r}")


async def test_a_cancelled_publish_returns_promptly_and_the_channel_stays_usable(
    amqp: Amqp, queue_name: str
) -> None:
    publisher = AmqpPublisher(amqp, group=EXCHANGE, encoding="spectacles", message_ttl_s=60)
    with trio.fail_after(20):
        await amqp.declare_queue(queue_name, ["MESSAGE_CREATE"], EXCHANGE, durable=False)
        for delay in (0, 0.0005, 0.002):
            with trio.move_on_after(delay):
                await publisher.publish([ev(seq) for seq in range(100)])
        await publisher.publish([ev(10_000)])
        got = await plain_aio_pika_get(queue_name, 10_000, stop_at_seq=10_000)
    # A cancelled publish has an unknown outcome (some may arrive); the one that returned did.
    assert got[-1]["headers"]["seq"] == 10_000


async def test_first_connection_failure_is_reported() -> None:
    with trio.fail_after(10), pytest.raises(AmqpConnectError, match=r"amqp://\*\*\*@127.0.0.1:1/"):
        async with open_amqp("amqp://guest:guest@127.0.0.1:1/"):
            pass


@pytest.mark.parametrize("bridge", ["asyncio-thread"])
async def test_other_bridges_publish_too(bridge: BridgeKind, queue_name: str) -> None:
    with trio.fail_after(20):
        async with open_amqp(URL, bridge=bridge) as connection:
            await connection.declare_queue(queue_name, ["MESSAGE_CREATE"], EXCHANGE, durable=False)
            await AmqpPublisher(connection, group=EXCHANGE, encoding="json", message_ttl_s=60).publish(
                [ev(1), ev(2)]
            )
            got = await plain_aio_pika_get(queue_name, 2)
            await connection.delete_queue(queue_name)
    assert [m["body"] for m in got] == [b'{"seq":1}', b'{"seq":2}']


async def rabbitmqctl(*args: str) -> float:
    started = time.monotonic()
    await trio.run_process(["rabbitmqctl", *args], capture_stdout=True, capture_stderr=True)
    return time.monotonic() - started


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to restart the broker")
async def test_broker_restart_loses_nothing_that_was_confirmed(amqp: Amqp, queue_name: str) -> None:
    """Publish batches continuously, several in flight as the pump does, while the broker's app stops and
    starts. Every event whose publish() returned must be in the (durable) queue afterwards; publishes during
    the outage must fail fast. Events of a failed publish may or may not be there (at-least-once)."""
    publisher = AmqpPublisher(amqp, group=EXCHANGE, encoding="spectacles", message_ttl_s=600)
    confirmed: set[int] = set()
    failures: list[float] = []  # how long each failing publish took
    after_restart = 0
    seq = 0
    restarted, enough_after_restart = trio.Event(), trio.Event()
    recovered_at: list[float] = []

    async def publish_forever() -> None:
        nonlocal seq, after_restart
        while True:
            batch = [ev(s) for s in range(seq + 1, seq + 51)]
            seq += 50
            started = trio.current_time()
            try:
                await publisher.publish(batch)
            except PublishError:
                failures.append(trio.current_time() - started)
                await trio.sleep(0.05)  # the pump's backoff, shortened; a real pump retries the same batch
                continue
            confirmed.update(e.seq for e in batch)
            if restarted.is_set():
                if not after_restart:
                    recovered_at.append(trio.current_time())
                after_restart += len(batch)
                if after_restart >= 500:
                    enough_after_restart.set()
            await trio.sleep(0.01)

    with trio.fail_after(40):
        await amqp.declare_queue(queue_name, ["MESSAGE_CREATE"], EXCHANGE, durable=True)
        async with trio.open_nursery() as nursery:
            for _ in range(4):  # the pump's default number of batches in flight
                nursery.start_soon(publish_forever)
            await trio.sleep(0.5)
            stop_s = await rabbitmqctl("stop_app")
            await trio.sleep(0.3)
            start_s = await rabbitmqctl("start_app")
            restarted.set()
            started_at = trio.current_time()
            await enough_after_restart.wait()
            nursery.cancel_scope.cancel()
        got, held = await plain_aio_pika_drain_seqs(queue_name, confirmed, timeout_s=10)
    received = set(got)
    missing = confirmed - received
    assert not missing, (
        f"{len(missing)} confirmed events lost (stop_app {stop_s:.1f}s, start_app {start_s:.1f}s, "
        f"{len(confirmed)} confirmed, {len(got)} of the {held} in the queue read)"
    )
    assert failures, "no publish failed while the broker was down"
    assert max(failures) < 2.0, f"a publish took {max(failures):.2f}s to fail"
    print(
        f"restart: stop_app {stop_s:.2f}s, start_app {start_s:.2f}s, {len(failures)} failed publishes "
        f"(slowest {max(failures) * 1000:.0f} ms), first success {recovered_at[0] - started_at:.2f}s after "
        f"start_app, {len(confirmed)} confirmed, {len(got)} read ({len(received - confirmed)} unconfirmed "
        f"that arrived, {len(got) - len(received)} duplicates)"
    )
