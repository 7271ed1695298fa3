"""A REST proxy request as the fronts receive it, checked field by field into a `ProxyRequest`.

Both fronts turn what they receive (decoded MessagePack, a parsed HTTP request) into a `ProxyRequest` with
`make_request`; each check raises `ProxyError` with the RPC status of the field it checks. Messages never
echo header values; `describe` names a request in logs by its route template, never by its path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import orjson

from ratelimit.proxy.errors import RpcStatus, bad_request
from ratelimit.routes import route_key

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PATH_CHARS",
    "METHODS",
    "ProxyRequest",
    "body_bytes",
    "check_method",
    "check_path",
    "describe",
    "header_pairs",
    "make_request",
    "query_pairs",
    "timeout_seconds",
]

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: Largest request body. Discord takes 10 MiB of attachments from a bot (up to 100 MiB in boosted guilds);
#: 25 MiB covers the common cases and bounds what 256 requests in flight can hold in memory.
MAX_BODY_BYTES: Final = 25 * 1024 * 1024
MAX_PATH_CHARS: Final = 4096
_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE: Final = re.compile(r"[\t\x20-\x7e]*")
_PATH_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f#]")


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
