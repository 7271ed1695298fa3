"""One REST proxy request: checked, sent to Discord under the shared limits, answered or failed with a code.

Both fronts (AMQP RPC in `ratelimit.proxy.amqp`, HTTP in `ratelimit.proxy.http`) turn what they receive
into a `ProxyRequest` through the checks here, call `RestProxy.send`, and turn the `ProxyResponse` or the
`ProxyError` into their own wire format. Every error carries both its RPC status (DESIGN 3.6: 1 unknown,
2 bad format, 3 bad path, 4 bad query, 5 bad method, 6 bad headers, 7 request failed, 8 timeout) and its
HTTP status, so the two fronts cannot disagree about what went wrong.

Design notes:

- Limits: each request goes through a `RatelimitedTransport` on the process's `Ratelimiter` (whose backend
  every process shares). The transport object is made per request around one shared inner
  `httpx.AsyncHTTPTransport`: it is a few attributes, and its maximum wait is then exactly what is left of
  this request's timeout, so a wait the engine knows to be too long fails at once instead of sleeping first.
- No `httpx.AsyncClient`: a client keeps a cookie jar, and a proxy that many bots share must not hand one
  caller's Discord cookies (`__dcfduid`, `__cf_bm`) to another, nor follow redirects on their behalf. The
  transport API is all a proxy needs.
- Timeout: `TIMEOUT` (default 30 s), or less when the request asks for less, bounds the wait for limits
  plus Discord's whole answer. Past it the request fails with RPC 8 / HTTP 504 (or 503 when the limits alone
  are known to need longer, before anything is sent).
- Encoding: the proxy asks Discord for `Accept-Encoding: identity` whatever the client sent. The transport
  must read error bodies (401/403/404/429) to learn Discord's JSON code and 429 scope, which decodes them;
  with identity those bytes are the ones Discord sent, for every status, so every body reaches the client
  untouched and nothing is decompressed only to be recompressed. The cost is uncompressed bytes between
  the proxy and Discord (JSON answers are small; the client side is loopback or a LAN). If an answer comes
  compressed anyway, the HTTP front passes it on raw with its `Content-Encoding`, and the RPC front (whose
  clients expect JSON bytes) passes it on decoded.
- Authorization: the RPC front adds `Authorization: Bot <DISCORD_TOKEN>` when the caller sent none (and the
  path carries no webhook or interaction token, which authenticate themselves); `@spectacles/proxy` sends
  its own. The HTTP front never adds it: the client sends its own (DESIGN 3.6), and a listening port that
  lent the bot's token to whoever connects would be an open relay for the bot.
- Secrets: error messages never echo header values, paths or bodies; logs name the route template
  (`routes.route_key`, tokens replaced by placeholders), never the path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

import httpx
import orjson
import trio

from ratelimit.engine import Ratelimiter, RateLimitTimeout, RequestRefused
from ratelimit.httpx_transport import RatelimitedTransport
from ratelimit.invalid import TOKEN_REVOKED, WEBHOOK_DEAD
from ratelimit.model import INVALID_BUDGET
from ratelimit.routes import route_key

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "METHODS",
    "ProxyError",
    "ProxyRequest",
    "ProxyResponse",
    "RestProxy",
    "RpcStatus",
    "SendMark",
    "describe",
    "make_request",
    "open_rest_proxy",
]

LOGGER: Final = logging.getLogger("ratelimit.proxy")

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: Largest request body. Discord takes 10 MiB of attachments from a bot (up to 100 MiB in boosted guilds);
#: 25 MiB covers the common cases and bounds what 256 requests in flight can hold in memory.
MAX_BODY_BYTES: Final = 25 * 1024 * 1024
#: Largest answer read from Discord (a full member list page is about 1 MiB).
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 30.0
MAX_PATH_CHARS: Final = 4096
USER_AGENT: Final = "DiscordBot (https://github.com/trio-shard-gateway/trio-shard-gateway, 0.1.0)"
#: Connections to Discord per process (the RPC front has at most 256 requests in flight per worker).
UPSTREAM_CONNECTIONS: Final = 256
UPSTREAM_KEEPALIVE: Final = 64
#: Closing an answer's stream (or the proxy's connections) never takes longer than this, cancelled or not.
CLOSE_TIMEOUT_S: Final = 5.0
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers the proxy sets itself (httpx computes host and length; encoding: see the module note).
_OWN_REQUEST_HEADERS: Final = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE: Final = re.compile(r"[\t\x20-\x7e]*")
_PATH_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f#]")
#: Where `SendMark` travels on the httpx request (popped before the request reaches httpx's own transport).
_MARK_EXTENSION: Final = "trio_shard_gateway.send_mark"


class RpcStatus(IntEnum):
    """The `status` of an RPC reply (`@spectacles/proxy`, spectacles proxy v0.1 README)."""

    OK = 0
    UNKNOWN = 1
    BAD_FORMAT = 2
    BAD_PATH = 3
    BAD_QUERY = 4
    BAD_METHOD = 5
    BAD_HEADERS = 6
    REQUEST_FAILED = 7
    TIMEOUT = 8


class ProxyError(Exception):
    """A request the proxy answers itself. `kind` names it in logs and in the HTTP `X-Proxy-Error` header;
    `message` never holds a secret (no header values, paths or bodies)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        rpc_status: RpcStatus,
        http_status: int,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.rpc_status = rpc_status
        self.http_status = http_status
        self.retry_after_s = retry_after_s


def bad_request(rpc_status: RpcStatus, message: str, *, http_status: int = 400) -> ProxyError:
    kind = {
        RpcStatus.BAD_FORMAT: "bad-format",
        RpcStatus.BAD_PATH: "bad-path",
        RpcStatus.BAD_QUERY: "bad-query",
        RpcStatus.BAD_METHOD: "bad-method",
        RpcStatus.BAD_HEADERS: "bad-headers",
    }.get(rpc_status, "bad-request")
    if http_status == 413:
        kind = "body-too-large"
    return ProxyError(kind, message, rpc_status=rpc_status, http_status=http_status)


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A checked request. `path` is relative to `DISCORD_API_URL` (`/channels/1/messages`) and may carry a
    raw query string; `query` pairs are appended to it, percent-encoded. Build it with `make_request`."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: The caller's own limit, in seconds; the proxy's `TIMEOUT` applies when it is longer or absent.
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class ProxyResponse:
    """Discord's answer: hop-by-hop headers and `content-length` removed (names lower-case, in order,
    repeated names kept), the URL it was sent to, and the body bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    url: str
    body: bytes

    def header_map(self) -> dict[str, str]:
        """One value per name, repeated headers joined with `, ` (the RPC reply's single-valued map)."""
        joined: dict[str, str] = {}
        for name, value in self.headers:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        return joined


@dataclass(slots=True)
class SendMark:
    """Set once the request was handed to the network (it may then have reached Discord). A front that
    must stop early requeues a request that was never sent and reports one that was."""

    sent: bool = False


# -- checks: each raises ProxyError with the RPC status of the field it checks ---------------------------


def check_method(value: object) -> str:
    if not isinstance(value, str):
        raise bad_request(RpcStatus.BAD_METHOD, "method must be a string")
    method = value.upper()
    if method not in METHODS:
        raise bad_request(RpcStatus.BAD_METHOD, f"method must be one of {', '.join(sorted(METHODS))}")
    return method


def check_path(method: str, value: object) -> str:
    """A path relative to the API base: starts with `/`, no whitespace, control characters, fragment or dot
    segments, at most MAX_PATH_CHARS, and one the route table can key (`routes.route_key`)."""
    if not isinstance(value, str):
        raise bad_request(RpcStatus.BAD_PATH, "path must be a string")
    if not value.startswith("/"):
        raise bad_request(RpcStatus.BAD_PATH, "path must start with '/'")
    if len(value) > MAX_PATH_CHARS:
        raise bad_request(RpcStatus.BAD_PATH, f"path longer than {MAX_PATH_CHARS} characters")
    if _PATH_FORBIDDEN.search(value):
        raise bad_request(RpcStatus.BAD_PATH, "path must not contain whitespace, control characters or '#'")
    segments = value.partition("?")[0].split("/")
    if any(segment in (".", "..") for segment in segments):
        raise bad_request(RpcStatus.BAD_PATH, "path must not contain '.' or '..' segments")
    try:
        route_key(method, value)
    except ValueError:
        raise bad_request(RpcStatus.BAD_PATH, "path names no Discord REST resource") from None
    return value


def query_pairs(value: object) -> tuple[tuple[str, str], ...]:
    """`{name: value}` with str, number or bool values, or lists of them (a repeated parameter)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise bad_request(RpcStatus.BAD_QUERY, "query must be a map of names to values")
    pairs: list[tuple[str, str]] = []
    for name, item in value.items():
        if not isinstance(name, str):
            raise bad_request(RpcStatus.BAD_QUERY, "query names must be strings")
        items = item if isinstance(item, list | tuple) else [item]
        pairs.extend((name, _query_value(name, each)) for each in items)
    return tuple(pairs)


def _query_value(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise bad_request(RpcStatus.BAD_QUERY, f"query value of {_shown(name)} must be a string, number or bool")


def header_pairs(value: object) -> tuple[tuple[str, str], ...]:
    """`{name: value}`: token names, values of visible ASCII (no CR, LF or NUL: no header injection)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise bad_request(RpcStatus.BAD_HEADERS, "headers must be a map of names to strings")
    pairs = []
    for name, item in value.items():
        if not isinstance(name, str) or not _TOKEN_CHARS.fullmatch(name):
            raise bad_request(RpcStatus.BAD_HEADERS, "header names must be HTTP tokens")
        if isinstance(item, int | float) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str) or not _HEADER_VALUE.fullmatch(item):
            # The value is not echoed: it may be a token.
            raise bad_request(
                RpcStatus.BAD_HEADERS, f"header {_shown(name)} must be visible ASCII without CR, LF or NUL"
            )
        pairs.append((name, item))
    return tuple(pairs)


def body_bytes(
    value: object, headers: tuple[tuple[str, str], ...]
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The body as bytes: bytes as they are, a string as UTF-8, a map or list (or number, bool) as JSON with
    `content-type: application/json` unless the caller set one. At most MAX_BODY_BYTES."""
    if value is None:
        body = b""
    elif isinstance(value, bytes | bytearray | memoryview):
        body = bytes(value)
    elif isinstance(value, str):
        try:
            body = value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(RpcStatus.BAD_FORMAT, "body is not valid UTF-8 text") from None
    elif isinstance(value, dict | list | int | float):
        try:
            body = orjson.dumps(value)
        except TypeError:
            raise bad_request(RpcStatus.BAD_FORMAT, "body cannot be encoded as JSON") from None
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers = (*headers, ("content-type", "application/json"))
    else:
        raise bad_request(RpcStatus.BAD_FORMAT, "body must be bytes, a string or JSON data")
    if len(body) > MAX_BODY_BYTES:
        raise bad_request(RpcStatus.BAD_FORMAT, f"body larger than {MAX_BODY_BYTES} bytes", http_status=413)
    return body, headers


def timeout_seconds(value: object) -> float | None:
    """The caller's timeout: a number of milliseconds (the unit of the AMQP `expiration` the JS broker
    uses), or Rust's serde `Duration` (`{secs, nanos}` or `[secs, nanos]`, what the Rust proxy read)."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000
    elif isinstance(value, Mapping) and set(value) <= {"secs", "nanos"} and "secs" in value:
        seconds = _duration(value.get("secs"), value.get("nanos", 0))
    elif isinstance(value, list | tuple) and len(value) == 2:
        seconds = _duration(value[0], value[1])
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise bad_request(RpcStatus.BAD_FORMAT, "timeout must be milliseconds or {secs, nanos}")
    return seconds


def _duration(secs: object, nanos: object) -> float | None:
    if isinstance(secs, bool) or isinstance(nanos, bool):
        return None
    if isinstance(secs, int) and isinstance(nanos, int):
        return secs + nanos / 1e9
    return None


def make_request(
    method: object,
    path: object,
    *,
    query: object = None,
    headers: object = None,
    body: object = None,
    timeout: object = None,
) -> ProxyRequest:
    """A `ProxyRequest` from loosely typed fields (decoded MessagePack, a parsed HTTP request). Raises
    `ProxyError` with the status of the first field that is wrong, in the order of the arguments."""
    checked_method = check_method(method)
    checked_path = check_path(checked_method, path)
    pairs = query_pairs(query)
    header_list = header_pairs(headers)
    content, header_list = body_bytes(body, header_list)
    return ProxyRequest(
        checked_method, checked_path, pairs, header_list, content, timeout_s=timeout_seconds(timeout)
    )


def describe(method: str, path: str) -> str:
    """`METHOD /route/{template}` for logs: ids and tokens replaced by placeholders, never the path itself."""
    try:
        return f"{method} {route_key(method, path).template}"
    except ValueError:
        return f"{method} (not a REST route)"


def _shown(name: str) -> str:
    return repr(name[:40])


# -- sending --------------------------------------------------------------------------------------------


class _MarkingTransport(httpx.AsyncBaseTransport):
    """Sets the request's `SendMark` as it goes to the network (and removes it, so httpx never sees it)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        mark = request.extensions.pop(_MARK_EXTENSION, None)
        if isinstance(mark, SendMark):
            mark.sent = True
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """A snapshot: answers relayed by HTTP status, failures by `ProxyError.kind`."""

    responses: Mapping[int, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    in_flight: int = 0


class RestProxy:
    """Sends `ProxyRequest`s to `api_url` under `limiter`. One per process, shared by both fronts; open it
    with `open_rest_proxy`."""

    def __init__(
        self,
        limiter: Ratelimiter,
        *,
        api_url: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bot_token: str | None = None,
        inner: httpx.AsyncBaseTransport | None = None,
        retries_429: int = 3,
        retries_5xx: int = 2,
        application_id: int | None = None,
        ip: str = "local",
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.limiter = limiter
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self._bot_token = bot_token
        self._inner = _MarkingTransport(
            inner
            if inner is not None
            else httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=UPSTREAM_KEEPALIVE
                )
            )
        )
        self._retries = (retries_429, retries_5xx)
        self._application_id = application_id
        self._ip = ip
        self._responses: dict[int, int] = {}
        self._errors: dict[str, int] = {}
        self._in_flight = 0

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(dict(self._responses), dict(self._errors), self._in_flight)

    async def send(
        self,
        request: ProxyRequest,
        *,
        add_bot_token: bool = False,
        decode: bool = False,
        mark: SendMark | None = None,
    ) -> ProxyResponse:
        """Send `request` once its limits allow, and return Discord's answer (any HTTP status).

        `add_bot_token`: add the bot's Authorization when the request has none (RPC front). `decode`:
        return a compressed body decoded (RPC) rather than as it came (HTTP). `mark` is set when the request
        goes to the network. Raises `ProxyError`: limits that need longer than the timeout, refused
        credentials, a network failure, the timeout. Cancellation gives unused permits back (the engine).
        """
        self._in_flight += 1
        try:
            response = await self._send(request, add_bot_token=add_bot_token, decode=decode, mark=mark)
        except ProxyError as exc:
            self._errors[exc.kind] = self._errors.get(exc.kind, 0) + 1
            raise
        finally:
            self._in_flight -= 1
        self._responses[response.status] = self._responses.get(response.status, 0) + 1
        return response

    async def _send(
        self, request: ProxyRequest, *, add_bot_token: bool, decode: bool, mark: SendMark | None
    ) -> ProxyResponse:
        timeout_s = self.timeout_s if request.timeout_s is None else min(self.timeout_s, request.timeout_s)
        mark = mark if mark is not None else SendMark()
        http_request = self._build(request, add_bot_token=add_bot_token, mark=mark)
        retries_429, retries_5xx = self._retries
        transport = RatelimitedTransport(
            self._inner,
            limiter=self.limiter,
            max_wait_s=timeout_s,
            retries_429=retries_429,
            retries_5xx=retries_5xx,
            application_id=self._application_id,
            ip=self._ip,
        )
        with trio.move_on_after(timeout_s) as deadline:
            try:
                response = await transport.handle_async_request(http_request)
            except RateLimitTimeout as exc:
                raise _ratelimit_timeout(exc, timeout_s) from None
            except RequestRefused as exc:
                raise _refused(exc.reason) from None
            except httpx.UnsupportedProtocol:
                raise bad_request(RpcStatus.BAD_PATH, "path names no Discord REST resource") from None
            except httpx.TransportError as exc:
                # The type names what failed (ConnectError, ReadError...); the text may hold the URL.
                raise ProxyError(
                    "upstream-failed",
                    f"request to Discord failed: {type(exc).__name__}",
                    rpc_status=RpcStatus.REQUEST_FAILED,
                    http_status=502,
                ) from None
            try:
                body, decoded = await _read_body(response, decode=decode)
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                    await response.aclose()
        if deadline.cancelled_caught and not mark.sent:
            raise ProxyError(
                "ratelimit-timeout",
                f"ratelimited: still waiting for the limits at the timeout ({timeout_s:g} s)",
                rpc_status=RpcStatus.TIMEOUT,
                http_status=503,
            )
        if deadline.cancelled_caught:
            raise ProxyError(
                "timeout",
                f"no answer from Discord within the timeout ({timeout_s:g} s)",
                rpc_status=RpcStatus.TIMEOUT,
                http_status=504,
            )
        drop = {"content-length", "content-encoding"} if decoded else {"content-length"}
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in response.headers.raw
            if name.decode("latin-1").lower() not in HOP_BY_HOP | drop
        )
        return ProxyResponse(response.status_code, headers, str(http_request.url), body)

    def _build(self, request: ProxyRequest, *, add_bot_token: bool, mark: SendMark) -> httpx.Request:
        url = self.api_url + request.path
        if request.query:
            encoded = urllib.parse.urlencode(request.query, quote_via=urllib.parse.quote)
            url += ("&" if "?" in request.path else "?") + encoded
        headers = [
            (name, value) for name, value in request.headers if name.lower() not in _OWN_REQUEST_HEADERS
        ]
        names = {name.lower() for name, _ in headers}
        if add_bot_token and self._bot_token and "authorization" not in names:
            template = describe(request.method, request.path)
            if "{webhook_token}" not in template and "{interaction_token}" not in template:
                headers.append(("Authorization", f"Bot {self._bot_token}"))
        if "user-agent" not in names:
            headers.append(("User-Agent", USER_AGENT))
        headers.append(("Accept-Encoding", "identity"))
        try:
            return httpx.Request(
                request.method, url, headers=headers, content=request.body, extensions={_MARK_EXTENSION: mark}
            )
        except httpx.InvalidURL:
            raise bad_request(RpcStatus.BAD_PATH, "path is not a valid URL path") from None
        except UnicodeEncodeError:
            raise bad_request(RpcStatus.BAD_HEADERS, "header values must be ASCII") from None

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _read_body(response: httpx.Response, *, decode: bool) -> tuple[bytes, bool]:
    """The body and whether it was decoded. The transport has already read (and so decoded) error bodies."""
    with contextlib.suppress(httpx.ResponseNotRead):
        return response.content, True
    encoded = "content-encoding" in response.headers
    chunks: list[bytes] = []
    size = 0
    try:
        parts = response.aiter_bytes() if decode and encoded else response.aiter_raw()
        async for chunk in parts:
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ProxyError(
                    "upstream-failed",
                    f"Discord's answer is larger than {MAX_RESPONSE_BYTES} bytes",
                    rpc_status=RpcStatus.REQUEST_FAILED,
                    http_status=502,
                )
            chunks.append(chunk)
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise ProxyError(
            "upstream-failed",
            f"reading Discord's answer failed: {type(exc).__name__}",
            rpc_status=RpcStatus.REQUEST_FAILED,
            http_status=502,
        ) from None
    return b"".join(chunks), decode and encoded


def _ratelimit_timeout(exc: RateLimitTimeout, timeout_s: float) -> ProxyError:
    retry = exc.wait_s if math.isfinite(exc.wait_s) else None
    return ProxyError(
        "ratelimit-timeout",
        f"ratelimited ({exc.reason}): the wait exceeds the timeout ({timeout_s:g} s)",
        rpc_status=RpcStatus.TIMEOUT,
        http_status=503,
        retry_after_s=retry,
    )


_REFUSALS: Final[Mapping[str, tuple[str, int, str]]] = {
    TOKEN_REVOKED: ("token-revoked", 401, "the token was refused by Discord (401); not sent again"),
    WEBHOOK_DEAD: ("webhook-dead", 404, "the webhook was deleted or its token refused; not sent again"),
    INVALID_BUDGET: (
        "invalid-budget",
        503,
        "too many invalid requests (401/403/429) from this IP recently; not sent to avoid a ban",
    ),
}


def _refused(reason: str) -> ProxyError:
    kind, status, message = _REFUSALS.get(reason, ("refused", 503, f"refused by the limiter ({reason})"))
    return ProxyError(kind, message, rpc_status=RpcStatus.REQUEST_FAILED, http_status=status)


@asynccontextmanager
async def open_rest_proxy(
    limiter: Ratelimiter,
    *,
    api_url: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    bot_token: str | None = None,
    inner: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[RestProxy]:
    """A `RestProxy` whose connections to Discord are closed on exit (even when cancelled)."""
    proxy = RestProxy(limiter, api_url=api_url, timeout_s=timeout_s, bot_token=bot_token, inner=inner)
    try:
        yield proxy
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await proxy.aclose()


def log_failure(front: str, error: ProxyError, route: str, level: int | None = None) -> None:
    """The one log line of a request the proxy answered itself (no path, no header value, no token): at
    info for a client's mistake, at warning for what the operator should see (limits, dead credentials,
    Discord unreachable)."""
    if level is None:
        serious = error.http_status >= 500 or error.kind in (
            "token-revoked",
            "webhook-dead",
            "ratelimit-timeout",
        )
        level = logging.WARNING if serious else logging.INFO
    LOGGER.log(
        level,
        "proxy.error",
        extra={"front": front, "kind": error.kind, "route": route, "reason": error.message},
    )


def headers_lookup(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first value of header `name` (case-insensitive)."""
    name = name.lower()
    return next((value for key, value in headers if key.lower() == name), None)
