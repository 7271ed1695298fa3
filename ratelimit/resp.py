"""RESP2, the Redis wire format, without I/O: commands to bytes, bytes to replies, keys to Cluster slots.

The client (`redis_client.py`) owns the sockets; this module is what it says on the wire, so the parser is
tested on bytes alone. Commands are arrays of bulk strings; replies are simple strings, errors, integers,
bulk strings, arrays and nil. `key_slot` is Redis Cluster's CRC16 with hash tags, which is how the client
knows which node a redirection taught it about.

The error classes are the client's too: `RedisConnectionError` (no usable answer: the connection is
dropped), `RespProtocolError` (bytes that are not RESP2) and `RedisReplyError` (an error reply; the
connection stays in step). They derive from `RatelimitError` because the client lives in the lowest
package, where every user of Redis (the ratelimiter, the session store, the identify gate) can reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, TypeAlias

from ratelimit.errors import RatelimitError

__all__ = [
    "CLUSTER_SLOTS",
    "Arg",
    "Incomplete",
    "RedisConnectionError",
    "RedisError",
    "RedisReplyError",
    "Reply",
    "RespProtocolError",
    "encode_command",
    "key_slot",
    "parse_reply",
]

CLUSTER_SLOTS: Final = 16384
_CRLF: Final = b"\r\n"

#: A decoded reply. Errors inside an array stay values (`RedisReplyError`); a top-level error is raised.
Reply: TypeAlias = "str | int | bytes | RedisReplyError | list[Reply] | None"
Arg: TypeAlias = bytes | str | int | float


class RedisError(RatelimitError):
    """Anything the Redis client raises about Redis (never a password in the message)."""


class RedisConnectionError(RedisError):
    """Redis could not be reached or did not answer in time; the connection was dropped."""


class RespProtocolError(RedisConnectionError):
    """The server's bytes are not RESP2 (or not what this client speaks); the connection was dropped."""


class RedisReplyError(RedisError):
    """Redis answered the command with an error reply (`-ERR ...`). The connection stays usable."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The error's first word: `ERR`, `NOSCRIPT`, `WRONGPASS`, `BUSY`, ..."""
        return self.message.split(" ", 1)[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedisReplyError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


# --- the wire format ----------------------------------------------------------------------------------


def _arg_bytes(arg: Arg) -> bytes:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, float):
        if not math.isfinite(arg):
            raise ValueError("inf and nan have no RESP spelling; pack them (struct 'd') instead")
        return repr(arg).encode()
    return str(arg).encode()


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (floats as `repr`, the shortest exact decimal)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else _arg_bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Incomplete(RedisError):
    """The buffer ends inside a reply: read more. Never escapes the client (`parse_reply` raises it to say
    so)."""


def parse_reply(buffer: bytes | bytearray, start: int = 0) -> tuple[Reply, int]:
    """Parse one RESP2 reply at `start`: (the reply, the offset just after it).

    Raises `Incomplete` when more bytes are needed and `RespProtocolError` when they are not RESP2.
    Simple strings decode as `str`, bulk strings stay `bytes`, error replies become `RedisReplyError`
    values (the caller decides whether to raise them).
    """
    end = buffer.find(_CRLF, start)
    if end < 0:
        raise Incomplete
    kind = buffer[start : start + 1]
    line = bytes(buffer[start + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), after
    if kind == b"-":
        return RedisReplyError(line.decode(errors="replace")), after
    if kind == b":":
        return _length(line), after
    if kind == b"$":
        size = _length(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise Incomplete
        if buffer[after + size : after + size + 2] != _CRLF:
            raise RespProtocolError("a bulk string does not end with CRLF")
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == b"*":
        count = _length(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            item, after = parse_reply(buffer, after)
            items.append(item)
        return items, after
    raise RespProtocolError(f"unexpected RESP2 type byte {kind!r}")


def _length(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RespProtocolError(f"bad RESP2 number {line[:32]!r}") from None


# --- Redis Cluster slots --------------------------------------------------------------------------------


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16: Final = _crc16_table()


def key_slot(key: bytes | str) -> int:
    """The Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the first non-empty `{...}`) or of the
    whole key, modulo 16384, as in the Redis Cluster specification."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % CLUSTER_SLOTS
