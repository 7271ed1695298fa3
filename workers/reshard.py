"""Live resharding, the worker's side: shadow buffers, event digests and the cut-over from one generation to
the next.

Design note. When Discord's recommended shard count changes, the supervisor starts a new generation of
shards beside the running one, as `shadow` workers (`ShardAssignment.role`). Both generations receive the
same guild events, so the cut-over must let every event out exactly once:

- A shadow shard connects and identifies as usual but publishes nothing and consumes no command. Each of its
  `ShardOutlet`s buffers the events it would have put into the publish pump (after the DISCORD_EVENTS filter)
  for `SHADOW_BUFFER_S`, with their digests. An event commits (the seq saved for RESUME moves past it) only
  when it ages out of the buffer, or once published or skipped after going live: a shadow worker that
  crashes resumes and replays at most `SHADOW_BUFFER_S` of events (more while `Uncovered` holds some back).
  Its session is saved at READY, at seq 0 (`workers.shard`), so even a shadow killed before anything aged
  out RESUMEs rather than identifying again.
- `Retire` (old generation): stop consuming commands, drop every event received from then on (the new
  generation covers them), wait up to `RETIRE_DRAIN_S` for the pump to drain, answer `Retired` with the
  digests of the events published in the last `RESHARD_DIGEST_WINDOW_S`, then close every shard with 1000
  (Discord ends the session), delete the stored sessions and exit 0 (`workers.main`).
- `GoLive` (new generation, with the union of the old generation's digests): freeze the buffers, publish per
  shard and in arrival order the buffered events whose digest is not in the set, then publish every event
  except those in the set for `RESHARD_DIGEST_WINDOW_S` more (the new connections may lag the old ones),
  after which the set is dropped. Commands start then.
- `Uncovered` (new generation, while shadow): the old generation, which runs `shard_count` shards, no longer
  publishes for the given shard ids (closed with 4011, or stopped for good). From then on each outlet keeps,
  instead of aging out and committing, every buffered event whose guild falls on one of them
  (`(guild_id >> 22) % shard_count in shards`, the guild read by `event_guild_ids`) until `GoLive`, which
  publishes the kept events first (they arrived before everything still buffered), like the rest of the
  buffer: not in the digest set, so published. Events with no guild (READY, DMs...) age out as before. A
  later `Uncovered` replaces the set (an empty one clears it) for the events aging out from then on; an event
  already kept stays kept until `GoLive` (the old generation did not publish it while its shard was listed:
  keeping it can only publish it twice, letting it go could lose it). Events that aged out before the first
  `Uncovered` came cannot come back: the supervisor must send it within `SHADOW_BUFFER_S` of the 4011. A kept
  event holds the committed seq back (it is committed once published), so a shadow that crashes meanwhile
  RESUMEs from before it and replays everything since (duplicates at worst, never a loss).

Which digests a worker keeps: only with `ShardAssignment.reshard` (the supervisor sets it with RESHARD=auto)
or as a shadow does a worker digest what it publishes (`DigestRing`, an int and a float per event, for
`RESHARD_DIGEST_WINDOW_S`); any other worker pays nothing and would answer a `Retire` with no digests (the
new generation would then publish its whole buffer again: duplicates, never a loss). An event counts as
published when the sink accepted it (the pump's confirm), so an event whose publish is still uncertain when
the drain times out is left to the new generation too.

What can still go wrong: two genuinely distinct events with the same name and byte-identical `d` have one
digest, so the new generation skips both when the old one published one of them (rare: nearly every
dispatch carries a unique id or timestamp). An event the old generation dropped after `Retire` is covered by
the new generation only while it is still in the shadow buffer, so `GoLive` must follow `Retire` within
`SHADOW_BUFFER_S` of the first dropped event (the drain is normally milliseconds; a broker outage during the
drain can stretch it to `RETIRE_DRAIN_S`). A kept event (`Uncovered`) that the old generation did publish
before its shard stopped, more than `RESHARD_DIGEST_WINDOW_S` before `Retire`, is published again at GoLive
(a duplicate).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
import trio

from .config import Role
from .control_messages import DIGEST_BYTES, MAX_WIRE_DIGESTS, ControlMessage, Retired
from .metric_labels import MULTIPROC_DIR_ENV
from .publish.base import OutboundEvent

__all__ = [
    "GUILDS_ARRIVAL_TIMEOUT_S",
    "RESHARD_DIGEST_WINDOW_S",
    "RETIRE_DRAIN_S",
    "SHADOW_BUFFER_S",
    "SHARDING_REQUIRED_CLOSE_CODE",
    "Cutover",
    "DigestRing",
    "FlushCounts",
    "GuildArrivals",
    "Offer",
    "Phase",
    "ShardOutlet",
    "event_digest",
    "event_guild_ids",
    "pack_digests",
    "unpack_digests",
]

LOGGER: Final = logging.getLogger("workers.reshard")
#: How long a shadow shard keeps the events it received (trio time), and so the most a crashed shadow replays.
SHADOW_BUFFER_S: Final = 5.0
#: How far back `Retired` reports published digests, and how long after `GoLive` their events are skipped.
RESHARD_DIGEST_WINDOW_S: Final = 10.0
#: How long a retiring worker waits for the sink to accept what it already put into the publish pump.
RETIRE_DRAIN_S: Final = 10.0
#: After READY, how long a shard waits for its unavailable guilds before counting them as arrived.
GUILDS_ARRIVAL_TIMEOUT_S: Final = 15.0
#: Discord's "sharding required": with `ShardAssignment.reshard` it stops the shard, not the worker.
SHARDING_REQUIRED_CLOSE_CODE: Final = 4011


def event_digest(name: str, data: bytes) -> int:
    """An event's identity across shard generations: the first 8 bytes of BLAKE2b (its default 64-byte
    digest) over the event name, a NUL and the raw JSON text of `d` (`OutboundEvent.data`), as an unsigned
    big-endian int.

    Both generations receive the same bytes for a guild event, so they compute the same digest. Two distinct
    events with the same name and byte-identical `d` collapse into one (rare; see the module note).
    """
    hasher = hashlib.blake2b(name.encode())
    hasher.update(b"\0")
    hasher.update(data)
    return int.from_bytes(hasher.digest()[:DIGEST_BYTES], "big")


def pack_digests(digests: Iterable[int]) -> bytes:
    """Digests as the control channel carries them: 8 bytes each, big-endian, concatenated."""
    return b"".join(digest.to_bytes(DIGEST_BYTES, "big") for digest in digests)


def unpack_digests(data: bytes) -> frozenset[int]:
    """The set of digests in `data` (`pack_digests`' format); ValueError unless it is whole digests."""
    if len(data) % DIGEST_BYTES:
        raise ValueError(f"digests are {DIGEST_BYTES} bytes each, got {len(data)} bytes")
    return frozenset(
        int.from_bytes(data[start : start + DIGEST_BYTES], "big")
        for start in range(0, len(data), DIGEST_BYTES)
    )


#: A guild's shard under `shard_count` shards: `(guild_id >> SNOWFLAKE_SHARD_SHIFT) % shard_count` (Discord).
SNOWFLAKE_SHARD_SHIFT: Final = 22
#: Dispatches whose `d` is the guild itself: their guild is the top-level `id`.
_GUILD_OBJECT_EVENTS: Final = frozenset({"GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"})
_GUILD_ID_KEY: Final = b'"guild_id"'
_GUILD_ID_TEXT: Final = b'"guild_id":"'
_GUILD_ID_NULL: Final = b'"guild_id":null'


def event_guild_ids(name: str, data: bytes) -> frozenset[int]:
    """The guilds an event may belong to, read from the raw JSON text of its `d` (`OutboundEvent.data`); empty
    for an event of no guild (READY, a DM's MESSAGE_CREATE...).

    What counts is the top-level `guild_id` (and, for GUILD_CREATE, GUILD_UPDATE and GUILD_DELETE, whose `d`
    is the guild, the top-level `id`). It is read without parsing `d`: a bytes search for every
    `"guild_id":"DIGITS"` (Discord's compact layout, snowflakes as strings). A JSON string cannot hold a bare
    `"` byte, so every match is a key, but the search cannot tell the top-level key from one in a nested
    object (a MESSAGE_CREATE's `message_reference` names the guild of a crossposted message): it returns every
    one it finds. The top-level one is always among them, so a caller that asks "is any of them on an
    uncovered shard" can only keep more events than needed, never fewer. Only when `"guild_id"` appears in a
    form the search does not recognise (spaces, a number; `null` is recognised and means no guild) is `d`
    parsed with orjson for its top-level key; a GUILD_CREATE/UPDATE/DELETE is always parsed (for its `id`;
    they are rare beside the event stream, and only events aging out of a shadow buffer while an `Uncovered`
    set is active are read at all).
    """
    ids: set[int] = set()
    if name in _GUILD_OBJECT_EVENTS:
        guild = _top_level_snowflake(data, "id")
        if guild is not None:
            ids.add(guild)
    keys = data.count(_GUILD_ID_KEY)
    if not keys:
        return frozenset(ids)
    recognised, start = data.count(_GUILD_ID_NULL), 0
    while (at := data.find(_GUILD_ID_TEXT, start)) >= 0:
        start = at + len(_GUILD_ID_TEXT)
        end = data.find(b'"', start)
        digits = data[start:end]
        if end > start and digits.isdigit():
            ids.add(int(digits))
            recognised += 1
    if recognised < keys:  # not the compact layout: parse for the top-level key
        guild = _top_level_snowflake(data, "guild_id")
        if guild is not None:
            ids.add(guild)
    return frozenset(ids)


def _top_level_snowflake(data: bytes, key: str) -> int | None:
    """`d[key]` as an int when `data` is a JSON object whose `key` holds a snowflake (string or number)."""
    try:
        d = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = d.get(key) if isinstance(d, dict) else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _count_suppressed(amount: int) -> None:
    """`discord_reshard_duplicates_suppressed_total`, when the supervisor collects metrics."""
    if amount and os.environ.get(MULTIPROC_DIR_ENV):
        from . import metric_defs as metrics

        metrics.RESHARD_DUPLICATES_SUPPRESSED.inc(amount)


class DigestRing:
    """The digests of the events published in the last `window_s` seconds (trio time), oldest first."""

    def __init__(self, window_s: float = RESHARD_DIGEST_WINDOW_S) -> None:
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, digest: int, now: float) -> None:
        self._entries.append((now, digest))
        self._prune(now)

    def recent(self, now: float) -> list[int]:
        """The digests added in (now - window_s, now], oldest first."""
        self._prune(now)
        return [digest for _, digest in self._entries]

    def _prune(self, now: float) -> None:
        entries, horizon = self._entries, now - self.window_s
        while entries and entries[0][0] <= horizon:
            entries.popleft()


class GuildArrivals:
    """Per shard: the guilds READY listed as unavailable that have not arrived (GUILD_CREATE or GUILD_DELETE)
    on this session yet; counted as arrived `GUILDS_ARRIVAL_TIMEOUT_S` after READY (Discord may never send
    them during an outage), which is logged once."""

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self._pending: set[str] = set()
        self._deadline = math.inf

    def on_ready(self, d: Any, now: float) -> None:
        guilds = d.get("guilds") if isinstance(d, dict) else None
        self._pending = {
            str(guild["id"])
            for guild in guilds or ()
            if isinstance(guild, dict) and guild.get("unavailable") and "id" in guild
        }
        self._deadline = now + GUILDS_ARRIVAL_TIMEOUT_S

    def on_guild(self, d: Any) -> None:
        if self._pending and isinstance(d, dict) and "id" in d:
            self._pending.discard(str(d["id"]))

    def pending(self, now: float) -> int:
        if self._pending and now >= self._deadline:
            LOGGER.warning(
                "shard.guilds_timeout",
                extra={
                    "shard": self.shard_id,
                    "guilds": len(self._pending),
                    "after_s": GUILDS_ARRIVAL_TIMEOUT_S,
                },
            )
            self._pending.clear()
        return len(self._pending)


class Phase(enum.Enum):
    SHADOW = "shadow"  # buffering, aging out: nothing published
    FLUSHING = "flushing"  # GoLive: publishing the buffer; new events join it, nothing ages out
    LIVE = "live"  # publishing (skipping the old generation's digests for a while after GoLive)
    RETIRED = "retired"  # Retire: dropping every new event


class Offer(enum.Enum):
    """What `ShardOutlet.offer` did with an event; the shard commits accordingly."""

    PUT = "put"  # in the publish pump: commits once the sink accepts it
    BUFFERED = "buffered"  # in the shadow buffer: commits when it ages out, is published or skipped
    SKIPPED = "skipped"  # the old generation published it: commits now
    DROPPED = "dropped"  # retiring: never published here, never committed


class _Pump(Protocol):
    """What an outlet needs of `workers.publish.pump.PublishPump`."""

    @property
    def capacity(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def try_put(self, event: OutboundEvent) -> bool: ...

    async def wait_drained_below(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class FlushCounts:
    """One outlet's GoLive: events it held (buffered), put into the pump (published) and skipped."""

    buffered: int = 0
    published: int = 0
    skipped: int = 0

    def __add__(self, other: FlushCounts) -> FlushCounts:
        return FlushCounts(
            self.buffered + other.buffered, self.published + other.published, self.skipped + other.skipped
        )


class ShardOutlet:
    """Where one shard's wanted events go, by the worker's reshard phase (see the module note).

    `commit(event)` is called for an event that will not be published here but may now be committed (aged out
    of the buffer, or skipped from it); the shard checks it is of its current session.
    """

    def __init__(
        self, shard_id: int, pump: _Pump, *, role: Role = "live", commit: Callable[[OutboundEvent], None]
    ) -> None:
        self.shard_id = shard_id
        self._pump = pump
        self._commit = commit
        self.phase = Phase.SHADOW if role == "shadow" else Phase.LIVE
        self._buffer: deque[tuple[OutboundEvent, int]] = deque()
        #: Events that reached `SHADOW_BUFFER_S` with their guild on an uncovered shard: kept until GoLive.
        #: Each arrived before every event still in `_buffer` (both in arrival order).
        self._kept: deque[tuple[OutboundEvent, int]] = deque()
        #: The last `Uncovered`: the old generation's shard count and the shards it no longer publishes.
        self._uncovered: tuple[int, frozenset[int]] | None = None
        self._buffer_filled = trio.Event()
        self._skip: Set[int] | None = None
        self._skip_until = -math.inf
        #: Events put into the publish pump, skipped as the old generation's, aged out unpublished, dropped,
        #: kept past `SHADOW_BUFFER_S` for an uncovered shard (`uncover`).
        self.published = 0
        self.suppressed = 0
        self.aged_out = 0
        self.dropped = 0
        self.kept = 0

    @property
    def role(self) -> str:
        """For the heartbeat: "shadow" until GoLive's flush is done, "retiring" after Retire, else "live"."""
        if self.phase is Phase.LIVE:
            return "live"
        return "retiring" if self.phase is Phase.RETIRED else "shadow"

    @property
    def needs_pump(self) -> bool:
        """Whether an offered event goes to the pump (so the reader must see room there first)."""
        return self.phase is Phase.LIVE

    @property
    def in_shadow(self) -> bool:
        """Whether this shard publishes nothing yet (a shadow until GoLive's flush is done)."""
        return self.phase is Phase.SHADOW or self.phase is Phase.FLUSHING

    @property
    def buffered(self) -> int:
        """Events held for GoLive: in the shadow buffer, and kept for uncovered shards."""
        return len(self._buffer) + len(self._kept)

    @property
    def held(self) -> int:
        """Of `buffered`, those kept past `SHADOW_BUFFER_S` because their guild's old shard is uncovered."""
        return len(self._kept)

    def uncover(self, shard_count: int, shards: Set[int]) -> bool:
        """`Uncovered`: from now on keep the events aging out whose guild falls on one of `shards` of the old
        generation's `shard_count` (replacing any earlier set; an empty one clears it). Events already kept
        stay kept; those already aged out are gone. Only in SHADOW (False, ignored, otherwise)."""
        if self.phase is not Phase.SHADOW:
            return False
        self._uncovered = (shard_count, frozenset(shards)) if shards and shard_count > 0 else None
        return True

    def _on_uncovered_shard(self, event: OutboundEvent) -> bool:
        uncovered = self._uncovered
        if uncovered is None:
            return False
        shard_count, shards = uncovered
        return any(
            (guild >> SNOWFLAKE_SHARD_SHIFT) % shard_count in shards
            for guild in event_guild_ids(event.name, event.data)
        )

    def offer(self, event: OutboundEvent) -> Offer:
        """Take a wanted event of this shard, in arrival order. Not a checkpoint. In LIVE the caller has
        checked that the pump has room."""
        if self.phase is Phase.LIVE:
            if self._skip is not None and self._skipped(event):
                return Offer.SKIPPED
            queued = self._pump.try_put(event)
            assert queued, "the reader checks for room before the core sees a dispatch"
            self.published += 1
            return Offer.PUT
        if self.phase is Phase.RETIRED:
            self.dropped += 1
            return Offer.DROPPED
        self._buffer.append((event, event_digest(event.name, event.data)))
        if len(self._buffer) == 1:
            self._buffer_filled.set()
        return Offer.BUFFERED

    def _skipped(self, event: OutboundEvent) -> bool:
        assert self._skip is not None
        if trio.current_time() >= self._skip_until:
            LOGGER.info(
                "reshard.skip_window_closed", extra={"shard": self.shard_id, "skipped": self.suppressed}
            )
            self._skip = None
            return False
        if event_digest(event.name, event.data) in self._skip:
            self.suppressed += 1
            _count_suppressed(1)
            return True
        return False

    def expire(self, now: float) -> int:
        """In SHADOW: drop and commit the events received `SHADOW_BUFFER_S` or more before `now`, but keep
        those of an uncovered shard's guilds (`uncover`) for GoLive, uncommitted; how many were dropped."""
        if self.phase is not Phase.SHADOW:
            return 0
        buffer, horizon, count, kept = self._buffer, now - SHADOW_BUFFER_S, 0, 0
        while buffer and buffer[0][0].received_at <= horizon:
            entry = buffer.popleft()
            if self._on_uncovered_shard(entry[0]):
                self._kept.append(entry)
                kept += 1
                continue
            self._commit(entry[0])
            count += 1
        self.aged_out += count
        self.kept += kept
        return count

    async def age_out(self) -> None:
        """Expire buffered events as they reach `SHADOW_BUFFER_S`, until the outlet leaves SHADOW."""
        while self.phase is Phase.SHADOW:
            if not self._buffer:
                self._buffer_filled = trio.Event()
                await self._buffer_filled.wait()
                continue
            await trio.sleep_until(self._buffer[0][0].received_at + SHADOW_BUFFER_S)
            self.expire(trio.current_time())

    def freeze(self) -> None:
        """GoLive begins: nothing ages out from now on (the buffer, kept events first, is about to be
        published)."""
        if self.phase is Phase.SHADOW:
            self.phase = Phase.FLUSHING
            self._buffer.extendleft(reversed(self._kept))
            self._kept.clear()
            self._uncovered = None

    async def go_live(self, skip: Set[int], skip_until: float) -> FlushCounts:
        """Publish the buffer in arrival order, skipping (and committing) events in `skip`, waiting for room
        in the pump when it is full; then go LIVE, skipping `skip` until `skip_until` (trio time)."""
        self.freeze()
        if self.phase is not Phase.FLUSHING:
            return FlushCounts()
        self._skip, self._skip_until = (skip or None), skip_until
        buffer, published, skipped = self._buffer, 0, 0
        while buffer:
            event, digest = buffer[0]
            if digest in skip:
                buffer.popleft()
                self._commit(event)
                skipped += 1
                continue
            if not self._pump.try_put(event):
                if self._pump.free_slots > 0:
                    break  # the pump is closing (the worker stops): the rest replays on RESUME
                await self._pump.wait_drained_below(max(1, self._pump.capacity // 2))
                continue
            buffer.popleft()
            published += 1
        self.published += published
        self.suppressed += skipped
        _count_suppressed(skipped)
        counts = FlushCounts(published + skipped + len(buffer), published, skipped)
        if self.phase is Phase.FLUSHING:
            self.phase = Phase.LIVE
        return counts

    def retire(self) -> int:
        """Retire: drop every event from now on (and what a shadow still buffers); how many were buffered."""
        self.phase = Phase.RETIRED
        dropped = len(self._buffer) + len(self._kept)
        self._buffer.clear()
        self._kept.clear()
        self.dropped += dropped
        self._buffer_filled.set()
        return dropped


class Cutover:
    """The worker's side of a live reshard: ages its shadow buffers, records what it publishes (with
    `reshard` or as a shadow), and carries out `GoLive` and `Retire` (see the module note).

    `send` reaches the supervisor (`SupervisorLink.send`); None for a worker without one.
    """

    def __init__(
        self,
        outlets: Mapping[int, ShardOutlet],
        pump: _Pump,
        *,
        role: Role = "live",
        reshard: bool = False,
        send: Callable[[ControlMessage], Awaitable[None]] | None = None,
    ) -> None:
        self._outlets = outlets
        self._pump = pump
        self._send = send
        self.ring: DigestRing | None = DigestRing() if reshard or role == "shadow" else None
        #: Set once the worker publishes (at once for a live worker; after GoLive's flush for a shadow).
        self.live = trio.Event()
        if role == "live":
            self.live.set()
        self.retiring = False
        self._aging = trio.CancelScope()

    def on_confirmed(self, batch: Sequence[OutboundEvent]) -> None:
        """The pump's confirm callback: record the digests of what the sink accepted."""
        ring = self.ring
        if ring is None:
            return
        now = trio.current_time()
        for event in batch:
            ring.add(event_digest(event.name, event.data), now)

    async def age_out(self) -> None:
        """Run the shadow buffers' aging until GoLive (or Retire); returns at once for a live worker."""
        with self._aging:
            async with trio.open_nursery() as nursery:
                for outlet in self._outlets.values():
                    if outlet.phase is Phase.SHADOW:
                        nursery.start_soon(outlet.age_out)

    def uncover(self, shard_count: int, shards: Sequence[int]) -> None:
        """Uncovered: every shadow outlet keeps the events of the guilds on `shards` (of the old generation's
        `shard_count`) past `SHADOW_BUFFER_S`, until GoLive (see the module note). Ignored (logged at debug)
        once live or retiring: there is nothing to keep then."""
        if self.live.is_set() or self.retiring:
            LOGGER.debug(
                "reshard.uncovered_ignored", extra={"live": self.live.is_set(), "retiring": self.retiring}
            )
            return
        uncovered = frozenset(shards)
        applied = [outlet.uncover(shard_count, uncovered) for outlet in self._outlets.values()]
        LOGGER.info(
            "reshard.uncovered",
            extra={
                "shard_count": shard_count,
                "shards": sorted(uncovered),
                "outlets": sum(applied),
                "kept": sum(outlet.held for outlet in self._outlets.values()),
            },
        )

    async def go_live(self, digests: bytes) -> FlushCounts:
        """GoLive: publish what the old generation did not, then go live (sets `live`)."""
        if self.live.is_set() or self.retiring:
            LOGGER.warning(
                "reshard.go_live_ignored", extra={"live": self.live.is_set(), "retiring": self.retiring}
            )
            return FlushCounts()
        skip = unpack_digests(digests)
        skip_until = trio.current_time() + RESHARD_DIGEST_WINDOW_S
        kept = sum(outlet.held for outlet in self._outlets.values())
        for outlet in self._outlets.values():
            outlet.freeze()  # every buffer at once, before any flush waits for room in the pump
        self._aging.cancel()
        total = FlushCounts()
        for outlet in self._outlets.values():
            total += await outlet.go_live(skip, skip_until)
        self.live.set()
        LOGGER.info(
            "reshard.live",
            extra={
                "buffered": total.buffered,
                "published": total.published,
                "skipped": total.skipped,
                "kept": kept,
                "digests": len(skip),
            },
        )
        return total

    async def retire(self) -> bytes:
        """Retire's first half: drop new events, drain the pump (at most `RETIRE_DRAIN_S`), send `Retired`
        with the digests published in the last `RESHARD_DIGEST_WINDOW_S`, and return them (packed). Closing
        the shards and exiting is the worker's (`workers.main`)."""
        self.retiring = True
        self._aging.cancel()
        dropped = sum(outlet.retire() for outlet in self._outlets.values())
        LOGGER.info("reshard.retiring", extra={"shards": len(self._outlets), "buffered_dropped": dropped})
        with trio.move_on_after(RETIRE_DRAIN_S) as drain:
            await self._pump.wait_drained_below(1)
        if drain.cancelled_caught:
            LOGGER.warning("reshard.retire_drain_timeout", extra={"timeout_s": RETIRE_DRAIN_S})
        digests = self.ring.recent(trio.current_time()) if self.ring is not None else []
        if len(digests) > MAX_WIRE_DIGESTS:
            LOGGER.warning(
                "reshard.digests_truncated", extra={"digests": len(digests), "kept": MAX_WIRE_DIGESTS}
            )
            digests = digests[-MAX_WIRE_DIGESTS:]
        packed = pack_digests(digests)
        if self._send is not None:
            await self._send(Retired(packed))
        LOGGER.info(
            "reshard.retired",
            extra={
                "digests": len(digests),
                "dropped": sum(outlet.dropped for outlet in self._outlets.values()),
                "drained": not drain.cancelled_caught,
            },
        )
        return packed
