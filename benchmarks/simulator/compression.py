"""Transport compression as Discord's gateway does it, one compressor per connection.

- zlib-stream: a single deflate stream for the whole connection; every message is flushed with
  `Z_SYNC_FLUSH`, so it ends with `00 00 ff ff`. Large messages may be split across several WebSocket
  messages; only the last one ends with the suffix, and clients must buffer until they see it.
- zstd-stream: a single zstd frame for the whole connection that is never ended; every message is flushed
  as a block (`COMPRESSOBJ_FLUSH_BLOCK`), and the frame header declares no content size, which is what
  breaks clients that call one-shot `decompress()` (discord.py #10344).
- none: JSON text messages.
"""

from __future__ import annotations

import os
import zlib
from typing import Final

import zstandard

from .config import Compression

ZLIB_SUFFIX: Final = b"\x00\x00\xff\xff"
ZSTD_LEVEL: Final = 3


class TransportCompressor:
    """Turns one gateway payload into the WebSocket messages that carry it: `(data, is_binary)` pairs."""

    def __init__(
        self,
        compression: Compression,
        *,
        zlib_level: int = 6,
        zlib_split_bytes: int = 0,
        zstd_window_log: int = 18,
    ) -> None:
        self.compression: Compression = compression
        self._split = zlib_split_bytes
        self._zlib = zlib.compressobj(zlib_level) if compression == "zlib-stream" else None
        self._zstd: zstandard.ZstdCompressionObj | None = None
        if compression == "zstd-stream":
            params = zstandard.ZstdCompressionParameters.from_level(
                ZSTD_LEVEL, window_log=zstd_window_log, write_content_size=0
            )
            self._zstd = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def encode(self, payload: bytes) -> list[tuple[bytes, bool]]:
        if self._zlib is not None:
            data = self._zlib.compress(payload) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
            if self._split and len(data) > self._split:
                return [(chunk, True) for chunk in _split_zlib(data, self._split)]
            return [(data, True)]
        if self._zstd is not None:
            return [
                (self._zstd.compress(payload) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK), True)
            ]
        return [(payload, False)]

    def corrupt_message(self) -> tuple[bytes, bool]:
        """A message that breaks the client's decoder: garbage in the compressed stream, or invalid JSON."""
        if self.compression == "none":
            return (b'{"op": 0, "d": {', False)
        garbage = b"\xff\xfe\xfd\xfc" + os.urandom(60)
        return ((garbage + ZLIB_SUFFIX) if self.compression == "zlib-stream" else garbage, True)


def _split_zlib(data: bytes, chunk_bytes: int) -> list[bytes]:
    """Cut a flushed zlib message into chunks, none but the last ending in the sync-flush suffix."""
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        end = min(start + chunk_bytes, len(data))
        # A middle chunk that happened to end with the suffix would look complete to the client.
        while end < len(data) and data[start:end].endswith(ZLIB_SUFFIX):
            end += 1
        chunks.append(data[start:end])
        start = end
    return chunks
