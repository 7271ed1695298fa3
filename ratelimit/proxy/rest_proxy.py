"""`RestProxy`: one checked REST request sent to Discord under the shared limits, answered or failed.

Both fronts (AMQP RPC in `ratelimit.proxy.amqp`, HTTP in `ratelimit.proxy.http`) turn what they receive
into a `ProxyRequest` (`ratelimit.proxy.request`), call `RestProxy.send`, and turn the `ProxyResponse` or
the `ProxyError` (`ratelimit.proxy.errors`, with both its RPC and its HTTP status) into their own wire
format.

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
import math
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import httpx
import trio

from ratelimit.engine import Ratelimiter, RateLimitTimeout, RequestRefused
from ratelimit.httpx_transport import RatelimitedTransport
from ratelimit.invalid import TOKEN_REVOKED, WEBHOOK_DEAD
from ratelimit.model import INVALID_BUDGET
from ratelimit.proxy.errors import ProxyError, RpcStatus, bad_request
from ratelimit.proxy.request import ProxyRequest, describe
from ratelimit.proxy.send_mark import MARK_EXTENSION, MarkingTransport, SendMark

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ProxyResponse",
    "ProxyStatistics",
    "RestProxy",
    "open_rest_proxy",
]

#: Largest answer read from Discord (a full member list page is about 1 MiB).
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S: Final = 30.0
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
        self._inner = MarkingTransport(
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
                request.method, url, headers=headers, content=request.body, extensions={MARK_EXTENSION: mark}
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
