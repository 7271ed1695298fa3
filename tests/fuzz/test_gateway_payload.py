"""Fuzz the gateway payload path of a shard: `decode_payload` (bytes -> op/s/t/d) and the core's `receive`.

workers/shard.py feeds each complete payload through `decode_payload` and then `ShardProtocol.receive`, and
catches `ProtocolError` (and `TransportError`) to drop the connection and RESUME. Anything else escaping
either call ends the shard's task, and with it every shard of the worker; so for any input both must return
or raise `ProtocolError`, quickly.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from workers.errors import ProtocolError
from workers.protocol import GatewayPayload, ShardProtocol, ShardState, decode_payload
from workers.shard import _data_bytes

from .strategies import FUZZ, json_values, nested_json, nested_object_json, odd_values

pytestmark = pytest.mark.timeout(60)

#: Ops the core handles specially, and some it must ignore.
OPS = st.sampled_from([0, 1, 7, 9, 10, 11]) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
DISPATCH_NAMES = st.sampled_from(["READY", "RESUMED", "RATE_LIMITED", "MESSAGE_CREATE"]) | st.text(
    max_size=10
)


def decode_or_protocol_error(raw: bytes | str) -> GatewayPayload | None:
    try:
        payload = decode_payload(raw)
    except ProtocolError as exc:
        error = exc
    else:
        check_payload(payload)
        return payload
    assert len(str(error)) < 4096, "an error message that echoes the whole payload floods the log"
    return None


def check_payload(payload: GatewayPayload) -> None:
    assert type(payload.op) is int
    assert payload.s is None or type(payload.s) is int
    assert payload.t is None or isinstance(payload.t, str)


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xff\xfe{}")
@example(b'{"op":1}\x00')
def test_arbitrary_bytes(raw: bytes) -> None:
    decode_or_protocol_error(raw)


@FUZZ
@given(st.text(max_size=256))
def test_arbitrary_text(raw: str) -> None:
    decode_or_protocol_error(raw)


@FUZZ
@given(json_values)
def test_any_json_document(value: Any) -> None:
    decode_or_protocol_error(orjson.dumps(value))


@FUZZ
@given(
    op=odd_values | OPS | st.just(True),
    s=odd_values | st.integers(),
    t=odd_values,
    d=json_values,
    drop=st.sets(st.sampled_from(["op", "s", "t", "d"])),
)
def test_wrong_types_for_op_s_t_d(op: Any, s: Any, t: Any, d: Any, drop: set[str]) -> None:
    fields = {"op": op, "s": s, "t": t, "d": d}
    document = {key: value for key, value in fields.items() if key not in drop}
    try:
        raw = orjson.dumps(document)
    except orjson.JSONEncodeError:
        return  # bytes or an int beyond 64 bits: JSON cannot carry it
    payload = decode_or_protocol_error(raw)
    if payload is not None:
        assert payload.op == document["op"] and payload.d == document.get("d")


@pytest.mark.parametrize(
    "raw",
    [
        nested_json(100_000),
        nested_json(100_000, opener=b"{", closer=b"}"),
        b'{"op":0,"d":' + nested_json(100_000) + b"}",
        b'{"op":0,"d":' + nested_json(1_000) + b"}",  # just below orjson's depth limit, a valid payload
        nested_object_json(100_000),
        b"[" * 1_000_000,  # never closed
    ],
    ids=["list-100k", "braces-100k", "d-100k", "d-1k", "objects-100k", "unclosed-1M"],
)
def test_deeply_nested_json(raw: bytes) -> None:
    started = time.perf_counter()
    decode_or_protocol_error(raw)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"op":0,"t":"MESSAGE_CREATE","s":1,"d":"' + b"x" * (32 * 1024 * 1024) + b'"}',
        b'{"op":"'
        + b"x" * (8 * 1024 * 1024)
        + b'"}',  # a huge wrong-typed op: the error must not echo it all
        b'{"op":1,"t":"' + b"\\u0000" * (1024 * 1024) + b'"}',
        b'{"op":0,"s":' + b"9" * 100_000 + b"}",  # an integer of 100k digits
    ],
    ids=["32MiB-d", "8MiB-op", "escaped-t", "huge-int-s"],
)
def test_huge_strings_and_numbers(raw: bytes) -> None:
    started = time.perf_counter()
    decode_or_protocol_error(raw)
    assert time.perf_counter() - started < 2.0


# -- the core: what a decoded payload does to a shard ------------------------------------------------------


def core_in(state: str) -> ShardProtocol:
    """A core connected and in `state` (connecting: before HELLO; identifying: HELLO seen; ready)."""
    core = ShardProtocol(shard_id=0, shard_count=1, token="fuzz-token", intents=0, gateway_url="wss://gw")
    core.on_connected(0.0)
    if state == "connecting":
        return core
    core.receive(GatewayPayload(10, {"heartbeat_interval": 41250}, None, None), 0.0)
    if state == "identifying":
        return core
    core.on_identify_permitted(0.0)
    ready = {"session_id": "s", "resume_gateway_url": "wss://resume"}
    core.receive(GatewayPayload(0, ready, 1, "READY"), 0.0)
    assert core.state is ShardState.READY
    return core


@FUZZ
@given(
    state=st.sampled_from(["connecting", "identifying", "ready"]),
    payloads=st.lists(
        st.builds(
            GatewayPayload, op=OPS, d=json_values | odd_values, s=st.none() | st.integers(), t=DISPATCH_NAMES
        ),
        max_size=8,
    ),
    now=st.floats(min_value=0.0, max_value=1e6),
)
@example(
    state="connecting",
    payloads=[GatewayPayload(10, {"heartbeat_interval": 5e-324}, None, None)],  # seconds underflow to 0.0
    now=0.0,
)
@example(
    state="connecting", payloads=[GatewayPayload(10, {"heartbeat_interval": 1e308}, None, None)], now=0.0
)
@example(
    state="ready",
    payloads=[GatewayPayload(0, {"opcode": 8, "retry_after": 1e308}, 2, "RATE_LIMITED")],
    now=1.0,
)
def test_the_core_takes_any_payload(state: str, payloads: list[GatewayPayload], now: float) -> None:
    core = core_in(state)
    for payload in payloads:
        try:
            core.receive(payload, now)
        except ProtocolError:
            return  # the shell drops the connection here
        deadline = core.next_deadline()
        assert not math.isnan(deadline), "trio refuses a NaN deadline: the timer task would crash"
        core.poll(now)


@pytest.mark.parametrize("op", [10, 0])
def test_a_malformed_hello_or_ready_nested_past_repr(op: int) -> None:
    """The core's error message shows the bad `d`; `repr` cannot recurse the 1000 levels JSON allows."""
    d = orjson.loads(
        b'{"heartbeat_interval":' + nested_json(1_000) + b', "session_id":' + nested_json(1_000) + b"}"
    )
    core = core_in("connecting" if op == 10 else "identifying")
    with pytest.raises(ProtocolError):
        core.receive(GatewayPayload(op, d, 1, "READY" if op == 0 else None), 0.0)


def test_the_published_d_is_the_payloads_d_whatever_follows_it() -> None:
    """The shard publishes `d` sliced from the raw payload when it starts with Discord's own envelope; a key
    after `d` would then be published as part of it, and consumers get invalid JSON."""
    raw = b'{"t":"MESSAGE_CREATE","s":5,"op":0,"d":{"id":"1"},"extra":2}'
    sliced = _data_bytes(raw, decode_payload(raw))
    assert sliced is None or orjson.loads(sliced) == orjson.loads(raw)["d"]
