"""Commands to the gateway: body encodings, every rejection, shard routing and the stdin reader."""

from __future__ import annotations

import os
from contextlib import aclosing
from typing import Any

import msgpack
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.commands import (
    MAX_COMMAND_BODY_BYTES,
    MAX_STDIN_LINE_BYTES,
    GatewayCommand,
    decode_command,
    read_stdin_commands,
    shard_for_guild,
)
from workers.errors import CommandRejected
from workers.publish.base import ENCODINGS, Encoding, encode_spectacles

GUILD = 81384788765712384  # (GUILD >> 22) == 19403645698
PRESENCE: dict[str, Any] = {"since": None, "activities": [], "status": "online", "afk": False}
MEMBERS: dict[str, Any] = {"guild_id": str(GUILD), "query": "", "limit": 0, "nonce": "n1"}


def encode(body: object, encoding: Encoding) -> bytes:
    if encoding == "spectacles":
        return encode_spectacles(orjson.dumps(body))
    if encoding == "msgpack":
        packed: bytes = msgpack.packb(body)
        return packed
    return orjson.dumps(body)


# -- routing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guild_id", "shard_count", "shard_id"),
    [
        (81384788765712384, 1, 0),
        (81384788765712384, 3, 1),
        (81384788765712384, 16, 2),
        (81384788765712384, 1000, 698),
        (41771983423143937, 5, 4),
        (41771983423143937, 64, 38),
        (613425648685547541, 7, 5),
        (613425648685547541, 64, 56),
        ((1 << 22) - 1, 2, 0),  # the low 22 bits (worker, process, increment) never affect the shard
        (1 << 22, 2, 1),
    ],
)
def test_shard_for_guild_matches_known_snowflakes(guild_id: int, shard_count: int, shard_id: int) -> None:
    assert shard_for_guild(guild_id, shard_count) == shard_id


def test_shard_for_guild_needs_a_shard() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        shard_for_guild(GUILD, 0)


# -- encodings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_send_in_every_encoding(encoding: Encoding) -> None:
    body = {"guild_id": str(GUILD), "packet": {"op": 8, "d": MEMBERS}}
    assert decode_command("SEND", encode(body, encoding), encoding, 16) == GatewayCommand(2, 8, MEMBERS)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_shard_routing_key_in_every_encoding(encoding: Encoding) -> None:
    body = {"op": 3, "d": PRESENCE}
    assert decode_command("5", encode(body, encoding), encoding, 16) == GatewayCommand(5, 3, PRESENCE)


def test_spectacles_accepts_the_shapes_spectacles_clients_send() -> None:
    body = {"guild_id": GUILD, "packet": {"op": 4, "d": None}}
    expected = GatewayCommand(2, 4, None)
    # Go clients: a MessagePack str of JSON text (fixstr/str16/str32 as ugorji writes, or msgpack's str8).
    assert decode_command("SEND", encode_spectacles(orjson.dumps(body)), "spectacles", 16) == expected
    assert decode_command("SEND", msgpack.packb(orjson.dumps(body).decode()), "spectacles", 16) == expected
    # A MessagePack bin of JSON text.
    assert decode_command("SEND", msgpack.packb(orjson.dumps(body)), "spectacles", 16) == expected
    # @spectacles/brokers (JS) encodes the object itself as a MessagePack map.
    assert decode_command("SEND", msgpack.packb(body), "spectacles", 16) == expected
    # A JS Buffer goes out unencoded: bare JSON text, also the pre-2021 format.
    assert decode_command("SEND", orjson.dumps(body), "spectacles", 16) == expected


def test_guild_id_as_string_or_integer() -> None:
    for guild_id in (str(GUILD), GUILD):
        body = orjson.dumps({"guild_id": guild_id, "packet": {"op": 8, "d": MEMBERS}})
        assert decode_command("SEND", body, "json", 3).shard_id == 1


def test_extra_packet_keys_are_dropped() -> None:
    body = orjson.dumps({"op": 3, "d": PRESENCE, "s": 5, "t": "X"})
    assert decode_command("0", body, "json", 1) == GatewayCommand(0, 3, PRESENCE)


# -- rejections ----------------------------------------------------------------------------------------------

REJECTIONS: list[tuple[str, str, bytes, Encoding, str]] = [
    # (case, routing key, body, encoding, reason fragment)
    ("unknown routing key", "MESSAGE_CREATE", b"{}", "json", "unknown routing key"),
    ("lowercase send", "send", b"{}", "json", "unknown routing key"),
    ("empty routing key", "", b"{}", "json", "unknown routing key"),
    ("non-canonical shard id", "03", b'{"op":3,"d":null}', "json", "unknown routing key"),
    ("signed shard id", "+3", b'{"op":3,"d":null}', "json", "unknown routing key"),
    ("unicode digits", "\u0663", b'{"op":3,"d":null}', "json", "unknown routing key"),
    ("shard id out of range", "16", b'{"op":3,"d":null}', "json", "out of range"),
    ("body too large", "0", b" " * (MAX_COMMAND_BODY_BYTES + 1), "json", "over the"),
    ("bad json", "0", b'{"op":3,', "json", "not valid json"),
    ("bad msgpack", "0", b"\xc1", "msgpack", "not valid msgpack"),
    ("msgpack extra data", "0", b"\x80\x80", "msgpack", "not valid msgpack"),
    ("spectacles str not json", "0", msgpack.packb("op 3"), "spectacles", "not valid spectacles"),
    ("spectacles str bad utf-8", "0", b"\xa2\xff\xfe", "spectacles", "not valid spectacles"),
    ("spectacles bare json broken", "0", b'{"op"', "spectacles", "not valid spectacles"),
    ("not an object (list)", "0", b"[3, null]", "json", "body must be an object"),
    ("not an object (msgpack int)", "0", msgpack.packb(3), "msgpack", "body must be an object"),
    ("not an object (spectacles)", "0", msgpack.packb("[]"), "spectacles", "body must be an object"),
    ("send without guild_id", "SEND", b'{"packet":{"op":3,"d":null}}', "json", "no guild_id"),
    ("guild_id null", "SEND", b'{"guild_id":null,"packet":{"op":3,"d":null}}', "json", "guild_id must be"),
    ("guild_id bool", "SEND", b'{"guild_id":true,"packet":{"op":3,"d":null}}', "json", "guild_id must be"),
    ("guild_id float", "SEND", b'{"guild_id":1.5,"packet":{"op":3,"d":null}}', "json", "guild_id must be"),
    ("guild_id words", "SEND", b'{"guild_id":"abc","packet":{"op":3,"d":null}}', "json", "guild_id must be"),
    ("guild_id signed", "SEND", b'{"guild_id":"-5","packet":{"op":3,"d":null}}', "json", "guild_id must be"),
    ("guild_id zero", "SEND", b'{"guild_id":0,"packet":{"op":3,"d":null}}', "json", "not a valid snowflake"),
    ("guild_id negative", "SEND", b'{"guild_id":-1,"packet":{"op":3,"d":null}}', "json", "not a valid snow"),
    ("guild_id too big", "SEND", b'{"guild_id":"18446744073709551616","packet":{}}', "json", "not a valid"),
    ("send without packet", "SEND", b'{"guild_id":"1"}', "json", "no packet"),
    ("packet not an object", "SEND", b'{"guild_id":"1","packet":"{}"}', "json", "packet must be an object"),
    ("packet without op", "SEND", b'{"guild_id":"1","packet":{"d":null}}', "json", 'both "op" and "d"'),
    ("packet without d", "0", b'{"op":3}', "json", 'both "op" and "d"'),
    ("op as string", "0", b'{"op":"3","d":null}', "json", "op must be an integer"),
    ("op as bool", "0", b'{"op":true,"d":null}', "json", "op must be an integer"),
    ("op as float", "0", b'{"op":3.0,"d":null}', "json", "op must be an integer"),
    ("op negative", "0", b'{"op":-3,"d":null}', "json", "op must be an integer"),
    ("op heartbeat", "0", b'{"op":1,"d":5}', "json", "reserved for the gateway"),
    ("op identify", "SEND", b'{"guild_id":"1","packet":{"op":2,"d":{}}}', "json", "reserved for the gateway"),
    ("op resume", "0", b'{"op":6,"d":{}}', "json", "reserved for the gateway"),
    ("op dispatch", "0", b'{"op":0,"d":{}}', "json", "sent by Discord only"),
    ("op hello", "0", b'{"op":10,"d":{}}', "json", "sent by Discord only"),
    ("d is bytes", "0", msgpack.packb({"op": 3, "d": b"\x00"}), "msgpack", "no JSON form"),
    ("d is an ext", "0", msgpack.packb({"op": 3, "d": msgpack.ExtType(5, b"x")}), "msgpack", "no JSON form"),
    ("d has an int key", "0", msgpack.packb({"op": 3, "d": {1: 2}}), "msgpack", "not valid msgpack"),
    ("d has a bin key", "0", msgpack.packb({"op": 3, "d": {b"k": 2}}), "msgpack", "no JSON form"),
]


@pytest.mark.parametrize(
    ("routing_key", "body", "encoding", "fragment"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejections(routing_key: str, body: bytes, encoding: Encoding, fragment: str) -> None:
    with pytest.raises(CommandRejected) as info:
        decode_command(routing_key, body, encoding, 16)
    assert fragment.lower() in info.value.reason.lower()


INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PACKETS = st.fixed_dictionaries({"op": st.integers(min_value=-2, max_value=40)}, optional={"d": VALUES})


@settings(max_examples=500, deadline=None)
@given(
    routing_key=st.one_of(st.sampled_from(["SEND", "0", "3", "15", "16", "-1", " 1"]), st.text(max_size=8)),
    body=st.one_of(
        st.binary(max_size=256),
        VALUES.map(msgpack.packb),
        PACKETS.map(msgpack.packb),
        st.fixed_dictionaries({"guild_id": INT64 | st.text(max_size=21), "packet": PACKETS | VALUES}).map(
            msgpack.packb
        ),
    ),
    encoding=st.sampled_from(ENCODINGS),
    shard_count=st.integers(min_value=1, max_value=64),
)
def test_decode_only_ever_raises_command_rejected(
    routing_key: str, body: bytes, encoding: Encoding, shard_count: int
) -> None:
    try:
        command = decode_command(routing_key, body, encoding, shard_count)
    except CommandRejected:
        return
    assert 0 <= command.shard_id < shard_count
    assert command.op not in {0, 1, 2, 6, 7, 9, 10, 11}
    orjson.dumps(command.d)


# -- stdin ---------------------------------------------------------------------------------------------------


async def collect(
    data: bytes, shard_count: int = 16, chunk: int = 7
) -> list[GatewayCommand | CommandRejected]:
    """Feed ``data`` in ``chunk``-byte pieces (so lines straddle reads) and gather what the reader yields."""
    send, receive = trio.testing.memory_stream_pair()
    results: list[GatewayCommand | CommandRejected] = []

    async def feed() -> None:
        for start in range(0, len(data), chunk):
            await send.send_all(data[start : start + chunk])
        await send.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            async with aclosing(read_stdin_commands(receive, shard_count)) as commands:
                results.extend([item async for item in commands])
    return results


def summary(results: list[GatewayCommand | CommandRejected]) -> list[object]:
    return [item.reason if isinstance(item, CommandRejected) else item for item in results]


async def test_stdin_good_and_bad_lines() -> None:
    lines = [
        orjson.dumps({"t": "SEND", "d": {"guild_id": str(GUILD), "packet": {"op": 8, "d": MEMBERS}}}),
        b"not json",
        b"",
        orjson.dumps({"t": "3", "d": {"op": 3, "d": PRESENCE}}) + b"\r",
        orjson.dumps({"t": 4, "d": {"op": 4, "d": None}}),
        orjson.dumps({"t": "3", "d": {"op": 2, "d": {}}}),
        orjson.dumps({"t": "99", "d": {"op": 3, "d": PRESENCE}}),
        b"[1, 2]",
        orjson.dumps({"t": "3"}),
        orjson.dumps({"t": None, "d": {}}),
        b"   ",
        orjson.dumps({"t": "0", "d": {"op": 3, "d": None}}),  # no final newline
    ]
    results = summary(await collect(b"\n".join(lines)))
    assert len(results) == 10
    assert results[0] == GatewayCommand(2, 8, MEMBERS)
    assert isinstance(results[1], str) and results[1].startswith("line 2: not valid JSON")
    assert results[2] == GatewayCommand(3, 3, PRESENCE)
    assert results[3] == GatewayCommand(4, 4, None)
    assert isinstance(results[4], str) and results[4].startswith("line 6: op 2")
    assert isinstance(results[5], str) and results[5].startswith("line 7: shard id 99 out of range")
    assert isinstance(results[6], str) and results[6].startswith("line 8: a line must be a JSON object")
    assert isinstance(results[7], str) and results[7].startswith('line 9: a line needs both "t"')
    assert isinstance(results[8], str) and results[8].startswith('line 10: "t" must be')
    assert results[9] == GatewayCommand(0, 3, None)


@pytest.mark.parametrize("chunk", [997, 65536, 200_000])
async def test_stdin_overlong_line_is_rejected_and_reading_goes_on(chunk: int) -> None:
    good = orjson.dumps({"t": "1", "d": {"op": 3, "d": PRESENCE}})
    long_line = orjson.dumps({"t": "1", "d": {"op": 3, "d": "x" * MAX_STDIN_LINE_BYTES}})
    results = summary(await collect(b"\n".join([good, long_line, good, long_line]), chunk=chunk))
    too_long = f"longer than {MAX_STDIN_LINE_BYTES} bytes"
    assert results == [
        GatewayCommand(1, 3, PRESENCE),
        f"line 2: {too_long}",
        results[0],
        f"line 4: {too_long}",
    ]


async def test_stdin_line_at_the_limit_is_read() -> None:
    prefix, suffix = b'{"t":"1","d":{"op":3,"d":"', b'"}}'
    line = prefix + b"x" * (MAX_STDIN_LINE_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(line) == MAX_STDIN_LINE_BYTES
    [result] = await collect(line + b"\n", chunk=4096)
    assert isinstance(result, GatewayCommand) and result.shard_id == 1


async def test_stdin_over_a_real_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(
            write_fd, b'{"t":"SEND","d":{"guild_id":"81384788765712384","packet":{"op":3,"d":null}}}\nbad\n'
        )
    finally:
        os.close(write_fd)
    async with trio.lowlevel.FdStream(read_fd) as stream:
        with trio.fail_after(5):
            async with aclosing(read_stdin_commands(stream, 3)) as commands:
                results = summary([item async for item in commands])
    assert results[0] == GatewayCommand(1, 3, None)
    assert isinstance(results[1], str) and results[1].startswith("line 2: not valid JSON")
    assert len(results) == 2
