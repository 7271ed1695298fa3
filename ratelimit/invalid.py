"""Invalid-request budget (R7), token/webhook health (R7) and sub-limit blocks (R6). Pure: time is passed in.

Rules (anchors/ratelimit.md 1.2, R6, R7, scenario 5.3.7), and why the obvious alternative is wrong:

- Invalid-request budget. Discord bans an egress IP at Cloudflare for a while after 10,000 responses with
  status 401, 403 or 429 in 10 minutes; 429s with `X-RateLimit-Scope: shared` do not count. The goal is
  never to come near the ban, so `InvalidRequestBudget` keeps a rolling count and refuses traffic early:
  optional traffic (retries, prefetches, anything a caller marked as sheddable) from `shed_at` of the limit
  (50 % by default, the scenario-7 ceiling), everything from `stop_at` (95 %), and `level` says "warn" from
  `warn_at` (25 %) so an operator hears of it long before anything is shed. A log of timestamps would be
  exact but grows with the storm it measures; a single fixed window lets 2x the limit through across its
  edge. So the window is cut into fixed sub-buckets (60 x 10 s by default) and the count covers the current
  sub-bucket and the `n` before it: every response of the last `window_s` is counted, plus at most one
  sub-bucket of older ones, so the count errs high (the safe side) by less than one sub-bucket and memory
  is `n + 1` counters whatever the rate. One budget per egress IP; the shm/Redis backends keep the same
  counters in one record per IP so that every process on that IP shares them.
- Token health. A 401 to a request sent with the bot token means the token is revoked: every later request
  with it would be another 401 against the IP's budget, so the token is marked dead and `check` fails
  requests fast without sending them (twilight and nirn do this). A dead token stays dead until `revive`
  (a configuration reload). A request authenticated by a webhook or interaction token in its path is
  different: its 401 (code 50027, "Invalid Webhook Token", which is also what an expired interaction token
  gives) or a 404 saying the webhook is unknown (code 10015, or no JSON code) only marks *that webhook*
  dead, in a negative cache with an expiry (1 h by default) - never the bot token, which nirn got wrong
  (nirn #23: a storm of dead-webhook 401s took the bot offline). A 404 with another code (10008, Unknown
  Message, on a follow-up message route) is about the message, not the webhook, and marks nothing.
- Sub-limits. A 429 with `Remaining > 0` that is not global is a hidden sub-limit (#2190): it blocks only the
  offending request class, not the bucket (`BucketState.on_rate_limited` returns a `SublimitBlock` and the
  caller records it here). The class is the route plus a body signature, as discord.js's `hasSublimit`:
  a PATCH of `/channels/{channel_id}` whose body sets `name` or `topic` is its own class (2 per 10 min,
  #1909), any other request's class is its route. Blocks are kept per (class, major) so that the same edit on
  another channel still flows, and expire; the table is bounded by `max_entries` (the entry expiring first
  is evicted, which at worst costs one more 429 of that class).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DEFAULT_INVALID_LIMIT",
    "DEFAULT_INVALID_WINDOW_S",
    "DEFAULT_WEBHOOK_TTL_S",
    "INVALID_WEBHOOK_TOKEN",
    "SUBLIMITED_CHANNEL_FIELDS",
    "TOKEN_REVOKED",
    "UNKNOWN_WEBHOOK",
    "WEBHOOK_DEAD",
    "InvalidRequestBudget",
    "InvalidStatistics",
    "Level",
    "SublimitStatistics",
    "SublimitTable",
    "TokenHealth",
    "TokenHealthStatistics",
    "health_verdict",
    "signature",
]

DEFAULT_INVALID_LIMIT: Final = 10_000  # 401/403/non-shared 429 responses per window per egress IP
DEFAULT_INVALID_WINDOW_S: Final = 600.0
DEFAULT_SUB_BUCKETS: Final = 60
DEFAULT_WEBHOOK_TTL_S: Final = 3600.0

#: Discord JSON error codes.
INVALID_WEBHOOK_TOKEN: Final = 50027
UNKNOWN_WEBHOOK: Final = 10015

#: Reasons `TokenHealth.check` gives for not sending a request.
TOKEN_REVOKED: Final = "token_revoked"
WEBHOOK_DEAD: Final = "webhook_dead"

#: Body fields of `PATCH /channels/{channel_id}` that fall under the hidden name/topic sub-limit (#1909).
SUBLIMITED_CHANNEL_FIELDS: Final = frozenset({"name", "topic"})
_CHANNEL_TEMPLATE: Final = "/channels/{channel_id}"

Level = Literal["ok", "warn", "shed"]


# --- invalid-request budget ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvalidStatistics:
    limit: int
    window_s: float
    count: int  # in the current window (errs high by less than one sub-bucket)
    level: Level
    counted: int  # all invalid responses recorded
    ignored: int  # responses recorded that do not count (shared 429s, other statuses)
    peak_count: int
    peak_fraction: float


class InvalidRequestBudget:
    """Rolling count of one egress IP's invalid responses, and the shedding decision built on it."""

    def __init__(
        self,
        limit: int = DEFAULT_INVALID_LIMIT,
        window_s: float = DEFAULT_INVALID_WINDOW_S,
        *,
        shed_at: float = 0.5,
        warn_at: float = 0.25,
        stop_at: float = 0.95,
        sub_buckets: int = DEFAULT_SUB_BUCKETS,
    ) -> None:
        if limit < 1 or not (window_s > 0.0 and math.isfinite(window_s)) or sub_buckets < 1:
            raise ValueError("limit and sub_buckets must be at least 1 and window_s positive")
        if not 0.0 < warn_at <= shed_at <= stop_at <= 1.0:
            raise ValueError(
                f"need 0 < warn_at <= shed_at <= stop_at <= 1; got {warn_at}, {shed_at}, {stop_at}"
            )
        self.limit = limit
        self.window_s = window_s
        self.warn_at = warn_at
        self.shed_at = shed_at
        self.stop_at = stop_at
        self.sub_buckets = sub_buckets
        self.sub_bucket_s = window_s / sub_buckets
        # (sub-bucket index, count), indices strictly increasing; at most sub_buckets + 1 entries.
        self._counts: deque[list[int]] = deque()
        self._total = 0  # sum of the counts in `_counts`
        self._counted = 0
        self._ignored = 0
        self._peak = 0

    @staticmethod
    def counts(status: int, scope: str | None) -> bool:
        """Whether Discord counts this response against the IP: 401, 403, and 429 unless scope is shared."""
        if status in (401, 403):
            return True
        return status == 429 and (scope is None or scope.lower() != "shared")

    def record(self, status: int, scope: str | None, now: float) -> bool:
        """Record one response; True if it counted. `scope` is `X-RateLimit-Scope` (a `RateLimitScope` is a
        str); a 429 without one (a Cloudflare ban page, say) counts."""
        if not self.counts(status, scope):
            self._ignored += 1
            return False
        index = self._index(now)
        self._expire(index)
        if self._counts and self._counts[-1][0] >= index:
            # A `now` older than the newest sub-bucket (a caller's stale clock read) lands in the newest one:
            # counted a little longer, never shorter.
            self._counts[-1][1] += 1
        else:
            self._counts.append([index, 1])
        self._total += 1
        self._counted += 1
        self._peak = max(self._peak, self._total)
        return True

    def count(self, now: float) -> int:
        """Invalid responses in the window ending at `now`: all of the last `window_s`, plus those of the
        older part of the oldest sub-bucket."""
        self._expire(self._index(now))
        return self._total

    def level(self, now: float) -> Level:
        count = self.count(now)
        if count >= self.shed_at * self.limit:
            return "shed"
        if count >= self.warn_at * self.limit:
            return "warn"
        return "ok"

    def allows(self, optional: bool, now: float) -> bool:
        """Whether a request may be sent: optional ones below `shed_at` of the limit, all below `stop_at`."""
        threshold = self.shed_at if optional else self.stop_at
        return self.count(now) < threshold * self.limit

    @property
    def peak_fraction(self) -> float:
        """The highest count any window has held, as a fraction of the limit."""
        return self._peak / self.limit

    def statistics(self, now: float) -> InvalidStatistics:
        return InvalidStatistics(
            limit=self.limit,
            window_s=self.window_s,
            count=self.count(now),
            level=self.level(now),
            counted=self._counted,
            ignored=self._ignored,
            peak_count=self._peak,
            peak_fraction=self.peak_fraction,
        )

    def to_record(self) -> tuple[int, ...]:
        """The rolling counts as plain integers (peak, then index/count pairs), for the shared backends."""
        flat: list[int] = [self._peak]
        for index, count in self._counts:
            flat.extend((index, count))
        return tuple(flat)

    def load_record(self, record: tuple[int, ...]) -> None:
        self._peak = record[0] if record else 0
        pairs = record[1:]
        self._counts = deque([pairs[i], pairs[i + 1]] for i in range(0, len(pairs) - 1, 2))
        self._total = sum(count for _, count in self._counts)

    def _index(self, now: float) -> int:
        return math.floor(now / self.sub_bucket_s)

    def _expire(self, index: int) -> None:
        oldest = index - self.sub_buckets
        while self._counts and self._counts[0][0] < oldest:
            self._total -= self._counts.popleft()[1]


# --- token and webhook health -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenHealthStatistics:
    dead_tokens: int
    dead_webhooks: int  # entries in the negative cache, expired ones not yet pruned included
    refused: int  # requests `check` failed fast


def health_verdict(status: int, code: int | None, *, token_id: str, webhook: bool) -> str | None:
    """What one response says about the credentials that sent it: `WEBHOOK_DEAD` (a request authenticated by
    a webhook or interaction token in its path: 401, code 50027, or 404 Unknown Webhook / no code),
    `TOKEN_REVOKED` (a 401 to a request sent with the bot token), or None."""
    if webhook:
        if (
            status == 401
            or code == INVALID_WEBHOOK_TOKEN
            or (status == 404 and code in (None, UNKNOWN_WEBHOOK))
        ):
            return WEBHOOK_DEAD
        return None
    if status == 401 and code != INVALID_WEBHOOK_TOKEN and token_id:
        return TOKEN_REVOKED
    return None


class TokenHealth:
    """Dead bot tokens (until `revive`) and a bounded negative cache of dead webhooks.

    `token_id` is `routes.token_id(...)` of the request's Authorization; `webhook_key` names the webhook of a
    request authenticated by a webhook or interaction token in its path (for instance `"|".join(majors)` of
    its `RouteKey`: webhook id and token digest), None for every other request.
    """

    def __init__(self, *, webhook_ttl_s: float = DEFAULT_WEBHOOK_TTL_S, max_webhooks: int = 100_000) -> None:
        if webhook_ttl_s <= 0.0 or max_webhooks < 1:
            raise ValueError("webhook_ttl_s must be positive and max_webhooks at least 1")
        self.webhook_ttl_s = webhook_ttl_s
        self.max_webhooks = max_webhooks
        self._dead_tokens: set[str] = set()
        # webhook key -> expiry; insertion order is expiry order (constant TTL, monotonic `now`).
        self._dead_webhooks: dict[str, float] = {}
        self._refused = 0

    def record(
        self, status: int, code: int | None, *, token_id: str, webhook_key: str | None, now: float
    ) -> str | None:
        """Apply one response (`code`: its JSON error code, or None); the reason it marked, or None."""
        verdict = health_verdict(status, code, token_id=token_id, webhook=webhook_key is not None)
        if webhook_key is not None:
            if verdict == WEBHOOK_DEAD:
                self._dead_webhooks.pop(webhook_key, None)  # re-insert at the end: expiry order holds
                self._dead_webhooks[webhook_key] = now + self.webhook_ttl_s
                self._prune(now)
                while len(self._dead_webhooks) > self.max_webhooks:
                    del self._dead_webhooks[next(iter(self._dead_webhooks))]
                return WEBHOOK_DEAD
            return None
        if verdict == TOKEN_REVOKED:
            self._dead_tokens.add(token_id)
        return verdict

    def check(self, token_id: str, webhook_key: str | None, now: float) -> str | None:
        """The reason a request must not be sent (`TOKEN_REVOKED`, `WEBHOOK_DEAD`), or None."""
        reason: str | None = None
        if webhook_key is not None:
            expiry = self._dead_webhooks.get(webhook_key)
            if expiry is not None:
                if now < expiry:
                    reason = WEBHOOK_DEAD
                else:
                    self._prune(now)
        elif token_id in self._dead_tokens:
            reason = TOKEN_REVOKED
        if reason is not None:
            self._refused += 1
        return reason

    def revive(self, token_id: str) -> None:
        """The token was replaced or re-validated (configuration reload)."""
        self._dead_tokens.discard(token_id)

    def statistics(self) -> TokenHealthStatistics:
        return TokenHealthStatistics(
            dead_tokens=len(self._dead_tokens), dead_webhooks=len(self._dead_webhooks), refused=self._refused
        )

    def _prune(self, now: float) -> None:
        while self._dead_webhooks:
            key, expiry = next(iter(self._dead_webhooks.items()))
            if expiry > now:
                return
            del self._dead_webhooks[key]


# --- sub-limits ----------------------------------------------------------------------------------------


def signature(method: str, template: str, body_keys: frozenset[str]) -> str:
    """The request class a sub-limit applies to: the route, or for a PATCH of a channel that sets `name` or
    `topic` the route plus a marker (discord.js `hasSublimit`)."""
    route = f"{method.upper()} {template}"
    if route == "PATCH " + _CHANNEL_TEMPLATE and body_keys & SUBLIMITED_CHANNEL_FIELDS:
        return route + " +name/topic"
    return route


@dataclass(frozen=True, slots=True)
class SublimitStatistics:
    entries: int
    blocks: int  # `block` calls
    evicted: int  # entries dropped by the size cap before they expired


class SublimitTable:
    """Blocks of request classes by hidden sub-limits, per (signature, major), each until its deadline."""

    signature = staticmethod(signature)

    def __init__(self, *, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._until: dict[tuple[str, str], float] = {}
        # (until, signature, major); stale when the dict holds a later deadline or none.
        self._heap: list[tuple[float, str, str]] = []
        self._blocks = 0
        self._evicted = 0

    def block(self, signature: str, major: str, until: float) -> None:
        """Nothing of this class on this major before `until` (a block never shortens an earlier one)."""
        key = (signature, major)
        current = self._until.get(key)
        self._blocks += 1
        if current is not None and current >= until:
            return
        self._until[key] = until
        heapq.heappush(self._heap, (until, signature, major))
        while len(self._until) > self.max_entries:
            self._pop(evicted=True)
        if len(self._heap) > 2 * self.max_entries:
            # Extensions leave stale heap entries behind; rebuild from the live ones.
            self._heap = [(u, s, m) for (s, m), u in self._until.items()]
            heapq.heapify(self._heap)

    def blocked_until(self, signature: str, major: str, now: float) -> float | None:
        """The deadline of a block in force at `now`, or None."""
        self.prune(now)
        until = self._until.get((signature, major))
        return until if until is not None and now < until else None

    def prune(self, now: float) -> None:
        """Drop every block that has expired at `now`."""
        while self._heap and self._heap[0][0] <= now:
            self._pop(evicted=False)

    def statistics(self) -> SublimitStatistics:
        return SublimitStatistics(entries=len(self._until), blocks=self._blocks, evicted=self._evicted)

    def _pop(self, *, evicted: bool) -> None:
        until, sig, major = heapq.heappop(self._heap)
        key = (sig, major)
        if self._until.get(key) == until:
            del self._until[key]
            if evicted:
                self._evicted += 1
