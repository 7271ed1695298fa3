"""Bucket math for one Discord REST ratelimit key: (token id, bucket hash, majors). Pure: time is passed in.

Rules (anchors/ratelimit.md 1.3 and 1.4), and why the obvious alternative is wrong:

- R2 unknown buckets: before the first response for a key exactly one probe is in flight; everyone else waits
  for its answer (`try_acquire` returns `math.inf`). Sending N first requests earns up to N-1 429s.
- R3 grants consume capacity, not responses: `remaining` drops and `in_flight` rises at the grant. When our
  local window rolls over we refill to `limit - in_flight`, because a request granted in the old window can
  reach Discord after its reset and count in the new one (discord.py does this). Responses arrive out of
  order, so a header never *raises* `remaining` within a window (we keep `min(local, header)`) and the later
  reset wins. Discord's header does not count our grants that have not arrived yet; the local count does.
- R4 time: the deadline is receive time (monotonic `now`) + `X-RateLimit-Reset-After`. That is late by the
  downlink latency, which is the safe side; the wall-clock `X-RateLimit-Reset` is never read (clock skew of
  1.5-2.5 s has been measured). Because our deadline is never earlier than Discord's reset, a request granted
  after our local rollover reaches Discord in the new window: responses to such grants are authoritative for
  it, while a response to a grant of an earlier window whose deadline is not later than the current one is
  stale and only decrements `in_flight`.
- R6 429 by scope: see `BucketState.on_rate_limited`; the caller applies the returned action (global freeze,
  request-class block) because those live outside this bucket.
- R8 drift: a shrinking limit clamps `remaining`; a growing one only takes effect at the next refill (raising
  `remaining` mid-window would trust a header over the grants we know are in flight). A changed bucket hash is
  recorded in `bucket_hash`; re-keying and moving waiters is the caller's job.
- R9 a grant that never reached Discord (cancelled before sending) returns its capacity: `on_cancel`.

A route that answers without bucket headers is subject to the global limit only (#1135): the key becomes
`global_only` and grants freely until a response carries bucket headers again (the caller caches this with
a TTL, R2). Waiting, FIFO order and the caller-visible maximum wait (R9) belong to the shell.

`BucketState` is a small mutable class rather than a frozen value plus pure functions: every call changes
several counters together, and one object per key matches the shm/Redis backends' one record per key.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BucketBlock",
    "BucketState",
    "BucketStatistics",
    "GlobalFreeze",
    "Grant",
    "RateLimitAction",
    "RateLimitHeaders",
    "RateLimitScope",
    "RateLimited",
    "SublimitBlock",
]

_H_LIMIT: Final = "x-ratelimit-limit"
_H_REMAINING: Final = "x-ratelimit-remaining"
_H_RESET_AFTER: Final = "x-ratelimit-reset-after"
_H_BUCKET: Final = "x-ratelimit-bucket"
_H_SCOPE: Final = "x-ratelimit-scope"
_H_GLOBAL: Final = "x-ratelimit-global"
_H_RETRY_AFTER: Final = "retry-after"


class RateLimitScope(enum.StrEnum):
    """`X-RateLimit-Scope`: whose limit was hit."""

    USER = "user"  # this token's bucket: our accounting was wrong (or another client shares the token)
    GLOBAL = "global"  # this token's global limit
    SHARED = "shared"  # a per-resource limit shared with other users; not an invalid request


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    # httpx.Headers is already case-insensitive, a plain dict is not: normalise once.
    return {key.lower(): value.strip() for key, value in headers.items()}


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) and result >= 0.0 else None


def _int(value: str | None) -> int | None:
    # Integers are documented, but "5.0" costs nothing to accept.
    number = _float(value)
    return None if number is None else int(number)


def _scope(value: str | None) -> RateLimitScope | None:
    if value is None:
        return None
    try:
        return RateLimitScope(value.lower())
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """The bucket headers of one response. `scope` is optional: documented for 429s only."""

    limit: int
    remaining: int
    reset_after: float
    bucket: str | None = None
    scope: RateLimitScope | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> RateLimitHeaders | None:
        """The bucket headers, or None when Limit, Remaining or Reset-After is missing or malformed.

        None means a route without bucket headers (global-only). Floats with any number of decimals are
        accepted; `X-RateLimit-Reset` (wall clock) is ignored on purpose (R4).
        """
        lowered = _lower(headers)
        limit = _int(lowered.get(_H_LIMIT))
        remaining = _int(lowered.get(_H_REMAINING))
        reset_after = _float(lowered.get(_H_RESET_AFTER))
        if limit is None or remaining is None or reset_after is None:
            return None
        return cls(
            limit=limit,
            remaining=min(remaining, limit),
            reset_after=reset_after,
            bucket=lowered.get(_H_BUCKET) or None,
            scope=_scope(lowered.get(_H_SCOPE)),
        )


@dataclass(frozen=True, slots=True)
class RateLimited:
    """What a 429 says: scope, how long to wait, and the Remaining header (sub-limit detection)."""

    retry_after: float
    scope: RateLimitScope | None
    remaining: int | None
    is_global: bool

    @classmethod
    def parse(
        cls, headers: Mapping[str, str], body: Mapping[str, object] | None = None
    ) -> RateLimited | None:
        """Parse a 429. The body's `retry_after` (precise float) wins over `Retry-After` (rounded up).

        None when neither gives a usable wait: not a Discord 429 (the caller treats it as a Cloudflare ban).
        """
        lowered = _lower(headers)
        retry_after: float | None = None
        body_global = False
        if body is not None:
            raw = body.get("retry_after")
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                retry_after = _float(str(raw))
            body_global = body.get("global") is True
        if retry_after is None:
            retry_after = _float(lowered.get(_H_RETRY_AFTER))
        if retry_after is None:
            return None
        scope = _scope(lowered.get(_H_SCOPE))
        is_global = (
            body_global or lowered.get(_H_GLOBAL, "").lower() == "true" or scope is RateLimitScope.GLOBAL
        )
        if is_global and scope is None:
            scope = RateLimitScope.GLOBAL
        return cls(
            retry_after=retry_after,
            scope=scope,
            remaining=_int(lowered.get(_H_REMAINING)),
            is_global=is_global,
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """A permit to send one request. Give it back exactly once: `on_response`, `on_rate_limited` or
    `on_cancel`."""

    window: int  # the bucket's window generation at the grant
    probe: bool  # the single request that learns an unknown bucket (R2)
    counted: bool  # took one from `remaining` (False for probes and global-only routes)
    epoch: int = 0  # the bucket's lease generation at the grant; an expired lease is not given back


@dataclass(frozen=True, slots=True)
class GlobalFreeze:
    """Global 429: freeze the token's `GlobalLimiter` until `until`, then retry."""

    until: float
    counts_as_invalid: bool = True


@dataclass(frozen=True, slots=True)
class BucketBlock:
    """User or shared 429: the whole bucket is closed until `until` (already applied to the state)."""

    until: float
    scope: RateLimitScope
    counts_as_invalid: bool


@dataclass(frozen=True, slots=True)
class SublimitBlock:
    """A hidden sub-limit (429, Remaining > 0, not global): block only this request class (route + body
    signature, keyed by the caller) until `until`. The bucket itself keeps flowing."""

    until: float
    counts_as_invalid: bool = True


RateLimitAction = GlobalFreeze | BucketBlock | SublimitBlock


@dataclass(frozen=True, slots=True)
class BucketStatistics:
    limit: int | None  # None until the first response with bucket headers
    remaining: int
    in_flight: int
    reset_at: float | None  # monotonic deadline of the current window; None if not yet known
    blocked_until: float
    probing: bool
    global_only: bool
    bucket_hash: str | None
    window: int


class BucketState:
    """The ratelimit state of one (token id, bucket hash, majors) key. Pure: time is passed in."""

    def __init__(self, epoch: int = 0) -> None:
        """`epoch`: where the lease generation starts. A record that is recreated after its predecessor
        expired or was evicted starts from a different one, so a grant of the old record is not taken for
        one of the new (the shared model seeds it from the clock)."""
        self._limit: int | None = None
        self._remaining = 0
        self._in_flight = 0
        self._reset_at: float | None = None
        self._blocked_until = -math.inf
        self._probing = False
        self._global_only = False
        self._window = 0
        self._lease_until = -math.inf
        self._epoch = epoch
        self._lost = 0  # grants sent but never answered since the last refill: they may count in the next one
        self._period = 0.0  # the longest Reset-After seen: an upper bound of the window's length
        self.bucket_hash: str | None = None

    def try_acquire(self, now: float, lease_s: float = math.inf) -> Grant | float:
        """A grant (capacity consumed now, R3), or the seconds to wait: until the reset or the end of a
        429 block, or `math.inf` to wait for a response (the probe's, or an in-flight one's).

        `lease_s` (R10): a grant that is not given back within `lease_s` of the latest grant is forgotten, so
        a process that died holding permits (or the probe) blocks nobody for longer than that.
        """
        self.expire_leases(now)
        if now < self._blocked_until:
            return self._blocked_until - now
        if self._global_only:
            return self._grant(probe=False, counted=False, now=now, lease_s=lease_s)
        if self._limit is None:
            if self._probing:
                return math.inf
            return self._grant(probe=True, counted=False, now=now, lease_s=lease_s)
        self._roll(now)
        if self._remaining > 0:
            self._remaining -= 1
            return self._grant(probe=False, counted=True, now=now, lease_s=lease_s)
        if self._reset_at is not None:
            return self._reset_at - now
        if self._in_flight > 0:
            return math.inf  # the first response of the new window tells us its deadline
        # Exhausted, no deadline and nothing in flight (a limit of 0, or a clamp): relearn with one probe.
        return self._grant(probe=True, counted=False, now=now, lease_s=lease_s)

    def expire_leases(self, now: float) -> None:
        if self._in_flight > 0 and now >= self._lease_until:
            # Every outstanding grant is older than its lease: its holder is presumed dead. A later give-back
            # of one of them carries the old epoch and changes nothing.
            self._in_flight = 0
            self._probing = False
            self._epoch += 1

    def lease_deadline(self) -> float:
        """When the outstanding grants' leases end (-inf when nothing is in flight)."""
        return self._lease_until if self._in_flight > 0 else -math.inf

    def adopt(self, headers: RateLimitHeaders, now: float) -> None:
        """Start a key from a response that was granted under another key (a route whose bucket hash was
        unknown when it was sent): first contact for this key, nothing of ours in flight here yet."""
        if self._limit is not None:
            return
        self._limit = headers.limit
        self._remaining = max(0, min(headers.remaining, headers.limit - self._in_flight))
        self._reset_at = now + headers.reset_after
        self._period = max(self._period, headers.reset_after)
        if headers.bucket is not None:
            self.bucket_hash = headers.bucket

    def on_lost(self, grant: Grant, now: float) -> None:
        """`grant` was sent but no answer came (transport error, timeout, cancelled in flight): it may have
        counted at Discord, so its capacity stays consumed.

        It may also have arrived after Discord's reset, in the window our next refill opens, so the refill
        still holds it back (`_lost`) as if it were in flight. With no known deadline (every answer of this
        window lost), the window is assumed to end one observed period from now: the request arrived before
        now, so Discord's window that counted it ends before that. A lost probe of an unknown bucket keeps the
        key until its lease ends. All three found by the Hypothesis machine.
        """
        if grant.probe and self._limit is None and grant.epoch == self._epoch:
            # A lost first request: we know nothing of this bucket but that one request may have counted.
            # The probe stays out until its lease ends rather than sending probe after probe into a window
            # of unknown size.
            return
        self._roll(now)
        if not self._release(grant) or self._limit is None:
            return
        if self._reset_at is None:
            self._reset_at = now + self._period
        else:
            self._lost += 1

    def to_record(self) -> tuple[int, int, int, int, int, int, int, float, float, float, float]:
        """The state as plain numbers, for the shared backends (`from_record` reverses it). The bucket hash
        is not part of it: the shared route map holds it."""
        flags = (1 if self._probing else 0) | (2 if self._global_only else 0)
        limit = -1 if self._limit is None else self._limit
        reset_at = math.nan if self._reset_at is None else self._reset_at
        return (
            limit,
            self._remaining,
            self._in_flight,
            self._window,
            self._epoch,
            flags,
            self._lost,
            reset_at,
            self._blocked_until,
            self._lease_until,
            self._period,
        )

    @classmethod
    def from_record(
        cls, record: tuple[int, int, int, int, int, int, int, float, float, float, float]
    ) -> BucketState:
        (
            limit,
            remaining,
            in_flight,
            window,
            epoch,
            flags,
            lost,
            reset_at,
            blocked_until,
            lease_until,
            period,
        ) = record
        state = cls()
        state._limit = None if limit < 0 else limit
        state._remaining = remaining
        state._in_flight = in_flight
        state._window = window
        state._epoch = epoch
        state._probing = bool(flags & 1)
        state._global_only = bool(flags & 2)
        state._reset_at = None if math.isnan(reset_at) else reset_at
        state._blocked_until = blocked_until
        state._lease_until = lease_until
        state._lost = lost
        state._period = period
        return state

    def on_response(self, headers: RateLimitHeaders | None, now: float, grant: Grant) -> None:
        """A non-429 response to `grant` came at `now`; `headers` None: no bucket headers (global-only).

        The window rolls over *before* the grant is given back: the reset happened before this answer came,
        when the grant was still in flight, so the refill must hold it back (it may have arrived at Discord
        in the new window). Releasing first let one answer of the old window free its slot twice: found by
        the Hypothesis machine in tests/ratelimit/test_model_properties.py.
        """
        self._roll(now)
        self._release(grant)
        if headers is None:
            self._global_only = True
            return
        self._global_only = False
        if headers.bucket is not None:
            self.bucket_hash = headers.bucket
        self._period = max(self._period, headers.reset_after)
        deadline = now + headers.reset_after
        if self._limit is None:  # first contact (R2)
            self._limit = headers.limit
            self._remaining = max(0, min(headers.remaining, headers.limit - self._in_flight))
            self._reset_at = deadline
            return
        self._roll(now)
        if grant.window < self._window:
            # Granted before our rollover: it may describe the window that has ended (R4 note above).
            current_end = now if self._reset_at is None else self._reset_at
            if deadline <= current_end:
                return
        self._limit = headers.limit
        # Never raise within a window (R3); a shrinking limit clamps (R8).
        self._remaining = max(0, min(self._remaining, headers.remaining, headers.limit))
        self._reset_at = deadline if self._reset_at is None else max(self._reset_at, deadline)

    def on_cancel(self, grant: Grant, now: float) -> None:
        """`grant` never reached Discord (R9): its capacity comes back.

        Also after a rollover: the refill subtracted it as in flight, so the new window gets it back.
        """
        self._roll(now)
        if not self._release(grant):
            return
        if grant.counted and self._limit is not None:
            self._remaining = min(self._limit, self._remaining + 1)

    def on_rate_limited(
        self,
        scope: RateLimitScope | None,
        retry_after: float,
        remaining_header: int | None,
        now: float,
        grant: Grant,
    ) -> RateLimitAction:
        """A 429 answered `grant` at `now`. Applies what concerns this bucket and returns the action (R6).

        - global (or scope global): nothing changes here; the caller freezes the global limiter.
        - shared: the bucket is blocked until `now + retry_after`; not an invalid request.
        - Remaining > 0 and not user: a hidden sub-limit; only the request class is blocked, by the caller.
        - user (or no scope): our accounting was wrong; remaining 0 until `now + retry_after`.
        """
        self._roll(now)
        self._release(grant)
        until = now + retry_after
        if scope is RateLimitScope.GLOBAL:
            return GlobalFreeze(until)
        if scope is RateLimitScope.SHARED:
            self._blocked_until = max(self._blocked_until, until)
            return BucketBlock(until, RateLimitScope.SHARED, counts_as_invalid=False)
        if remaining_header is not None and remaining_header > 0:
            return SublimitBlock(until)
        if self._limit is None:
            self._blocked_until = max(self._blocked_until, until)
        else:
            self._roll(now)
            self._remaining = 0
            self._reset_at = until if self._reset_at is None else max(self._reset_at, until)
        return BucketBlock(until, RateLimitScope.USER, counts_as_invalid=True)

    def statistics(self) -> BucketStatistics:
        return BucketStatistics(
            limit=self._limit,
            remaining=self._remaining,
            in_flight=self._in_flight,
            reset_at=self._reset_at,
            blocked_until=self._blocked_until,
            probing=self._probing,
            global_only=self._global_only,
            bucket_hash=self.bucket_hash,
            window=self._window,
        )

    def _grant(self, *, probe: bool, counted: bool, now: float, lease_s: float) -> Grant:
        self._in_flight += 1
        self._lease_until = max(self._lease_until, now + lease_s)
        if probe:
            self._probing = True
        return Grant(window=self._window, probe=probe, counted=counted, epoch=self._epoch)

    def _release(self, grant: Grant) -> bool:
        """Whether the grant was still outstanding (False: its lease had expired and it was forgotten)."""
        if grant.epoch != self._epoch:
            return False
        if self._in_flight == 0:
            raise ValueError("a grant was given back twice, or to another bucket")
        self._in_flight -= 1
        if grant.probe:
            self._probing = False
        return True

    def _roll(self, now: float) -> None:
        """Open a new window if the current one's deadline has passed: refill to `limit - in_flight` (R3)."""
        if self._limit is not None and self._reset_at is not None and now >= self._reset_at:
            self._remaining = max(0, self._limit - self._in_flight - self._lost)
            self._lost = 0
            self._reset_at = None
            self._window += 1
