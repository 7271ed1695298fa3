"""The REST half of the simulator: Discord's rate limits, enforced at arrival, with a ledger of every 429.

Design note. Discord counts a request when it *arrives*, then the answer travels back; a client only learns a
bucket's state from an answer. So each request is decided synchronously in `_decide` at its arrival time
(`trio.current_time()`), and only then does `handle` sleep the injected latency and answer. Checks run in
Discord's order, each with its own answer:

1. Cloudflare-style ban of the source IP → HTML 429, no `Via` (what discord.py and hikari read as a ban).
2. Injected 5xx (the edge answers; nothing is counted).
3. Route match (404 JSON otherwise), then auth: a bad or missing bot token → 401.
4. Global limit, a sliding 1 s window per token (per source IP without a token) counted at arrival;
   interaction routes are exempt (`POST /interactions/.../callback` and follow-ups on
   `/webhooks/{application_id}/...`). Every request that passes it is counted, even one a bucket refuses.
5. Webhook faults (dead → 404 10015, invalid token → 401 50027).
6. Shared-scope 429 for a resource marked busy by "other users" (not an invalid request).
7. The route's bucket counter (sliding or fixed, see `buckets.py`), keyed by (token, counter, majors).
8. Hidden sub-limit: channel name/topic edits, answered with `Remaining > 0`.
9. Body validation, permissions (403), then the payload.

401, 403 and non-shared 429 count toward the per-IP invalid-request budget; reaching it bans the IP.
A bucket 429 is `first-contact` when no answer with that counter's headers had been sent to the token before
the request arrived, else `avoidable` (with zero latency a concurrent burst reads as avoidable: the server
cannot see when the client sent it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import trio

from supervisor.httpserver import HttpRequest, HttpResponse

from .buckets import EMPTY_STATE, BucketState, BucketView, SlidingLog, peek, take
from .config import BOT_USER_ID, SimulatorConfig
from .payloads import BUILDERS, SnowflakeMinter
from .rest_ledger import BanRecord, Category, RequestRecord, RestLedger
from .routes import (
    OLD_MESSAGE_DELETE_GROUP,
    OLD_MESSAGE_DELETE_LABEL,
    BucketGroup,
    RouteCatalogue,
    RouteMatch,
)
from .tokens import TokenRegistry, token_id

#: The global limit's window: requests per token (or IP) per this many seconds.
GLOBAL_WINDOW_S: Final = 1.0
JSON_HEADERS: Final = (("content-type", "application/json"), ("Via", "1.1 google"))
RATE_LIMITED_MESSAGE: Final = "You are being rate limited."
API_PREFIXES: Final = ("/api/v10/", "/api/v9/", "/api/")
WEBHOOK_STATES: Final = ("ok", "dead", "invalid_token")
SERVER_ERROR_STATUSES: Final = (500, 502, 503, 504)
BAN_PAGE: Final = b"".join(
    (
        b"<!DOCTYPE html><html><head><title>Access denied | discord.com used Cloudflare to restrict access",
        b"</title></head><body><h1>Error 1015</h1><p>You are being rate limited.</p></body></html>",
    )
)

CounterKey = tuple[str, str, str]


@dataclass(slots=True)
class _Outcome:
    """A decided answer plus what the ledger needs to know about it."""

    response: HttpResponse
    category: Category | None = None
    token_id: str | None = None
    template: str | None = None
    major: str | None = None
    bucket: str | None = None
    #: The counter whose headers this answer carries (the token is informed once it is sent).
    informs: CounterKey | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


def _json(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, [*JSON_HEADERS, *(headers or [])], orjson.dumps(payload))


def _error(status: int, message: str, code: int) -> HttpResponse:
    return _json(status, {"message": message, "code": code})


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() in ("bot", "bearer") and token:
        return token.strip()
    return authorization.strip()


def _strip_prefix(path: str) -> str:
    for prefix in API_PREFIXES:
        if path.startswith(prefix):
            return "/" + path[len(prefix) :]
    return path


class RestSimulator:
    """The simulated REST API. See the module docstring for the rules it enforces.

    Control actions (`POST /_sim/rest/<action>`, JSON body):
    - `latency` {ms: float, sigma?: float}: median and lognormal sigma of the added answer latency.
    - `global_limit` {limit: int}: global requests per second per token (and per IP).
    - `revoke_token` {token: str}: that token now gets 401; `restore_tokens` {}: undo every revocation.
    - `webhook` {id: str, state: "dead" | "invalid_token" | "ok"}: dead → 404 10015, invalid_token → 401
      50027 on the webhook-with-token routes.
    - `shared` {method: str, path: str, seconds: float}: the resource (counter + majors) of that concrete
      path is busy "because of other users": every token gets a shared-scope 429 until then.
    - `forbid` {major: str, forbidden?: bool}: requests whose majors include that id get 403 code 50013.
    - `unban` {ip?: str}: lift bans and clear invalid-request windows (of one IP, or all).
    - `server_error` {count: int, status?: 500 | 502 | 503 | 504}: the next `count` API answers are 5xx.
    - `reset_buckets` {}: forget every bucket, global, sub-limit and "informed" state.
    - `catalogue` {}: the route templates with their bucket hash and shape (for tests and reports).
    """

    def __init__(
        self, config: SimulatorConfig, tokens: TokenRegistry, gateway_bot_info: Callable[[], dict[str, Any]]
    ) -> None:
        self.config = config
        self.rest = config.rest
        self.tokens = tokens
        self._gateway_bot_info = gateway_bot_info
        self.catalogue = RouteCatalogue(
            config.seed, random_shapes=self.rest.random_bucket_shapes, time_scale=self.rest.bucket_time_scale
        )
        self.ledger = RestLedger(self.rest.ledger_records, self._invalid_counts)
        self.latency_ms = self.rest.latency_ms
        self.latency_sigma = self.rest.latency_sigma
        self.global_limit = self.rest.global_limit
        self._rng = random.Random(config.seed)
        self._ids = SnowflakeMinter()
        self._buckets: dict[CounterKey, BucketState] = {}
        self._informed: dict[CounterKey, float] = {}
        self._global: dict[str, SlidingLog] = {}
        self._sublimits: dict[tuple[str, str], SlidingLog] = {}
        self._invalid: dict[str, SlidingLog] = {}
        self._banned_until: dict[str, float] = {}
        self._shared_until: dict[tuple[str, str], float] = {}
        self._webhooks: dict[str, str] = {}
        self._forbidden: set[str] = set()
        self._server_errors: list[int] = []

    # -- serving ---------------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest, api_path: str) -> HttpResponse:
        """Answer one API request (`api_path` without the `/api/v10` prefix); sleeps the injected latency."""
        arrival = trio.current_time()
        source_ip = request.headers.get("x-fake-source-ip") or request.client_host
        outcome = self._decide(request, api_path, source_ip, arrival)
        await trio.sleep(self._latency_s())
        if outcome.informs is not None:
            self._informed.setdefault(outcome.informs, trio.current_time())
        response = outcome.response
        self.ledger.record(
            RequestRecord(
                arrival=arrival,
                token_id=outcome.token_id,
                source_ip=source_ip,
                method=request.method,
                template=outcome.template,
                major=outcome.major,
                bucket=outcome.bucket,
                status=response.status,
                category=outcome.category,
            )
        )
        return response

    def _latency_s(self) -> float:
        if self.latency_ms <= 0:
            return 0.0
        return self.latency_ms / 1000 * math.exp(self.latency_sigma * self._rng.gauss(0.0, 1.0))

    def _decide(self, request: HttpRequest, api_path: str, source_ip: str, now: float) -> _Outcome:
        banned_until = self._banned_until.get(source_ip)
        if banned_until is not None:
            if now < banned_until:
                return _Outcome(self._ban_page(banned_until - now), category="ban")
            del self._banned_until[source_ip]
            self._invalid.pop(source_ip, None)
        if self._server_errors:
            return _Outcome(self._server_error(self._server_errors.pop()))
        match = self.catalogue.match(request.method, api_path)
        if match is None:
            return _Outcome(_error(404, "404: Not Found", 0))
        route = match.route
        outcome = _Outcome(HttpResponse(200), template=route.label, major=match.major or None)
        token = _bearer(request.headers.get("authorization"))
        if token is not None or route.auth:
            if token is None or not self.tokens.is_valid(token):
                outcome.response = _error(401, "401: Unauthorized", 0)
                return self._invalid_answer(source_ip, now, outcome)
            identity = outcome.token_id = token_id(token)
        else:
            identity = f"ip:{source_ip}"
        interaction = route.interaction or (route.webhook and match.params["webhook_id"] == str(BOT_USER_ID))
        if not interaction:
            log = self._global.setdefault(identity, SlidingLog(self.global_limit, GLOBAL_WINDOW_S))
            log.limit = self.global_limit
            if not log.try_add(now):
                outcome.response = self._rate_limited(log.retry_after(now), "global", [])
                outcome.category = "global"
                return self._invalid_answer(source_ip, now, outcome)
        webhook_state = self._webhooks.get(match.params.get("webhook_id", ""), "ok")
        if webhook_state == "dead":
            outcome.response = _error(404, "Unknown Webhook", 10015)
            return outcome
        if webhook_state == "invalid_token" and route.webhook:
            outcome.response = _error(401, "Invalid Webhook Token", 50027)
            return self._invalid_answer(source_ip, now, outcome)
        group = self.catalogue.group_for(match, time.time() * 1000)
        if group is None:
            return self._answer(outcome, request, match, [])
        if group.name == OLD_MESSAGE_DELETE_GROUP:
            outcome.template = OLD_MESSAGE_DELETE_LABEL
        return self._decide_bucket(outcome, request, match, group, identity, source_ip, now)

    def _decide_bucket(
        self,
        outcome: _Outcome,
        request: HttpRequest,
        match: RouteMatch,
        group: BucketGroup,
        identity: str,
        source_ip: str,
        now: float,
    ) -> _Outcome:
        key: CounterKey = (identity, group.name, match.major)
        bucket = outcome.bucket = self.catalogue.hashes[group.name]
        state = self._buckets.get(key, EMPTY_STATE)
        resource = (group.name, match.major)
        shared_for = self._shared_until.get(resource, now) - now
        probability = self.rest.reaction_shared_probability
        if (
            shared_for <= 0
            and group.name == "reactions"
            and probability > 0
            and self._rng.random() < probability
        ):
            shared_for = self.rest.shared_retry_after_s
            self._shared_until[resource] = now + shared_for
        if shared_for > 0:
            headers = self._bucket_headers(group, peek(group.shape, state, now), bucket)
            outcome.response = self._rate_limited(shared_for, "shared", headers)
            outcome.category = "shared"
            outcome.informs = key
            return outcome
        decision = take(group.shape, state, now)
        if not decision.allowed:
            informed_at = self._informed.get(key)
            outcome.category = (
                "avoidable" if informed_at is not None and informed_at <= now else "first-contact"
            )
            headers = self._bucket_headers(group, decision.view, bucket)
            outcome.response = self._rate_limited(decision.retry_after_s, "user", headers)
            outcome.informs = key
            return self._invalid_answer(source_ip, now, outcome)
        outcome.informs = key
        body = self._parse_body(request) if match.route.json_body else {}
        if body is None:
            self._buckets[key] = decision.state
            headers = self._bucket_headers(group, decision.view, bucket)
            outcome.response = _json(400, {"message": "400: Bad Request", "code": 50109}, headers)
            return outcome
        if (
            match.route.label == "PATCH /channels/{channel_id}"
            and isinstance(body, dict)
            and ("name" in body or "topic" in body)
        ):
            sublimit = self._sublimits.setdefault(
                (identity, match.major), SlidingLog(self.rest.sublimit_count, self.rest.sublimit_window_s)
            )
            if not sublimit.try_add(now):
                headers = self._bucket_headers(group, peek(group.shape, state, now), bucket)
                outcome.response = self._rate_limited(sublimit.retry_after(now), "user", headers)
                outcome.category = "sublimit"
                return self._invalid_answer(source_ip, now, outcome)
        self._buckets[key] = decision.state
        headers = self._bucket_headers(group, decision.view, bucket)
        if self.rest.scope_on_success:
            headers.append(("X-RateLimit-Scope", "user"))
        if any(value in self._forbidden for value in match.major.split("/")):
            outcome.response = _json(403, {"message": "Missing Permissions", "code": 50013}, headers)
            return self._invalid_answer(source_ip, now, outcome)
        return self._answer(outcome, request, match, headers, body)

    def _answer(
        self,
        outcome: _Outcome,
        request: HttpRequest,
        match: RouteMatch,
        headers: list[tuple[str, str]],
        body: Any = None,
    ) -> _Outcome:
        route = match.route
        if body is None:
            body = self._parse_body(request) if route.json_body else {}
            if body is None:
                outcome.response = _json(400, {"message": "400: Bad Request", "code": 50109}, headers)
                return outcome
        if route.kind == "empty":
            outcome.response = HttpResponse(204, [("Via", "1.1 google"), *headers])
        elif route.kind == "gateway":
            outcome.response = _json(200, {"url": self._gateway_bot_info()["url"]}, headers)
        elif route.kind == "gateway_bot":
            outcome.response = _json(200, self._gateway_bot_info(), headers)
        else:
            payload = BUILDERS[route.kind](match.params, body, self._ids)
            outcome.response = _json(200, payload, headers)
        return outcome

    @staticmethod
    def _parse_body(request: HttpRequest) -> Any:
        """The JSON body (`{}` for multipart uploads); None when it is missing or not JSON."""
        if request.headers.get("content-type", "").startswith("multipart/"):
            return {}
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict | list) else None

    # -- answers --------------------------------------------------------------------------------------

    def _bucket_headers(self, group: BucketGroup, view: BucketView, bucket: str) -> list[tuple[str, str]]:
        reset_at = time.time() + self.rest.wall_clock_offset_s + view.reset_after_s
        return [
            ("X-RateLimit-Limit", str(group.shape.limit)),
            ("X-RateLimit-Remaining", str(view.remaining)),
            ("X-RateLimit-Reset", f"{reset_at:.3f}"),
            ("X-RateLimit-Reset-After", f"{view.reset_after_s:.3f}"),
            ("X-RateLimit-Bucket", bucket),
        ]

    @staticmethod
    def _rate_limited(retry_after_s: float, scope: str, headers: list[tuple[str, str]]) -> HttpResponse:
        retry = max(math.ceil(retry_after_s * 1000) / 1000, 0.001)
        is_global = scope == "global"
        extra = [("Retry-After", str(math.ceil(retry))), ("X-RateLimit-Scope", scope)]
        if is_global:
            extra.append(("X-RateLimit-Global", "true"))
        body = {"message": RATE_LIMITED_MESSAGE, "retry_after": retry, "global": is_global}
        return _json(429, body, [*headers, *extra])

    def _ban_page(self, remaining_s: float) -> HttpResponse:
        headers = [("content-type", "text/html; charset=UTF-8"), ("Retry-After", str(math.ceil(remaining_s)))]
        return HttpResponse(429, headers, BAN_PAGE)

    @staticmethod
    def _server_error(status: int) -> HttpResponse:
        if status == 500:
            return _error(500, "500: Internal Server Error", 0)
        reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}[status]
        return HttpResponse(
            status, [("content-type", "text/html")], f"<html>{status} {reason}</html>".encode()
        )

    def _invalid_answer(self, source_ip: str, now: float, outcome: _Outcome) -> _Outcome:
        """Count `outcome` (a 401, 403 or non-shared 429) toward `source_ip`'s budget; ban at the limit."""
        log = self._invalid.setdefault(
            source_ip, SlidingLog(self.rest.invalid_request_limit, self.rest.invalid_window_s)
        )
        count = log.add(now)
        self.ledger.note_invalid(source_ip, count)
        if count >= self.rest.invalid_request_limit and source_ip not in self._banned_until:
            until = now + self.rest.ban_duration_s
            self._banned_until[source_ip] = until
            self.ledger.note_ban(BanRecord(source_ip, now, until, count))
        return outcome

    def _invalid_counts(self) -> dict[str, int]:
        now = trio.current_time()
        return {ip: log.count(now) for ip, log in self._invalid.items()}

    # -- control --------------------------------------------------------------------------------------

    async def control(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Carry out a control action (see the class docstring); raises ValueError for a bad request."""
        handler = getattr(self, f"_control_{action}", None)
        if handler is None:
            raise ValueError(f"unknown REST control action {action!r}")
        result: dict[str, Any] = handler(body)
        return result

    def _control_latency(self, body: dict[str, Any]) -> dict[str, Any]:
        ms, sigma = float(body["ms"]), float(body.get("sigma", self.latency_sigma))
        if ms < 0 or sigma < 0:
            raise ValueError("latency ms and sigma must be >= 0")
        self.latency_ms, self.latency_sigma = ms, sigma
        return {"ms": ms, "sigma": sigma}

    def _control_global_limit(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = int(body["limit"])
        if limit < 1:
            raise ValueError("global limit must be >= 1")
        self.global_limit = limit
        return {"limit": limit}

    def _control_revoke_token(self, body: dict[str, Any]) -> dict[str, Any]:
        token = body["token"]
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        self.tokens.revoke(token)
        return {"token_id": token_id(token)}

    def _control_restore_tokens(self, body: dict[str, Any]) -> dict[str, Any]:
        self.tokens.restore()
        return {"ok": True}

    def _control_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        webhook_id, state = str(body["id"]), body["state"]
        if state not in WEBHOOK_STATES:
            raise ValueError(f"webhook state must be one of {WEBHOOK_STATES}")
        if state == "ok":
            self._webhooks.pop(webhook_id, None)
        else:
            self._webhooks[webhook_id] = state
        return {"id": webhook_id, "state": state}

    def _control_shared(self, body: dict[str, Any]) -> dict[str, Any]:
        method, path, seconds = (
            str(body["method"]).upper(),
            _strip_prefix(str(body["path"])),
            float(body["seconds"]),
        )
        match = self.catalogue.match(method, path.partition("?")[0])
        if match is None:
            raise ValueError(f"no route matches {method} {path}")
        group = self.catalogue.group_for(match, time.time() * 1000)
        if group is None:
            raise ValueError(f"{match.route.label} has no bucket to mark shared")
        self._shared_until[(group.name, match.major)] = trio.current_time() + seconds
        return {"bucket": self.catalogue.hashes[group.name], "major": match.major, "seconds": seconds}

    def _control_forbid(self, body: dict[str, Any]) -> dict[str, Any]:
        major, forbidden = str(body["major"]), bool(body.get("forbidden", True))
        if forbidden:
            self._forbidden.add(major)
        else:
            self._forbidden.discard(major)
        return {"major": major, "forbidden": forbidden}

    def _control_unban(self, body: dict[str, Any]) -> dict[str, Any]:
        ip = body.get("ip")
        if ip is None:
            lifted = len(self._banned_until)
            self._banned_until.clear()
            self._invalid.clear()
        else:
            lifted = int(self._banned_until.pop(str(ip), None) is not None)
            self._invalid.pop(str(ip), None)
        return {"lifted": lifted}

    def _control_server_error(self, body: dict[str, Any]) -> dict[str, Any]:
        count, status = int(body["count"]), int(body.get("status", 500))
        if count < 0 or status not in SERVER_ERROR_STATUSES:
            raise ValueError(f"count must be >= 0 and status one of {SERVER_ERROR_STATUSES}")
        self._server_errors = [status] * count
        return {"count": count, "status": status}

    def _control_reset_buckets(self, body: dict[str, Any]) -> dict[str, Any]:
        for table in (self._buckets, self._informed, self._global, self._sublimits, self._shared_until):
            table.clear()
        return {"ok": True}

    def _control_catalogue(self, body: dict[str, Any]) -> dict[str, Any]:
        routes = []
        for route in self.catalogue.routes:
            group = self.catalogue.groups.get(route.group) if route.group else None
            routes.append(
                {
                    "route": route.label,
                    "group": route.group,
                    "bucket": self.catalogue.hashes[group.name] if group else None,
                    "limit": group.shape.limit if group else None,
                    "window_s": group.shape.window_s if group else None,
                    "sliding": group.shape.sliding if group else None,
                    "global_exempt": route.interaction,
                }
            )
        return {"routes": routes}
