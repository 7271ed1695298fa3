"""The supervisor waits for RabbitMQ and Redis before it spawns a worker (why: `workers.dependencies`).

Each dependency the settings use is probed the way its real client talks to it, so "up" means "would accept
the worker": RabbitMQ through `open_amqp` (TCP, the AMQP handshake and the credentials, then closed), Redis
with one PING through redis-py (the connection, AUTH/SELECT or TLS from the URL). A port that accepts TCP but
does not speak the protocol yet (a broker half-way through its boot) counts as down.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

import trio

from workers.dependencies import Dependency, wait_until_up
from workers.settings import Settings

__all__ = ["PROBE_TIMEOUT_S", "needed_dependencies", "wait_for_dependencies"]

#: One probe's deadline: a broker that accepts TCP but hangs in its handshake is down too.
PROBE_TIMEOUT_S: Final = 10.0


class ProbeFailed(Exception):
    """One probe did not get an answer (the dependency is not up yet)."""


def needed_dependencies(settings: Settings) -> dict[Dependency, str]:
    """The dependencies these settings connect to, with their URLs, in the order they are waited for."""
    needed: dict[Dependency, str] = {}
    if settings.shard_store_type == "redis" or settings.ratelimit_backend == "redis":
        needed["redis"] = settings.redis_url
    if settings.broker_type == "amqp":
        needed["amqp"] = settings.amqp_url
    return needed


@contextlib.asynccontextmanager
async def _probe_amqp(url: str) -> AsyncIterator[None]:
    from workers.amqp_bridge import AmqpConnectError, open_amqp

    try:
        with trio.fail_after(PROBE_TIMEOUT_S):
            async with open_amqp(url):
                pass
    except (AmqpConnectError, trio.TooSlowError) as exc:
        raise ProbeFailed(str(exc) or "no AMQP handshake in time") from exc
    yield


@contextlib.asynccontextmanager
async def _probe_redis(url: str) -> AsyncIterator[None]:
    # The one Redis client (ratelimit.redis_client), as the identify gate, the session store and the
    # ratelimiter use it: every URL form they take (rediss://, unix://, an ACL user) answers the same way.
    from ratelimit.redis_client import open_redis_client
    from ratelimit.resp import RedisError

    try:
        with trio.fail_after(PROBE_TIMEOUT_S):
            async with open_redis_client(url, timeout_s=PROBE_TIMEOUT_S, max_connections=1) as client:
                await client.execute("PING")
    except (RedisError, OSError, trio.TooSlowError) as exc:
        # A reply error (LOADING while Redis reads its dump, NOAUTH) is "not up yet" as well.
        raise ProbeFailed(str(exc) or "no PONG in time") from exc
    yield


_PROBES: Final[Mapping[Dependency, Callable[[str], contextlib.AbstractAsyncContextManager[None]]]] = {
    "amqp": _probe_amqp,
    "redis": _probe_redis,
}


async def wait_for_dependencies(
    needed: Mapping[Dependency, str], on_wait: Callable[[Dependency | None], None]
) -> None:
    """Wait until every dependency in `needed` answers its probe, one after the other. `on_wait(name)` is
    called before each wait and `on_wait(None)` once all are up (health and systemd status). Checkpoint;
    waits forever unless cancelled."""
    for dependency, url in needed.items():
        on_wait(dependency)
        probe = functools.partial(_PROBES[dependency], url)
        await wait_until_up(dependency, url, probe, (ProbeFailed,))
    on_wait(None)
