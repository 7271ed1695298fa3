"""Where the shared ratelimit state lives: the interface every backend implements, and the in-process one.

A backend makes `model.acquire` and `model.release` atomic for every process that shares it: `LocalBackend`
(one process, a dict; also the conservative fallback while Redis is away), `ShmBackend` (`ratelimit/shm/`,
one host) and `RedisBackend` (`ratelimit/redis_backend.py`, many hosts). Each has its own clock domain (trio's
clock, CLOCK_MONOTONIC, the Redis server's TIME); the caller only ever sees durations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from ratelimit import model
from ratelimit.errors import RatelimitError
from ratelimit.model import Ask, EngineConfig, MemoryStore, Outcome, Permit, Refusal, Wait

__all__ = ["Backend", "BackendUnavailable", "LocalBackend"]


class BackendUnavailable(RatelimitError):
    """The shared store cannot be reached (Redis down or too slow). The caller falls back to local limits."""


class Backend(Protocol):
    """One shared ratelimit state. `acquire` and `release` are each atomic across every sharer."""

    name: str
    config: EngineConfig

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        """`model.acquire` on the shared state. Raises `BackendUnavailable`."""
        ...

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        """`model.release` on the shared state. Raises `BackendUnavailable`."""
        ...

    async def aclose(self) -> None: ...


class LocalBackend:
    """The state of one process, on a dict. `clock` defaults to trio's (MockClock in tests)."""

    name = "memory"

    def __init__(
        self, config: EngineConfig | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.store = MemoryStore()
        self._clock = clock or trio.current_time
        self._operations = 0

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        self._sweep_now_and_then()
        return model.acquire(self.store, ask, self._clock(), self.config)

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        model.release(self.store, permit, outcome, self._clock(), self.config)

    async def aclose(self) -> None:
        self.store.records.clear()

    def _sweep_now_and_then(self) -> None:
        # Expired records are dropped lazily on read; a sweep every 4096 operations bounds the rest.
        self._operations += 1
        if self._operations % 4096 == 0:
            self.store.sweep(self._clock())
