"""The ratelimit engine's trio shell: waiting in order, the caller's maximum wait, cancellation, fallback.

`model.acquire` answers at once (a permit, a wait, a refusal); this shell turns that into `await
limiter.acquire(ask)`:

- FIFO per route key (R9): within a process, asks of one (token, route, majors) queue behind a fair
  `trio.Lock`, so only the head asks the backend and the rest keep their arrival order. Across processes
  there is no queue (the backend is the arbiter); a global FIFO would cost a shared list per key for a
  fairness nobody can observe across hosts.
- Maximum wait (R9, hikari's `max_rate_limit`, nirn #10): a caller gives the longest it will wait; a wait
  known to end later fails at once with `RateLimitTimeout` (how long, and why) instead of sleeping first.
- A wait for an answer (reason "probe": a probe in flight, or a window whose deadline only the next answer
  tells) is re-asked when a local release happens or after
  `poll_s`, whichever is first: another process's probe answer cannot wake us, and a short poll costs one
  backend call per waiting key.
- Cancellation (R9): a permit that was granted while the caller was being cancelled is given back as
  `cancel`, so its bucket capacity and global slot return.
- The global limit is waited for by one task per token and process (`_wait_global`); the others queue
  behind it locally instead of all polling the shared backend for the same slot.
- Fallback (R10): when the shared backend is unreachable (`BackendUnavailable`), asks go to a local backend
  in conservative mode - one request in flight per bucket, the global rate divided by `fallback_share` - and
  the shared one is tried again every `recheck_s`. Failing open would spend the whole bot's limit from every
  process at once; failing closed would stop the bot because Redis blinked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from ratelimit.backend import Backend, BackendUnavailable, LocalBackend
from ratelimit.errors import RatelimitError
from ratelimit.model import Ask, Outcome, Permit, Refusal, Wait

__all__ = ["EngineStatistics", "RateLimitTimeout", "Ratelimiter", "RequestRefused"]

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.02
DEFAULT_RECHECK_S = 1.0


class RateLimitTimeout(RatelimitError):
    """The limits would hold the request longer than the caller's maximum wait."""

    def __init__(self, wait_s: float, reason: str) -> None:
        shown = "unknown" if math.isinf(wait_s) else f"{wait_s:.3f} s"
        super().__init__(f"ratelimited ({reason}): the wait ({shown}) exceeds the maximum wait")
        self.wait_s = wait_s
        self.reason = reason


class RequestRefused(RatelimitError):
    """The request must not be sent: dead credentials, or the invalid-request budget is spent."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request refused without sending it: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot of a `Ratelimiter`'s counters since it was made (`Ratelimiter.statistics()`)."""

    grants: int = 0
    waits: Mapping[str, int] = field(default_factory=dict)  # by reason
    refusals: Mapping[str, int] = field(default_factory=dict)  # by reason
    timeouts: int = 0
    fallback_grants: int = 0
    backend_errors: int = 0
    outcomes: Mapping[str, int] = field(default_factory=dict)  # response / limited:<scope> / cancel / lost


@dataclass(slots=True)
class _Counts:
    """What `EngineStatistics` snapshots, counted in place."""

    grants: int = 0
    waits: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    fallback_grants: int = 0
    backend_errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


class Ratelimiter:
    """Waits for permits from a `Backend`. One per process; share it between every client of the process."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_wait_s: float = math.inf,
        poll_s: float = DEFAULT_POLL_S,
        fallback_share: int = 1,
        recheck_s: float = DEFAULT_RECHECK_S,
    ) -> None:
        if poll_s <= 0 or recheck_s <= 0 or fallback_share < 1:
            raise ValueError("poll_s and recheck_s must be positive, fallback_share at least 1")
        self.backend = backend
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.recheck_s = recheck_s
        self._counts = _Counts()
        config = backend.config
        self.fallback = LocalBackend(
            dataclasses.replace(
                config, global_rate=max(2, config.global_rate // fallback_share), max_in_flight=1
            )
        )
        self._fallback_until = -math.inf
        self._fallback_permits: dict[int, Permit] = {}
        self._queues: dict[tuple[str, str, str], trio.Lock] = {}
        self._global_queues: dict[str, trio.Lock] = {}
        self._changed = trio.Event()
        self._releases = 0  # counts gives-back: a waiter that saw none since it asked waits for the next

    def statistics(self) -> EngineStatistics:
        """The counters now; later counting does not change the snapshot."""
        counts = self._counts
        return EngineStatistics(
            grants=counts.grants,
            waits=dict(counts.waits),
            refusals=dict(counts.refusals),
            timeouts=counts.timeouts,
            fallback_grants=counts.fallback_grants,
            backend_errors=counts.backend_errors,
            outcomes=dict(counts.outcomes),
        )

    @property
    def in_fallback(self) -> bool:
        return trio.current_time() < self._fallback_until

    async def acquire(self, ask: Ask, *, max_wait_s: float | None = None) -> Permit:
        """A permit for `ask`, after waiting in order for the limits. Raises `RateLimitTimeout` when the wait
        would exceed `max_wait_s` (default: the limiter's), `RequestRefused` when it must not be sent."""
        limit = self.max_wait_s if max_wait_s is None else max_wait_s
        queue_key = (ask.token, ask.route, ask.major)
        lock = self._queues.get(queue_key)
        first: Wait | None = None
        seen = self._releases
        if lock is None:
            # Fast path: nobody of this process waits on this key, so asking at once keeps FIFO order.
            result = await self._ask_backend(ask)
            if isinstance(result, Permit):
                self._counts.grants += 1
                return result
            if isinstance(result, Refusal):
                self._refused(result)
            lock = self._queues.get(queue_key)
            if lock is None:
                lock = self._queues[queue_key] = trio.Lock()
                first = result  # still the head of this key: no need to ask again
        deadline = trio.current_time() + limit
        try:
            with trio.fail_after(max(0.0, limit)) if math.isfinite(limit) else contextlib.nullcontext():
                async with lock:
                    return await self._acquire_head(ask, deadline, first, seen)
        except trio.TooSlowError:
            self._counts.timeouts += 1
            raise RateLimitTimeout(limit, "queue") from None
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._queues.pop(queue_key, None)

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        """Give `permit` back with what became of it. Never raises for a backend outage (logged)."""
        key = outcome.kind if outcome.kind != "limited" else f"limited:{outcome.scope or 'cloudflare'}"
        self._counts.outcomes[key] += 1
        backend: Backend = self.backend
        if self._fallback_permits.pop(id(permit), None) is not None:
            backend = self.fallback
        with trio.CancelScope(shield=True):
            try:
                await backend.release(permit, outcome)
            except BackendUnavailable as exc:
                self._backend_failed(exc)
        self._releases += 1
        if self._changed.statistics().tasks_waiting:
            self._changed.set()
            self._changed = trio.Event()

    async def aclose(self) -> None:
        await self.backend.aclose()
        await self.fallback.aclose()

    async def _acquire_head(self, ask: Ask, deadline: float, first: Wait | None, seen: int) -> Permit:
        while True:
            result: Permit | Wait | Refusal
            if first is not None:
                result, first = first, None
            else:
                seen = self._releases
                result = await self._ask_backend(ask)
            if isinstance(result, Wait) and result.reason == "global":
                result = await self._wait_global(ask, result, deadline)
            if isinstance(result, Permit):
                self._counts.grants += 1
                return result
            if isinstance(result, Refusal):
                self._refused(result)
            self._counts.waits[result.reason] += 1
            await self._wait(result, seen, deadline)

    async def _wait_global(self, ask: Ask, wait: Wait, deadline: float) -> Permit | Wait | Refusal:
        """Wait for the token's global limit as the one asker of this process. Without this every waiting
        route key of the process (thousands under a Zipf load) slept until the same slot and asked the
        backend at once: about 190 backend calls per grant were measured, which slowed the pacing itself
        and queued interaction callbacks behind them. With it, one call per process per slot."""
        lock = self._global_queues.get(ask.token)
        if lock is None:
            lock = self._global_queues[ask.token] = trio.Lock()
        queued = lock.locked()
        async with lock:
            if queued:
                # The wait we were given is stale: the task before us took that slot.
                result = await self._ask_backend(ask)
                if not (isinstance(result, Wait) and result.reason == "global"):
                    return result
                wait = result
            while True:
                self._counts.waits[wait.reason] += 1
                if trio.current_time() + wait.seconds > deadline:
                    self._counts.timeouts += 1
                    raise RateLimitTimeout(wait.seconds, wait.reason)
                await trio.sleep(wait.seconds)
                result = await self._ask_backend(ask)
                if not (isinstance(result, Wait) and result.reason == "global"):
                    return result
                wait = result

    def _refused(self, refusal: Refusal) -> NoReturn:
        self._counts.refusals[refusal.reason] += 1
        raise RequestRefused(refusal.reason)

    async def _wait(self, wait: Wait, seen: int, deadline: float) -> None:
        now = trio.current_time()
        if wait.reason == "probe" or math.isinf(wait.seconds):
            # Waiting for an answer to a request in flight: its time is unknown (the seconds given are only
            # the latest its lease can last), so wait for a local answer or poll, until the deadline.
            if now >= deadline:
                self._counts.timeouts += 1
                raise RateLimitTimeout(math.inf, wait.reason)
            if self._releases != seen:
                return  # an answer came while we asked: ask again at once
            with trio.move_on_after(min(self.poll_s, wait.seconds, deadline - now)):
                await self._changed.wait()
            return
        if now + wait.seconds > deadline:
            self._counts.timeouts += 1
            raise RateLimitTimeout(wait.seconds, wait.reason)
        await trio.sleep(wait.seconds)

    async def _ask_backend(self, ask: Ask) -> Permit | Wait | Refusal:
        if not self.in_fallback:
            try:
                permit = await self._shielded_acquire(self.backend, ask)
            except BackendUnavailable as exc:
                self._backend_failed(exc)
            else:
                return permit
        result = await self._shielded_acquire(self.fallback, ask)
        if isinstance(result, Permit):
            self._counts.fallback_grants += 1
            self._fallback_permits[id(result)] = result
        return result

    async def _shielded_acquire(self, backend: Backend, ask: Ask) -> Permit | Wait | Refusal:
        # The backend call is shielded so that a grant it made is always seen; a cancellation that arrived
        # meanwhile then gives the grant back (R9) instead of leaking it until its lease ends.
        with trio.CancelScope(shield=True):
            result = await backend.acquire(ask)
        if isinstance(result, Permit):
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                if backend is self.fallback:
                    self._fallback_permits[id(result)] = result
                await self.release(result, Outcome("cancel"))
                raise
        return result

    def _backend_failed(self, exc: BackendUnavailable) -> None:
        self._counts.backend_errors += 1
        if not self.in_fallback:
            logger.warning(
                "ratelimit backend %s unavailable (%s): conservative local limits for %.1f s",
                self.backend.name,
                exc,
                self.recheck_s,
            )
        self._fallback_until = trio.current_time() + self.recheck_s
