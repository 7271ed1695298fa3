"""Gateway sessions and the identify limiter: the state that outlives one WebSocket connection.

A session is created by a successful IDENTIFY and owns the shard's dispatch stream: sequence numbers, the
replay buffer RESUME reads from, and the firehose task that keeps producing events while the client is
disconnected (as Discord does; that is what makes a lost-event test meaningful). It expires `session_ttl_s`
after its last connection went away, or at once when invalidated (op 9 false, 4007, 4009, a client close
with 1000/1001). In guild-stream mode (guild_stream.py) no session runs a firehose: the bot-wide guild
stream appends to the sessions instead.

Identify rules (anchors/gateway.md C2, C3): one IDENTIFY per `shard_id % max_concurrency` key per 5 s,
across every connection of the token, and a daily budget that resets the token when spent.

A session sees its connection only through `SessionClient` (what it needs of one), so this module does not
import the connection's (gateway_connection.py imports this one).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Final, Protocol

import orjson
import trio

from .config import IDENTIFY_INTERVAL_S
from .events import FirehosePool, dispatch_bytes, firehose_pool, guild_create_payload

__all__ = [
    "BUDGET_PERIOD_MS",
    "MAX_CLIENT_LAG_EVENTS",
    "FirehoseRates",
    "IdentifyDecision",
    "IdentifyLimiter",
    "Session",
    "SessionClient",
    "guild_create_bodies",
]

#: How far (in events) the firehose may run ahead of an attached client before it waits for it, so a slow
#: client slows the firehose instead of overflowing the replay buffer.
MAX_CLIENT_LAG_EVENTS: Final = 4096
#: Longest firehose tick; shorter ticks at higher rates keep the stream smooth.
MAX_TICK_S: Final = 1.0
MIN_TICK_S: Final = 0.01
#: A daily identify budget refills this long after it last did.
BUDGET_PERIOD_MS: Final = 86_400_000


class SessionClient(Protocol):
    """The connection a session is attached to, as the session (and whoever takes it over) sees it."""

    #: The last seq written to the client.
    sent_seq: int
    #: Cancelling it ends the connection (a RESUME on another connection drops this one).
    cancel_scope: trio.CancelScope

    def wake(self) -> None:
        """New dispatches are buffered: the writer should look."""

    async def wait_progress(self) -> None:
        """Wait until the writer has written another batch."""


@dataclass(slots=True)
class Session:
    session_id: str
    shard_id: int
    shard_count: int
    token: str
    guild_ids: list[int]
    replay_capacity: int
    created_at: float
    last_seq: int = 0
    #: Dispatch JSON for seqs `first_seq .. last_seq`, oldest first.
    events: list[bytes] = field(default_factory=list)
    first_seq: int = 1
    connection: SessionClient | None = None
    detached_at: float | None = None
    invalid: bool = False
    sent: int = 0
    replayed: int = 0
    resumes: int = 0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pool: FirehosePool | None = None

    @classmethod
    def create(
        cls, token: str, shard: tuple[int, int], guild_ids: list[int], replay_capacity: int
    ) -> Session:
        return cls(
            uuid.uuid4().hex, shard[0], shard[1], token, guild_ids, replay_capacity, trio.current_time()
        )

    @property
    def state(self) -> str:
        if self.invalid:
            return "ended"
        return "attached" if self.connection is not None else "detached"

    def append(self, event_name: bytes, body_json: bytes) -> None:
        self.last_seq += 1
        self.events.append(dispatch_bytes(event_name, self.last_seq, body_json))
        excess = len(self.events) - self.replay_capacity
        if excess > self.replay_capacity // 4:
            del self.events[:excess]
            self.first_seq += excess
        if self.connection is not None:
            self.connection.wake()

    def can_replay_from(self, seq: int) -> bool:
        """Whether every dispatch after `seq` is still buffered."""
        first_buffered = self.first_seq + max(0, len(self.events) - self.replay_capacity)
        return first_buffered <= seq + 1 and seq <= self.last_seq

    def events_between(self, after_seq: int, upto_seq: int) -> list[bytes]:
        start = after_seq + 1 - self.first_seq
        stop = upto_seq + 1 - self.first_seq
        return self.events[max(0, start) : max(0, stop)]

    def attach(self, connection: SessionClient) -> None:
        self.connection = connection
        self.detached_at = None

    def detach(self, connection: SessionClient) -> None:
        if self.connection is connection:
            self.connection = None
            self.detached_at = trio.current_time()

    def invalidate(self) -> None:
        """End the session: no more events, no RESUME; the buffer is freed."""
        self.invalid = True
        self.cancel_scope.cancel()
        self.events = []

    async def run_firehose(self, rates: FirehoseRates, seed: int) -> None:
        """Produce dispatches at the current rate until the session ends. Cancelled by `invalidate`."""
        with self.cancel_scope:
            rng = random.Random(seed ^ self.shard_id)
            carry = 0.0
            while True:
                rate = rates.event_rate
                if rate <= 0:
                    await rates.wait_changed()
                    continue
                if self.pool is None:
                    self.pool = firehose_pool(self.shard_id, self.guild_ids, seed)
                tick = min(MAX_TICK_S, max(MIN_TICK_S, 1.0 / rate))
                await trio.sleep(tick)
                connection = self.connection
                if connection is not None and self.last_seq - connection.sent_seq > MAX_CLIENT_LAG_EVENTS:
                    await connection.wait_progress()
                    continue
                due = rate * tick + carry
                count = int(due)
                carry = due - count
                for _ in range(count):
                    if rates.large_guild_probability and rng.random() < rates.large_guild_probability:
                        body = guild_create_payload(
                            self.guild_ids[0] if self.guild_ids else 1, target_bytes=rates.large_guild_bytes
                        )
                        self.append(b"GUILD_CREATE", _dumps(body))
                    else:
                        name, body_json = self.pool.next()
                        self.append(name, body_json)


def _dumps(value: object) -> bytes:
    return orjson.dumps(value)


class FirehoseRates:
    """The live firehose settings, changed through the control endpoint; sessions wait on changes."""

    def __init__(self, event_rate: float, large_guild_probability: float, large_guild_bytes: int) -> None:
        self.event_rate = event_rate
        self.large_guild_probability = large_guild_probability
        self.large_guild_bytes = large_guild_bytes
        self._changed = trio.Event()

    def set_rate(self, rate: float) -> None:
        self.event_rate = rate
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


@dataclass(slots=True)
class IdentifyDecision:
    allowed: bool
    reason: str = ""
    #: Seconds since this key's previous IDENTIFY (None if it is the first).
    since_previous_s: float | None = None


class IdentifyLimiter:
    """Discord's identify rules for one bot: the per-key 5 s window and the daily budget."""

    def __init__(self, max_concurrency: int, total: int, remaining: int, reset_after_ms: int) -> None:
        self.max_concurrency = max_concurrency
        self.total = total
        self.remaining = remaining
        self.reset_after_ms = reset_after_ms
        self._budget_set_at = trio.current_time()
        self._last_by_key: dict[int, float] = {}

    def reset_after_now_ms(self) -> int:
        self.refill()
        elapsed_ms = int((trio.current_time() - self._budget_set_at) * 1000)
        return max(0, self.reset_after_ms - elapsed_ms)

    def refill(self) -> None:
        """Once `reset_after` has passed, the budget is whole again for another day (as on Discord)."""
        now = trio.current_time()
        if (now - self._budget_set_at) * 1000 >= self.reset_after_ms:
            self.remaining = self.total
            self.reset_after_ms = BUDGET_PERIOD_MS
            self._budget_set_at = now

    def set_budget(
        self,
        *,
        remaining: int | None = None,
        total: int | None = None,
        max_concurrency: int | None = None,
        reset_after_ms: int | None = None,
    ) -> None:
        if remaining is not None:
            self.remaining = remaining
        if total is not None:
            self.total = total
        if max_concurrency is not None:
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            self.max_concurrency = max_concurrency
        if reset_after_ms is not None:
            self.reset_after_ms = reset_after_ms
            self._budget_set_at = trio.current_time()

    def check(self, shard_id: int) -> IdentifyDecision:
        """Account one IDENTIFY for `shard_id` now and say whether Discord would accept it."""
        now = trio.current_time()
        self.refill()
        if self.remaining <= 0:
            return IdentifyDecision(False, "budget_exhausted")
        key = shard_id % self.max_concurrency
        previous = self._last_by_key.get(key)
        since = None if previous is None else now - previous
        self._last_by_key[key] = now
        if since is not None and since < IDENTIFY_INTERVAL_S:
            return IdentifyDecision(False, "rate_limited", since)
        self.remaining -= 1
        return IdentifyDecision(True, "", since)


def guild_create_bodies(guild_ids: list[int]) -> list[bytes]:
    return [_dumps(guild_create_payload(gid)) for gid in guild_ids]
