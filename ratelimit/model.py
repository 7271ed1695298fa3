"""The shared ratelimit state machine: what one acquire and one release decide, over a store of records.

Every process and host that sends with one token must see one state (DESIGN 4, anchors/ratelimit.md R2, R5,
R7): the bucket of a (token, bucket hash, majors) key, the token's global limit, the egress IP's
invalid-request budget, dead tokens and webhooks, sub-limit blocks and Cloudflare bans. This module holds
all the decisions as two atomic operations, `acquire` and `release`, over a `RecordStore` of small binary
records with expiries. The in-process backend runs them on a dict, the shm backend on an `mmap`ed table
under `flock`, and the Redis backend runs the same steps in Lua (`redis_scripts.py`); the contract suite
checks that all three answer alike.

Records (the key strings; a backend may prefix or hash them):

- `map|{token}|{route}`: the bucket hash Discord gave this route (R1, R2), "" for a route that answers
  without bucket headers (global-only, #1135); expires after `map_ttl_s` / `global_only_ttl_s`.
- `bkt|{token}|{bucket}|{major}`: a `BucketState`; `bucket` is the hash, or `?{route}` while the hash is
  unknown (the shared probe of R2 is taken there, so N processes send one first request, not N).
- `glb|{token}`: the global GCRA state (R5), asked at dispatch, never for interaction routes.
- `inv|{ip}`: the invalid-request budget of an egress IP (R7), `ban|{ip}`: a Cloudflare ban (non-JSON 429).
- `dead|{token}` (a 401 to the bot token), `hook|{webhook}` (a dead webhook, with a TTL), and
  `sub|{token}|{signature}|{major}` (a hidden sub-limit block, R6).

Order inside `acquire` (why): refusals first (ban, dead credentials, budget) so that nothing is counted for a
request that will not be sent; the global limit is *checked* before the bucket and *taken* after it, so a
request that waits for its bucket holds no global slot and a request that waits for the global limit holds
no bucket capacity. Waits are durations (seconds), valid in any clock domain; `math.inf` means "until a
response or a lease expiry changes something" (a probe in flight).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from ratelimit.buckets import (
    BucketState,
    GlobalFreeze,
    Grant,
    RateLimitAction,
    RateLimited,
    RateLimitHeaders,
    RateLimitScope,
    SublimitBlock,
)
from ratelimit.global_limit import (
    DEFAULT_GLOBAL_RATE,
    DEFAULT_JITTER_MARGIN_S,
    GLOBAL_WINDOW_S,
    GlobalLimiter,
)
from ratelimit.invalid import (
    DEFAULT_INVALID_LIMIT,
    DEFAULT_INVALID_WINDOW_S,
    DEFAULT_WEBHOOK_TTL_S,
    TOKEN_REVOKED,
    WEBHOOK_DEAD,
    InvalidRequestBudget,
    health_verdict,
)

__all__ = [
    "EPOCH_MODULUS",
    "INVALID_BUDGET",
    "MAX_PAYLOAD",
    "Ask",
    "EngineConfig",
    "MemoryStore",
    "Outcome",
    "Permit",
    "RecordStore",
    "Refusal",
    "Wait",
    "WaitReason",
    "acquire",
    "bucket_key",
    "release",
]

#: The reason `acquire` gives when the egress IP's invalid-request budget refuses a request.
INVALID_BUDGET: Final = "invalid_budget"
#: The largest record payload in bytes (the shm table's slot size is built on it).
MAX_PAYLOAD: Final = 104

WaitReason = Literal["ban", "sublimit", "global", "bucket", "probe", "blocked"]

#: Epochs are kept below 2**31 so that every backend stores them exactly.
EPOCH_MODULUS: Final = 2**31
_BUCKET: Final = struct.Struct("<qqqqqqqdddd")  # BucketState.to_record
_GLOBAL: Final = struct.Struct("<dd")
_UNTIL: Final = struct.Struct("<d")
_INVALID_PAIRS: Final = (MAX_PAYLOAD - 8) // 8  # (index, count) int32 pairs after the int64 peak


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tunables shared by every backend. The same values must be used by every process sharing a store."""

    global_rate: int = DEFAULT_GLOBAL_RATE  # DISCORD_GLOBAL_LIMIT
    global_window_s: float = GLOBAL_WINDOW_S
    jitter_margin_s: float = DEFAULT_JITTER_MARGIN_S
    #: A grant not given back within this long of the bucket's latest grant is forgotten (R10).
    lease_s: float = 10.0
    map_ttl_s: float = 24 * 3600.0  # route -> bucket hash (discord.js keeps 24 h)
    global_only_ttl_s: float = 3600.0  # route -> "no bucket headers"
    #: An idle bucket record lives this long past its reset (and past any block or lease).
    idle_ttl_s: float = 300.0
    invalid_limit: int = DEFAULT_INVALID_LIMIT
    invalid_window_s: float = DEFAULT_INVALID_WINDOW_S
    #: Sub-buckets of the shared invalid-request window: fewer than the pure budget's 60 so the record fits
    #: one slot; the count errs high by less than one sub-bucket (the safe side).
    invalid_sub_buckets: int = 10
    shed_at: float = 0.5
    stop_at: float = 0.95
    webhook_ttl_s: float = DEFAULT_WEBHOOK_TTL_S
    #: How long a non-JSON (Cloudflare) 429 stops all traffic of the IP when it names no Retry-After.
    ban_s: float = 60.0
    #: How long a 401 to the bot token stops every request with it. Not forever: a token restored on
    #: Discord's side then costs one 401 per period instead of a restart of every process.
    dead_token_s: float = 3600.0
    #: Conservative mode (R10, the fallback while Redis is unreachable): at most this many grants in flight
    #: per bucket; None for no cap.
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.global_rate < 2:
            raise ValueError(f"global_rate must be at least 2, got {self.global_rate}")
        if self.invalid_sub_buckets + 1 > _INVALID_PAIRS:
            raise ValueError(f"invalid_sub_buckets must be at most {_INVALID_PAIRS - 1}")
        if not (self.lease_s > 0 and self.map_ttl_s > 0 and self.global_only_ttl_s > 0 and self.ban_s > 0):
            raise ValueError("lease_s, map_ttl_s, global_only_ttl_s and ban_s must be positive")

    def global_limiter(self) -> GlobalLimiter:
        return GlobalLimiter(
            self.global_rate, window_s=self.global_window_s, jitter_margin_s=self.jitter_margin_s
        )

    def invalid_budget(self) -> InvalidRequestBudget:
        return InvalidRequestBudget(
            self.invalid_limit,
            self.invalid_window_s,
            shed_at=self.shed_at,
            warn_at=min(0.25, self.shed_at),
            stop_at=self.stop_at,
            sub_buckets=self.invalid_sub_buckets,
        )


class RecordStore(Protocol):
    """Binary records with expiries, in the clock domain of the `now` passed to the model. Not thread-safe:
    the backend makes one `acquire`/`release` atomic (a lock, or a Lua script)."""

    def get(self, key: str, now: float) -> bytes | None:
        """The payload, or None when there is none or it has expired at `now`."""
        ...

    def put(self, key: str, payload: bytes, expires_at: float) -> None:
        """Store `payload` (at most `MAX_PAYLOAD` bytes) until `expires_at` (`math.inf`: no expiry)."""
        ...

    def delete(self, key: str) -> None: ...


@dataclass
class MemoryStore:
    """A `RecordStore` on a dict: one process's own state, and the reference the other stores are tested
    against. Expired records are dropped lazily and by `sweep`."""

    records: dict[str, tuple[bytes, float]] = field(default_factory=dict)

    def get(self, key: str, now: float) -> bytes | None:
        entry = self.records.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            del self.records[key]
            return None
        return entry[0]

    def put(self, key: str, payload: bytes, expires_at: float) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"record payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
        self.records[key] = (payload, expires_at)

    def delete(self, key: str) -> None:
        self.records.pop(key, None)

    def sweep(self, now: float) -> int:
        """Drop every expired record; how many."""
        expired = [key for key, (_, expires_at) in self.records.items() if now >= expires_at]
        for key in expired:
            del self.records[key]
        return len(expired)


# --- what callers pass and get --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    """One request that wants to be sent, reduced to what the limits need. No secret is in it: `token` is
    `routes.token_id(...)` of the Authorization ("" for none), `webhook` names a webhook by id and token
    digest."""

    token: str
    route: str  # RouteKey.route
    major: str  # "|".join(RouteKey.majors)
    exempt: bool = False  # interaction routes: never asked of the global limit (R5)
    signature: str = ""  # the request class of hidden sub-limits (invalid.signature); "" = the route
    webhook: str | None = None  # set when the request is authenticated by a token in its path
    ip: str = "local"  # the egress IP (the invalid-request budget and bans are per IP)
    optional: bool = False  # may be shed first when the invalid-request budget runs low

    @property
    def request_class(self) -> str:
        return self.signature or self.route


@dataclass(frozen=True, slots=True)
class Permit:
    """A grant to send one request. Give it back exactly once with `release`."""

    ask: Ask
    bucket: str | None  # the bucket record's key; None for a global-only route
    grant: Grant | None
    global_counted: bool
    granted_at: float  # in the backend's clock domain


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: ask again after `seconds` (`math.inf`: after a response changes something)."""

    seconds: float
    reason: WaitReason


@dataclass(frozen=True, slots=True)
class Refusal:
    """Never: the credentials are dead (`TOKEN_REVOKED`, `WEBHOOK_DEAD`) or the invalid-request budget is
    spent (`INVALID_BUDGET`). The request must fail without being sent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a permit.

    - `response`: Discord answered with a status other than 429 (`headers`: its bucket headers, None when
      it had none; `code`: the JSON error code of an error body, if any).
    - `limited`: a 429; `limited` is the parsed Discord 429, or None for a non-JSON (Cloudflare) 429, whose
      `ban_s` (its Retry-After, if any) is used for the ban.
    - `cancel`: the request never left; everything it took comes back (R9).
    - `lost`: it left but no answer came; its capacity stays spent.
    """

    kind: Literal["response", "limited", "cancel", "lost"]
    status: int = 0
    headers: RateLimitHeaders | None = None
    code: int | None = None
    limited: RateLimited | None = None
    ban_s: float | None = None

    @property
    def scope(self) -> str | None:
        return None if self.limited is None or self.limited.scope is None else str(self.limited.scope)


# --- keys -----------------------------------------------------------------------------------------


def map_key(token: str, route: str) -> str:
    return f"map|{token}|{route}"


def bucket_key(token: str, bucket: str, major: str) -> str:
    """The bucket record's key; `bucket` is a Discord hash, or `?{route}` while the hash is unknown."""
    return f"bkt|{token}|{bucket}|{major}"


def global_key(token: str) -> str:
    return f"glb|{token}"


def invalid_key(ip: str) -> str:
    return f"inv|{ip}"


def ban_key(ip: str) -> str:
    return f"ban|{ip}"


def dead_key(token: str) -> str:
    return f"dead|{token}"


def hook_key(webhook: str) -> str:
    return f"hook|{webhook}"


def sublimit_key(token: str, request_class: str, major: str) -> str:
    return f"sub|{token}|{request_class}|{major}"


# --- records --------------------------------------------------------------------------------------


def _until(store: RecordStore, key: str, now: float) -> float:
    payload = store.get(key, now)
    return -math.inf if payload is None else float(_UNTIL.unpack(payload)[0])


def _put_until(store: RecordStore, key: str, until: float) -> None:
    previous = store.get(key, -math.inf)
    if previous is not None:
        until = max(until, float(_UNTIL.unpack(previous)[0]))
    store.put(key, _UNTIL.pack(until), until)


def new_epoch(now: float) -> int:
    """The first lease generation of a bucket record created at `now`: different for a record recreated
    later, so a grant of an expired or evicted predecessor is never given back to it (Lua mirrors this)."""
    return math.floor(now * 1000.0) % EPOCH_MODULUS


def load_bucket(store: RecordStore, key: str, now: float) -> BucketState:
    payload = store.get(key, now)
    if payload is None:
        return BucketState(new_epoch(now))
    return BucketState.from_record(_BUCKET.unpack(payload))


def save_bucket(store: RecordStore, key: str, state: BucketState, config: EngineConfig, now: float) -> None:
    record = state.to_record()
    reset_at = record[7]
    horizon = max(now, record[8], record[9], now if math.isnan(reset_at) else reset_at)
    store.put(key, _BUCKET.pack(*record), horizon + config.idle_ttl_s)


def load_global(store: RecordStore, token: str, config: EngineConfig, now: float) -> GlobalLimiter:
    limiter = config.global_limiter()
    payload = store.get(global_key(token), now)
    if payload is not None:
        limiter.load_record(_GLOBAL.unpack(payload))
    return limiter


def save_global(store: RecordStore, token: str, limiter: GlobalLimiter, config: EngineConfig) -> None:
    tat, frozen_until = limiter.to_record()
    # Once TAT and any freeze are in the past the record says nothing a fresh one would not.
    store.put(
        global_key(token), _GLOBAL.pack(tat, frozen_until), max(tat, frozen_until) + config.global_window_s
    )


def load_invalid(store: RecordStore, ip: str, config: EngineConfig, now: float) -> InvalidRequestBudget:
    return _budget(store.get(invalid_key(ip), now), config)


def _budget(payload: bytes | None, config: EngineConfig) -> InvalidRequestBudget:
    budget = config.invalid_budget()
    if payload is not None:
        peak = struct.unpack_from("<q", payload)[0]
        pairs = struct.unpack_from(f"<{(len(payload) - 8) // 4}i", payload, 8)
        budget.load_record((peak, *pairs))
    return budget


def save_invalid(
    store: RecordStore, ip: str, budget: InvalidRequestBudget, config: EngineConfig, now: float
) -> None:
    record = budget.to_record()
    payload = struct.pack("<q", record[0]) + struct.pack(f"<{len(record) - 1}i", *record[1:])
    store.put(invalid_key(ip), payload, now + config.invalid_window_s + budget.sub_bucket_s)


def route_bucket(store: RecordStore, ask: Ask, now: float) -> str | None:
    """The bucket record key of `ask`: by the learned hash, by route while unknown, None if global-only."""
    payload = store.get(map_key(ask.token, ask.route), now)
    if payload is None:
        return bucket_key(ask.token, "?" + ask.route, ask.major)
    if not payload:
        return None
    return bucket_key(ask.token, payload.decode(), ask.major)


# --- the two operations ---------------------------------------------------------------------------


def acquire(store: RecordStore, ask: Ask, now: float, config: EngineConfig) -> Permit | Wait | Refusal:
    """Grant `ask` now (taking bucket capacity and a global slot), or say how long to wait, or refuse it."""
    banned = _until(store, ban_key(ask.ip), now)
    if banned > now:
        return Wait(banned - now, "ban")
    if ask.webhook is not None:
        if _until(store, hook_key(ask.webhook), now) > now:
            return Refusal(WEBHOOK_DEAD)
    elif ask.token and store.get(dead_key(ask.token), now) is not None:
        return Refusal(TOKEN_REVOKED)
    invalid = store.get(invalid_key(ask.ip), now)
    if invalid is not None and not _budget(invalid, config).allows(ask.optional, now):
        return Refusal(INVALID_BUDGET)
    blocked = _until(store, sublimit_key(ask.token, ask.request_class, ask.major), now)
    if blocked > now:
        return Wait(blocked - now, "sublimit")
    limiter: GlobalLimiter | None = None
    if not ask.exempt:
        limiter = load_global(store, ask.token, config, now)
        wait = limiter.wait_s(now)
        if wait > 0.0:
            return Wait(wait, "global")
    key = route_bucket(store, ask, now)
    grant: Grant | None = None
    if key is not None:
        state = load_bucket(store, key, now)
        state.expire_leases(now)
        stats = state.statistics()
        if config.max_in_flight is not None and stats.in_flight >= config.max_in_flight:
            save_bucket(store, key, state, config, now)
            return Wait(state.lease_deadline() - now, "probe")
        result = state.try_acquire(now, config.lease_s)
        if not isinstance(result, Grant):
            save_bucket(store, key, state, config, now)
            if math.isinf(result):
                # Waiting for a response; no later than the in-flight leases' end.
                lease_left = state.lease_deadline() - now
                return Wait(lease_left if math.isfinite(lease_left) and lease_left > 0 else math.inf, "probe")
            reason: WaitReason = "blocked" if stats.blocked_until > now else "bucket"
            return Wait(result, reason)
        grant = result
        save_bucket(store, key, state, config, now)
    if limiter is not None:
        limiter.try_acquire(now)
        save_global(store, ask.token, limiter, config)
    return Permit(ask=ask, bucket=key, grant=grant, global_counted=limiter is not None, granted_at=now)


def effective_kind(outcome: Outcome) -> Literal["response", "limited", "cancel", "lost"]:
    """How the bucket takes an outcome: an error answer without bucket headers (a 5xx from a proxy on the
    way, a 4xx of a route that sends none) says nothing of the bucket, so it counts as lost (its capacity
    stays spent) rather than teaching that the route has no bucket."""
    if outcome.kind == "response" and outcome.headers is None and outcome.status >= 400:
        return "lost"
    return outcome.kind


def learns_route(outcome: Outcome) -> bool:
    """Whether the answer teaches the route map: its bucket hash, or (a success without bucket headers)
    that the route is global-only."""
    return effective_kind(outcome) == "response" and outcome.status < 500


def classify_429(limited: RateLimited, now: float) -> GlobalFreeze | SublimitBlock | None:
    """What a 429 means beyond its bucket, when there is no bucket record to ask (a global-only route, or a
    record that expired while the request was out)."""
    if limited.scope is RateLimitScope.GLOBAL:
        return GlobalFreeze(now + limited.retry_after)
    if limited.scope is not RateLimitScope.SHARED and limited.remaining is not None and limited.remaining > 0:
        return SublimitBlock(now + limited.retry_after)
    return None


def release(store: RecordStore, permit: Permit, outcome: Outcome, now: float, config: EngineConfig) -> None:
    """Give `permit` back with what became of it, and apply everything the answer says (R2-R8)."""
    ask = permit.ask
    kind = effective_kind(outcome)
    action: RateLimitAction | None = None
    handled = False
    if permit.bucket is not None and permit.grant is not None:
        # A record that expired (or was evicted) holds nothing of this grant: skip the give-back.
        payload = store.get(permit.bucket, now)
        if payload is not None:
            handled = True
            state = BucketState.from_record(_BUCKET.unpack(payload))
            if kind == "cancel":
                state.on_cancel(permit.grant, now)
            elif kind == "lost":
                state.on_lost(permit.grant, now)
            elif kind == "response":
                state.on_response(outcome.headers, now, permit.grant)
            elif outcome.limited is not None:
                limited = outcome.limited
                action = state.on_rate_limited(
                    limited.scope, limited.retry_after, limited.remaining, now, permit.grant
                )
            else:
                state.on_lost(permit.grant, now)  # Cloudflare: the ban below stops everything
            save_bucket(store, permit.bucket, state, config, now)
    if not handled and outcome.kind == "limited" and outcome.limited is not None:
        action = classify_429(outcome.limited, now)
    if learns_route(outcome):
        _learn_route(store, permit, outcome.headers, now, config)
    refund = permit.global_counted and outcome.kind == "cancel"
    # A global 429 freezes the token, unless it answered an (exempt) interaction route.
    freeze = action.until if isinstance(action, GlobalFreeze) and not ask.exempt else None
    if refund or freeze is not None:
        limiter = load_global(store, ask.token, config, now)
        if refund:
            limiter.refund(now)
        if freeze is not None:
            limiter.freeze(freeze)
        save_global(store, ask.token, limiter, config)
    if isinstance(action, SublimitBlock):
        _put_until(store, sublimit_key(ask.token, ask.request_class, ask.major), action.until)
    if outcome.kind in ("response", "limited"):
        _record_invalid(store, ask, outcome, now, config)
    if outcome.kind == "limited" and outcome.limited is None:
        _put_until(store, ban_key(ask.ip), now + (outcome.ban_s if outcome.ban_s else config.ban_s))
    if outcome.kind == "response":
        verdict = health_verdict(
            outcome.status, outcome.code, token_id=ask.token, webhook=ask.webhook is not None
        )
        if verdict == WEBHOOK_DEAD and ask.webhook is not None:
            _put_until(store, hook_key(ask.webhook), now + config.webhook_ttl_s)
        elif verdict == TOKEN_REVOKED:
            store.put(dead_key(ask.token), b"\x01", now + config.dead_token_s)


def _learn_route(
    store: RecordStore, permit: Permit, headers: RateLimitHeaders | None, now: float, config: EngineConfig
) -> None:
    """Record route -> bucket hash (R2) and start the hashed key from the response that revealed it (R8: a
    changed hash simply points the route at the new key; waiters find it when they ask again)."""
    ask = permit.ask
    key = map_key(ask.token, ask.route)
    if headers is None:
        if store.get(key, now) != b"":
            store.put(key, b"", now + config.global_only_ttl_s)
        return
    if headers.bucket is None:
        return
    learned = headers.bucket.encode()
    if store.get(key, now) != learned:
        store.put(key, learned, now + config.map_ttl_s)
    target = bucket_key(ask.token, headers.bucket, ask.major)
    if target != permit.bucket:
        state = load_bucket(store, target, now)
        if state.statistics().limit is None:
            state.adopt(headers, now)
            save_bucket(store, target, state, config, now)


def _record_invalid(store: RecordStore, ask: Ask, outcome: Outcome, now: float, config: EngineConfig) -> None:
    scope = outcome.scope
    if not InvalidRequestBudget.counts(outcome.status, scope):
        return
    budget = load_invalid(store, ask.ip, config, now)
    budget.record(outcome.status, scope, now)
    save_invalid(store, ask.ip, budget, config, now)
