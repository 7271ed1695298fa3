"""The guild ledger: every event of the bot-wide guild stream, whom it went to, and the audit of a consumer.

In guild-stream mode (`GatewayConfig.guild_count`, guild_stream.py) each guild event is one MESSAGE_CREATE
whose `id` is its key: a snowflake unique to the event, `FIRST_EVENT_ID + n` for the n-th event since the
simulator started (a ledger reset does not restart the numbering). The ledger records, per event, the key,
the guild, the generation time (`trio.current_time()`) and the sessions it was appended to as
`(shard_id, shard_count)` pairs: one per live session whose shard holds the guild under that session's own
shard count, attached or detached (a detached session buffers it for RESUME).

Counters are exact however long the run: `guild_events`, `guild_deliveries` (session appends) and
`guild_events_undelivered` (no live session held the guild), and `deliveries_by_shard_count` (per
generation). The `records` list is capped at `max_records` (`GatewayConfig.guild_ledger_records`); the audit
does not read it: it reads two compact columns (the guild of every event, and whether it reached a session),
9 bytes an event, so it is exact over every event since the last reset.

`audit_guild_events(ledger, published)` judges what a consumer published, given as `(key, receive_time)`
pairs in the order the consumer received them: `lost` (keys delivered to some session, never published),
`duplicates` (key -> extra publications), `unknown` (published keys the ledger never generated, those from
before a reset included), and `max_guild_gap_s`: for each guild, the longest interval between two consecutive
first publications of its events, by the consumer's receive times; the largest over all guilds. An event
that reached no session cannot be published and is not lost.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

from .events import snowflake

__all__ = [
    "FIRST_EVENT_ID",
    "GUILD_COUNTERS",
    "GuildAudit",
    "GuildEventRecord",
    "GuildLedger",
    "audit_guild_events",
]

#: The key of the first guild event: a snowflake of 2023-11-14 with increment 0; event n is this plus n.
FIRST_EVENT_ID: Final = snowflake(1_700_000_000_000, 0)
#: The guild ledger's counters, present from the start.
GUILD_COUNTERS: Final = ("guild_events", "guild_deliveries", "guild_events_undelivered")


@dataclass(frozen=True, slots=True)
class GuildEventRecord:
    """One guild event: its key (the MESSAGE_CREATE's id), guild, generation time and recipients."""

    key: str
    guild_id: int
    at: float
    #: `(shard_id, shard_count)` of every session it was appended to (a pair twice: two sessions of a shard).
    delivered_to: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class GuildAudit:
    """What `audit_guild_events` found; `clean` when nothing was lost, duplicated or unknown."""

    #: Publications read (every one, duplicates and unknown keys included).
    published: int
    #: Keys delivered to at least one session and never published, in generation order.
    lost: tuple[str, ...]
    #: Key -> how many times it was published beyond the first.
    duplicates: dict[str, int]
    #: Published keys the ledger never generated (since its last reset), in publication order.
    unknown: tuple[str, ...]
    #: The longest interval between consecutive first publications of one guild's events (0 if none).
    max_guild_gap_s: float
    #: Shard count -> session appends to sessions of that shard count (from the ledger, exact).
    deliveries_by_shard_count: dict[int, int]
    #: Events generated, and those that reached no session (from the ledger).
    events: int
    undelivered: int

    @property
    def duplicate_count(self) -> int:
        return sum(self.duplicates.values())

    @property
    def clean(self) -> bool:
        return not self.lost and not self.duplicates and not self.unknown


class GuildLedger:
    """The guild stream's record; see the module docstring."""

    def __init__(self, max_records: int) -> None:
        self.max_records = max_records
        #: Event number (since the simulator started) of the first event since the last reset.
        self._first = 0
        self._reset_records()

    def _reset_records(self) -> None:
        self.counters: Counter[str] = Counter(dict.fromkeys(GUILD_COUNTERS, 0))
        self.deliveries_by_shard_count: Counter[int] = Counter()
        self.records: list[GuildEventRecord] = []
        #: Per event since the last reset: its guild id, and 1 if it reached a session.
        self._guilds = array("Q")
        self._delivered = bytearray()

    def next_key(self) -> int:
        """The id the next event must carry (`record` checks it)."""
        return FIRST_EVENT_ID + self._first + len(self._guilds)

    def record(
        self, key: int, guild_id: int, at: float, delivered_to: list[tuple[int, int]]
    ) -> GuildEventRecord | None:
        """Account the event `key` (from `next_key`); returns its record if the capped list kept it."""
        if key != self.next_key():
            raise ValueError(f"guild event {key} recorded out of order (expected {self.next_key()})")
        self._guilds.append(guild_id)
        self._delivered.append(1 if delivered_to else 0)
        self.counters["guild_events"] += 1
        self.counters["guild_deliveries"] += len(delivered_to)
        if not delivered_to:
            self.counters["guild_events_undelivered"] += 1
        for _, shard_count in delivered_to:
            self.deliveries_by_shard_count[shard_count] += 1
        if len(self.records) >= self.max_records:
            return None
        record = GuildEventRecord(str(key), guild_id, at, tuple(delivered_to))
        self.records.append(record)
        return record

    def index_of(self, key: str) -> int | None:
        """The event's position since the last reset, or None if this ledger did not generate `key`."""
        if not (key.isascii() and key.isdecimal()):
            return None
        index = int(key) - FIRST_EVENT_ID - self._first
        return index if 0 <= index < len(self._guilds) else None

    def guild_of(self, key: str) -> int | None:
        index = self.index_of(key)
        return None if index is None else self._guilds[index]

    def reset(self) -> None:
        """Forget every event so far (counters included); keys go on from where they were."""
        self._first += len(self._guilds)
        self._reset_records()

    def audit(self, published: Iterable[tuple[str, float]]) -> GuildAudit:
        """Judge a consumer's publications against the ledger (see the module docstring).

        `published` holds `(key, receive_time)` in the order the consumer received them; keys are the
        MESSAGE_CREATE ids as strings. Exact over every event since the ledger's last reset.
        """
        events = len(self._guilds)
        seen = bytearray(events)
        duplicates: Counter[str] = Counter()
        unknown: list[str] = []
        last_seen: dict[int, float] = {}
        max_gap = 0.0
        count = 0
        for key, received_at in published:
            count += 1
            index = self.index_of(key)
            if index is None:
                unknown.append(key)
                continue
            if seen[index]:
                duplicates[key] += 1
                continue
            seen[index] = 1
            guild_id = self._guilds[index]
            previous = last_seen.get(guild_id)
            if previous is not None:
                max_gap = max(max_gap, received_at - previous)
            last_seen[guild_id] = received_at
        delivered = self._delivered
        lost = tuple(
            str(FIRST_EVENT_ID + self._first + index)
            for index in range(events)
            if delivered[index] and not seen[index]
        )
        return GuildAudit(
            published=count,
            lost=lost,
            duplicates=dict(duplicates),
            unknown=tuple(unknown),
            max_guild_gap_s=round(max_gap, 6),
            deliveries_by_shard_count=dict(sorted(self.deliveries_by_shard_count.items())),
            events=events,
            undelivered=self.counters["guild_events_undelivered"],
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "deliveries_by_shard_count": {
                str(count): deliveries for count, deliveries in sorted(self.deliveries_by_shard_count.items())
            },
            "first_key": str(FIRST_EVENT_ID + self._first),
            "next_key": str(self.next_key()),
            "records": [asdict(record) for record in self.records],
        }


def audit_guild_events(ledger: GuildLedger, published: Iterable[tuple[str, float]]) -> GuildAudit:
    """`ledger.audit(published)`: judge a consumer's `(key, receive_time)` publications against the ledger."""
    return ledger.audit(published)
