"""Fuzz the transport decompressors (workers/decompress.py) for zlib-stream and zstd-stream.

The shard catches `TransportError` from `Decompressor.feed` and replaces the connection (and with it the
decompressor), so for any sequence of messages `feed` must return bytes or None, or raise `TransportError`;
valid streams, however the messages are cut into frames, must come out whole; and no message may inflate
past `MAX_PAYLOAD_BYTES` (a decompression bomb would take the worker and all its shards down).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Final

import orjson
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from workers import decompress
from workers.decompress import MAX_PAYLOAD_BYTES, ZLIB_SUFFIX, Decompressor
from workers.errors import TransportError
from workers.settings import Compression

from .strategies import FUZZ, json_values

pytestmark = pytest.mark.timeout(60)

CODECS: Final[tuple[Compression, ...]] = ("zlib-stream", "zstd-stream")
#: Small enough that the bomb properties run fast; the real bound has its own test below.
SMALL_LIMIT: Final = 256 * 1024


class Stream:
    """The server side of one connection: one compression context, one flush per gateway message."""

    def __init__(self, compression: Compression, *, level: int = 3) -> None:
        self.compression = compression
        self._zlib = zlib.compressobj(level) if compression == "zlib-stream" else None
        self._zstd = (
            zstandard.ZstdCompressor(level=level).compressobj() if compression == "zstd-stream" else None
        )

    def message(self, payload: bytes) -> bytes:
        if self._zlib is not None:
            return self._zlib.compress(payload) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        assert self._zstd is not None
        return self._zstd.compress(payload) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


def feed_all(decompressor: Decompressor, frames: list[bytes]) -> Iterator[bytes]:
    """What the shard would see: each completed payload, or TransportError (which ends the connection)."""
    for frame in frames:
        result = decompressor.feed(frame)
        assert result is None or isinstance(result, bytes)
        if result is not None:
            yield result


def payloads_of(values: list[object]) -> list[bytes]:
    return [orjson.dumps({"op": 0, "s": i, "t": "X", "d": value}) for i, value in enumerate(values)]


def split(message: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(message) + 1) for cut in cuts} | {0, len(message)})
    return [message[a:b] for a, b in itertools.pairwise(points)] or [message]


# -- arbitrary input --------------------------------------------------------------------------------------


@FUZZ
@given(compression=st.sampled_from(CODECS), frames=st.lists(st.binary(max_size=256), max_size=8))
def test_random_bytes(compression: Compression, frames: list[bytes]) -> None:
    with contextlib.suppress(TransportError):
        list(feed_all(Decompressor(compression), frames))


@FUZZ
@given(
    compression=st.sampled_from(CODECS),
    values=st.lists(json_values, min_size=1, max_size=4),
    junk=st.binary(min_size=1, max_size=64),
    at=st.integers(min_value=0),
    suffix=st.booleans(),
)
def test_valid_stream_then_corruption(
    compression: Compression, values: list[object], junk: bytes, at: int, suffix: bool
) -> None:
    """Junk spliced into a valid stream: an error, or bytes (which the JSON decoder then refuses)."""
    stream = Stream(compression)
    frames = [stream.message(payload) for payload in payloads_of(values)]
    index = at % len(frames)
    cut = at % (len(frames[index]) + 1)
    frames[index] = frames[index][:cut] + junk + frames[index][cut:]
    if suffix:
        frames.append(junk + ZLIB_SUFFIX)
    with contextlib.suppress(TransportError):
        list(feed_all(Decompressor(compression), frames))


@FUZZ
@given(
    compression=st.sampled_from(CODECS),
    values=st.lists(json_values, min_size=1, max_size=4),
    keep=st.integers(min_value=0),
)
def test_truncated_stream(compression: Compression, values: list[object], keep: int) -> None:
    """A stream cut short (the connection dropped mid-message) yields the messages before the cut."""
    stream = Stream(compression)
    payloads = payloads_of(values)
    data = b"".join(stream.message(payload) for payload in payloads)
    cut = keep % (len(data) + 1)
    try:
        out = b"".join(feed_all(Decompressor(compression), [data[:cut]]))
    except TransportError:
        return
    assert b"".join(payloads).startswith(out)


# -- valid streams, cut anywhere ------------------------------------------------------------------------


@FUZZ
@given(
    compression=st.sampled_from(CODECS),
    values=st.lists(json_values, min_size=1, max_size=6),
    cuts=st.lists(st.lists(st.integers(min_value=0), max_size=4), min_size=6, max_size=6),
)
def test_valid_stream_split_into_frames(
    compression: Compression, values: list[object], cuts: list[list[int]]
) -> None:
    stream = Stream(compression)
    payloads = payloads_of(values)
    frames: list[bytes] = []
    for payload, message_cuts in zip(payloads, cuts, strict=False):
        frames += split(stream.message(payload), message_cuts)
    outputs = list(feed_all(Decompressor(compression), frames))
    assert b"".join(outputs) == b"".join(payloads)
    if compression == "zlib-stream" and not any(frame.endswith(ZLIB_SUFFIX) for frame in frames[:-1]):
        assert outputs == payloads  # whole messages, however many frames each took


@pytest.mark.parametrize("compression", CODECS)
def test_valid_stream_split_at_every_byte(compression: Compression) -> None:
    """Every message of a 3-message stream cut into two frames at every position."""
    payloads = payloads_of([{"content": "hello " * 20, "n": n} for n in range(3)])
    stream = Stream(compression)
    messages = [stream.message(payload) for payload in payloads]
    for index, message in enumerate(messages):
        for cut in range(len(message) + 1):
            frames = [*messages[:index], message[:cut], message[cut:], *messages[index + 1 :]]
            decompressor = Decompressor(compression)
            # A new decompressor needs the stream from its start: replay the earlier messages first.
            outputs = list(feed_all(decompressor, frames))
            assert b"".join(outputs) == b"".join(payloads), (index, cut)
            if compression == "zlib-stream" and not message[:cut].endswith(ZLIB_SUFFIX):
                assert outputs == payloads


# -- decompression bombs ------------------------------------------------------------------------------


@FUZZ
@given(
    compression=st.sampled_from(CODECS),
    size=st.integers(min_value=SMALL_LIMIT - 2, max_value=4 * SMALL_LIMIT),
    byte=st.binary(min_size=1, max_size=3),
    noise=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(min_value=0), max_size=3),
)
def test_output_past_the_limit_is_refused(
    compression: Compression, size: int, byte: bytes, noise: random.Random, cuts: list[int]
) -> None:
    # Incompressible bytes first make some messages larger than ZSTD_SLICE_BYTES (the sliced path).
    payload = (noise.randbytes(noise.choice([0, 100, 4000])) + byte * size)[:size]
    frames = split(Stream(compression).message(payload), cuts)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decompress, "MAX_PAYLOAD_BYTES", SMALL_LIMIT)
            outputs = list(feed_all(Decompressor(compression), frames))
    except TransportError as exc:
        refused: TransportError | None = exc
    else:
        refused = None
    if refused is not None:
        assert "more than" in str(refused)
        assert size > SMALL_LIMIT
        return
    assert b"".join(outputs) == payload
    assert all(len(output) <= SMALL_LIMIT for output in outputs)


@pytest.mark.parametrize("compression", CODECS)
def test_a_real_bomb_is_refused_without_inflating_it(compression: Compression) -> None:
    """A small message that inflates past the real limit: refused, with memory bounded near the limit."""
    size = MAX_PAYLOAD_BYTES + 16 * 1024 * 1024
    chunk = b"\x00" * (16 * 1024 * 1024)
    if compression == "zlib-stream":
        compressor = zlib.compressobj(4)
        bomb = b"".join(compressor.compress(chunk) for _ in range(size // len(chunk)))
        bomb += compressor.flush(zlib.Z_SYNC_FLUSH)
    else:
        compressor_z = zstandard.ZstdCompressor(level=1).compressobj()
        bomb = b"".join(compressor_z.compress(chunk) for _ in range(size // len(chunk)))
        bomb += compressor_z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert len(bomb) < 1024 * 1024
    decompressor = Decompressor(compression)
    tracemalloc.start()
    try:
        with pytest.raises(TransportError, match="more than"):
            decompressor.feed(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_PAYLOAD_BYTES + 64 * 1024 * 1024, f"peak {peak} bytes"


def test_a_zlib_message_that_never_ends_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decompress, "MAX_PENDING_BYTES", 1024)
    decompressor = Decompressor("zlib-stream")
    with pytest.raises(TransportError, match="never ended"):
        for _ in range(100):
            assert decompressor.feed(b"\x00" * 100) is None


def test_text_on_a_compressed_connection_is_refused() -> None:
    for compression in CODECS:
        with pytest.raises(TransportError):
            Decompressor(compression).feed('{"op": 10}')
    assert Decompressor("none").feed('{"op": 10}') == b'{"op": 10}'


@pytest.mark.parametrize("compression", CODECS)
def test_large_incompressible_messages_round_trip(compression: Compression) -> None:
    """Messages far larger than ZSTD_SLICE_BYTES compressed, as one frame and split into many."""
    noise = random.Random(7)
    payloads = [noise.randbytes(size) for size in (1, 1023, 1024, 1025, 200_000)]
    stream = Stream(compression)
    messages = [stream.message(payload) for payload in payloads]
    assert list(feed_all(Decompressor(compression), messages)) == payloads
    stream = Stream(compression)
    frames = [frame for payload in payloads for frame in split(stream.message(payload), [4096, 70_000])]
    assert b"".join(feed_all(Decompressor(compression), frames)) == b"".join(payloads)
