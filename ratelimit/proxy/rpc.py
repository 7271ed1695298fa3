"""The AMQP RPC wire format of the REST proxy, compatible with `@spectacles/proxy` (pure: no I/O).

What the clients send, read in their sources:

- `@spectacles/proxy` 0.1.3 (`Client.make`) calls `broker.call('REQUEST', {method, path, body, query,
  headers})` on `@spectacles/brokers` 0.9.x, which MessagePack-encodes it (`@msgpack/msgpack`) and publishes
  it on exchange `group` with routing key `REQUEST`, a ulid `correlationId` and `replyTo` = its exclusive
  callback queue. `headers` always holds `Authorization: Bot <token>` and `X-RateLimit-Precision`;
  `body` is a Buffer (MessagePack bin), a JSON string (str; the client then adds `content-type:
  application/json`) or undefined (nil); `query` is a map or nil. No `timeout`.
- The Rust proxy (spectacles proxy v0.1, the server these clients were written against) decoded the same
  fields with rmp-serde, which also accepts the fields as an array in declaration order
  (`[method, path, query, body, headers, timeout]`), `timeout` being serde's `Duration`; we accept both.

The reply is `{status, body}`: status 0 with `body = {status, headers, url, body}` (Discord's answer, body
as bin), any other status with an error string. The JS broker hands the decoded reply to the caller as is
(`@spectacles/proxy` never throws on an HTTP error: a 404 is status 0 with `body.status` 404).

Field errors map to the status of their field (3 path, 4 query, 5 method, 6 headers); a body that is not
MessagePack, not a map or array, or lacks `method` or `path` is 2 (bad format), as is a bad `body` or
`timeout`.

CANCEL (spectacles proxy v0.1 `broker.rs`): a message on routing key `CANCEL` whose body is the correlation
id of the request to cancel, as raw UTF-8; a MessagePack string (what `broker.publish('CANCEL', id)` of the
JS broker sends) is accepted too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from ratelimit.proxy.errors import ProxyError, RpcStatus, bad_request
from ratelimit.proxy.request import ProxyRequest, make_request
from ratelimit.proxy.rest_proxy import ProxyResponse

__all__ = [
    "ARRAY_FIELDS",
    "CONTENT_TYPE",
    "MAX_CORRELATION_ID_CHARS",
    "decode_cancel",
    "decode_request",
    "encode_error",
    "encode_proxy_error",
    "encode_response",
]

CONTENT_TYPE: Final = "application/msgpack"
#: The order of the Rust proxy's `SerializableHttpRequest` fields (rmp-serde's array form).
ARRAY_FIELDS: Final = ("method", "path", "query", "body", "headers", "timeout")
MAX_CORRELATION_ID_CHARS: Final = 255


def decode_request(data: bytes) -> ProxyRequest:
    """The request in an RPC message body. Raises `ProxyError` (status 2-6)."""
    try:
        payload: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # ValueError and its kin, or TypeError for a map key that is itself a map
        raise bad_request(RpcStatus.BAD_FORMAT, f"not a MessagePack message ({type(exc).__name__})") from None
    if isinstance(payload, list | tuple):
        payload = dict(zip(ARRAY_FIELDS, payload, strict=False))
    if not isinstance(payload, Mapping):
        raise bad_request(RpcStatus.BAD_FORMAT, "the request must be a map {method, path, ...}")
    missing = [name for name in ("method", "path") if payload.get(name) is None]
    if missing:
        raise bad_request(RpcStatus.BAD_FORMAT, f"the request lacks {' and '.join(missing)}")
    return make_request(
        payload["method"],
        payload["path"],
        query=payload.get("query"),
        headers=payload.get("headers"),
        body=payload.get("body"),
        timeout=payload.get("timeout"),
    )


def encode_response(response: ProxyResponse) -> bytes:
    body = {
        "status": response.status,
        "headers": response.header_map(),
        "url": response.url,
        "body": response.body,
    }
    data: bytes = msgpack.packb({"status": int(RpcStatus.OK), "body": body}, use_bin_type=True)
    return data


def encode_error(status: RpcStatus, message: str) -> bytes:
    data: bytes = msgpack.packb({"status": int(status), "body": message}, use_bin_type=True)
    return data


def encode_proxy_error(error: ProxyError) -> bytes:
    return encode_error(error.rpc_status, error.message)


def decode_cancel(data: bytes) -> str | None:
    """The correlation id a CANCEL message names, or None when its body is not one."""
    text: object = None
    with contextlib.suppress(Exception):
        text = msgpack.unpackb(data, raw=False)
    if isinstance(text, bytes):
        data = text
    if not isinstance(text, str):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    assert isinstance(text, str)
    text = text.strip()
    return text if 0 < len(text) <= MAX_CORRELATION_ID_CHARS else None
