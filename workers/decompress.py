"""Transport decompression, one decompressor per connection (anchors/gateway.md H1-H3).

- zlib-stream: one inflate context for the whole connection; WebSocket messages are buffered until the data
  ends with the sync-flush suffix `00 00 ff ff`, because one gateway message may span several frames.
- zstd-stream: one streaming decompression context for the whole connection; the frame never ends and its
  header declares no content size, so one-shot `decompress()` cannot be used (discord.py #10344).
- none: text messages are the JSON itself.

A decompressor never outlives its connection, so nothing of an old stream can corrupt a new one. Corrupt
input raises `TransportError`; the shard then closes with a resumable code and RESUMEs on a fresh context.

A payload may not decompress to more than `MAX_PAYLOAD_BYTES`, the same bound the WebSocket message limit
puts on an uncompressed one: without it one 64 MiB message of zlib (ratio up to about 1032:1) or zstd (far
more) inflates to tens of GiB and takes the worker, every shard of it, down. zlib stops at the bound itself
(`max_length`); zstd's streaming object has no such argument, so a large message is fed to it in slices and
the output is checked after each (a zstd block of up to 128 KiB takes 4 bytes, so a 1 KiB slice yields at
most 32 MiB).
"""

from __future__ import annotations

import zlib
from typing import Final

import zstandard

from .errors import TransportError
from .settings import Compression

ZLIB_SUFFIX: Final = b"\x00\x00\xff\xff"
#: A zlib message still incomplete after this many bytes is treated as corrupt (bounds memory).
MAX_PENDING_BYTES: Final = 256 * 1024 * 1024
#: The largest decompressed payload: workers/shard.py's WebSocket message limit (MAX_MESSAGE_BYTES).
MAX_PAYLOAD_BYTES: Final = 64 * 1024 * 1024
#: zstd input larger than this is decompressed a slice at a time, so each call's output stays bounded.
ZSTD_SLICE_BYTES: Final = 1024


class Decompressor:
    """Turns the WebSocket messages of one connection into complete gateway payloads (JSON bytes)."""

    def __init__(self, compression: Compression) -> None:
        self.compression: Compression = compression
        self._zlib = zlib.decompressobj() if compression == "zlib-stream" else None
        self._zstd = zstandard.ZstdDecompressor().decompressobj() if compression == "zstd-stream" else None
        self._pending = bytearray()

    def feed(self, message: bytes | str) -> bytes | None:
        """The payload completed by `message`, or None when more frames are needed."""
        if isinstance(message, str):
            if self.compression != "none":
                raise TransportError(f"a text message on a {self.compression} connection")
            return message.encode()
        if self._zlib is not None:
            if not self._pending and message.endswith(ZLIB_SUFFIX):
                data = message  # the common case: one frame, one message, no copy
            else:
                self._pending += message
                if len(self._pending) > MAX_PENDING_BYTES:
                    raise TransportError("a zlib-stream message never ended")
                if not self._pending.endswith(ZLIB_SUFFIX):
                    return None
                data = bytes(self._pending)
                self._pending.clear()
            try:
                payload = self._zlib.decompress(data, MAX_PAYLOAD_BYTES + 1)
            except zlib.error as exc:
                raise TransportError(f"corrupt zlib-stream data: {exc}") from exc
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise _too_large("zlib-stream")
            return payload
        if self._zstd is not None:
            try:
                if len(message) <= ZSTD_SLICE_BYTES:
                    payload = self._zstd.decompress(message)
                else:
                    payload = self._zstd_sliced(message)
            except zstandard.ZstdError as exc:
                raise TransportError(f"corrupt zstd-stream data: {exc}") from exc
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise _too_large("zstd-stream")
            return payload
        return message

    def _zstd_sliced(self, message: bytes) -> bytes:
        assert self._zstd is not None
        view = memoryview(message)
        parts: list[bytes] = []
        size = 0
        for start in range(0, len(view), ZSTD_SLICE_BYTES):
            part = self._zstd.decompress(view[start : start + ZSTD_SLICE_BYTES])
            size += len(part)
            if size > MAX_PAYLOAD_BYTES:
                raise _too_large("zstd-stream")
            parts.append(part)
        return b"".join(parts)


def _too_large(compression: str) -> TransportError:
    return TransportError(f"a {compression} message decompresses to more than {MAX_PAYLOAD_BYTES} bytes")


def gateway_query(compression: Compression) -> str:
    """The query string for a gateway URL: API v10, JSON, and the transport compression."""
    query = "v=10&encoding=json"
    return query if compression == "none" else f"{query}&compress={compression}"
