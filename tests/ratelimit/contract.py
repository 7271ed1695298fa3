"""The ratelimit backend contract: scenarios every backend must answer alike, with a clock the test drives.

`tests/ratelimit/test_contract.py` runs them against the in-process, shm and Redis backends.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ratelimit.backend import Backend
from ratelimit.buckets import RateLimited, RateLimitHeaders, RateLimitScope
from ratelimit.model import Ask, EngineConfig, Outcome, Permit, Refusal, Wait


@dataclass
class Clock:
    """A clock the test moves; starts far from zero so that Redis-style absolute times look realistic."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: Global waits shorter than this are `config()`'s pacing, which `Driver` steps over.
PACING_S = 1e-5

BackendFactory = Callable[[EngineConfig, Clock], AbstractAsyncContextManager[Backend]]

ASK = Ask(token="tok", route="POST /channels/{channel_id}/messages", major="1")
OTHER_MAJOR = Ask(token="tok", route="POST /channels/{channel_id}/messages", major="2")


def ok(limit: int, remaining: int, reset_after: float, bucket: str | None = "h1") -> Outcome:
    return Outcome("response", status=200, headers=RateLimitHeaders(limit, remaining, reset_after, bucket))


def limited(scope: RateLimitScope | None, retry_after: float, remaining: int | None = 0) -> Outcome:
    return Outcome(
        "limited",
        status=429,
        limited=RateLimited(retry_after, scope, remaining, scope is RateLimitScope.GLOBAL),
    )


class Driver:
    """Thin helpers over one backend and its clock."""

    def __init__(self, backend: Backend, clock: Clock) -> None:
        self.backend = backend
        self.clock = clock

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        """`backend.acquire`, stepping over the microsecond global spacing of `config()`'s huge rate."""
        while True:
            result = await self.backend.acquire(ask)
            if not (isinstance(result, Wait) and result.reason == "global" and result.seconds < PACING_S):
                return result
            self.clock.advance(result.seconds)

    async def permit(self, ask: Ask = ASK) -> Permit:
        result = await self.acquire(ask)
        assert isinstance(result, Permit), result
        return result

    async def wait(self, ask: Ask = ASK) -> Wait:
        result = await self.acquire(ask)
        assert isinstance(result, Wait), result
        return result

    async def refusal(self, ask: Ask = ASK) -> Refusal:
        result = await self.acquire(ask)
        assert isinstance(result, Refusal), result
        return result

    async def learn(self, limit: int, remaining: int, reset_after: float, ask: Ask = ASK) -> None:
        """One probe answered with these headers."""
        permit = await self.permit(ask)
        await self.backend.release(permit, ok(limit, remaining, reset_after))


def config(**changes: Any) -> EngineConfig:
    """A config whose global limit never binds unless a test sets `global_rate`."""
    changes.setdefault("global_rate", 1_000_000)
    changes.setdefault("jitter_margin_s", 0.0)
    return EngineConfig(**changes)


@asynccontextmanager
async def scenario_driver(
    factory: BackendFactory, engine: EngineConfig | None = None
) -> AsyncIterator[Driver]:
    clock = Clock()
    async with factory(engine or config(), clock) as backend:
        yield Driver(backend, clock)


def close(a: float, b: float) -> bool:
    """Equal up to the global spacing steps a test took (each at most `PACING_S`)."""
    return math.isclose(a, b, abs_tol=1e-4) or (math.isinf(a) and math.isinf(b))
