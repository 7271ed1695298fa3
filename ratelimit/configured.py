"""One way to open the configured backend and the limiter on it (workers, benchmarks, tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from ratelimit.backend import Backend, LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.model import EngineConfig
from ratelimit.routes import token_id

__all__ = [
    "BackendKind",
    "BackendSpec",
    "SharedBackendKind",
    "engine_config",
    "open_backend",
    "open_ratelimiter",
    "shm_segment_name",
]

#: The backends that share state between processes: what the service may be configured with.
SharedBackendKind = Literal["shm", "redis"]
#: Every backend `open_backend` opens; "memory" is one process's own (tests, tools).
BackendKind = Literal[SharedBackendKind, "memory"]
SEGMENT_PREFIX = "trio-shard-gateway-ratelimit-"


def engine_config(global_rate: int) -> EngineConfig:
    """The engine's tunables from the service's configuration (`DISCORD_GLOBAL_LIMIT`). The supervisor and
    every worker build it with this one function: the shm segment refuses sharers whose tunables differ."""
    return EngineConfig(global_rate=max(2, global_rate))


def shm_segment_name(token: str) -> str:
    """The segment name of one bot on this host: the token's public id, so that two bots on one host never
    share state and a worker started alone finds its supervisor's segment. The token itself is not in it."""
    return SEGMENT_PREFIX + (token_id(token) or "anonymous")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Where the shared state lives. `shm_name`: the segment's file name (the supervisor creates it and
    hands the name to its workers); `owner`: create (and later remove) it rather than find it."""

    kind: BackendKind = "memory"
    config: EngineConfig = field(default_factory=EngineConfig)
    shm_name: str = "trio-shard-gateway-ratelimit"
    shm_dir: str = "/dev/shm"
    owner: bool = False
    redis_url: str = "redis://127.0.0.1:6379"
    redis_prefix: str = "ratelimit"
    #: Connections to Redis this process may hold (REDIS_POOL_SIZE).
    redis_pool_size: int = 4


@asynccontextmanager
async def open_backend(spec: BackendSpec) -> AsyncIterator[Backend]:
    """The backend `spec` names, closed on exit (an owned shm segment is also removed)."""
    backend: Backend
    if spec.kind == "memory":
        backend = LocalBackend(spec.config)
    elif spec.kind == "shm":
        from ratelimit.shm import ShmBackend

        backend = ShmBackend.open(
            spec.shm_name, spec.config, directory=spec.shm_dir, create=spec.owner, unlink_on_close=spec.owner
        )
    else:
        from ratelimit.redis_backend import RedisBackend

        backend = RedisBackend(
            spec.redis_url, spec.config, prefix=spec.redis_prefix, max_connections=spec.redis_pool_size
        )
    try:
        yield backend
    finally:
        await backend.aclose()


@asynccontextmanager
async def open_ratelimiter(
    spec: BackendSpec, *, max_wait_s: float = float("inf"), fallback_share: int = 1
) -> AsyncIterator[Ratelimiter]:
    async with open_backend(spec) as backend:
        limiter = Ratelimiter(backend, max_wait_s=max_wait_s, fallback_share=fallback_share)
        yield limiter
