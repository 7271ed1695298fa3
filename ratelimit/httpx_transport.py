"""`RatelimitedTransport`: Discord-correct limits for any `httpx.AsyncClient`, and the REST proxy's sender.

    limiter = Ratelimiter(LocalBackend())  # or ShmBackend / RedisBackend, shared by every process
    async with httpx.AsyncClient(transport=RatelimitedTransport(limiter=limiter)) as client:
        await client.post("https://discord.com/api/v10/channels/1/messages", headers=auth, json=...)

It wraps another transport (httpx's own by default). For each request it computes the route key, asks the
engine for a permit (waiting in order, at most `max_wait_s`), sends, and gives the permit back with what
Discord answered: bucket headers, a 429 by scope, a non-JSON 429 (a Cloudflare ban), a 401/403/404 with its
JSON code. 429s are retried (`retries_429`, after the engine's wait: the retry waits for exactly the state
the 429 left; when that wait would pass the maximum, the 429 itself is returned), and 500/502/503/504 on
idempotent methods (`retries_5xx`, with backoff; a POST is not retried because Discord may have acted on
it). A request the engine refuses or cannot fit in the maximum wait raises `RequestRefused` /
`RateLimitTimeout` without being sent.

Secrets: the Authorization header is reduced to `routes.token_id` (a truncated SHA-256) before anything is
stored or logged; webhook and interaction tokens in paths are reduced to digests by `route_key`.
"""

from __future__ import annotations

import math
import time
from typing import Final

import httpx
import orjson
import trio

from ratelimit.buckets import RateLimited, RateLimitHeaders
from ratelimit.engine import Ratelimiter, RateLimitTimeout, RequestRefused
from ratelimit.invalid import signature
from ratelimit.model import Ask, Outcome, Permit
from ratelimit.routes import route_key, token_id

__all__ = ["RateLimitTimeout", "RatelimitedTransport", "RequestRefused", "ask_for"]

RETRIED_5XX: Final = frozenset({500, 502, 503, 504})
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
BACKOFF_BASE_S: Final = 0.25
BACKOFF_CAP_S: Final = 4.0
#: Error bodies read to find Discord's JSON error code (401/403/404) or the 429 body; larger ones are not
#: Discord errors.
_ERROR_STATUSES: Final = frozenset({401, 403, 404, 429})


def ask_for(
    request: httpx.Request, *, application_id: int | None = None, ip: str = "local", optional: bool = False
) -> Ask:
    """The engine's view of `request`. Raises ValueError for a path that is not a Discord REST path."""
    key = route_key(
        request.method, request.url.path, application_id=application_id, now_ms=int(time.time() * 1000)
    )
    token = token_id(request.headers.get("authorization"))
    webhook = None
    if "{webhook_token}" in key.template or "{interaction_token}" in key.template:
        webhook = "|".join(key.majors)
    body_keys: frozenset[str] = frozenset()
    if key.method == "PATCH" and key.template == "/channels/{channel_id}":
        body_keys = _json_keys(request)
    return Ask(
        token=token or f"ip:{ip}",
        route=key.route,
        major="|".join(key.majors),
        exempt=key.interaction,
        signature=signature(key.method, key.template, body_keys),
        webhook=webhook,
        ip=ip,
        optional=optional,
    )


def _json_keys(request: httpx.Request) -> frozenset[str]:
    try:
        body = orjson.loads(request.content)
    except (orjson.JSONDecodeError, httpx.RequestNotRead):
        return frozenset()
    return frozenset(body) if isinstance(body, dict) else frozenset()


def outcome_of(status: int, headers: httpx.Headers, body: bytes | None) -> Outcome:
    """The engine's view of one answer; `body` is read for error statuses only (None otherwise)."""
    parsed: object = None
    if body:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
    mapping = parsed if isinstance(parsed, dict) else None
    if status == 429:
        # Discord's 429s are JSON; anything else (an HTML page) is Cloudflare's ban, whatever its headers.
        limited = RateLimited.parse(headers, mapping) if mapping is not None else None
        ban_s = None
        if limited is None:
            raw = headers.get("retry-after")
            try:
                ban_s = float(raw) if raw is not None else None
            except ValueError:
                ban_s = None
            if ban_s is not None and not (math.isfinite(ban_s) and ban_s > 0):
                ban_s = None
        return Outcome("limited", status=status, limited=limited, ban_s=ban_s)
    code = mapping.get("code") if mapping is not None else None
    return Outcome(
        "response",
        status=status,
        headers=RateLimitHeaders.parse(headers),
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
    )


class RatelimitedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that applies Discord's limits through a shared `Ratelimiter`."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        limiter: Ratelimiter,
        max_wait_s: float | None = None,
        retries_429: int = 3,
        retries_5xx: int = 2,
        application_id: int | None = None,
        ip: str = "local",
    ) -> None:
        if retries_429 < 0 or retries_5xx < 0:
            raise ValueError("retries must not be negative")
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self.limiter = limiter
        self.max_wait_s = max_wait_s
        self.retries_429 = retries_429
        self.retries_5xx = retries_5xx
        self.application_id = application_id
        self.ip = ip

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            ask = ask_for(request, application_id=self.application_id, ip=self.ip)
        except ValueError as exc:
            raise httpx.UnsupportedProtocol(f"not a Discord REST request: {exc}", request=request) from None
        limit = self.limiter.max_wait_s if self.max_wait_s is None else self.max_wait_s
        deadline = trio.current_time() + limit
        limited_tries = 0
        failed_tries = 0
        last_429: httpx.Response | None = None
        while True:
            try:
                permit = await self.limiter.acquire(ask, max_wait_s=max(0.0, deadline - trio.current_time()))
            except RateLimitTimeout:
                if last_429 is None:
                    raise
                # The retry would wait past the maximum: the caller gets Discord's own 429 to act on.
                return last_429
            response, outcome = await self._send(request, permit)
            if outcome.kind == "limited" and outcome.limited is not None and limited_tries < self.retries_429:
                limited_tries += 1
                last_429 = response  # its body is read already
                continue
            if (
                outcome.status in RETRIED_5XX
                and request.method.upper() in IDEMPOTENT
                and failed_tries < self.retries_5xx
            ):
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**failed_tries)
                failed_tries += 1
                if trio.current_time() + delay <= deadline:
                    await response.aclose()
                    await trio.sleep(delay)
                    continue
            return response

    async def _send(self, request: httpx.Request, permit: Permit) -> tuple[httpx.Response, Outcome]:
        try:
            response = await self.inner.handle_async_request(request)
            body: bytes | None = None
            if response.status_code in _ERROR_STATUSES:
                body = await response.aread()
        except (httpx.ConnectError, httpx.ConnectTimeout):
            # No connection, so nothing was sent: everything the permit took comes back.
            await self.limiter.release(permit, Outcome("cancel"))
            raise
        except BaseException:
            # Sent or not, we cannot tell: its capacity stays spent until the next refill.
            await self.limiter.release(permit, Outcome("lost"))
            raise
        outcome = outcome_of(response.status_code, response.headers, body)
        await self.limiter.release(permit, outcome)
        return response, outcome

    async def aclose(self) -> None:
        await self.inner.aclose()
