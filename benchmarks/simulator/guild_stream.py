"""The bot-wide guild stream: one source of guild events that every generation of shards sees.

On Discord a guild's events go to whichever session holds the guild under that session's shard count, so
two generations of a bot (4 shards and 8 shards, during a live reshard) both receive every guild event,
each on the shard that routes the guild. Guild-stream mode (`GatewayConfig.guild_count > 0`) models that:
the bot has one fixed guild set (`events.bot_guild_ids`), shard (id, count) holds the guilds with
`(guild_id >> 22) % count == id`, and one generator task, started with the gateway in its nursery,
produces `guild_event_rate` MESSAGE_CREATEs per second for the whole bot (control action
`guild_event_rate`). The per-session firehose (`event_rate`) does not run in this mode.

Each event takes the next guild round-robin over the guild set, gets a unique snowflake `id` (its key, from
the guild ledger, guild_ledger.py), is serialised once and appended (`Session.append`) to every live session
whose shard holds the guild: attached or detached (a detached session buffers it for RESUME, as Discord
does), not ended, not past its resume TTL. Live sessions are indexed by shard count, then shard id, so one
event costs one lookup per generation, not one per session.

Back-pressure, as in the per-session firehose (sessions.py, `MAX_CLIENT_LAG_EVENTS`): before a tick's events
the generator checks the attached sessions, and while one's client is more than `MAX_CLIENT_LAG_EVENTS`
behind it waits (a tick at most) for that client's writer and skips the tick. One stream feeds every
session, so a slow client slows the stream for all of them, which keeps the replay buffers from
overflowing into losses the consumer did not cause. Detached sessions are not waited for: they buffer up to
`replay_buffer` events, beyond which a RESUME gets op 9 false, as on Discord.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import orjson
import trio

from .events import guilds_of_shard, message_create_templates
from .guild_ledger import GuildLedger
from .sessions import MAX_CLIENT_LAG_EVENTS, MAX_TICK_S, MIN_TICK_S, Session, SessionClient

__all__ = ["GuildStream", "check_rate"]

EVENT_NAME = b"MESSAGE_CREATE"


class GuildStream:
    """The guild set, the live sessions by (shard count, shard id), and the generator; see the docstring."""

    def __init__(
        self, guild_ids: list[int], rate: float, ledger: GuildLedger, session_ttl_s: float, seed: int
    ) -> None:
        self.guild_ids = guild_ids
        self.rate = check_rate(rate)
        self.ledger = ledger
        self.session_ttl_s = session_ttl_s
        self._templates = message_create_templates(seed)
        self._position = 0
        #: shard count -> shard id -> its live sessions (two while two connections serve one shard).
        self._index: dict[int, dict[int, list[Session]]] = {}
        self._changed = trio.Event()

    @property
    def active(self) -> bool:
        """Whether the simulator is in guild-stream mode."""
        return bool(self.guild_ids)

    def guilds_for_shard(self, shard_id: int, shard_count: int) -> list[int]:
        return guilds_of_shard(self.guild_ids, shard_id, shard_count)

    # -- sessions ----------------------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        """Index a new session: from now on it receives its shard's guild events."""
        shards = self._index.setdefault(session.shard_count, {})
        shards.setdefault(session.shard_id, []).append(session)

    def discard(self, session: Session) -> None:
        """Forget a session (the reaper removed it); idempotent."""
        shards = self._index.get(session.shard_count)
        sessions = None if shards is None else shards.get(session.shard_id)
        if shards is None or sessions is None:
            return
        kept = [other for other in sessions if other is not session]  # by identity, not dataclass equality
        if len(kept) == len(sessions):
            return
        sessions[:] = kept
        if not sessions:
            del shards[session.shard_id]
        if not shards:
            del self._index[session.shard_count]

    def sessions(self) -> Iterator[Session]:
        """Every indexed session (ended ones are dropped lazily, when an event or the reaper finds them)."""
        for shards in self._index.values():
            for sessions in shards.values():
                yield from sessions

    def generations(self) -> list[int]:
        """The shard counts that have indexed sessions, smallest first."""
        return sorted(self._index)

    def _live(self, session: Session, now: float) -> bool:
        detached_at = session.detached_at
        return not session.invalid and (detached_at is None or now - detached_at <= self.session_ttl_s)

    # -- the generator -----------------------------------------------------------------------------------

    def set_rate(self, rate: float) -> None:
        self.rate = check_rate(rate)
        self._changed.set()
        self._changed = trio.Event()

    def emit(self) -> None:
        """Generate one guild event now and append it to every live session whose shard holds its guild."""
        guild_id = self.guild_ids[self._position]
        self._position = (self._position + 1) % len(self.guild_ids)
        key = self.ledger.next_key()
        body = dict(self._templates[key % len(self._templates)])
        body["id"] = str(key)
        body["guild_id"] = str(guild_id)
        body["channel_id"] = str(guild_id + 1)
        body_json = orjson.dumps(body)
        now = trio.current_time()
        timestamp = guild_id >> 22
        delivered: list[tuple[int, int]] = []
        for shard_count, shards in list(self._index.items()):
            shard_id = timestamp % shard_count
            sessions = shards.get(shard_id)
            if not sessions:
                continue
            for session in list(sessions):
                if session.invalid:
                    self.discard(session)
                elif self._live(session, now):
                    session.append(EVENT_NAME, body_json)
                    delivered.append((shard_id, shard_count))
        self.ledger.record(key, guild_id, now, delivered)

    def _lagging_client(self) -> SessionClient | None:
        for session in self.sessions():
            client = session.connection
            if client is not None and session.last_seq - client.sent_seq > MAX_CLIENT_LAG_EVENTS:
                return client
        return None

    async def run(self) -> None:
        """Produce `rate` events per second until cancelled (the gateway's nursery ends)."""
        carry = 0.0
        while True:
            rate = self.rate
            if rate <= 0:
                carry = 0.0
                await self._changed.wait()
                continue
            tick = min(MAX_TICK_S, max(MIN_TICK_S, 1.0 / rate))
            await trio.sleep(tick)
            rate = self.rate  # a rate set during the tick counts (0 stops the stream at once)
            lagging = self._lagging_client()
            if lagging is not None:
                with trio.move_on_after(tick):
                    await lagging.wait_progress()
                continue
            due = rate * tick + carry
            count = int(due)
            carry = due - count
            for _ in range(count):
                self.emit()


def check_rate(rate: object) -> float:
    """`rate` as events per second, or ValueError if it is not a finite number >= 0."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
        raise ValueError("`rate` must be a finite number of events per second, at least 0")
    return float(rate)
