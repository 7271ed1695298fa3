"""Body encodings (byte-exact), the stdio line format and the stdio and null publishers."""

from __future__ import annotations

import os

import msgpack
import orjson
import pytest
import trio
import trio.testing

from workers.errors import PublishError
from workers.publish import NullPublisher, OutboundEvent, StdioPublisher, encode_body
from workers.publish.base import encode_spectacles, msgpack_str_header
from workers.publish.stdio import stdio_line

D = b'{"id":"1234","content":"h\\u00e9llo \xe2\x9c\x93","n":[1,2.5,null,true]}'
EVENT = OutboundEvent(shard_id=3, session_id="sess", seq=42, name="MESSAGE_CREATE", data=D)


@pytest.mark.parametrize("length", [0, 1, 31, 32, 255, 256, 65535, 65536, 70000])
def test_spectacles_is_a_msgpack_str_of_the_json_text(length: int) -> None:
    data = b"x" * length
    body = encode_spectacles(data)
    assert msgpack.unpackb(body, raw=False) == data.decode()
    assert body.endswith(data) and len(body) == len(data) + len(msgpack_str_header(length))


def test_spectacles_header_is_ugorjis_legacy_raw() -> None:
    # spectacles/gateway: ugorji, WriteExt=false -> fixstr < 32, then str16 (0xda) and str32 (0xdb), no str8.
    assert encode_spectacles(b"{}") == b"\xa2{}"
    assert encode_spectacles(b"a" * 31)[:1] == b"\xbf"
    assert encode_spectacles(b"a" * 32)[:3] == b"\xda\x00\x20"
    assert encode_spectacles(b"a" * 255)[:3] == b"\xda\x00\xff"
    assert encode_spectacles(b"a" * 65535)[:3] == b"\xda\xff\xff"
    assert encode_spectacles(b"a" * 65536)[:5] == b"\xdb\x00\x01\x00\x00"


def test_encode_body_per_encoding() -> None:
    body, content_type = encode_body(EVENT, "spectacles")
    assert (body, content_type) == (b"\xda\x00" + bytes((len(D),)) + D, "application/msgpack")
    assert msgpack.unpackb(body, raw=False).encode() == D

    body, content_type = encode_body(EVENT, "msgpack")
    assert content_type == "application/msgpack"
    assert body == msgpack.packb(orjson.loads(D))
    assert msgpack.unpackb(body) == {"id": "1234", "content": "h\u00e9llo \u2713", "n": [1, 2.5, None, True]}

    assert encode_body(EVENT, "json") == (D, "application/json")
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_body(EVENT, "xml")  # type: ignore[arg-type]


def test_stdio_line_copies_d_verbatim() -> None:
    line = stdio_line(EVENT)
    assert line == b'{"t":"MESSAGE_CREATE","s":42,"shard":3,"d":' + D + b"}\n"
    assert orjson.loads(line) == {"t": "MESSAGE_CREATE", "s": 42, "shard": 3, "d": orjson.loads(D)}


async def test_stdio_publisher_never_interleaves_concurrent_batches() -> None:
    send, receive = trio.testing.memory_stream_pair()
    publisher = StdioPublisher(send)
    events = [
        OutboundEvent(0, "s", seq, "READY" if seq == 1 else "X", b'{"s":%d}' % seq) for seq in range(1, 6)
    ]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher.publish, events[:3])
            nursery.start_soon(publisher.publish, events[3:])
        await publisher.aclose()
        received = b""
        while chunk := await receive.receive_some():
            received += chunk
    lines = [orjson.loads(line) for line in received.splitlines()]
    assert [line["s"] for line in lines] in ([1, 2, 3, 4, 5], [4, 5, 1, 2, 3])  # trio picks who goes first
    assert all(line["d"]["s"] == line["s"] and line["shard"] == 0 for line in lines)
    assert [line["t"] for line in lines if line["s"] == 1] == ["READY"]


async def test_stdio_publisher_over_a_pipe_and_broken_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with trio.fail_after(5):
            async with StdioPublisher(fd=write_fd) as publisher:
                await publisher.publish([EVENT])
                assert os.read(read_fd, 65536) == stdio_line(EVENT)
                os.close(read_fd)
                read_fd = -1
                with pytest.raises(PublishError, match="stdout write failed"):
                    await publisher.publish([EVENT])
        assert os.get_blocking(write_fd)  # the dup is closed; our fd keeps its blocking mode
    finally:
        os.close(write_fd)
        if read_fd >= 0:
            os.close(read_fd)


async def test_null_publisher_accepts_everything() -> None:
    publisher = NullPublisher()
    await publisher.publish([EVENT, EVENT])
    await publisher.publish([])
    assert (publisher.events, publisher.batches) == (2, 2)
