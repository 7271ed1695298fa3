"""Helpers for the REST proxy tests: the simulator with a proxy on it, a worker process serving the proxy,
and a Python AMQP RPC client.

The client is plain aio-pika on an asyncio thread (the test side only; the proxy under test uses the worker's
own bridge), shaped like `@spectacles/brokers`' `call`: an exclusive server-named callback queue, a fresh
correlation id per call, MessagePack bodies.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import msgpack
import trio
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.children import stop_process
from benchmarks.simulator import DEFAULT_TOKEN
from ratelimit.backend import LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.proxy import RestProxy, open_rest_proxy
from tests.simulator.rest_helpers import AUTH, RestHarness, rest_harness
from workers.amqp_bridge import AsyncioThread, open_asyncio_thread

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/")


@dataclass
class ProxyStack:
    harness: RestHarness
    limiter: Ratelimiter
    proxy: RestProxy

    async def ledger(self) -> dict[str, Any]:
        return await self.harness.ledger()


@asynccontextmanager
async def proxy_stack(*, timeout_s: float = 10.0, **rest: Any) -> AsyncIterator[ProxyStack]:
    """The simulator (`RestConfig(**rest)`) and a `RestProxy` on it with an in-process limiter."""
    async with rest_harness(**rest) as harness:
        limiter = Ratelimiter(LocalBackend())
        async with open_rest_proxy(
            limiter, api_url=harness.sim.addresses.rest_url, timeout_s=timeout_s, bot_token=DEFAULT_TOKEN
        ) as proxy:
            yield ProxyStack(harness, limiter, proxy)


@asynccontextmanager
async def running_worker(env: Mapping[str, str], log_path: Path) -> AsyncIterator[trio.Process]:
    """`python -m workers` for shard 0 of 1 with `env`, its stderr in `log_path`; stopped on exit (SIGTERM,
    then SIGKILL after 15 s)."""
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "workers", "--shard-ids", "0", "--shard-count", "1"], env=env, stderr=log
        )
        try:
            yield process
        finally:
            await stop_process(process, grace_s=15)


async def wait_for_http_front(base_url: str, process: trio.Process, log_path: Path) -> httpx.Response:
    """Poll `GET /users/@me` through the proxy's HTTP front until it answers (200) while the worker lives."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        while True:
            try:
                me = await client.get("/users/@me", headers=AUTH)
            except httpx.ConnectError:
                assert process.returncode is None, await trio.Path(log_path).read_text()
                await trio.sleep(0.1)
                continue
            assert me.status_code == 200, me.text
            return me


def unique_group() -> str:
    return f"test-rest-{uuid.uuid4().hex[:10]}"


class RpcClient:
    """A small RPC caller; every method is a trio coroutine (the aio-pika work runs on its asyncio thread)."""

    def __init__(self, group: str, thread: AsyncioThread) -> None:
        self.group = group
        self._thread = thread
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._callback = ""
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self.stray: list[tuple[str | None, bytes]] = []

    async def _open(self) -> None:
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        self._channel = await self._connection.channel()
        self._exchange = await self._channel.declare_exchange(
            self.group, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await self._channel.declare_queue("", exclusive=True)
        self._callback = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)
        else:
            self.stray.append((message.correlation_id, message.body))

    async def _publish(
        self, routing_key: str, body: bytes, correlation_id: str | None, reply: bool
    ) -> asyncio.Future[bytes] | None:
        assert self._exchange is not None
        future: asyncio.Future[bytes] | None = None
        if reply and correlation_id is not None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[correlation_id] = future
        await self._exchange.publish(
            aio_pika.Message(body, correlation_id=correlation_id, reply_to=self._callback if reply else None),
            routing_key,
        )
        return future

    async def _call(self, body: bytes, correlation_id: str, timeout: float) -> bytes:
        future = await self._publish("REQUEST", body, correlation_id, True)
        assert future is not None
        return await asyncio.wait_for(future, timeout)

    async def call_raw(self, body: bytes, *, correlation_id: str | None = None, timeout: float = 10.0) -> Any:
        """Publish `body` as a request and return the decoded reply."""
        data = await self._thread.call(self._call, body, correlation_id or uuid.uuid4().hex, timeout)
        return msgpack.unpackb(data, raw=False)

    async def call(self, request: Mapping[str, Any] | list[Any], **kwargs: Any) -> Any:
        return await self.call_raw(msgpack.packb(request, use_bin_type=True), **kwargs)

    async def publish(self, routing_key: str, body: bytes, *, correlation_id: str | None = None) -> None:
        """Publish without waiting for a reply (no reply_to)."""
        await self._thread.call(self._publish, routing_key, body, correlation_id, False)

    async def close(self) -> None:
        if self._connection is not None:
            await self._thread.call(self._connection.close)


@asynccontextmanager
async def open_rpc_client(group: str) -> AsyncIterator[RpcClient]:
    """A plain aio-pika client on an asyncio loop in a thread of its own, closed on exit."""
    async with open_asyncio_thread(use_uvloop=False) as thread:
        client = RpcClient(group, thread)
        await thread.call(client._open)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await client.close()
