"""Fuzz the command decoders: AMQP bodies of SEND and shard-id commands in every BROKER_ENCODING
(`workers.commands.decode_command`, what `workers.command_consumer` calls per delivery) and the stdin
command reader (`read_stdin_commands`).

The consumer catches `CommandRejected` only; anything else would end the consumer task and the worker. So
for any routing key and body, `decode_command` returns a command a shard can send or raises
`CommandRejected`, and the stdin reader yields commands and rejections and never raises, whatever the bytes.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, Final, get_args

import msgpack
import orjson
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from workers.commands import (
    CORE_OPS,
    MAX_COMMAND_BODY_BYTES,
    RECEIVE_ONLY_OPS,
    GatewayCommand,
    decode_command,
    read_stdin_commands,
)
from workers.errors import CommandRejected
from workers.publish.base import Encoding, encode_spectacles

from .strategies import FUZZ, json_values, nested_json, odd_values

pytestmark = pytest.mark.timeout(60)

ENCODINGS: Final[tuple[Encoding, ...]] = get_args(Encoding)
SHARD_COUNTS = st.integers(min_value=1, max_value=2**20)
ROUTING_KEYS = (
    st.sampled_from(["SEND", "0", "1", "7", "01", "-1", "1.0", "٣", "SEND ", "send", "9" * 5000])
    | st.integers(min_value=0, max_value=2**70).map(str)
    | st.text(max_size=12)
)
#: Values a field may hold in MessagePack: JSON's, plus bin, ext and timestamps, and map keys of any type.
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


def check(command: GatewayCommand, shard_count: int) -> None:
    """What a shard relies on in a command that passed."""
    assert 0 <= command.shard_id < shard_count
    assert type(command.op) is int and 0 <= command.op <= 255
    assert command.op not in CORE_OPS | RECEIVE_ONLY_OPS
    orjson.dumps({"op": command.op, "d": command.d})


def decode_or_reject(routing_key: str, body: bytes, encoding: Encoding, shard_count: int) -> None:
    try:
        command = decode_command(routing_key, body, encoding, shard_count)
    except CommandRejected as exc:
        rejected = exc
    else:
        check(command, shard_count)
        return
    assert rejected.reason and len(rejected.reason) < 1024


def encode(value: Any, encoding: Encoding) -> bytes | None:
    """`value` as a body in `encoding`; None where that encoding cannot carry it."""
    try:
        if encoding == "json":
            return orjson.dumps(value)
        if encoding == "spectacles":
            return encode_spectacles(orjson.dumps(value))
        packed: bytes = msgpack.packb(value, use_bin_type=True)
        return packed
    except (TypeError, ValueError, OverflowError):
        return None


@FUZZ
@given(
    routing_key=ROUTING_KEYS,
    body=st.binary(max_size=256),
    encoding=st.sampled_from(ENCODINGS),
    shard_count=SHARD_COUNTS,
)
@example(routing_key="SEND", body=b"\x81\x91\x01\x01", encoding="msgpack", shard_count=1)  # map, array key
@example(routing_key="SEND", body=b"{", encoding="spectacles", shard_count=1)
def test_arbitrary_bodies(routing_key: str, body: bytes, encoding: Encoding, shard_count: int) -> None:
    decode_or_reject(routing_key, body, encoding, shard_count)


@FUZZ
@given(
    routing_key=ROUTING_KEYS,
    guild_id=odd_values
    | st.integers(min_value=-(2**64), max_value=2**65)
    | st.from_regex(r"\A[0-9]{1,22}\Z"),
    op=odd_values | st.integers(min_value=-1, max_value=300),
    d=msgpack_values,
    shape=st.sampled_from(["send", "packet", "no-packet", "no-op", "no-d", "extra"]),
    encoding=st.sampled_from(ENCODINGS),
    shard_count=SHARD_COUNTS,
)
def test_commands_of_every_shape(
    routing_key: str, guild_id: Any, op: Any, d: Any, shape: str, encoding: Encoding, shard_count: int
) -> None:
    packet: dict[str, Any] = {"op": op, "d": d}
    if shape == "no-op":
        del packet["op"]
    elif shape == "no-d":
        del packet["d"]
    elif shape == "extra":
        packet["extra"] = d
    body: Any = packet if shape == "packet" else {"guild_id": guild_id, "packet": packet}
    if shape == "no-packet":
        del body["packet"]
    data = encode(body, encoding)
    if data is not None:
        decode_or_reject(routing_key, data, encoding, shard_count)


@FUZZ
@given(value=msgpack_values | json_values, encoding=st.sampled_from(ENCODINGS), shard_count=SHARD_COUNTS)
def test_bodies_of_any_type(value: Any, encoding: Encoding, shard_count: int) -> None:
    data = encode(value, encoding)
    if data is not None:
        for routing_key in ("SEND", "0"):
            decode_or_reject(routing_key, data, encoding, shard_count)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "body",
    [
        nested_json(100_000),
        nested_json(MAX_COMMAND_BODY_BYTES // 2 - 1),
        b'{"guild_id":"1","packet":{"op":3,"d":' + nested_json(1_000) + b"}}",
        b'{"guild_id":' + nested_json(1_000) + b',"packet":{"op":3,"d":null}}',  # shown in the error
        b'{"op":' + nested_json(1_000) + b',"d":null}',
        b"\x91" * (MAX_COMMAND_BODY_BYTES - 1) + b"\x01",  # MessagePack arrays 64k deep
        b"\x81\xa1d" * 20_000 + b"\xc0",  # MessagePack maps 20k deep
        msgpack.packb("[" * 60_000),  # a spectacles string holding deep JSON
        b'"' + b"x" * (MAX_COMMAND_BODY_BYTES - 2) + b'"',
    ],
    ids=[
        "json-100k",
        "json-max",
        "d-1k",
        "guild-1k",
        "op-1k",
        "msgpack-64k",
        "maps-20k",
        "str-60k",
        "str-max",
    ],
)
def test_deeply_nested_and_oversized_bodies(body: bytes, encoding: Encoding) -> None:
    for routing_key in ("SEND", "0"):
        decode_or_reject(routing_key, body, encoding, 4)


# -- stdin ------------------------------------------------------------------------------------------------


class Chunks(trio.abc.ReceiveStream):
    """A stream that returns the given chunks, then end of file."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = [chunk for chunk in chunks if chunk]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._chunks.pop(0) if self._chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def read_stdin(chunks: list[bytes], shard_count: int) -> list[GatewayCommand | CommandRejected]:
    async def main() -> list[GatewayCommand | CommandRejected]:
        with trio.fail_after(10):
            async with aclosing(read_stdin_commands(Chunks(chunks), shard_count)) as commands:
                return [item async for item in commands]

    return trio.run(main)


def stdin_lines(values: list[Any]) -> bytes:
    return b"".join(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS) + b"\n" for value in values)


def check_stdin(items: list[GatewayCommand | CommandRejected], shard_count: int) -> None:
    for item in items:
        if isinstance(item, GatewayCommand):
            check(item, shard_count)
        else:
            assert item.reason.startswith("line ")


@FUZZ
@given(chunks=st.lists(st.binary(max_size=128), max_size=8), shard_count=SHARD_COUNTS)
@example(chunks=[b'{"t":"' + b"1" * 5000 + b'","d":{}}\n'], shard_count=4)  # int() refuses > 4300 digits
@example(chunks=[b'{"t":"SEND","d":{"guild_id":' + nested_json(1_000) + b"}}"], shard_count=4)
def test_stdin_arbitrary_bytes(chunks: list[bytes], shard_count: int) -> None:
    check_stdin(read_stdin(chunks, shard_count), shard_count)


@FUZZ
@given(
    lines=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "t": ROUTING_KEYS | odd_values | st.integers(min_value=-(2**63), max_value=2**63),
                "d": json_values
                | st.fixed_dictionaries(
                    {"op": odd_values | st.integers(0, 40), "d": json_values},
                    optional={"guild_id": odd_values | st.from_regex(r"\A[0-9]{1,22}\Z")},
                ),
            },
        )
        | json_values,
        max_size=6,
    ),
    cut=st.integers(min_value=1, max_value=64),
    shard_count=SHARD_COUNTS,
)
def test_stdin_lines_of_every_shape(lines: list[Any], cut: int, shard_count: int) -> None:
    try:
        data = stdin_lines(lines)
    except orjson.JSONEncodeError:
        return
    chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
    check_stdin(read_stdin(chunks, shard_count), shard_count)


def test_stdin_huge_lines_are_skipped_whole() -> None:
    line = b'{"t":"0","d":{"op":3,"d":"' + b"x" * 200_000 + b'"}}\n'
    good = b'{"t":"0","d":{"op":3,"d":null}}\n'
    items = read_stdin([good, line[:70_000], line[70_000:], good, b"[" * 100_000 + b"\n", good], 1)
    assert [type(item) for item in items] == [
        GatewayCommand,
        CommandRejected,
        GatewayCommand,
        CommandRejected,
        GatewayCommand,
    ]
