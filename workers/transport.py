"""Transport decompression, one decompressor per connection (anchors/gateway.md H1-H3).

- zlib-stream: one inflate context for the whole connection; WebSocket messages are buffered until the data
  ends with the sync-flush suffix `00 00 ff ff`, because one gateway message may span several frames.
- zstd-stream: one streaming decompression context for the whole connection; the frame never ends and its
  header declares no content size, so one-shot `decompress()` cannot be used (discord.py #10344).
- none: text messages are the JSON itself.

A decompressor never outlives its connection, so nothing of an old stream can corrupt a new one. Corrupt
input raises `TransportError`; the shard then closes with a resumable code and RESUMEs on a fresh context.
"""

from __future__ import annotations

import zlib
from typing import Final

import zstandard

from .config import Compression
from .errors import TransportError

ZLIB_SUFFIX: Final = b"\x00\x00\xff\xff"
#: A zlib message still incomplete after this many bytes is treated as corrupt (bounds memory).
MAX_PENDING_BYTES: Final = 256 * 1024 * 1024


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
                return self._zlib.decompress(data)
            except zlib.error as exc:
                raise TransportError(f"corrupt zlib-stream data: {exc}") from exc
        if self._zstd is not None:
            try:
                return self._zstd.decompress(message)
            except zstandard.ZstdError as exc:
                raise TransportError(f"corrupt zstd-stream data: {exc}") from exc
        return message


def gateway_query(compression: Compression) -> str:
    """The query string for a gateway URL: API v10, JSON, and the transport compression."""
    query = "v=10&encoding=json"
    return query if compression == "none" else f"{query}&compress={compression}"
