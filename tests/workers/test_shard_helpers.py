"""The shard shell's pure helpers."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.protocol import decode_payload
from workers.shard import _data_bytes


def sliced(raw: bytes) -> bytes | None:
    return _data_bytes(raw, decode_payload(raw))


def test_d_is_sliced_from_discords_layout() -> None:
    d = {"content": 'a "d": trap', "nested": {"d": 1}, "list": [1, 2]}
    raw = b'{"t":"MESSAGE_CREATE","s":42,"op":0,"d":' + orjson.dumps(d) + b"}"
    assert sliced(raw) == orjson.dumps(d)


def test_other_layouts_are_not_sliced() -> None:
    d = orjson.dumps({"x": 1})
    assert sliced(b'{"d":' + d + b',"t":"X","s":1,"op":0}') is None  # d first
    assert sliced(b'{"t": "X", "s": 1, "op": 0, "d": ' + d + b"}") is None  # spaces
    assert sliced(b'{"t":"X","s":1,"op":0,"d":' + d + b"}\n") is None  # trailing bytes
    assert sliced(b'{"t":"X","s":1,"op":0,"d":' + d + b',"extra":2}') is None  # a key after d
    assert sliced(b'{"t":"X","s":1,"op":0,"d":' + d + b',"d2":{}}') is None
    assert sliced(b'{"t":"X","s":null,"op":0,"d":' + d + b"}") is None  # no seq
    # The envelope must be the payload's own: another seq or name is not sliced.
    payload = decode_payload(b'{"t":"X","s":1,"op":0,"d":' + d + b"}")
    assert _data_bytes(b'{"t":"X","s":2,"op":0,"d":' + d + b"}", payload) is None


ENVELOPE = ("t", "s", "op", "d")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["d", "t", "x"]), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    keys=st.permutations(ENVELOPE).flatmap(
        lambda order: st.lists(st.sampled_from(["x", "extra", "d2"]), max_size=2, unique=True).flatmap(
            lambda extra: st.permutations([*order, *extra])
        )
    )
    | st.just(ENVELOPE),
    d=JSON,
    seq=st.integers(0, 2**31),
)
def test_what_is_sliced_is_the_payloads_d(keys: list[str], d: Any, seq: int) -> None:
    values = {"t": "MESSAGE_CREATE", "s": seq, "op": 0, "d": d, "x": 1, "extra": [2], "d2": {"d": 3}}
    raw = orjson.dumps({key: values[key] for key in keys})
    data = sliced(raw)
    if tuple(keys) == ENVELOPE:
        assert data == orjson.dumps(d)  # Discord's layout: always sliced
    else:
        assert data is None or orjson.loads(data) == d
