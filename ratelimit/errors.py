"""The root of every exception the ratelimit package raises: `except RatelimitError` catches them all.

Each exception lives with the idea it belongs to and subclasses `RatelimitError`:

- `BackendUnavailable` (`ratelimit.backend`): the shared store cannot be reached; the engine falls back.
- `RateLimitTimeout`, `RequestRefused` (`ratelimit.engine`): a request waits too long, or must not be sent.
- `ShmError` (`ratelimit.shm`): a shared-memory segment cannot be created or opened.
- `RedisConnectionError` and its `RespProtocolError`, `RedisReplyError` (`ratelimit.resp`): the Redis client.
- `ProxyError` (`ratelimit.proxy.errors`): a request the REST proxy answers itself.
"""

from __future__ import annotations

__all__ = ["RatelimitError"]


class RatelimitError(Exception):
    """Base class of the ratelimit package's exceptions."""
