"""Fuzz the REST proxy's decoders: the AMQP RPC request and CANCEL bodies (`ratelimit.proxy.rpc`) and the
HTTP front's request parsing (`ratelimit.proxy.http`, over a real loopback socket).

Contracts: `decode_request` returns a checked `ProxyRequest` or raises `ProxyError` (the RPC server replies
with its status; anything else escapes the consumer and ends it), and its message never holds a header
value (it may be a token); `decode_cancel` returns a correlation id or None; the HTTP front answers any
bytes with an HTTP response or a close, and never dies.

The proxy is being written by someone else (ratelimit/proxy/ is theirs).
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

import msgpack
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from ratelimit.proxy import ProxyError, ProxyRequest, ProxyResponse, make_request
from ratelimit.proxy.http import HttpLimits, HttpProxyServer
from ratelimit.proxy.request import METHODS
from ratelimit.proxy.rpc import ARRAY_FIELDS, MAX_CORRELATION_ID_CHARS, decode_cancel, decode_request

from .strategies import FUZZ, json_values, odd_values

pytestmark = pytest.mark.timeout(60)

SECRET: Final = "Bot MTAwMDAwMDAwMDAwMDAwMDAw.Gfuzz1.c2VjcmV0LWZ1enotdG9rZW4tdmFsdWU"
PATHS: Final = st.sampled_from(
    ["/channels/1/messages", "/gateway/bot", "/users/@me", "/webhooks/1/tok", "/", "/../x", "", "x"]
) | st.text(max_size=20).map(lambda text: "/" + text)
#: MessagePack values of every kind, with map keys of every kind (arrays and maps included).
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    odd_values
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=4))
    | st.builds(msgpack.Timestamp, st.integers(min_value=0, max_value=2**33), st.just(0)),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers() | st.binary(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


def decode_or_error(data: bytes) -> ProxyRequest | None:
    try:
        request = decode_request(data)
    except ProxyError as exc:
        error = exc
    else:
        assert request.method in METHODS and request.path.startswith("/")
        return request
    assert 2 <= error.rpc_status <= 6, error.rpc_status
    assert SECRET not in error.message and SECRET.split()[1] not in error.message
    return None


@FUZZ
@given(st.binary(max_size=256))
@example(b"\x93\xa3GET\xa2/x\xc0")
@example(b"\x91" * 100_000 + b"\x01")
@example(b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion items
def test_rpc_arbitrary_bytes(data: bytes) -> None:
    decode_or_error(data)


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "method": st.sampled_from(sorted(METHODS))
            | st.sampled_from(["get", "TRACE", ""])
            | msgpack_values,
            "path": PATHS | msgpack_values,
            "query": st.dictionaries(st.text(max_size=4) | st.integers(), msgpack_values, max_size=3)
            | msgpack_values,
            "body": st.binary(max_size=32) | json_values | msgpack_values,
            "headers": st.dictionaries(
                st.sampled_from(["Authorization", "X-Audit-Log-Reason", "bad name", "", "\x00"]),
                st.sampled_from([SECRET, SECRET + "\r\nX: y", SECRET + "\x00", SECRET + "é"])
                | msgpack_values,
                max_size=3,
            )
            | msgpack_values,
            "timeout": st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats()
            | st.fixed_dictionaries({"secs": odd_values}, optional={"nanos": odd_values})
            | msgpack_values,
        },
    ),
    as_array=st.booleans(),
    extra=st.dictionaries(st.text(max_size=4), msgpack_values, max_size=2),
)
def test_rpc_requests_of_every_shape(fields: dict[str, Any], as_array: bool, extra: dict[str, Any]) -> None:
    message: Any = [fields.get(name) for name in ARRAY_FIELDS] if as_array else {**extra, **fields}
    try:
        data = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    request = decode_or_error(data)
    if request is not None:
        assert all("\r" not in value and "\n" not in value for _, value in request.headers)


@pytest.mark.parametrize("data", [b"\x81\x91\x01\x01", b"\x81\x81\x01\x01\x01"], ids=["array-key", "map-key"])
def test_a_map_keyed_by_an_array_or_map(data: bytes) -> None:
    """msgpack raises TypeError (unhashable key) for these with `strict_map_key=False`."""
    with pytest.raises(ProxyError):
        decode_request(data)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda text: msgpack.packb(text)))
def test_rpc_cancel_bodies(data: bytes) -> None:
    correlation_id = decode_cancel(data)
    assert correlation_id is None or 0 < len(correlation_id) <= MAX_CORRELATION_ID_CHARS


@FUZZ
@given(
    method=odd_values | st.sampled_from(sorted(METHODS)),
    path=odd_values | PATHS,
    query=odd_values,
    headers=odd_values,
    body=odd_values,
    timeout=odd_values,
)
def test_make_request_takes_loosely_typed_fields(
    method: Any, path: Any, query: Any, headers: Any, body: Any, timeout: Any
) -> None:
    with contextlib.suppress(ProxyError):
        make_request(method, path, query=query, headers=headers, body=body, timeout=timeout)


# -- the HTTP front --------------------------------------------------------------------------------------


class AnswerEverything:
    """Stands in for `RestProxy`: records what reached it and answers 200."""

    def __init__(self) -> None:
        self.requests: list[ProxyRequest] = []

    async def send(self, request: ProxyRequest, **_: Any) -> ProxyResponse:
        await trio.lowlevel.checkpoint()
        self.requests.append(request)
        return ProxyResponse(200, (("content-type", "application/json"),), "http://discord/api", b"{}")


def exchange(data: bytes) -> tuple[bytes, list[ProxyRequest]]:
    """Send `data` (then end of file) to a fresh HTTP front; what it answered, and what it relayed."""
    proxy = AnswerEverything()

    async def main() -> bytes:
        server = HttpProxyServer(proxy, limits=HttpLimits(head_timeout_s=5, body_timeout_s=5))  # type: ignore[arg-type]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, "127.0.0.1", 0)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                answer = bytearray()
                async with stream:
                    # The server may answer and close before it has read everything (431, 413): then the
                    # rest of the sending fails, and reading stops at the reset.
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(data)
                        await stream.send_eof()
                    with contextlib.suppress(trio.BrokenResourceError):
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                server.stop(0)
        return bytes(answer)

    answer = trio.run(main)
    if answer:
        assert answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit(), answer[:100]
    return answer, proxy.requests


HEADER_NAMES: Final = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Authorization", "Expect", "Connection", "X"]
) | st.text(alphabet="abcXYZ-_:\x00 \t", max_size=8)
HEADER_VALUES: Final = st.sampled_from(
    ["0", "5", "-1", "99999999999999999999", "chunked", "100-continue", "close", SECRET, "a\x00b", ""]
) | st.text(max_size=12)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([*sorted(METHODS), "get", "FOO", "", "GET GET"]))
    target = draw(st.sampled_from(["/api/v10", "/api", "/api/v9", "", "http://x", "*"])) + draw(PATHS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 x"]))
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
    body = draw(st.binary(max_size=64))
    head = f"{method} {target} {version}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("utf-8", "surrogatepass") + b"\r\n" + body


@FUZZ
@given(http_requests() | st.binary(max_size=256))
@example(b"GET /api/v10/channels/1/messages HTTP/1.1\r\nHost: x\r\n\r\n")
@example(b"GET /api/v10/gateway/bot HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20_000 + b"\r\n")
@example(b"POST /api/v10/channels/1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
@example(
    b"GET /api/v10/channels/1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + b"0" * 5000 + b"\r\n\r\n"
)
def test_http_front_answers_any_bytes(data: bytes) -> None:
    answer, relayed = exchange(data)
    for request in relayed:
        assert request.method in METHODS and request.path.startswith("/")
    if data.startswith(b"GET /api/v10/channels/1/messages HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert answer.startswith(b"HTTP/1.1 200 ") and len(relayed) == 1
    assert SECRET.encode() not in answer
