"""The ratelimit state of many hosts in one Redis: `model.acquire` / `model.release` as one Lua call each.

Design (DESIGN 4-5, anchors/ratelimit.md R2, R4, R10):

- One round trip per operation. The decisions are the model's, ported to Lua (`redis_scripts.py`) and run
  atomically by Redis, so a grant, a wait or a refusal costs one EVALSHA on a small trio-native RESP client
  (`redis_client.py`, the service's one Redis client; its docstring has the measurements against redis-py
  and coredis). Reading the records,
  deciding in Python and writing back under WATCH would take three round trips and retry under contention.
- One clock. Deadlines live in the Redis server's `TIME` domain: hosts share no monotonic clock, and wall
  clocks of different hosts disagree by seconds. Every answer the caller sees is a duration. A `clock`
  passed to the constructor (tests) replaces `TIME` with its value, which is how the differential tests run
  this backend and `LocalBackend` on the same explicit times.
- One hash tag. Every key is `{prefix}:` + the model's key (`bkt|token|hash|major`, ...), so one slot holds
  a deployment's state and one script may touch all of it, as Redis Cluster requires (every key a script
  touches is declared in KEYS).
- The route map lives in Redis, the bucket key depends on it, and KEYS must be known before the call. So
  each process caches route -> hash; the acquire script checks the guess against the map and, when they
  differ, changes nothing and answers the map's view ("redirect"); the cache is corrected and the call
  repeated. That costs at most one extra round trip per route per process (plus one per hash change), and a
  release that teaches the map also teaches the cache. Two scripts per route (a lookup, then the acquire)
  would pay the extra round trip on every call.
- Failure. Anything but an answer (refused connection, timeout after `timeout_s`, broken or foreign
  protocol, an error reply from a Redis that is loading, read-only or out of memory) raises
  `BackendUnavailable`: the caller falls back to conservative local limits (R10) rather than waiting on
  Redis. A Redis restart or SCRIPT FLUSH is survived: NOSCRIPT reloads the script once.

Opening: `RedisBackend(...)` connects lazily and is an async context manager; `open_redis_backend(...)`
also loads both scripts up front (so the first acquire is one round trip) and raises `BackendUnavailable`
when Redis cannot be reached.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ratelimit import model
from ratelimit.backend import BackendUnavailable
from ratelimit.buckets import Grant
from ratelimit.invalid import TOKEN_REVOKED, WEBHOOK_DEAD, InvalidRequestBudget, health_verdict
from ratelimit.model import INVALID_BUDGET, Ask, EngineConfig, Outcome, Permit, Refusal, Wait, WaitReason
from ratelimit.redis_client import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT_S, RedisClient, Script
from ratelimit.redis_scripts import ACQUIRE, DOUBLE_RELEASE, RELEASE, RELEASE_NUMBERS, pack_config
from ratelimit.redis_url import RedisAddress
from ratelimit.resp import Arg, RedisConnectionError, RedisReplyError, Reply

__all__ = [
    "DEFAULT_PREFIX",
    "RedisBackend",
    "RedisBackendStatistics",
    "open_redis_backend",
]

DEFAULT_PREFIX: Final = "ratelimit"
#: Attempts of one acquire when the route map keeps disagreeing with the cache (it changed in between).
MAX_ROUTE_ATTEMPTS: Final = 3
#: Entries of the route -> hash cache before it is cleared (a cleared entry costs one redirect).
ROUTE_CACHE_SIZE: Final = 65536
#: How far past its logical expiry a key may live in Redis: TIME mode rounds up and covers the gap between
#: TIME and SET; a test clock is unrelated to Redis's, so there the logical expiry alone decides.
TIME_SLACK_MS: Final = 1.0
CLOCK_SLACK_MS: Final = 600_000.0

_DOUBLE: Final = struct.Struct("<d")
_REFUSALS: Final = {b"webhook": WEBHOOK_DEAD, b"token": TOKEN_REVOKED, b"invalid": INVALID_BUDGET}
_WAIT_REASONS: Final[dict[bytes, WaitReason]] = {
    reason.encode(): reason for reason in ("ban", "sublimit", "global", "bucket", "probe", "blocked")
}
_KINDS: Final = {"response": b"r", "limited": b"l", "cancel": b"c", "lost": b"x"}
# The cache's view of a route: a hash, "" for global-only, absent for unknown.
_UNKNOWN: Final = "u"
_GLOBAL_ONLY: Final = "g"
_HASHED: Final = "h"


@dataclass(frozen=True, slots=True)
class RedisBackendStatistics:
    calls: int  # script calls and loads (the extra round trips of a NOSCRIPT reload not counted)
    redirects: int  # acquires repeated because the route map disagreed with the cache
    reloads: int  # NOSCRIPT answers (a restarted or flushed Redis)
    errors: int  # BackendUnavailable raised
    connects: int  # connections opened


class RedisBackend:
    """`Backend` on Redis: the state every process of every host shares. Not opened until first used.

    `url` is a `redis://`, `rediss://` or `unix://` URL (`redis_url.py`: ACL user, TLS, Cluster through
    redirections); `timeout_s` bounds each call (connecting included); `clock` (tests) replaces the Redis
    server's TIME with its value. `acquire` and `release` are checkpoints; cancelling one drops its
    connection and may or may not have applied the call.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        config: EngineConfig | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty Redis hash tag without braces, got {prefix!r}")
        self.config = config or EngineConfig()
        self.prefix = prefix
        self._client = RedisClient(
            RedisAddress.parse(url), timeout_s=timeout_s, max_connections=max_connections
        )
        self._clock = clock
        self._key_prefix = f"{{{prefix}}}:"
        self._config_arg = pack_config(
            self.config, slack_ms=TIME_SLACK_MS if clock is None else CLOCK_SLACK_MS
        )
        self._acquire = Script(ACQUIRE)
        self._release = Script(RELEASE)
        self._routes: dict[tuple[str, str], str] = {}
        self._calls = 0
        self._redirects = 0
        self._errors = 0

    @property
    def address(self) -> RedisAddress:
        return self._client.address

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def load_scripts(self) -> None:
        """Load both scripts (one round trip each). Raises `BackendUnavailable`."""
        for script in (self._acquire, self._release):
            await self._call(script.load(self._client, key=self._key_prefix))

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        """`model.acquire` on the shared state. Raises `BackendUnavailable`."""
        now = self._now_arg()
        flags = (
            (b"e" if ask.exempt else b"")
            + (b"o" if ask.optional else b"")
            + (b"w" if ask.webhook is not None else (b"t" if ask.token else b""))
        )
        keys = [
            self._key(model.ban_key(ask.ip)),
            self._key(self._credential_key(ask)),
            self._key(model.invalid_key(ask.ip)),
            self._key(model.sublimit_key(ask.token, ask.request_class, ask.major)),
            self._key(model.global_key(ask.token)),
            self._key(model.map_key(ask.token, ask.route)),
            "",
        ]
        route = (ask.token, ask.route)
        for _ in range(MAX_ROUTE_ATTEMPTS):
            cached = self._routes.get(route)
            bucket = self._guess_bucket(ask, cached)
            keys[6] = keys[5] if bucket is None else self._key(bucket)
            kind = _UNKNOWN if cached is None else (_GLOBAL_ONLY if cached == "" else _HASHED)
            reply = await self._call(
                self._acquire(self._client, keys, [self._config_arg, now, flags, kind, cached or ""])
            )
            try:
                result = _acquire_result(ask, bucket, reply)
            except (TypeError, ValueError, KeyError, IndexError, struct.error) as error:
                raise self._unavailable(f"unexpected acquire reply {reply!r}") from error
            if not isinstance(result, tuple):
                return result
            self._redirects += 1
            self._learn(route, *result)
        raise self._unavailable(f"the route map of {ask.route!r} kept changing")

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        """`model.release` on the shared state. Raises `BackendUnavailable`, and ValueError where the model
        does (a grant given back twice)."""
        ask = permit.ask
        grant = permit.grant
        headers = outcome.headers
        limited = outcome.limited
        map_key = self._key(model.map_key(ask.token, ask.route))
        has_grant = permit.bucket is not None and grant is not None
        learn = model.learns_route(outcome)
        learned = headers.bucket if headers is not None and headers.bucket is not None else None
        verdict = (
            health_verdict(outcome.status, outcome.code, token_id=ask.token, webhook=ask.webhook is not None)
            if outcome.kind == "response"
            else None
        )
        counts = outcome.kind in ("response", "limited") and InvalidRequestBudget.counts(
            outcome.status, outcome.scope
        )
        flags = b"".join(
            flag
            for flag, on in (
                (b"b", has_grant),
                (b"p", grant is not None and grant.probe),
                (b"c", grant is not None and grant.counted),
                (b"g", permit.global_counted),
                (b"e", ask.exempt),
                (b"h", headers is not None),
                (b"B", learned is not None),
                (b"L", limited is not None),
                (b"m", learn),
                (b"i", counts),
                (b"W", verdict == WEBHOOK_DEAD and ask.webhook is not None),
                (b"T", verdict == TOKEN_REVOKED),
            )
            if on
        )
        numbers = RELEASE_NUMBERS.pack(
            grant.window if grant is not None else 0,
            grant.epoch if grant is not None else 0,
            headers.limit if headers is not None else 0,
            headers.remaining if headers is not None else 0,
            headers.reset_after if headers is not None else 0.0,
            limited.retry_after if limited is not None else 0.0,
            limited.remaining if limited is not None and limited.remaining is not None else math.nan,
            outcome.ban_s if outcome.ban_s else self.config.ban_s,
        )
        keys = [
            self._key(permit.bucket) if has_grant and permit.bucket is not None else map_key,
            self._key(model.global_key(ask.token)),
            self._key(model.sublimit_key(ask.token, ask.request_class, ask.major)),
            self._key(model.invalid_key(ask.ip)),
            self._key(model.ban_key(ask.ip)),
            self._key(self._credential_key(ask)),
            map_key,
            self._key(model.bucket_key(ask.token, learned, ask.major)) if learned is not None else map_key,
        ]
        args: list[Arg] = [
            self._config_arg,
            self._now_arg(),
            _KINDS[model.effective_kind(outcome)],
            flags,
            numbers,
            "" if limited is None or limited.scope is None else str(limited.scope),
            learned or "",
        ]
        try:
            await self._call(self._release(self._client, keys, args))
        except RedisReplyError:  # only DOUBLE_RELEASE gets through `_call`
            raise ValueError("a grant was given back twice, or to another bucket") from None
        if learn:
            if headers is None:
                self._learn((ask.token, ask.route), _GLOBAL_ONLY, "")
            elif learned is not None:
                self._learn((ask.token, ask.route), _HASHED, learned)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._routes.clear()

    def statistics(self) -> RedisBackendStatistics:
        return RedisBackendStatistics(
            calls=self._calls,
            redirects=self._redirects,
            reloads=self._acquire.reloads + self._release.reloads,
            errors=self._errors,
            connects=self._client.connects,
        )

    # --- helpers ---------------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._key_prefix + key

    def _now_arg(self) -> bytes:
        return b"" if self._clock is None else _DOUBLE.pack(self._clock())

    @staticmethod
    def _credential_key(ask: Ask) -> str:
        return model.hook_key(ask.webhook) if ask.webhook is not None else model.dead_key(ask.token)

    @staticmethod
    def _guess_bucket(ask: Ask, cached: str | None) -> str | None:
        if cached is None:
            return model.bucket_key(ask.token, "?" + ask.route, ask.major)
        if cached == "":
            return None
        return model.bucket_key(ask.token, cached, ask.major)

    def _learn(self, route: tuple[str, str], kind: str, bucket_hash: str) -> None:
        if kind == _UNKNOWN:
            self._routes.pop(route, None)
            return
        if len(self._routes) >= ROUTE_CACHE_SIZE and route not in self._routes:
            self._routes.clear()
        self._routes[route] = "" if kind == _GLOBAL_ONLY else bucket_hash

    async def _call(self, call: Awaitable[Reply]) -> Reply:
        self._calls += 1
        try:
            return await call
        except RedisConnectionError as error:
            raise self._unavailable(str(error)) from error
        except RedisReplyError as error:
            if error.code == DOUBLE_RELEASE:
                raise
            raise self._unavailable(f"Redis answered an error: {error.message}") from error

    def _unavailable(self, message: str) -> BackendUnavailable:
        self._errors += 1
        return BackendUnavailable(message)


def _acquire_result(ask: Ask, bucket: str | None, reply: Reply) -> Permit | Wait | Refusal | tuple[str, str]:
    """The acquire script's reply as the model's answer, or (route kind, hash) of a redirect. Raises
    TypeError, ValueError, KeyError, IndexError or struct.error for a reply the script never gives."""
    if not isinstance(reply, list):
        raise TypeError(reply)
    tag = reply[0]
    if tag == b"p":
        has_grant, window, probe, counted, epoch, now = reply[1:7]
        grant = None
        if has_grant == 1:
            if not (isinstance(window, int) and isinstance(epoch, int)):
                raise TypeError(reply)
            grant = Grant(window=window, probe=probe == 1, counted=counted == 1, epoch=epoch)
        return Permit(
            ask=ask, bucket=bucket, grant=grant, global_counted=not ask.exempt, granted_at=_double(now)
        )
    if tag == b"w":
        return Wait(_double(reply[1]), _WAIT_REASONS[_bytes(reply[2])])
    if tag == b"r":
        return Refusal(_REFUSALS[_bytes(reply[1])])
    if tag == b"m":
        return _bytes(reply[1]).decode(), _bytes(reply[2]).decode()
    raise ValueError(tag)


def _bytes(value: Reply) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(value)
    return value


def _double(value: Reply) -> float:
    return float(_DOUBLE.unpack(_bytes(value))[0])


@asynccontextmanager
async def open_redis_backend(
    url: str,
    config: EngineConfig | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Callable[[], float] | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> AsyncIterator[RedisBackend]:
    """A `RedisBackend` with both scripts loaded, closed on exit. Raises `BackendUnavailable` when Redis
    cannot be reached (the caller decides whether to start on local limits instead)."""
    backend = RedisBackend(
        url, config, prefix=prefix, timeout_s=timeout_s, clock=clock, max_connections=max_connections
    )
    try:
        await backend.load_scripts()
        yield backend
    finally:
        await backend.aclose()
