"""The measuring client of the proxy benchmark (`benchmarks.proxy`): one asyncio (uvloop) process.

Every path is timed from this one process and runtime, so what differs between them is the path, not the
client: `direct` (httpx to the simulator), `http` (httpx to the HTTP proxy) and `amqp` (an RPC over
RabbitMQ to the AMQP proxy, shaped like `@spectacles/brokers`' `call`: an exclusive server-named callback
queue, a fresh correlation id per call, MessagePack bodies, no publisher confirms, as that client does).

Protocol (stdout, one JSON object per line): after connecting and a warm-up it interleaves the paths,
one request at a time in a shuffled order per round, and prints `{"latency_ms": {path: [...]}}`. Then,
for each path, it prints `{"begin": path}`, runs `concurrency` callers for `throughput_s` seconds, and
prints `{"end": path, "requests": N, "errors": N, "elapsed_s": T}`, so the parent can read the server
processes' CPU time around each phase. Errors go to stderr; the exit status is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import aio_pika
import httpx
import msgpack
from aio_pika.abc import AbstractIncomingMessage

PATHS: Final = ("direct", "http", "amqp")
#: The route every request takes: no per-route bucket in the simulator (nor at Discord), only the global
#: limit, which both the simulator and the proxy run far above the request rate.
ROUTE: Final = "/users/@me"
CALL_TIMEOUT_S: Final = 10.0

Call = Callable[[], Awaitable[None]]


class RequestFailed(Exception):
    """A request got no answer or an answer other than 200."""


def emit(value: dict[str, Any]) -> None:
    print(json.dumps(value), flush=True)


class RpcCaller:
    """RPC calls to the AMQP REST proxy on group `group`, event `event`."""

    def __init__(self, url: str, group: str, event: str, token: str) -> None:
        self.url, self.group, self.event = url, group, event
        self.body = msgpack.packb(
            {"method": "GET", "path": ROUTE, "headers": {"Authorization": f"Bot {token}"}}, use_bin_type=True
        )
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.exchange: aio_pika.abc.AbstractExchange | None = None
        self.callback = ""

    async def open(self) -> None:
        self.connection = await aio_pika.connect(self.url, timeout=CALL_TIMEOUT_S)
        channel = await self.connection.channel(publisher_confirms=False)
        self.exchange = await channel.declare_exchange(self.group, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        self.callback = queue.name
        await queue.consume(self.on_reply, no_ack=True)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self) -> None:
        assert self.exchange is not None
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[correlation_id] = future
        message = aio_pika.Message(self.body, correlation_id=correlation_id, reply_to=self.callback)
        try:
            await self.exchange.publish(message, self.event)
            data = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except TimeoutError:
            raise RequestFailed("amqp: no reply") from None
        finally:
            self.waiting.pop(correlation_id, None)
        reply = msgpack.unpackb(data, raw=False)
        if reply.get("status") != 0 or reply["body"].get("status") != 200:
            raise RequestFailed(f"amqp: {reply.get('status')} {str(reply.get('body'))[:200]}")


def http_call(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Call:
    async def call() -> None:
        try:
            response = await client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise RequestFailed(f"{url}: {exc!r}") from exc
        if response.status_code != 200:
            raise RequestFailed(f"{url}: HTTP {response.status_code} {response.text[:200]}")

    return call


async def wait_answering(call: Call, within_s: float) -> None:
    """Retry `call` until it succeeds (the proxy may still be declaring its queue or binding its port)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await call()
            return
        except RequestFailed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def measure_latency(calls: dict[str, Call], warmup: int, requests: int) -> dict[str, list[float]]:
    """`requests` rounds after `warmup` rounds; each round times one request of every path, in a fresh
    random order, so drift in the machine's speed touches every path alike."""
    samples: dict[str, list[float]] = {path: [] for path in calls}
    order = list(calls)
    for round_number in range(warmup + requests):
        random.shuffle(order)
        for path in order:
            started = time.perf_counter()
            await calls[path]()
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            if round_number >= warmup:
                samples[path].append(round(elapsed_ms, 4))
    return samples


async def measure_throughput(call: Call, concurrency: int, seconds: float) -> dict[str, Any]:
    done = errors = 0
    stop_at = time.monotonic() + seconds
    first_error = ""

    async def caller() -> None:
        nonlocal done, errors, first_error
        while time.monotonic() < stop_at:
            try:
                await call()
                done += 1
            except RequestFailed as exc:
                errors += 1
                first_error = first_error or str(exc)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    if first_error:
        print(f"proxy_client: first error: {first_error}", file=sys.stderr, flush=True)
    return {"requests": done, "errors": errors, "elapsed_s": round(time.monotonic() - started, 4)}


async def main_async(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bot {args.token}"}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    rpc = RpcCaller(args.amqp_url, args.group, args.event, args.token)
    async with (
        httpx.AsyncClient(limits=limits, timeout=CALL_TIMEOUT_S) as direct,
        httpx.AsyncClient(limits=limits, timeout=CALL_TIMEOUT_S) as proxied,
    ):
        calls: dict[str, Call] = {
            "direct": http_call(direct, args.rest_url.rstrip("/") + ROUTE, headers),
            "http": http_call(proxied, args.proxy_url.rstrip("/") + ROUTE, headers),
        }
        if not args.no_amqp:
            await rpc.open()
            calls["amqp"] = rpc.call
        try:
            for call in calls.values():
                await wait_answering(call, args.ready_timeout)
            emit({"latency_ms": await measure_latency(calls, args.warmup, args.requests)})
            for path, call in calls.items():
                emit({"begin": path})
                emit({"end": path, **await measure_throughput(call, args.concurrency, args.throughput_s)})
        finally:
            await rpc.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_client", description=__doc__)
    parser.add_argument("--rest-url", required=True, help="the simulator's REST base (the direct path)")
    parser.add_argument(
        "--proxy-url", required=True, help="the HTTP proxy's API base (http://HOST:PORT/api/v10)"
    )
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--group", required=True, help="the proxy's AMQP_GROUP")
    parser.add_argument("--event", default="REQUEST", help="the proxy's AMQP_EVENT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--no-amqp", action="store_true", help="time only the direct and HTTP paths")
    parser.add_argument("--requests", type=int, default=2000, help="timed rounds (one request per path)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed rounds first")
    parser.add_argument("--concurrency", type=int, default=16, help="callers in the throughput phases")
    parser.add_argument("--throughput-s", type=float, default=5.0, help="length of each throughput phase")
    parser.add_argument(
        "--ready-timeout", type=float, default=30.0, help="how long the proxy may take to answer"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still measures
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
