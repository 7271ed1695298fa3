"""Hypothesis stateful tests of the shared model against a Discord bucket that counts at arrival.

The property that matters to users: whatever the order of submissions, latencies (uplink and downlink vary
independently, so answers come back out of order), cancellations and losses, the engine never lets more
requests *arrive* in one of Discord's windows than its limit (R3, R4): zero avoidable 429s. A second
machine checks the global limit the same way over a sliding 1 s window at arrival (R5, with the jitter
margin covering the latency spread).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ratelimit import model
from ratelimit.buckets import RateLimitHeaders
from ratelimit.model import Ask, EngineConfig, MemoryStore, Outcome, Permit

ASK = Ask(token="tok", route="POST /channels/{channel_id}/messages", major="1")
LIMIT = 3
WINDOW_S = 1.0
MAX_LATENCY_S = 0.3


@dataclass(order=True)
class Event:
    at: float
    order: int
    kind: str = field(compare=False)  # "arrive", "arrive-lost" or "answer"
    permit: Permit = field(compare=False)
    downlink: float = field(compare=False, default=0.0)
    headers: RateLimitHeaders | None = field(compare=False, default=None)
    status: int = field(compare=False, default=200)


class DiscordBucket:
    """A fixed window of LIMIT per WINDOW_S that opens at the first arrival, as Discord's fixed buckets."""

    def __init__(self) -> None:
        self.window_end = -math.inf
        self.count = 0
        self.rejected = 0

    def arrive(self, now: float) -> tuple[int, RateLimitHeaders]:
        if now >= self.window_end:
            self.window_end = now + WINDOW_S
            self.count = 0
        self.count += 1
        if self.count > LIMIT:
            self.rejected += 1
            return 429, RateLimitHeaders(LIMIT, 0, self.window_end - now, "h")
        return 200, RateLimitHeaders(LIMIT, LIMIT - self.count, self.window_end - now, "h")


class BucketMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.config = EngineConfig(global_rate=1_000_000, jitter_margin_s=0.0, lease_s=5.0)
        self.store = MemoryStore()
        self.now = 0.0
        self.events: list[Event] = []
        self.order = 0
        self.discord = DiscordBucket()
        self.held: list[Permit] = []  # granted, not yet sent

    def _push(self, event: Event) -> None:
        heapq.heappush(self.events, event)

    @rule()
    def acquire(self) -> None:
        result = model.acquire(self.store, ASK, self.now, self.config)
        if isinstance(result, Permit):
            self.held.append(result)

    @precondition(lambda self: bool(self.held))
    @rule(uplink=st.floats(0.0, MAX_LATENCY_S), downlink=st.floats(0.0, MAX_LATENCY_S), lost=st.booleans())
    def send(self, uplink: float, downlink: float, lost: bool) -> None:
        permit = self.held.pop(0)
        if self.now - permit.granted_at >= self.config.lease_s:
            return  # its holder counts as dead (R10): a dead process sends nothing
        self.order += 1
        kind = "arrive-lost" if lost else "arrive"
        self._push(Event(self.now + uplink, self.order, kind, permit, downlink))

    @precondition(lambda self: bool(self.held))
    @rule()
    def cancel_before_sending(self) -> None:
        model.release(self.store, self.held.pop(), Outcome("cancel"), self.now, self.config)

    @rule(dt=st.floats(0.0, 0.7))
    def advance(self, dt: float) -> None:
        target = self.now + dt
        while self.events and self.events[0].at <= target:
            event = heapq.heappop(self.events)
            self.now = event.at
            if event.kind == "arrive-lost":
                # Discord counts it, the answer never comes back: the caller gives the grant back as lost.
                self.discord.arrive(self.now)
                model.release(self.store, event.permit, Outcome("lost"), self.now, self.config)
            elif event.kind == "arrive":
                status, headers = self.discord.arrive(self.now)
                self.order += 1
                self._push(
                    Event(self.now + event.downlink, self.order, "answer", event.permit, 0.0, headers, status)
                )
            elif event.status == 429:
                outcome = Outcome("limited", status=429)  # never reached while the invariant holds
                model.release(self.store, event.permit, outcome, self.now, self.config)
            else:
                outcome = Outcome("response", status=200, headers=event.headers)
                model.release(self.store, event.permit, outcome, self.now, self.config)
        self.now = target

    @invariant()
    def no_request_arrives_over_the_limit(self) -> None:
        assert self.discord.rejected == 0


class GlobalMachine(RuleBasedStateMachine):
    """Global-only routes at a small rate: arrivals in any 1 s never exceed the rate, whatever the jitter."""

    RATE = 5

    def __init__(self) -> None:
        super().__init__()
        self.config = EngineConfig(global_rate=self.RATE, jitter_margin_s=MAX_LATENCY_S)
        self.store = MemoryStore()
        self.now = 0.0
        self.arrivals: list[float] = []
        self.major = 0

    @rule(uplink=st.floats(0.0, MAX_LATENCY_S), exempt=st.booleans())
    def request(self, uplink: float, exempt: bool) -> None:
        self.major += 1  # a fresh resource each time: only the global limit can hold it back
        ask = Ask(token="tok", route="GET /x/{id}", major=str(self.major), exempt=exempt)
        result = model.acquire(self.store, ask, self.now, self.config)
        if isinstance(result, Permit):
            if not exempt:
                self.arrivals.append(self.now + uplink)
            model.release(self.store, result, Outcome("response", status=200), self.now, self.config)

    @rule(dt=st.floats(0.0, 0.5))
    def advance(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def never_more_than_the_rate_in_any_second(self) -> None:
        ordered = sorted(self.arrivals)
        start = 0
        for end, at in enumerate(ordered):
            while at - ordered[start] >= 1.0:
                start += 1
            assert end - start + 1 <= self.RATE, ordered[start : end + 1]


TestBucketMachine = BucketMachine.TestCase
TestBucketMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestGlobalMachine = GlobalMachine.TestCase
TestGlobalMachine.settings = settings(max_examples=100, stateful_step_count=80, deadline=None)
