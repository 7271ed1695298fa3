"""The shared REST ratelimit engine, and (in `ratelimit.proxy`) the REST proxy built on it.

What a user of ratelimit as a library imports is here:

- `RatelimitedTransport`: an httpx transport that sends each request when Discord's limits allow it
  (`httpx.AsyncClient(transport=RatelimitedTransport(limiter=limiter))`).
- `Ratelimiter`: waits for permits in order, with a maximum wait and a fallback; one per process.
- The backends that hold the shared state, behind `Backend`: `LocalBackend` (one process), `ShmBackend`
  (`ShmBackend.open`: one host), `RedisBackend` (`open_redis_backend`: many hosts); or by configuration,
  `open_backend` / `open_ratelimiter` with a `BackendSpec` of a `BackendKind` (`SharedBackendKind`: the
  ones a service shares between processes).
- `EngineConfig` (the tunables every sharer must agree on), and the model's `Ask`, `Permit`, `Outcome`.
- The exceptions, all under `RatelimitError`, and the `statistics()` snapshot types.

The pure cores (`model`, `buckets`, `global_limit`, `invalid`, `routes`), the service's one Redis client
(`redis_client`, on `redis_url` and `resp`) and the scripts (`redis_scripts`) are modules of their own for
those who need them.
"""

from ratelimit.backend import Backend, BackendUnavailable, LocalBackend
from ratelimit.configured import (
    BackendKind,
    BackendSpec,
    SharedBackendKind,
    open_backend,
    open_ratelimiter,
)
from ratelimit.engine import EngineStatistics, Ratelimiter, RateLimitTimeout, RequestRefused
from ratelimit.errors import RatelimitError
from ratelimit.httpx_transport import RatelimitedTransport
from ratelimit.model import Ask, EngineConfig, Outcome, Permit
from ratelimit.redis_backend import RedisBackend, RedisBackendStatistics, open_redis_backend
from ratelimit.resp import RedisConnectionError, RedisReplyError, RespProtocolError
from ratelimit.shm import ShmBackend, ShmError, ShmStatistics

__all__ = [
    "Ask",
    "Backend",
    "BackendKind",
    "BackendSpec",
    "BackendUnavailable",
    "EngineConfig",
    "EngineStatistics",
    "LocalBackend",
    "Outcome",
    "Permit",
    "RateLimitTimeout",
    "RatelimitError",
    "RatelimitedTransport",
    "Ratelimiter",
    "RedisBackend",
    "RedisBackendStatistics",
    "RedisConnectionError",
    "RedisReplyError",
    "RequestRefused",
    "RespProtocolError",
    "SharedBackendKind",
    "ShmBackend",
    "ShmError",
    "ShmStatistics",
    "open_backend",
    "open_ratelimiter",
    "open_redis_backend",
]
