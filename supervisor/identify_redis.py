"""Permits to IDENTIFY shared by every supervisor on one Redis: one grant per key per interval, on all hosts.

Rule (anchors/gateway.md 1-C2, C3; DESIGN 4): each rate-limit key ``shard_id % max_concurrency`` may start one
session per 5 s *across all processes and hosts*, and every IDENTIFY spends one unit of a daily budget.
:class:`workers.identify.InMemoryIdentifyGate` enforces that inside one process; this gate implements the same
:class:`~workers.identify.IdentifyGate` protocol for several supervisors sharing one Redis (anchors/gateway.md
6.4: per-key ``SET identify:{key} NX PX 5000+50``, the avrae pattern).

Redis layout (``prefix`` = ``SHARD_STORE_PREFIX``; the braces make it a Redis Cluster hash tag, so all keys of
one bot sit in one slot and one script may touch several of them)::

    {gateway}:identify:3       -> "host:pid:token:call"   PX interval: granted within the interval
    {gateway}:identify:budget  -> "987"                   PX until the daily reset (optional, see below)

A grant is one call of a Lua script (a ``ratelimit.redis_client.Script``: EVALSHA, reloaded after a Redis
restart empties the script cache; the client speaks TLS, ACL, unix sockets and Cluster, following MOVED/ASK):
for each key asked for, in key order, ``SET key owner NX PX interval_ms``; when the key is taken it returns
the key's PTTL instead. Expiry runs on the Redis server's clock, so the hosts' clocks never matter; only a
step of the *Redis host's* wall clock could end an interval early. The requester sleeps exactly that PTTL
(counted from when the reply arrived, so never too early) plus a jitter of 2-20 ms, so that hosts don't
stampede, and then asks again: no polling. The owner value is unique per call, so when the client retries a
call whose reply was lost (its connection broke) the script recognises its own grant instead of waiting a
whole interval for it.

Within one process: one granter task (owned by :func:`open_redis_identify_gate`) serves FIFO queues per key;
only a queue's head is ever asked for, and all keys due at the same moment go in one script call, in key
order, so lower keys win when the budget runs short. Across hosts nothing orders the keys (a host that asks
first wins), which Discord doesn't need: only the per-key interval is enforced. The gate also never asks for a
key sooner than an interval after its own last grant of it, which bounds each host by itself (see outages).

Cancellation removes a waiter without consuming a permit. A permit taken in Redis for a waiter that is
cancelled meanwhile (during the call, or in the instant of the grant) goes to the next waiter of the same key;
if there is none, nothing is rolled back in Redis: the key just expires, so such a cancelled grant wastes at
most one interval of that key (counted in ``wasted_grants``).

Outages: when a call fails or takes longer than :data:`CALL_TIMEOUT_S`, the gate logs once and falls back to a
conservative local mode: the rule of ``InMemoryIdentifyGate`` with the same interval, applied to this
process's own grants *including those it got from Redis just before*, so the switch never doubles a key on
this host. (It isn't literally an ``InMemoryIdentifyGate`` for that reason: that one would not know the Redis
grants.) The risk: hosts in fallback don't see each other, nor hosts still on Redis, so two of them may
identify the same key within one interval (Discord answers with op 9 and the shard retries through the gate);
each host is still bounded to one grant per key per interval. A background probe retries with backoff (0.1 s
doubling to 2 s) and, on success, first writes this host's recent local grants into Redis (``SET NX PX`` with
the time left) so other hosts honour them, then switches back and logs once.

Daily budget (optional, :meth:`RedisIdentifyGate.set_budget`): a shared counter that every grant decrements
while it exists; once it is ``<= budget_reserve`` no key is granted until it expires at the reset (then the
budget is unknown, i.e. unlimited, until set again), mirroring ``InMemoryIdentifyGate.set_budget``. Waiters
blocked on it look again every :data:`BUDGET_RECHECK_S`, so a budget raised by another host is seen. Every
host should use the same ``budget_reserve``. In fallback the last budget seen is spent locally, and what was
spent is subtracted from the shared counter on recovery; after an outage the counter is approximate until the
next ``set_budget`` with Discord's ``session_start_limit``.

RESUMEs need no permit and never come here.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from ratelimit.redis_client import RedisClient, Script, is_hash_tag
from ratelimit.resp import Arg, RedisError, Reply
from workers.identify import (
    IDENTIFY_INTERVAL_S,
    IDENTIFY_MARGIN_S,
    IdentifyGateStatistics,
    check_gate_arguments,
)

__all__ = [
    "BUDGET_RECHECK_S",
    "CALL_TIMEOUT_S",
    "DEFAULT_INTERVAL_S",
    "RedisIdentifyGate",
    "RedisIdentifyGateStatistics",
    "budget_key",
    "identify_key",
    "open_redis_identify_gate",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_INTERVAL_S: Final = IDENTIFY_INTERVAL_S + IDENTIFY_MARGIN_S
DEFAULT_POOL_SIZE: Final = 5
#: One script call may take this long, the client's own retries included, before Redis counts as unavailable.
CALL_TIMEOUT_S: Final = 2.0
#: One attempt of a call (connecting included); the client repeats an attempt whose connection broke
#: CLIENT_RETRIES times (every call here is idempotent: the grant script knows its own owner value).
ATTEMPT_TIMEOUT_S: Final = 1.0
CLIENT_RETRIES: Final = 2
#: Added to a PTTL before asking again, so that hosts waiting for the same key don't all ask at once.
RETRY_JITTER_MIN_S: Final = 0.002
RETRY_JITTER_MAX_S: Final = 0.02
#: While the budget is exhausted, look again this often (another host may have raised it).
BUDGET_RECHECK_S: Final = 2.0
OUTAGE_BACKOFF_FIRST_S: Final = 0.1
OUTAGE_BACKOFF_CAP_S: Final = 2.0

# KEYS[1]: the budget counter; KEYS[2..]: the identify keys to try, in key order. ARGV: owner (unique per
# call), interval in ms, budget reserve. Returns {budget left or -1 if unknown, the budget's PTTL, then per
# key: 0 if granted, -1 if the budget is exhausted, else the ms until the key is free}.
_GRANT_LUA: Final = """
local owner, interval, reserve = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local budget = tonumber(redis.call('GET', KEYS[1]))
local out = {-1, redis.call('PTTL', KEYS[1])}
for i = 2, #KEYS do
  local key, wait = KEYS[i], 0
  if redis.call('GET', key) == owner then
    wait = 0  -- the client retried this very call after losing its reply: the grant is ours
  elseif budget and budget <= reserve then
    wait = -1
  elseif redis.call('SET', key, owner, 'NX', 'PX', interval) then
    if budget then budget = redis.call('DECR', KEYS[1]) end
  else
    wait = redis.call('PTTL', key)
    if wait < 0 then  -- no TTL: not written by this gate; repair it rather than wait forever
      redis.call('PEXPIRE', key, interval)
      wait = interval
    elseif wait == 0 then
      wait = 1
    end
  end
  out[#out + 1] = wait
end
if budget then out[1] = budget end
return out
"""

# After an outage. KEYS[1]: the budget counter; KEYS[2..]: keys granted locally less than an interval ago.
# ARGV: owner, identifies spent locally, then the ms left of each key's interval.
_HOLD_LUA: Final = """
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[i + 1])
end
local spent = tonumber(ARGV[2])
local budget = tonumber(redis.call('GET', KEYS[1]))
if spent > 0 and budget then
  redis.call('SET', KEYS[1], math.max(0, budget - spent), 'KEEPTTL')
end
return #KEYS - 1
"""
_GRANTED: Final = 0
_BUDGET_EXHAUSTED: Final = -1


def _integers(reply: Reply) -> list[int]:
    """The grant script's reply, checked: a list of integers."""
    if not isinstance(reply, list) or not all(isinstance(value, int) for value in reply):
        raise _Unavailable(f"unexpected reply {str(reply)[:64]}")
    return [value for value in reply if isinstance(value, int)]


def identify_key(prefix: str, key: int) -> str:
    """The Redis key of rate-limit key ``key``: ``{prefix}:identify:KEY``."""
    return f"{{{prefix}}}:identify:{key}"


def budget_key(prefix: str) -> str:
    """The Redis key of the shared daily budget: ``{prefix}:identify:budget``."""
    return f"{{{prefix}}}:identify:budget"


@dataclass(frozen=True, slots=True)
class RedisIdentifyGateStatistics(IdentifyGateStatistics):
    """:class:`IdentifyGateStatistics` plus the Redis side. The budget is the last one Redis (or, in fallback,
    this process) knew. ``local_grants``: granted in fallback; ``wasted_grants``: taken in Redis for a waiter
    that was gone; ``redis_calls``: grant script calls."""

    redis_available: bool
    local_grants: int
    wasted_grants: int
    redis_calls: int


class _Waiter:
    __slots__ = ("granted", "shard_id", "wake")

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.wake = trio.Event()
        self.granted = False


class _Unavailable(Exception):
    """A script call failed or timed out."""


class RedisIdentifyGate:
    """An :class:`~workers.identify.IdentifyGate` shared through Redis (module docstring). Made by
    :func:`open_redis_identify_gate`, which runs its granter and probe tasks."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        max_concurrency: int,
        interval_s: float = DEFAULT_INTERVAL_S,
        budget_reserve: int = 0,
    ) -> None:
        if not is_hash_tag(prefix):
            raise ValueError(f"prefix must be non-empty and without braces, not {prefix!r}")
        check_gate_arguments(max_concurrency, interval_s, budget_reserve)
        self._client = client
        self._prefix = prefix
        self._max_concurrency = max_concurrency
        self._interval_s = interval_s
        self._interval_ms = max(1, math.ceil(interval_s * 1000))
        self._budget_reserve = budget_reserve
        # Who holds a key, for whoever reads Redis; each call appends a counter.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._grant_script = Script(_GRANT_LUA)
        self._hold_script = Script(_HOLD_LUA)
        self._queues: list[collections.deque[_Waiter]] = [collections.deque() for _ in range(max_concurrency)]
        # Trio clock. _free_at: our own last grant of each key plus the interval (never asked for sooner);
        # _retry_at: what Redis said (another holder's PTTL, or the budget).
        self._free_at = [-math.inf] * max_concurrency
        self._retry_at = [-math.inf] * max_concurrency
        self._work = trio.Event()  # set when a key may have become due: new head, budget, recovery
        self._closed = False
        self._granted = 0
        self._local_grants = 0
        self._wasted_grants = 0
        self._calls = 0
        self._budget_remaining: int | None = None
        self._budget_resets_at: float | None = None
        self._fallback_spent = 0  # budget spent in fallback, not yet subtracted in Redis
        self._outage_started_at: float | None = None
        self._outage = trio.Event()  # set while in fallback

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def key(self, key: int) -> str:
        return identify_key(self._prefix, key)

    @property
    def budget_key(self) -> str:
        return budget_key(self._prefix)

    def statistics(self) -> RedisIdentifyGateStatistics:
        return RedisIdentifyGateStatistics(
            max_concurrency=self._max_concurrency,
            waiting=sum(len(queue) for queue in self._queues),
            granted=self._granted,
            budget_remaining=self._budget_remaining,
            budget_resets_at=self._budget_resets_at,
            redis_available=self._outage_started_at is None,
            local_grants=self._local_grants,
            wasted_grants=self._wasted_grants,
            redis_calls=self._calls,
        )

    # -- the protocol ----------------------------------------------------------------------------------------

    async def wait_for_permit(self, shard_id: int) -> None:
        """See :meth:`workers.identify.IdentifyGate.wait_for_permit`. Raises ``trio.ClosedResourceError`` once
        :func:`open_redis_identify_gate` has exited. Never raises for a Redis outage (module docstring)."""
        if shard_id < 0:
            raise ValueError(f"shard_id must not be negative, not {shard_id}")
        if self._closed:
            raise trio.ClosedResourceError("the identify gate is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        key = shard_id % self._max_concurrency
        waiter = _Waiter(shard_id)
        queue = self._queues[key]
        queue.append(waiter)
        if len(queue) == 1:
            self._work.set()
        try:
            await waiter.wake.wait()
        except BaseException:
            self._withdraw(key, waiter)
            raise
        if not waiter.granted:
            raise trio.ClosedResourceError("the identify gate was closed while waiting")

    async def set_budget(self, remaining: int, reset_after_s: float) -> None:
        """Record the daily budget (``session_start_limit.remaining``, ``reset_after`` in seconds) for every
        host: grants stop while ``remaining <= budget_reserve`` until the reset, then the budget is unknown
        (unlimited) until set again. Unlike ``InMemoryIdentifyGate.set_budget`` this writes Redis, hence
        async; an outage isn't raised (the local copy serves the fallback)."""
        if remaining < 0 or reset_after_s < 0:
            raise ValueError(f"remaining and reset_after_s must be >= 0, not {remaining}, {reset_after_s}")
        reset_ms = math.ceil(reset_after_s * 1000)
        self._budget_remaining = remaining
        self._budget_resets_at = trio.current_time() + reset_after_s
        self._fallback_spent = 0
        try:
            await self._call(self._write_budget(remaining, reset_ms))
        except _Unavailable as exc:
            self._note_outage(exc)
        self._retry_at = [-math.inf] * self._max_concurrency
        self._work.set()

    # -- the tasks -------------------------------------------------------------------------------------------

    async def serve_granter(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant the heads of the queues as their keys come due, forever; run by the opener."""
        task_status.started()
        while True:
            now = trio.current_time()
            due = [key for key, queue in enumerate(self._queues) if queue and self._next_try(key) <= now]
            if not due:
                heads = [self._next_try(key) for key, queue in enumerate(self._queues) if queue]
                with trio.move_on_at(min(heads, default=math.inf)):
                    await self._work.wait()
                self._work = trio.Event()
            elif self._outage_started_at is None:
                await self._grant_through_redis(due)
            else:
                self._grant_locally(due, now)

    async def serve_prober(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """While in fallback, try Redis with backoff and switch back when it answers; run by the opener."""
        task_status.started()
        while True:
            await self._outage.wait()
            backoff_s = OUTAGE_BACKOFF_FIRST_S
            while self._outage_started_at is not None:
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, OUTAGE_BACKOFF_CAP_S)
                await self._try_recover()

    def close(self) -> None:
        """Wake every waiter with ``trio.ClosedResourceError``; called by the opener on exit."""
        self._closed = True
        for queue in self._queues:
            for waiter in queue:
                waiter.wake.set()
            queue.clear()

    # -- granting --------------------------------------------------------------------------------------------

    def _next_try(self, key: int) -> float:
        return max(self._free_at[key], self._retry_at[key])

    async def _grant_through_redis(self, due: list[int]) -> None:
        self._calls += 1
        keys = [self.budget_key, *(self.key(key) for key in due)]
        args = [f"{self._owner}:{self._calls}", str(self._interval_ms), str(self._budget_reserve)]
        try:
            reply = _integers(await self._call(self._grant_script(self._client, keys, args)))
        except _Unavailable as exc:
            self._note_outage(exc)
            return
        # Counted from the reply, which is never earlier than the moment Redis set or measured the key.
        now = trio.current_time()
        budget_left, budget_pttl, *waits = reply
        self._budget_remaining = None if budget_left < 0 else budget_left
        self._budget_resets_at = now + budget_pttl / 1000 if budget_left >= 0 and budget_pttl > 0 else None
        for key, wait_ms in zip(due, waits, strict=True):
            if wait_ms == _GRANTED:
                self._grant(key, now)
            elif wait_ms == _BUDGET_EXHAUSTED:
                wait_s = BUDGET_RECHECK_S if budget_pttl <= 0 else min(BUDGET_RECHECK_S, budget_pttl / 1000)
                self._retry_at[key] = now + wait_s
            else:
                jitter_s = random.uniform(RETRY_JITTER_MIN_S, RETRY_JITTER_MAX_S)
                self._retry_at[key] = now + wait_ms / 1000 + jitter_s

    def _grant_locally(self, due: list[int], now: float) -> None:
        """The fallback: InMemoryIdentifyGate's rule over this process's own grants, in key order."""
        for index, key in enumerate(due):
            if not self._local_budget_allows(now):
                resets_at = self._budget_resets_at
                for blocked in due[index:]:
                    self._retry_at[blocked] = resets_at if resets_at is not None else now + BUDGET_RECHECK_S
                return
            self._grant(key, now)
            self._local_grants += 1
            if self._budget_remaining is not None:
                self._budget_remaining -= 1
                self._fallback_spent += 1

    def _local_budget_allows(self, now: float) -> bool:
        if self._budget_remaining is None:
            return True
        if self._budget_resets_at is not None and now >= self._budget_resets_at:
            self._budget_remaining = self._budget_resets_at = None
            return True
        return self._budget_remaining > self._budget_reserve

    def _grant(self, key: int, now: float) -> None:
        """Key ``key`` was granted at ``now``: its head (if any is left) gets the permit."""
        self._free_at[key] = now + self._interval_s
        queue = self._queues[key]
        if not queue:
            self._wasted_grants += 1  # its waiter was cancelled during the call: the key just expires
            return
        waiter = queue.popleft()
        waiter.granted = True
        waiter.wake.set()
        self._granted += 1
        if queue:
            self._work.set()

    def _withdraw(self, key: int, waiter: _Waiter) -> None:
        queue = self._queues[key]
        if not waiter.granted:
            if waiter in queue:  # not if the gate was closed meanwhile
                queue.remove(waiter)
            return
        # Granted in the instant it was cancelled. Redis can't take the grant back, but the permit belongs to
        # the key: its next waiter gets it now (as InMemoryIdentifyGate's rollback would do), or it's wasted.
        self._granted -= 1
        if queue:
            heir = queue.popleft()
            heir.granted = True
            heir.wake.set()
            self._granted += 1
            if queue:
                self._work.set()
        else:
            self._wasted_grants += 1

    # -- Redis -----------------------------------------------------------------------------------------------

    async def _call(self, call: Awaitable[_T]) -> _T:
        """``await call`` within :data:`CALL_TIMEOUT_S`; any failure is :class:`_Unavailable`. Cancelling
        it leaves the outcome unknown (module docstring)."""
        try:
            with trio.move_on_after(CALL_TIMEOUT_S):
                return await call
        except RedisError as exc:
            raise _Unavailable(str(exc)) from exc
        raise _Unavailable(f"no answer in {CALL_TIMEOUT_S} s")

    async def _write_budget(self, remaining: int, reset_ms: int) -> Reply:
        if reset_ms < 1:
            return await self._client.execute(
                "DEL", self.budget_key
            )  # the reset is now: the budget is unknown
        return await self._client.execute("SET", self.budget_key, remaining, "PX", reset_ms)

    def _note_outage(self, exc: _Unavailable) -> None:
        if self._outage_started_at is not None:
            logger.debug("identify_gate.redis_call_failed", extra={"error": str(exc)})
            return
        self._outage_started_at = trio.current_time()
        self._outage.set()
        logger.warning(
            "identify_gate.redis_unavailable",
            extra={"error": str(exc), "fallback": "local", "interval_s": self._interval_s},
        )

    async def _try_recover(self) -> None:
        """Write this host's recent local grants and spent budget into Redis; on success leave fallback."""
        while True:
            local_grants, spent, now = self._local_grants, self._fallback_spent, trio.current_time()
            held = [key for key in range(self._max_concurrency) if self._free_at[key] > now]
            keys = [self.budget_key, *(self.key(key) for key in held)]
            args: list[Arg] = [
                self._owner,
                str(spent),
                *(str(math.ceil((self._free_at[key] - now) * 1000)) for key in held),
            ]
            try:
                await self._call(self._hold_script(self._client, keys, args))
            except _Unavailable as exc:
                logger.debug("identify_gate.redis_probe_failed", extra={"error": str(exc)})
                return
            self._fallback_spent -= spent
            if self._local_grants == local_grants:
                break  # else a key was granted locally during the call: write it too
        assert self._outage_started_at is not None
        outage_s = trio.current_time() - self._outage_started_at
        self._outage_started_at = None
        self._outage = trio.Event()
        self._retry_at = [-math.inf] * self._max_concurrency  # Redis is the authority again
        self._work.set()
        logger.info(
            "identify_gate.redis_recovered", extra={"outage_s": round(outage_s, 3), "held_keys": len(held)}
        )


@asynccontextmanager
async def open_redis_identify_gate(
    url: str,
    *,
    prefix: str,
    max_concurrency: int,
    interval_s: float = DEFAULT_INTERVAL_S,
    pool_size: int = DEFAULT_POOL_SIZE,
    budget_reserve: int = 0,
) -> AsyncIterator[RedisIdentifyGate]:
    """A :class:`RedisIdentifyGate` whose granter and probe tasks live as long as the ``async with``.

    ``url`` is any URL ``ratelimit.redis_url`` reads (TLS, ACL, unix, Cluster; ValueError for one it cannot
    use). Doesn't connect up front: Redis may be down when the supervisor starts (the gate then starts in
    fallback). Every gate sharing a schedule must use the same ``prefix``, ``max_concurrency`` and
    ``interval_s``. On exit, waiters still queued get ``trio.ClosedResourceError``.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    client = RedisClient.from_url(
        url, timeout_s=ATTEMPT_TIMEOUT_S, max_connections=pool_size, retries=CLIENT_RETRIES
    )
    async with client.closing():
        gate = RedisIdentifyGate(
            client,
            prefix=prefix,
            max_concurrency=max_concurrency,
            interval_s=interval_s,
            budget_reserve=budget_reserve,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(gate.serve_granter)
            await nursery.start(gate.serve_prober)
            try:
                yield gate
            finally:
                gate.close()
                nursery.cancel_scope.cancel()
