"""The shard shell's pure helpers."""

from __future__ import annotations

import orjson

from workers.shard import _data_bytes


def test_d_is_sliced_from_discords_layout() -> None:
    d = {"content": 'a "d": trap', "nested": {"d": 1}, "list": [1, 2]}
    raw = b'{"t":"MESSAGE_CREATE","s":42,"op":0,"d":' + orjson.dumps(d) + b"}"
    assert _data_bytes(raw, "MESSAGE_CREATE", 42) == orjson.dumps(d)


def test_other_layouts_are_not_sliced() -> None:
    d = orjson.dumps({"x": 1})
    assert _data_bytes(b'{"d":' + d + b',"t":"X","s":1,"op":0}', "X", 1) is None  # d first
    assert _data_bytes(b'{"t":"X","s":1,"op":0,"d":' + d + b"}", "X", 2) is None  # another seq
    assert _data_bytes(b'{"t": "X", "s": 1, "op": 0, "d": ' + d + b"}", "X", 1) is None  # spaces
    assert _data_bytes(b'{"t":"X","s":1,"op":0,"d":' + d + b"}\n", "X", 1) is None  # trailing bytes
