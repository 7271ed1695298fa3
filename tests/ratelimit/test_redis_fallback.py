"""R10 with the real Redis: when it becomes unreachable the engine keeps going on conservative local limits,
and goes back to the shared state when Redis answers again. The outage is a TCP forwarder in front of the
real server that the test switches off and on (stopping the shared Redis would disturb other tests; the
fault suite does that)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import trio

from ratelimit.buckets import RateLimitHeaders
from ratelimit.engine import Ratelimiter
from ratelimit.model import Ask, EngineConfig, Outcome
from ratelimit.redis_backend import RedisBackend

ASK = Ask(token="tok", route="POST /channels/{channel_id}/messages", major="1")


class Forwarder:
    """127.0.0.1:<port> -> Redis, with a switch that drops every connection and refuses new ones."""

    def __init__(self) -> None:
        self.up = True
        self.port = 0
        self._scope = trio.CancelScope()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.up = False
        self._scope.cancel()
        self._scope = trio.CancelScope()

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.up:
            await client.aclose()
            return
        with self._scope:
            async with client, await trio.open_tcp_stream("127.0.0.1", 6379) as server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, server)
                    nursery.start_soon(_pump, server, client)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for chunk in source:
            await sink.send_all(chunk)


@contextlib.asynccontextmanager
async def forwarded_limiter() -> AsyncIterator[tuple[Forwarder, Ratelimiter]]:
    forwarder = Forwarder()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(forwarder.serve)
        backend = RedisBackend(
            f"redis://127.0.0.1:{port}",
            EngineConfig(global_rate=100),
            prefix=f"fallback-{uuid.uuid4().hex[:12]}",
            timeout_s=0.3,
        )
        limiter = Ratelimiter(backend, fallback_share=4, recheck_s=0.2)
        try:
            yield forwarder, limiter
        finally:
            await limiter.aclose()
            nursery.cancel_scope.cancel()


def falling_back(limiter: Ratelimiter) -> bool:
    return limiter.in_fallback


async def test_outage_falls_back_to_one_in_flight_and_recovers() -> None:
    async with forwarded_limiter() as (forwarder, limiter):
        first = await limiter.acquire(ASK)
        await limiter.release(first, Outcome("response", 200, RateLimitHeaders(5, 4, 5.0, "h")))
        assert limiter.statistics().fallback_grants == 0

        forwarder.cut()
        during = await limiter.acquire(ASK, max_wait_s=1.0)  # from the local, conservative state
        assert falling_back(limiter) and limiter.statistics().fallback_grants == 1
        assert limiter.statistics().backend_errors >= 1
        # Conservative: one request in flight per bucket until it is answered.
        with trio.move_on_after(0.1) as blocked:
            await limiter.acquire(ASK)
        assert blocked.cancelled_caught
        await limiter.release(during, Outcome("response", 200, RateLimitHeaders(5, 3, 5.0, "h")))

        forwarder.up = True
        await trio.sleep(0.25)  # past recheck_s
        again = await limiter.acquire(ASK)  # from Redis: its bucket still knows 4 left
        assert not falling_back(limiter) and limiter.statistics().fallback_grants == 1
        assert again.bucket is not None and "h" in again.bucket
        await limiter.release(again, Outcome("response", 200, RateLimitHeaders(5, 3, 5.0, "h")))
