"""Permits to IDENTIFY: one per ``shard_id % max_concurrency`` key per 5 s, FIFO per key, in key order.

Rule (anchors/gateway.md 1-C2, C3; DESIGN 4): Discord lets each rate-limit key ``shard_id % max_concurrency``
start one session per 5 s; going faster earns an INVALID_SESSION, and every IDENTIFY spends one unit of a
daily budget (1000 for most bots) whose exhaustion resets the token. RESUMEs need no permit.

This gate follows twilight-gateway-queue's ``InMemoryQueue``: a FIFO queue per key, and when several keys can
be released at the same instant they are released in key order (0, 1, ... ``max_concurrency - 1``), so with 16
keys shards 0-15 start together and 16-31 five seconds later. The interval counts from the *grant*, not from
when the shard actually sent IDENTIFY or got READY: the caller sends at once, and a grant is the only moment
this gate can see. Unlike twilight there is no background task ticking every 5 s; each waiting task sleeps
until its own key is free, and whichever task wakes first grants every key that is ready, in key order. That
keeps the gate a plain object (no nursery to own) and gives exact grant times (a waiter arriving at a free key
is granted immediately, not at the next tick).

Cancellation: a cancelled waiter leaves its queue and consumes nothing. If another task granted it a permit in
the same instant it was cancelled (it was rescheduled with ``Cancelled`` before it could see the grant), the
grant is rolled back: the key's next free time and the budget are restored and the permit goes to the next
waiter.

Daily budget (optional, :meth:`InMemoryIdentifyGate.set_budget`): every grant spends one unit; once
``remaining <= budget_reserve`` waiters wait until ``reset_after_s`` has passed. After the reset the budget is
treated as unknown (no limit) until the next ``set_budget``: the caller refreshes it from
``GET /gateway/bot``'s ``session_start_limit``. The reserve keeps some identifies for sessions that must be
re-established after invalidation instead of spending the whole budget on restart loops.

This gate serves one process. Across processes and hosts (DESIGN 4) the supervisor grants permits over IPC or
a Redis-backed gate implements the same :class:`IdentifyGate` protocol.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Final, Protocol

import trio

__all__ = [
    "IDENTIFY_INTERVAL_S",
    "IDENTIFY_MARGIN_S",
    "BudgetedIdentifyGate",
    "IdentifyGate",
    "IdentifyGateStatistics",
    "InMemoryIdentifyGate",
    "check_gate_arguments",
]

IDENTIFY_INTERVAL_S: Final = 5.0
#: Added to Discord's 5 s window by every gate of ours: grants are timed here, but Discord times IDENTIFYs on
#: arrival, and two sends of one key can take different times to get there (seen here under load: over 50 ms).
IDENTIFY_MARGIN_S: Final = 0.15


def check_gate_arguments(max_concurrency: int, interval_s: float, budget_reserve: int) -> None:
    """The arguments every gate takes, validated the same way (ValueError naming the argument)."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    if budget_reserve < 0:
        raise ValueError(f"budget_reserve must not be negative, not {budget_reserve}")


class IdentifyGate(Protocol):
    async def wait_for_permit(self, shard_id: int) -> None:
        """Return when shard ``shard_id`` may send IDENTIFY now; the permit is spent on return.

        Always a checkpoint. Cancellation removes the waiter without consuming a permit.
        """
        ...


class BudgetedIdentifyGate(IdentifyGate, Protocol):
    """A gate that owns the schedule (the supervisor's: in memory, or shared through Redis), not a proxy to
    one; it also guards Discord's daily budget."""

    async def set_budget(self, remaining: int, reset_after_s: float) -> None:
        """Spend at most ``remaining`` more identifies (less the reserve) until ``reset_after_s`` from now."""
        ...

    def statistics(self) -> IdentifyGateStatistics: ...


@dataclass(frozen=True, slots=True)
class IdentifyGateStatistics:
    """A snapshot for metrics; ``budget_resets_at`` is on trio's clock, and the budget is None if unknown."""

    max_concurrency: int
    waiting: int
    granted: int
    budget_remaining: int | None
    budget_resets_at: float | None


@dataclass(frozen=True, slots=True)
class _Grant:
    """What one grant changed, so that a grant to a waiter cancelled in the same instant can be undone."""

    at: float
    previous_free_at: float
    spent_budget: bool
    budget_epoch: int


class _Waiter:
    __slots__ = ("grant", "key", "shard_id", "wake")

    def __init__(self, shard_id: int, key: int) -> None:
        self.shard_id = shard_id
        self.key = key
        self.wake = trio.Event()
        self.grant: _Grant | None = None


class InMemoryIdentifyGate:
    """An :class:`IdentifyGate` for the shards of one process (module docstring)."""

    def __init__(
        self, max_concurrency: int, interval_s: float = IDENTIFY_INTERVAL_S, *, budget_reserve: int = 0
    ) -> None:
        check_gate_arguments(max_concurrency, interval_s, budget_reserve)
        self._max_concurrency = max_concurrency
        self._interval_s = interval_s
        self._budget_reserve = budget_reserve
        self._queues: list[collections.deque[_Waiter]] = [collections.deque() for _ in range(max_concurrency)]
        # When each key may next be granted (trio clock).
        self._free_at = [-math.inf] * max_concurrency
        self._granted = 0
        self._budget_remaining: int | None = None
        self._budget_resets_at: float | None = None
        # Bumped by every budget change that a rollback must not undo (a new set_budget, a reset).
        self._budget_epoch = 0

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    async def set_budget(self, remaining: int, reset_after_s: float) -> None:
        """Record the daily budget (``session_start_limit.remaining`` and ``reset_after`` in seconds).

        Async like the Redis gate's, so callers hold either gate the same way, but not a checkpoint: the
        new budget applies before any other task runs. Grants stop while ``remaining <= budget_reserve``
        until ``reset_after_s`` from now; then the budget is unknown (unlimited) until set again. Call it
        from trio (it reads trio's clock).
        """
        if remaining < 0 or reset_after_s < 0:
            raise ValueError(f"remaining and reset_after_s must be >= 0, not {remaining}, {reset_after_s}")
        self._budget_remaining = remaining
        self._budget_resets_at = trio.current_time() + reset_after_s
        self._budget_epoch += 1
        self._grant_ready(trio.current_time())
        # Heads that were waiting on the old budget recompute their deadline.
        for queue in self._queues:
            if queue:
                queue[0].wake.set()

    def statistics(self) -> IdentifyGateStatistics:
        return IdentifyGateStatistics(
            max_concurrency=self._max_concurrency,
            waiting=sum(len(queue) for queue in self._queues),
            granted=self._granted,
            budget_remaining=self._budget_remaining,
            budget_resets_at=self._budget_resets_at,
        )

    async def wait_for_permit(self, shard_id: int) -> None:
        """See :meth:`IdentifyGate.wait_for_permit`."""
        if shard_id < 0:
            raise ValueError(f"shard_id must not be negative, not {shard_id}")
        await trio.lowlevel.checkpoint_if_cancelled()
        waiter = _Waiter(shard_id, shard_id % self._max_concurrency)
        self._queues[waiter.key].append(waiter)
        slept = False
        try:
            self._grant_ready(trio.current_time())
            while waiter.grant is None:
                with trio.move_on_at(self._wake_at(waiter)):
                    slept = True
                    await waiter.wake.wait()
                waiter.wake = trio.Event()
                if waiter.grant is None:
                    self._grant_ready(trio.current_time())
        except BaseException:
            self._withdraw(waiter)
            raise
        if not slept:
            # Granted at once: still a schedule point, but one that cannot lose the permit to a cancellation.
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _budget_allows(self, now: float) -> bool:
        if self._budget_remaining is None:
            return True
        if self._budget_resets_at is not None and now >= self._budget_resets_at:
            self._budget_remaining = None
            self._budget_resets_at = None
            self._budget_epoch += 1
            return True
        return self._budget_remaining > self._budget_reserve

    def _grant_ready(self, now: float) -> None:
        """Grant the head of every key that is free at ``now``, in key order, while the budget allows."""
        for key, queue in enumerate(self._queues):
            if not queue or now < self._free_at[key]:
                continue
            if not self._budget_allows(now):
                return
            waiter = queue.popleft()
            spent = self._budget_remaining is not None
            waiter.grant = _Grant(now, self._free_at[key], spent, self._budget_epoch)
            self._free_at[key] = now + self._interval_s
            if self._budget_remaining is not None:
                self._budget_remaining -= 1
            self._granted += 1
            waiter.wake.set()
            if queue:
                queue[0].wake.set()  # the new head starts waiting for the key's next free time

    def _wake_at(self, waiter: _Waiter) -> float:
        """When ``waiter`` should look again unless woken earlier: only a queue's head has a deadline."""
        if self._queues[waiter.key][0] is not waiter:
            return math.inf
        at = self._free_at[waiter.key]
        if self._budget_remaining is not None and self._budget_remaining <= self._budget_reserve:
            at = max(at, self._budget_resets_at if self._budget_resets_at is not None else math.inf)
        return at

    def _withdraw(self, waiter: _Waiter) -> None:
        queue = self._queues[waiter.key]
        grant = waiter.grant
        if grant is None:
            was_head = queue[0] is waiter
            queue.remove(waiter)
            if was_head and queue:
                queue[0].wake.set()
            return
        # Granted in the instant it was cancelled: give the permit back.
        if self._free_at[waiter.key] == grant.at + self._interval_s:
            self._free_at[waiter.key] = grant.previous_free_at
        same_budget = grant.budget_epoch == self._budget_epoch
        if grant.spent_budget and same_budget and self._budget_remaining is not None:
            self._budget_remaining += 1
        self._granted -= 1
        self._grant_ready(trio.current_time())
        for other in self._queues:
            if other:
                other[0].wake.set()
