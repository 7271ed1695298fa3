"""Bucket math for the simulated REST API: pure functions of the current time, no I/O and no clock reads.

Design note. Discord has two kinds of per-route bucket and the headers cannot tell them apart
(discord-api-docs #7680, hikari #2427):

- *Sliding* (leaky, since 2022-11): modelled as GCRA. Each request pushes a "theoretical arrival time"
  (`tat`) forward by `interval = window / limit`; a request is allowed while `tat - now <= window - interval`.
  `Reset-After` is the time until the bucket is full again (`tat - now`), `Retry-After` on a 429 the time
  until one slot frees.
- *Fixed*: the window opens at the first request and allows `limit` requests until it closes; the next
  request after that opens a new window. `Reset-After` and `Retry-After` are both the time until it closes.

Every function takes `now` (seconds on a monotonic clock) so the same code runs under a real clock in the
simulator and under `trio.testing.MockClock` or plain floats in tests. The states are frozen values; the
caller stores the new state only when it decides to admit the request (a sub-limit can still refuse it).

`SlidingLog` is the exact "at most N in any window" counter used for the global limit, the invalid-request
budget and hidden sub-limits; it is mutable (a deque of arrival times) but equally clock-free.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

#: Float slack when turning fractional slot usage into whole slots (GCRA arithmetic accumulates error).
EPSILON_S: Final = 1e-9


@dataclass(frozen=True, slots=True)
class BucketShape:
    """A bucket's limit: `limit` requests per `window_s` seconds, sliding (GCRA) or fixed."""

    limit: int
    window_s: float
    sliding: bool

    @property
    def interval_s(self) -> float:
        """Seconds per slot for a sliding bucket."""
        return self.window_s / self.limit


@dataclass(frozen=True, slots=True)
class BucketState:
    """One counter's state. Sliding buckets use `tat`; fixed buckets use `window_start` and `count`."""

    tat: float = -math.inf
    window_start: float = -math.inf
    count: int = 0


EMPTY_STATE: Final = BucketState()


@dataclass(frozen=True, slots=True)
class BucketView:
    """What the headers say about a counter: slots left and seconds until it is full again."""

    remaining: int
    reset_after_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against a bucket.

    `view` describes the state after the request (after counting it when allowed); `retry_after_s` is the
    time until the request would be allowed (0 when allowed).
    """

    allowed: bool
    view: BucketView
    retry_after_s: float
    state: BucketState


def peek(shape: BucketShape, state: BucketState, now: float) -> BucketView:
    """The bucket as the headers would describe it at `now`, without counting a request."""
    if shape.sliding:
        backlog = max(state.tat - now, 0.0)
        used = math.ceil(backlog / shape.interval_s - EPSILON_S) if backlog > 0 else 0
        return BucketView(max(shape.limit - used, 0), backlog)
    if now >= state.window_start + shape.window_s:
        return BucketView(shape.limit, 0.0)
    return BucketView(shape.limit - state.count, state.window_start + shape.window_s - now)


def take(shape: BucketShape, state: BucketState, now: float) -> Decision:
    """Count one request arriving at `now`; the returned `state` is the one to store if it is admitted."""
    if shape.sliding:
        return _take_sliding(shape, state, now)
    return _take_fixed(shape, state, now)


def _take_sliding(shape: BucketShape, state: BucketState, now: float) -> Decision:
    interval = shape.interval_s
    tat = max(state.tat, now)
    excess = tat - now - (shape.window_s - interval)
    if excess > EPSILON_S:
        return Decision(False, peek(shape, state, now), excess, state)
    new_state = BucketState(tat=tat + interval)
    return Decision(True, peek(shape, new_state, now), 0.0, new_state)


def _take_fixed(shape: BucketShape, state: BucketState, now: float) -> Decision:
    if now >= state.window_start + shape.window_s:
        state = BucketState(window_start=now, count=0)
    closes_in = state.window_start + shape.window_s - now
    if state.count >= shape.limit:
        return Decision(False, BucketView(0, closes_in), closes_in, state)
    new_state = BucketState(window_start=state.window_start, count=state.count + 1)
    return Decision(True, BucketView(shape.limit - new_state.count, closes_in), 0.0, new_state)


class SlidingLog:
    """At most `limit` events in any `window_s` seconds, exactly: a log of admitted arrival times."""

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def count(self, now: float) -> int:
        """Events within the window ending at `now`."""
        self._expire(now)
        return len(self._times)

    def retry_after(self, now: float) -> float:
        """Seconds until one more event fits (0 when it fits now)."""
        self._expire(now)
        if len(self._times) < self.limit:
            return 0.0
        return self._times[len(self._times) - self.limit] + self.window_s - now

    def try_add(self, now: float) -> bool:
        """Record an event at `now` if it fits; return whether it did."""
        if self.count(now) >= self.limit:
            return False
        self._times.append(now)
        return True

    def add(self, now: float) -> int:
        """Record an event at `now` unconditionally; return the count in the window including it."""
        self._expire(now)
        self._times.append(now)
        return len(self._times)

    def clear(self) -> None:
        self._times.clear()
