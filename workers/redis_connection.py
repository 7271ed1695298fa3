"""The one way workers talk to Redis: redis.asyncio on the process's trio-asyncio loop (DESIGN 5).

redis-py is an asyncio library; it runs on the loop opened by ``async with trio_asyncio.open_loop():`` at the
top of ``main`` and is called through ``trio_asyncio.aio_as_trio``. Every client gets socket timeouts and
redis-py's ``Retry`` (anchors/trio-asyncio.md 5: with them a client recovered 0.02-0.04 s after a Redis
restart); scripts go through ``register_script()``, which reloads them after NOSCRIPT. Callers add their own
deadline around each call and their own backoff beyond redis-py's few retries.

Keys start with ``{prefix}``: a Redis Cluster hash tag, so every key of one bot sits in one slot and one
script may touch several of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio
import trio_asyncio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

__all__ = [
    "CLIENT_BACKOFF_BASE_S",
    "CLIENT_BACKOFF_CAP_S",
    "CLIENT_RETRIES",
    "CLOSE_TIMEOUT_S",
    "SOCKET_CONNECT_TIMEOUT_S",
    "SOCKET_TIMEOUT_S",
    "is_hash_tag",
    "open_redis_client",
    "require_trio_asyncio_loop",
]

SOCKET_TIMEOUT_S: Final = 1.0
SOCKET_CONNECT_TIMEOUT_S: Final = 1.0
# redis-py's retries inside one call; the caller's own backoff takes over beyond them.
CLIENT_RETRIES: Final = 2
CLIENT_BACKOFF_BASE_S: Final = 0.05
CLIENT_BACKOFF_CAP_S: Final = 0.5
# How long closing the client's connections may take.
CLOSE_TIMEOUT_S: Final = 2.0


def require_trio_asyncio_loop(caller: str) -> None:
    """Raise RuntimeError unless a trio-asyncio loop is running; the message names ``caller``."""
    if trio_asyncio.current_loop.get() is None:
        raise RuntimeError(
            f"{caller} needs a trio-asyncio loop: wrap the worker's main in "
            "`async with trio_asyncio.open_loop():`"
        )


def is_hash_tag(prefix: str) -> bool:
    """Whether ``{prefix}`` is a usable Redis Cluster hash tag: non-empty and without braces."""
    return bool(prefix) and "{" not in prefix and "}" not in prefix


@asynccontextmanager
async def open_redis_client(url: str, *, pool_size: int, pool_timeout_s: float) -> AsyncIterator[Redis]:
    """A redis.asyncio client with timeouts and retries, closed (shielded, at most :data:`CLOSE_TIMEOUT_S`)
    on exit. Doesn't connect up front: Redis may be down when the process starts.

    ``pool_timeout_s`` is how long a call waits for one of the ``pool_size`` connections. Needs a running
    trio-asyncio loop (:func:`require_trio_asyncio_loop`).
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=pool_timeout_s,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=CLIENT_BACKOFF_CAP_S, base=CLIENT_BACKOFF_BASE_S), CLIENT_RETRIES),
    )
    client = Redis(connection_pool=pool)
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            await trio_asyncio.aio_as_trio(client.aclose)(close_connection_pool=True)
