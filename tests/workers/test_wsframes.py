"""The WebSocket frame codec (workers/wsframes.py): pure tests, no sockets, with wsproto as the reference.

Server frames are built by hand (`frame`) or by wsproto's server side; the parser must yield the messages
and control frames wsproto's client-side parser yields, and wsproto's server must read the client frames
this module encodes. The connection on top (workers/websocket.py) is covered by the worker tests against
the simulator.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from workers import wsframes
from workers.wsframes import Close, FrameError, FrameParser, Ping, Pong

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, length_bytes: int | None = None
) -> bytes:
    """A server frame (unmasked) built by hand; `length_bytes` forces a 0-, 2- or 8-byte extended length."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    size = length_bytes if length_bytes is not None else 0 if length < 126 else 2 if length < 65_536 else 8
    if size == 0:
        header = bytes((first, length))
    elif size == 2:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def feed_all(parser: FrameParser, *chunks: bytes) -> list[bytes | str]:
    messages: list[bytes | str] = []
    for chunk in chunks:
        messages += parser.feed(chunk)
    return messages


# -- messages -----------------------------------------------------------------------------------------


def test_unfragmented_frames_of_each_length_form() -> None:
    small, medium, large = b"a" * 125, b"b" * 126, os.urandom(70_000)
    data = frame(2, small) + frame(2, medium) + frame(2, large) + frame(1, "héllo".encode()) + frame(2)
    parser = FrameParser()
    assert parser.feed(data) == [small, medium, large, "héllo", b""]
    assert parser.controls == []


def test_fragmented_message_with_control_frames_between_fragments() -> None:
    data = (
        frame(1, b"he", fin=False)
        + frame(9, b"ping-1")
        + frame(0, "ll\xc3".encode("latin-1"), fin=False)  # a character split across fragments
        + frame(10, b"pong")
        + frame(0, b"\xa9o")
        + frame(2, b"next")
    )
    parser = FrameParser()
    assert parser.feed(data) == ["hell\u00e9o", b"next"]
    assert parser.controls == [Ping(b"ping-1"), Pong(b"pong")]


def test_binary_fragments_are_joined() -> None:
    parser = FrameParser()
    assert parser.feed(frame(2, b"ab", fin=False) + frame(0, b"cd", fin=False)) == []
    assert parser.feed(frame(0, b"ef")) == [b"abcdef"]


def test_close_frame_mid_buffer_ends_parsing() -> None:
    data = frame(2, b"before") + frame(8, struct.pack("!H", 4004) + b"Authentication failed.")
    parser = FrameParser()
    assert parser.feed(data + frame(2, b"after") + b"\xff\xff garbage") == [b"before"]
    assert parser.controls == [Close(4004, "Authentication failed.")]
    assert parser.closed
    assert parser.feed(frame(2, b"later")) == []


def test_close_frame_without_a_code() -> None:
    parser = FrameParser()
    parser.feed(frame(8))
    assert parser.controls == [Close(None, "")]


def test_controls_are_left_for_the_caller_to_take() -> None:
    parser = FrameParser()
    parser.feed(frame(9, b"1"))
    parser.feed(frame(9, b"2"))
    assert parser.controls == [Ping(b"1"), Ping(b"2")]


STREAM = (
    frame(2, b"x" * 100)
    + frame(1, b"t" * 300)  # 16-bit length
    + frame(2, b"ab", fin=False)
    + frame(9, b"p")
    + frame(0, b"cd")
    + frame(2)
    + frame(8, struct.pack("!H", 4000))
)
STREAM_MESSAGES: list[bytes | str] = [b"x" * 100, "t" * 300, b"abcd", b""]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_stream_fed_in_small_chunks(chunk: int) -> None:
    parser = FrameParser()
    pieces = [STREAM[i : i + chunk] for i in range(0, len(STREAM), chunk)]
    assert feed_all(parser, *pieces) == STREAM_MESSAGES
    assert parser.controls == [Ping(b"p"), Close(4000, "")]


def test_stream_split_at_every_byte_offset() -> None:
    for cut in range(len(STREAM) + 1):
        parser = FrameParser()
        assert feed_all(parser, STREAM[:cut], STREAM[cut:]) == STREAM_MESSAGES, cut
        assert parser.controls == [Ping(b"p"), Close(4000, "")], cut


def test_64_bit_length_frame_split_around_its_header_and_payload() -> None:
    payload = os.urandom(70_000)
    data = frame(2, b"head") + frame(2, payload) + frame(2, b"tail")
    offsets = [*range(32), 1_000, 35_000, len(data) - 11, len(data) - 7, len(data) - 1, len(data)]
    for cut in offsets:
        parser = FrameParser()
        assert feed_all(parser, data[:cut], data[cut:]) == [b"head", payload, b"tail"], cut


def test_a_large_message_arriving_in_reads_is_joined_once_complete() -> None:
    payload = os.urandom(300_000)
    data = frame(2, payload)
    parser = FrameParser()
    reads = [data[i : i + 65_536] for i in range(0, len(data), 65_536)]
    assert [parser.feed(read) for read in reads[:-1]] == [[]] * (len(reads) - 1)
    assert parser.feed(reads[-1]) == [payload]


# -- limits and protocol errors -----------------------------------------------------------------------


@pytest.mark.parametrize("length_bytes", [2, 8])
def test_a_frame_over_the_limit_fails_on_its_header(length_bytes: int) -> None:
    limit = 1_000 if length_bytes == 2 else 70_000
    size = limit + 1
    header = frame(2, b"\0" * size, length_bytes=length_bytes)[: 2 + length_bytes]
    with pytest.raises(FrameError) as info:
        FrameParser(limit).feed(header)  # no payload needed: the header is enough to refuse it
    assert info.value.code == wsframes.CLOSE_MESSAGE_TOO_BIG


def test_a_frame_at_the_limit_passes() -> None:
    assert FrameParser(1_000).feed(frame(2, b"\0" * 1_000)) == [b"\0" * 1_000]


def test_fragments_over_the_limit_together() -> None:
    parser = FrameParser(1_000)
    parser.feed(frame(2, b"\0" * 600, fin=False))
    with pytest.raises(FrameError) as info:
        parser.feed(frame(0, b"\0" * 600))
    assert info.value.code == wsframes.CLOSE_MESSAGE_TOO_BIG


def test_the_worker_limit_is_64_mib() -> None:
    header = struct.pack("!BBQ", 0x82, 127, 64 * 1024 * 1024 + 1)
    with pytest.raises(FrameError):
        FrameParser().feed(header)
    assert FrameParser().feed(struct.pack("!BBQ", 0x82, 127, 64 * 1024 * 1024)) == []  # waits for the rest


PROTOCOL_ERRORS = {
    "masked": bytes((0x82, 0x81)) + b"\0\0\0\0x",
    "rsv1": frame(2, b"x", rsv=4),
    "rsv3 on a control frame": frame(9, b"x", rsv=1),
    "opcode 3": frame(3, b"x"),
    "opcode 0xb": frame(0xB, b"x"),
    "control frame over 125 bytes": frame(9, b"x" * 126),
    "fragmented control frame": frame(9, b"x", fin=False),
    "continuation without a start": frame(0, b"x"),
    "new message inside a fragmented one": frame(2, b"a", fin=False) + frame(1, b"b"),
    "16-bit length that fits 7 bits": frame(2, b"x" * 125, length_bytes=2),
    "64-bit length that fits 16 bits": frame(2, b"x" * 65_535, length_bytes=8),
    "64-bit length with its top bit set": struct.pack("!BBQ", 0x82, 127, 1 << 63),
    "close with a 1-byte payload": frame(8, b"\x03"),
    "close code 999": frame(8, struct.pack("!H", 999)),
    "close code 1005 (local only)": frame(8, struct.pack("!H", 1005)),
    "close code 1006 (local only)": frame(8, struct.pack("!H", 1006)),
    "close code 2000 (reserved)": frame(8, struct.pack("!H", 2000)),
    "close code 5000": frame(8, struct.pack("!H", 5000)),
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ERRORS))
def test_protocol_errors(name: str) -> None:
    data = PROTOCOL_ERRORS[name]
    with pytest.raises(FrameError) as info:
        FrameParser(100_000).feed(data)
    assert info.value.code == wsframes.CLOSE_PROTOCOL_ERROR
    reference = FrameProtocol(client=True, extensions=[])
    reference.receive_bytes(data)
    with pytest.raises(ParseFailed):
        list(reference.received_frames())


@pytest.mark.parametrize(
    "data",
    [
        frame(1, b"\xff"),
        frame(1, b"a\xc3", fin=False) + frame(0, b"("),
        frame(8, struct.pack("!H", 4000) + b"\xff"),
    ],
)
def test_invalid_utf8_is_1007(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        FrameParser().feed(data)
    assert info.value.code == wsframes.CLOSE_INVALID_DATA


def test_a_bad_control_frame_fails_before_its_payload_arrives() -> None:
    with pytest.raises(FrameError):
        FrameParser().feed(struct.pack("!BBH", 0x89, 126, 200))


# -- property tests against wsproto ------------------------------------------------------------------

# One server message: text or binary, cut into fragments at these fractions, with a ping after some.
server_messages = st.lists(
    st.tuples(
        st.one_of(st.binary(max_size=300), st.text(max_size=150), st.binary(min_size=126, max_size=70_000)),
        st.lists(st.floats(0, 1), max_size=3),
        st.booleans(),
    ),
    max_size=6,
)


def _wsproto_server_bytes(messages: list[tuple[bytes | str, list[float], bool]], close: int | None) -> bytes:
    server = Connection(ConnectionType.SERVER)
    out = bytearray()
    for data, cuts, ping in messages:
        points = sorted({int(len(data) * cut) for cut in cuts})
        parts = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            event = (
                TextMessage(part, message_finished=last)
                if isinstance(part, str)
                else BytesMessage(part, message_finished=last)
            )
            out += server.send(event)
            if ping and not last:
                out += server.send(WsPing(b"between"))
        if ping:
            out += server.send(WsPong(b"after"))
    if close is not None:
        out += server.send(CloseConnection(close, "bye"))
    return bytes(out)


def _reference(data: bytes) -> tuple[list[bytes | str], list[Ping | Pong | Close]]:
    """wsproto's client-side parser over `data`: the messages and control frames."""
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(data)
    messages: list[bytes | str] = []
    controls: list[Ping | Pong | Close] = []
    parts: list[bytes | str] = []
    for received in protocol.received_frames():
        if received.opcode is Opcode.PING:
            controls.append(Ping(bytes(received.payload)))  # type: ignore[arg-type]
        elif received.opcode is Opcode.PONG:
            controls.append(Pong(bytes(received.payload)))  # type: ignore[arg-type]
        elif received.opcode is Opcode.CLOSE:
            code, reason = received.payload  # type: ignore[misc]
            controls.append(Close(None if code == 1005 else int(code), reason))
        else:
            payload = received.payload
            parts.append(payload if isinstance(payload, str) else bytes(payload))
            if received.message_finished:
                text = isinstance(parts[0], str) or received.opcode is Opcode.TEXT
                messages.append(
                    "".join(map(str, parts)) if text else b"".join(p for p in parts if isinstance(p, bytes))
                )
                parts = []
    return messages, controls


@FAST
@given(server_messages, st.one_of(st.none(), st.sampled_from([1000, 1011, 4000, 4004, 4999])), st.randoms())
def test_parser_agrees_with_wsproto(
    messages: list[tuple[bytes | str, list[float], bool]], close: int | None, rng: random.Random
) -> None:
    data = _wsproto_server_bytes(messages, close)
    expected_messages, expected_controls = _reference(data)
    assert expected_messages == [message for message, _, _ in messages]
    cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    parser = FrameParser()
    assert feed_all(parser, *chunks) == expected_messages
    assert parser.controls == expected_controls


# Arbitrary frames, mostly well formed: both parsers must agree on the messages and on whether it fails.
raw_frames = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, 8, 9, 10, 0xB]),
        st.booleans(),
        st.sampled_from([0, 0, 0, 0, 1, 4]),
        st.one_of(st.binary(max_size=130), st.text(max_size=40).map(str.encode)),
    ),
    max_size=8,
)


@FAST
@given(raw_frames)
def test_parser_agrees_with_wsproto_on_arbitrary_frames(frames: list[tuple[int, bool, int, bytes]]) -> None:
    data = b"".join(frame(opcode, payload, fin=fin, rsv=rsv) for opcode, fin, rsv, payload in frames)
    try:
        expected: tuple[list[bytes | str], list[Ping | Pong | Close]] | None = _reference(data)
    except ParseFailed:
        expected = None
    except UnicodeDecodeError:  # wsproto lets a bad continuation of UTF-8 escape as this
        expected = None
    parser = FrameParser()
    try:
        got: tuple[list[bytes | str], list[Ping | Pong | Close]] | None = (parser.feed(data), parser.controls)
    except FrameError:
        got = None
    if expected is None and got is not None:
        # wsproto checks text as it arrives, this parser once the message is complete: they differ only on
        # an unfinished text message (bad UTF-8 so far) at the end of the input.
        assert parser._fragment_opcode == wsframes.OP_TEXT
        return
    assert got == expected


@FAST
@given(st.one_of(st.text(max_size=5_000), st.binary(max_size=70_000)), st.binary(max_size=125))
def test_wsproto_server_reads_our_client_frames(message: str | bytes, ping_payload: bytes) -> None:
    data = wsframes.encode_text(message) if isinstance(message, str) else wsframes.encode_frame(2, message)
    data += wsframes.encode_pong(ping_payload) + wsframes.encode_close(4900, "resumable")
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(data)
    received = list(server.received_frames())
    payloads = [f.payload for f in received if f.opcode in (Opcode.TEXT, Opcode.BINARY)]
    assert ("".join(payloads) if isinstance(message, str) else b"".join(payloads)) == message  # type: ignore[arg-type]
    assert [(f.opcode, f.payload) for f in received[-2:]] == [
        (Opcode.PONG, ping_payload),
        (Opcode.CLOSE, (4900, "resumable")),
    ]


def test_client_frames_are_masked_with_a_fresh_key() -> None:
    one, two = wsframes.encode_text("same"), wsframes.encode_text("same")
    assert one[1] & 0x80 and two[1] & 0x80
    assert one != two  # two random keys agree with odds of 2**-32
    assert wsframes.encode_text("same", mask=b"\0\0\0\0") == b"\x81\x84\0\0\0\0same"


def test_close_frames() -> None:
    mask = b"\0\0\0\0"
    assert wsframes.encode_close(None, mask=mask) == b"\x88\x80" + mask
    assert wsframes.encode_close(4000, "x", mask=mask) == b"\x88\x83" + mask + b"\x0f\xa0x"
    long = wsframes.encode_close(4000, "é" * 100, mask=mask)
    assert len(long) == 2 + 4 + 125 - 1  # cut to 123 bytes of reason, less the half character
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(long)
    [closed] = server.received_frames()
    assert closed.payload == (4000, "é" * 61)
