"""What goes wrong with a REST proxy request, as one error with both fronts' codes (DESIGN 3.6).

Every `ProxyError` carries both its RPC status (1 unknown, 2 bad format, 3 bad path, 4 bad query, 5 bad
method, 6 bad headers, 7 request failed, 8 timeout) and its HTTP status, so the two fronts (AMQP RPC in
`ratelimit.proxy.amqp`, HTTP in `ratelimit.proxy.http`) cannot disagree about what went wrong.

Secrets: error messages never echo header values, paths or bodies; logs name the route template
(`routes.route_key`, tokens replaced by placeholders), never the path.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from typing import Final

from ratelimit.errors import RatelimitError

__all__ = ["ProxyError", "RpcStatus", "bad_request", "log_failure"]

LOGGER: Final = logging.getLogger("ratelimit.proxy")


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


class ProxyError(RatelimitError):
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
