"""Shard sessions that outlive a worker: what a shard RESUMEs from after a crash or restart (DESIGN 3.2, 3.4).

A shard saves ``{session_id, seq, resume_url, shard_count}`` whenever its committed seq (the highest seq the
broker has confirmed) moves, and deletes it when the session is gone: op 9 ``false``, close 4007 or 4009, a
fatal close. A restarted worker loads it and RESUMEs on ``resume_url``; with nothing stored it IDENTIFYs.
:meth:`SessionStore.load` returns whatever is stored, even if ``shard_count`` differs from the caller's
current shard count: the caller decides (a session of a different shard layout cannot be resumed as this
shard, and must be dropped there, with a log line saying why).

Redis layout (``SHARD_STORE_TYPE=redis``, ``SHARD_STORE_PREFIX`` = ``prefix``): one hash per shard of one
shard count (a live reshard runs two generations, 16 and 32 shards say, whose shard 7s are different shards
with different sessions),

    {gateway}:16:7:session  ->  session_id  "a1b2..."
                                seq         "1234"
                                resume_url  "wss://gateway-us-east1-b.discord.gg"
                                shard_count "16"

A store opened without a shard count (tests, tools) uses the key of earlier versions, ``{gateway}:7:session``;
a store with one still *reads* that key when its own is missing and the stored ``shard_count`` matches, so
an upgrade RESUMEs instead of identifying every shard (the old key then expires by its TTL).

with ``PEXPIRE ttl_s`` refreshed on every write, so a session nobody saves again disappears once Discord has
certainly expired it. The braces make ``{prefix}`` a Redis Cluster hash tag: all keys of one bot sit in one
slot, which is what lets one script write a whole batch of shards. Spectacles (anchors/spectacles.md 1.3) kept
``gateway0seq`` and ``gateway0session`` as two bare keys with no TTL, wrote the seq on every dispatch with a
set-max that also held a *new* session's seq at the old session's value, and never deleted anything; here a
save only moves seq forward *within the same session_id*, a new session_id replaces the hash, and a delete
removes it.

Writes are coalesced: ``save``/``delete`` only record the newest value per shard (they never block, so the
event path never waits on Redis); a flusher task owned by :func:`open_redis_session_store` starts a batch at
most :data:`SAVE_WINDOW_S` after the first unwritten change and sends everything pending as ONE call of a Lua
script (a ``ratelimit.redis_client.Script``: EVALSHA, reloaded after a Redis restart empties the script
cache). Batching bounds Redis traffic at 10 calls/s per worker whatever the event rate; the price is that a
crash loses at most the last 100 ms of seq progress, which is replayed as duplicates on RESUME (at least once;
consumers dedupe on ``(shard_id, session_id, seq)``).

Outages: the client retries a call that lost its connection twice (the batch is idempotent: replaying it
writes the same values), which hides a pooled connection that died with a Redis restart. A batch that still
fails is merged back under anything newer and retried with backoff, logging once when the outage starts and
once when it ends, so the newest value per shard is never lost while the process lives.
``load`` waits at most :data:`LOAD_TIMEOUT_S` and returns None on any failure (the shard then IDENTIFYs, which
is always safe); it also sees this process's own unwritten changes.

Redis is the service's one client (``ratelimit.redis_client``: trio-native, TLS, ACL, unix sockets, Redis
Cluster by following MOVED/ASK); every key of one bot carries the ``{prefix}`` hash tag, so a batch goes to
one node.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from ratelimit.redis_client import RedisClient, Script, is_hash_tag, open_redis_client
from ratelimit.resp import RedisError, RespProtocolError
from workers.errors import SessionStoreError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TTL_S",
    "LOAD_TIMEOUT_S",
    "SAVE_WINDOW_S",
    "InMemorySessionStore",
    "RedisSessionStore",
    "SessionStore",
    "SessionStoreStatistics",
    "StoredSession",
    "open_redis_session_store",
    "session_key",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "gateway"
DEFAULT_TTL_S: Final = 600.0
DEFAULT_POOL_SIZE: Final = 5
# A change is sent at most this long after it was made; changes within one window share one Redis call.
SAVE_WINDOW_S: Final = 0.1
LOAD_TIMEOUT_S: Final = 2.0
# One batch may take this long, the client's own retries included, before it counts as failed.
WRITE_TIMEOUT_S: Final = 5.0
# The client repeats a call whose connection broke this many times (every call here is idempotent).
CLIENT_RETRIES: Final = 2
# Beyond the client's own few retries, the flusher backs off this way.
OUTAGE_BACKOFF_FIRST_S: Final = 0.1
OUTAGE_BACKOFF_CAP_S: Final = 2.0
# On leaving open_redis_session_store, how long to try writing what is still pending.
CLOSE_FLUSH_TIMEOUT_S: Final = 2.0

_FIELDS: Final = ("session_id", "seq", "resume_url", "shard_count")
# KEYS: one session hash per shard. ARGV[1]: the TTL in ms; then five values per key: mode, session_id, seq,
# resume_url, shard_count. Mode D deletes, R replaces, S saves but never moves seq backwards within the same
# session_id. Seqs stay strings so that Lua's doubles never reformat them.
_WRITE_BATCH_LUA: Final = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  local a = 1 + (i - 1) * 5
  local mode = ARGV[a + 1]
  if mode == 'D' then
    redis.call('DEL', key)
  else
    local seq = ARGV[a + 3]
    if mode == 'S' then
      local stored = redis.call('HMGET', key, 'session_id', 'seq')
      local stored_seq = tonumber(stored[2])
      if stored[1] == ARGV[a + 2] and stored_seq and stored_seq > tonumber(seq) then
        seq = stored[2]
      end
    end
    redis.call('HSET', key, 'session_id', ARGV[a + 2], 'seq', seq, 'resume_url', ARGV[a + 4],
      'shard_count', ARGV[a + 5])
    redis.call('PEXPIRE', key, ttl)
  end
end
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class StoredSession:
    session_id: str
    seq: int
    resume_url: str
    shard_count: int


class SessionStore(Protocol):
    async def load(self, shard_id: int) -> StoredSession | None:
        """The stored session of ``shard_id``, or None if there is none or it can't be read (logged; an
        outage is never raised). The ``shard_count`` may differ from the caller's: the caller decides."""
        ...

    def save(self, shard_id: int, session: StoredSession) -> None:
        """Record ``session`` without blocking; it is written within :data:`SAVE_WINDOW_S` (batched). Within
        the same ``session_id`` the stored seq only moves forward; a different ``session_id`` replaces."""
        ...

    def delete(self, shard_id: int) -> None:
        """Forget the session of ``shard_id`` without blocking (it can't be resumed any more)."""
        ...

    async def flush(self) -> None:
        """Return once everything saved or deleted before the call is written. Blocks through an outage: put
        a deadline on it."""
        ...


@dataclass(frozen=True, slots=True)
class SessionStoreStatistics:
    pending: int
    batches_written: int
    batches_failed: int
    redis_available: bool


# -- the rules, shared by both stores ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Change:
    """The newest change for one shard: a save (``session``) or a delete (None). ``replace``: a delete came
    first, so whatever is stored no longer matters."""

    session: StoredSession | None
    replace: bool = False


def _saved(stored: StoredSession | None, new: StoredSession) -> StoredSession:
    if stored is not None and stored.session_id == new.session_id and stored.seq > new.seq:
        return dataclasses.replace(new, seq=stored.seq)
    return new


def _applied(stored: StoredSession | None, change: _Change) -> StoredSession | None:
    if change.session is None:
        return None
    return change.session if change.replace else _saved(stored, change.session)


def _merged(earlier: _Change | None, later: _Change) -> _Change:
    """One change with the effect of ``earlier`` then ``later``."""
    if earlier is None or later.session is None:
        return later
    if earlier.session is None:
        return _Change(later.session, replace=True)
    return _Change(_saved(earlier.session, later.session), replace=earlier.replace or later.replace)


def session_key(prefix: str, shard_id: int, shard_count: int | None = None) -> str:
    """The Redis key of ``shard_id``'s session hash: ``{prefix}:COUNT:ID:session``, or the key of earlier
    versions ``{prefix}:ID:session`` without a shard count."""
    if shard_count is None:
        return f"{{{prefix}}}:{shard_id}:session"
    return f"{{{prefix}}}:{shard_count}:{shard_id}:session"


# -- in memory -----------------------------------------------------------------------------------------------


class InMemorySessionStore:
    """A :class:`SessionStore` in this process's memory; no TTL. For tests and ``SHARD_STORE_TYPE=memory``."""

    def __init__(self) -> None:
        self._sessions: dict[int, StoredSession] = {}

    async def load(self, shard_id: int) -> StoredSession | None:
        await trio.lowlevel.checkpoint()
        return self._sessions.get(shard_id)

    def save(self, shard_id: int, session: StoredSession) -> None:
        self._sessions[shard_id] = _saved(self._sessions.get(shard_id), session)

    def delete(self, shard_id: int) -> None:
        self._sessions.pop(shard_id, None)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


# -- Redis ---------------------------------------------------------------------------------------------------


class RedisSessionStore:
    """A :class:`SessionStore` in Redis (module docstring). Made by :func:`open_redis_session_store`."""

    def __init__(
        self, client: RedisClient, *, prefix: str, ttl_s: float, shard_count: int | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._shard_count = shard_count
        self._ttl_ms = max(1, math.ceil(ttl_s * 1000))
        self._script = Script(_WRITE_BATCH_LUA)
        self._pending: dict[int, _Change] = {}
        self._in_flight: dict[int, _Change] = {}
        self._changed = trio.Event()  # set while something is pending
        self._changes_made = 0  # a generation count: every save and delete
        self._changes_written = 0  # the generation of the last batch written
        self._batch_done = trio.Event()  # set and replaced after every write attempt
        self._write_attempts = 0
        self._batches_written = 0
        self._batches_failed = 0
        self._pause_scope: trio.CancelScope | None = None
        self._flushers = 0
        self._outage_started_at: float | None = None

    def key(self, shard_id: int) -> str:
        return session_key(self._prefix, shard_id, self._shard_count)

    def statistics(self) -> SessionStoreStatistics:
        return SessionStoreStatistics(
            pending=len(self._pending.keys() | self._in_flight.keys()),
            batches_written=self._batches_written,
            batches_failed=self._batches_failed,
            redis_available=self._outage_started_at is None,
        )

    def unwritten(self) -> dict[int, int | None]:
        """Per shard with a change not yet written: the seq it saves, or None for a delete."""
        changes = {**self._in_flight, **self._pending}  # a pending change is newer than one in flight
        return {
            shard_id: None if change.session is None else change.session.seq
            for shard_id, change in sorted(changes.items())
        }

    def save(self, shard_id: int, session: StoredSession) -> None:
        self._record(shard_id, _Change(session))

    def delete(self, shard_id: int) -> None:
        self._record(shard_id, _Change(None))

    def _record(self, shard_id: int, change: _Change) -> None:
        self._pending[shard_id] = _merged(self._pending.get(shard_id), change)
        self._changes_made += 1
        self._changed.set()

    async def flush(self) -> None:
        """See :meth:`SessionStore.flush`. Skips the batching window and any outage backoff in progress.
        Needs the flusher, so only inside :func:`open_redis_session_store`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        target = self._changes_made
        self._flushers += 1
        try:
            if self._pause_scope is not None:
                self._pause_scope.cancel()
            while self._changes_written < target:
                await self._batch_done.wait()
        finally:
            self._flushers -= 1
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def load(self, shard_id: int) -> StoredSession | None:
        """See :meth:`SessionStore.load`; waits at most :data:`LOAD_TIMEOUT_S`. Always a checkpoint."""
        await trio.lowlevel.checkpoint()
        stored: StoredSession | None = None
        with trio.move_on_after(LOAD_TIMEOUT_S) as scope:
            while not self._local_change_decides(shard_id):
                attempts = self._write_attempts
                try:
                    stored = await self._read(shard_id)
                except RedisError as exc:
                    logger.warning(
                        "session_store.load_failed", extra={"shard_id": shard_id, "error": repr(exc)}
                    )
                    break
                # A batch that finished while we read may or may not be in what we read; read again. Changes
                # still pending or in flight are applied below: each is idempotent.
                if self._write_attempts == attempts:
                    break
        if scope.cancelled_caught:
            logger.warning(
                "session_store.load_timeout", extra={"shard_id": shard_id, "timeout_s": LOAD_TIMEOUT_S}
            )
        for change in (self._in_flight.get(shard_id), self._pending.get(shard_id)):
            if change is not None:
                stored = _applied(stored, change)
        return stored

    def _local_change_decides(self, shard_id: int) -> bool:
        """Whether an unwritten change makes what Redis holds irrelevant (a delete, or a save after one)."""
        for change in (self._in_flight.get(shard_id), self._pending.get(shard_id)):
            if change is not None and (change.session is None or change.replace):
                return True
        return False

    async def _read(self, shard_id: int) -> StoredSession | None:
        stored = await self._read_key(shard_id, self.key(shard_id))
        if stored is None and self._shard_count is not None:
            # An earlier version's key (module docstring): only a session of this shard count is ours.
            legacy = await self._read_key(shard_id, session_key(self._prefix, shard_id))
            if legacy is not None and legacy.shard_count == self._shard_count:
                return legacy
        return stored

    async def _read_key(self, shard_id: int, key: str) -> StoredSession | None:
        values = await self._client.execute("HMGET", key, *_FIELDS)
        if not isinstance(values, list) or not all(
            value is None or isinstance(value, bytes) for value in values
        ):
            raise RespProtocolError(f"HMGET answered {type(values).__name__}")
        if all(value is None for value in values):
            return None
        try:
            text = [value.decode() for value in values if isinstance(value, bytes)]
            if len(text) != len(_FIELDS):
                raise ValueError(f"some of the fields {_FIELDS} are missing")
            return StoredSession(text[0], int(text[1]), text[2], int(text[3]))
        except ValueError as exc:  # a field missing or not a number (UnicodeDecodeError is a ValueError)
            logger.warning(
                "session_store.unreadable",
                extra={"shard_id": shard_id, "key": key, "error": repr(exc)},
            )
            return None

    async def serve_flusher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write pending changes in batches, forever; run by :func:`open_redis_session_store`."""
        task_status.started()
        backoff_s = OUTAGE_BACKOFF_FIRST_S
        while True:
            await self._changed.wait()
            if not self._flushers:
                await self._pause(SAVE_WINDOW_S)
            if await self._write_pending():
                backoff_s = OUTAGE_BACKOFF_FIRST_S
            else:
                await self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, OUTAGE_BACKOFF_CAP_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless a flush cuts it short."""
        with trio.move_on_after(seconds) as self._pause_scope:
            await trio.sleep_forever()
        self._pause_scope = None

    async def _write_pending(self) -> bool:
        batch, generation = self._pending, self._changes_made
        self._pending, self._in_flight = {}, batch
        self._changed = trio.Event()
        written = False
        try:
            with trio.move_on_after(WRITE_TIMEOUT_S) as scope:
                await self._script(self._client, *self._script_arguments(batch))
                written = True
            if scope.cancelled_caught:
                self._note_failure(TimeoutError(f"no answer in {WRITE_TIMEOUT_S} s"), len(batch))
        except RedisError as exc:
            self._note_failure(exc, len(batch))
        finally:
            self._in_flight = {}
            if not written:
                # Newer changes go on top of the failed batch; nothing newer is ever overwritten by it.
                for shard_id, change in batch.items():
                    later = self._pending.get(shard_id)
                    self._pending[shard_id] = change if later is None else _merged(change, later)
                self._changed.set()
            self._write_attempts += 1
            self._batch_done.set()
            self._batch_done = trio.Event()
        if written:
            self._changes_written = generation
            self._batches_written += 1
            if self._outage_started_at is not None:
                logger.info(
                    "session_store.redis_recovered",
                    extra={"outage_s": round(trio.current_time() - self._outage_started_at, 3)},
                )
                self._outage_started_at = None
        return written

    def _script_arguments(self, batch: dict[int, _Change]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = [str(self._ttl_ms)]
        for shard_id, change in sorted(batch.items()):
            keys.append(self.key(shard_id))
            session = change.session
            if session is None:
                args += ["D", "", "", "", ""]
            else:
                mode = "R" if change.replace else "S"
                args += [mode, session.session_id, str(session.seq)]
                args += [session.resume_url, str(session.shard_count)]
        return keys, args

    def _note_failure(self, exc: BaseException, shards: int) -> None:
        self._batches_failed += 1
        if self._outage_started_at is None:
            self._outage_started_at = trio.current_time()
            logger.warning(
                "session_store.redis_unavailable",
                extra={"error": repr(exc), "pending_shards": shards},
            )
        else:
            logger.debug("session_store.write_failed", extra={"error": repr(exc)})


async def stored_session_shards(
    url: str, prefix: str, shard_ids: Sequence[int], shard_count: int | None = None
) -> frozenset[int]:
    """Which of `shard_ids` (of `shard_count` shards) have a session in the Redis store (a start will RESUME
    them, spending no IDENTIFY budget): one pipeline of EXISTS, on each shard's key and, with a shard count,
    also on the key of earlier versions (which a store reads when its own is missing). Empty, with a warning,
    when Redis cannot be read within LOAD_TIMEOUT_S: then every shard counts as one that identifies."""
    if not shard_ids:
        return frozenset()
    keys = [session_key(prefix, shard_id, shard_count) for shard_id in shard_ids]
    if shard_count is not None:
        keys += [session_key(prefix, shard_id) for shard_id in shard_ids]
    async with open_redis_client(url, timeout_s=LOAD_TIMEOUT_S, max_connections=1) as client:
        try:
            found = await client.pipeline([("EXISTS", key) for key in keys], key=keys[0])
            if not all(isinstance(count, int) for count in found):
                raise RespProtocolError(f"EXISTS answered {found[:3]!r}")
        except RedisError as exc:
            logger.warning("session_store.count_failed", extra={"error": str(exc)})
            return frozenset()
    count = len(shard_ids)
    own, legacy = found[:count], found[count:] or [0] * count
    return frozenset(shard for shard, *exists in zip(shard_ids, own, legacy, strict=True) if any(exists))


@asynccontextmanager
async def open_redis_session_store(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    ttl_s: float = DEFAULT_TTL_S,
    pool_size: int = DEFAULT_POOL_SIZE,
    shard_count: int | None = None,
) -> AsyncIterator[RedisSessionStore]:
    """A Redis-backed :class:`SessionStore` whose flusher task lives as long as the ``async with``.

    ``url`` is any URL ``ratelimit.redis_url`` reads (TLS, ACL, unix, Cluster); a URL it cannot use raises
    :class:`SessionStoreError`. Doesn't connect up front: Redis may be down when the worker starts. On exit,
    tries for :data:`CLOSE_FLUSH_TIMEOUT_S` to write what is pending (also when cancelled) and logs what it
    couldn't.
    """
    if not is_hash_tag(prefix):
        raise SessionStoreError(f"SHARD_STORE_PREFIX must be non-empty and without braces, not {prefix!r}")
    if not ttl_s > 0 or pool_size < 1:
        raise SessionStoreError(f"need ttl_s > 0 and pool_size >= 1, not {ttl_s}, {pool_size}")
    try:  # one attempt (connecting included) may take as long as a load may wait
        client = RedisClient.from_url(
            url, timeout_s=LOAD_TIMEOUT_S, max_connections=pool_size, retries=CLIENT_RETRIES
        )
    except (ValueError, OSError) as exc:
        raise SessionStoreError(f"REDIS_URL cannot be used: {exc}") from exc
    async with client.closing(), trio.open_nursery() as nursery:
        store = RedisSessionStore(client, prefix=prefix, ttl_s=ttl_s, shard_count=shard_count)
        await nursery.start(store.serve_flusher)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLOSE_FLUSH_TIMEOUT_S):
                    await store.flush()
                if unwritten := store.unwritten():
                    # What a restart cannot RESUME from: those shards replay from an older seq (or, for a
                    # delete, try to RESUME a session that is gone, and IDENTIFY after op 9).
                    logger.error(
                        "session_store.unwritten_on_close",
                        extra={
                            "pending_shards": len(unwritten),
                            "seqs": {str(shard): seq for shard, seq in unwritten.items()},
                            "timeout_s": CLOSE_FLUSH_TIMEOUT_S,
                        },
                    )
            nursery.cancel_scope.cancel()
