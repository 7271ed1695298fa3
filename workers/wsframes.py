"""A sans-io WebSocket frame codec for the client side of a gateway connection (RFC 6455 section 5).

`FrameParser` turns the bytes a server sends into complete messages; `encode_frame` builds the masked
frames a client sends. No I/O and no extension: the gateway negotiates none, so the RSV bits must be 0.

Parser. A server's frames are never masked (5.1: a masked one is a protocol error). `feed(data)` parses
every complete frame in `data` in one call and returns the data messages it completed, in order; the
control frames it met go to `controls` (pings and pongs may sit between the fragments of a message, 5.4; a
close frame ends parsing, and anything after it is discarded, 5.5.1). The hot path is a loop over frame
headers, one slice per payload: an unfragmented binary frame becomes `data[start:end]`, its only copy, with
no per-byte work and no intermediate buffer. A frame left incomplete at the end of `data` is kept as a list
of chunks together with the number of bytes it needs, so a 20 MB GUILD_CREATE arriving 64 KiB at a time is
joined once, when it is complete, not re-copied on every read. Fragments are joined when the final one
arrives; a text message is decoded (and so validated) as UTF-8 then.

Errors raise `FrameError` with the close code the client should send: 1002 for a protocol violation
(masked frame, RSV bits, unknown opcode, a fragmented or oversized (> 125 bytes) control frame, a
continuation with nothing to continue, a new data frame inside a fragmented message, a length not in its
shortest form or with the 64-bit MSB set, a malformed close frame), 1007 for text or a close reason that is
not UTF-8, 1009 for a message over `max_message_bytes`. wsproto's parser is the reference for these checks
(tests/workers/test_wsframes.py compares the two).

Encoder. Client frames are masked with a fresh 4-byte key from `os.urandom` (5.3). The XOR runs on Python
integers (one `int.from_bytes`, one XOR and one `to_bytes` per frame), which is fast for the few, small
frames a client sends: heartbeats, commands of at most 4096 bytes, pongs and the close.

Why this module exists, and the figures, are in workers/websocket.py's docstring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: The largest payload a control frame may carry (5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: The largest message the worker accepts: a large GUILD_CREATE (anchors/gateway.md section 4).
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009
#: Reported, never sent: the close frame had no status code (7.1.5).
CLOSE_NO_STATUS: Final = 1005
#: Reported, never sent: the connection ended without a closing handshake (7.1.5).
CLOSE_ABNORMAL: Final = 1006

#: Codes a peer may put in a close frame (7.4): the defined ones that are not local-only, and 3000-4999.
_SENDABLE_PROTOCOL_CODES: Final = frozenset((1000, 1001, 1002, 1003, *range(1007, 1014)))

# First header byte of a final, unfragmented binary or text frame with no RSV bit: the fast path.
_FIN_BINARY: Final = 0x80 | OP_BINARY
_FIN_TEXT: Final = 0x80 | OP_TEXT


class FrameError(Exception):
    """The server broke the framing rules; `code` is the close code to answer with."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """A close frame: `code` is None when it carried no status code (reported as 1005)."""

    code: int | None
    reason: str


Control = Ping | Pong | Close


class FrameParser:
    """Parses a server's frames; one per connection."""

    __slots__ = (
        "_fragment_opcode",
        "_fragments",
        "_fragments_size",
        "_max",
        "_need",
        "_pending",
        "_pending_size",
        "closed",
        "controls",
    )

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < MAX_CONTROL_PAYLOAD:
            raise ValueError(f"max_message_bytes must be at least {MAX_CONTROL_PAYLOAD}")
        self._max = max_message_bytes
        #: Bytes of an incomplete frame, and how many bytes that frame needs in all (header included).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = 0
        #: A fragmented message in progress: its opcode (0 when none), its payloads so far and their size.
        self._fragment_opcode = 0
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        #: Control frames parsed and not yet taken by the caller (who clears this list).
        self.controls: list[Control] = []
        #: A close frame was parsed: everything after it is discarded.
        self.closed = False

    def feed(self, data: bytes) -> list[bytes | str]:
        """The messages completed by `data` (binary as bytes, text as str), in order; controls met go to
        `controls`. Raises `FrameError`; the parser is then unusable (the connection must end)."""
        if self.closed:
            return []
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return []
            data = b"".join(self._pending)
            self._pending = []
        messages: list[bytes | str] = []
        size = len(data)
        pos = 0
        need = 2  # bytes the frame at `pos` needs, as far as its header is known
        while True:
            if size - pos < 2:
                need = 2
                break
            first = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                raise FrameError("a server frame is masked")
            start = pos + 2
            if length >= 126:
                if length == 126:
                    if size - start < 2:
                        need = 4
                        break
                    length = int.from_bytes(data[start : start + 2], "big")
                    start += 2
                    if length <= MAX_CONTROL_PAYLOAD:
                        raise FrameError("a 16-bit payload length that fits in 7 bits")
                else:
                    if size - start < 8:
                        need = 10
                        break
                    length = int.from_bytes(data[start : start + 8], "big")
                    start += 8
                    if length >> 63:
                        raise FrameError("a 64-bit payload length with its top bit set")
                    if length <= 0xFFFF:
                        raise FrameError("a 64-bit payload length that fits in 16 bits")
                if length > self._max:
                    raise _too_big(length, self._max)
            end = start + length
            if end > size:
                if (first & 0x0F) >= OP_CLOSE:
                    _check_control(first, length)  # fail early: a bad control frame never completes
                need = end - pos
                break
            if first == _FIN_BINARY and not self._fragment_opcode:
                messages.append(data[start:end])
            elif first == _FIN_TEXT and not self._fragment_opcode:
                messages.append(_text(data[start:end]))
            else:
                message = self._frame(first, data[start:end])
                if message is not None:
                    messages.append(message)
                if (first & 0x0F) == OP_CLOSE:
                    return messages  # nothing after a close frame counts (5.5.1)
            pos = end
        if pos < size:
            tail = data[pos:] if pos else data
            self._pending = [tail]
            self._pending_size = len(tail)
            self._need = need
        else:
            self._pending_size = 0
        return messages

    def _frame(self, first: int, payload: bytes) -> bytes | str | None:
        """Every frame but an unfragmented data frame outside a fragmented message."""
        if first & 0x70:
            raise FrameError("a reserved bit is set (no extension was negotiated)")
        opcode = first & 0x0F
        fin = first & 0x80
        if opcode >= OP_CLOSE:
            _check_control(first, len(payload))
            if opcode == OP_PING:
                self.controls.append(Ping(payload))
            elif opcode == OP_PONG:
                self.controls.append(Pong(payload))
            else:
                self.controls.append(_close(payload))
                self.closed = True
            return None
        if opcode == OP_CONTINUATION:
            if not self._fragment_opcode:
                raise FrameError("a continuation frame with no message to continue")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragment_opcode:
                raise FrameError("a new data frame inside a fragmented message")
            self._fragment_opcode = opcode
        else:
            raise FrameError(f"unknown opcode {opcode:#x}")
        self._fragments_size += len(payload)
        if self._fragments_size > self._max:
            raise _too_big(self._fragments_size, self._max)
        self._fragments.append(payload)
        if not fin:
            return None
        joined = b"".join(self._fragments)
        text = self._fragment_opcode == OP_TEXT
        self._fragments = []
        self._fragments_size = 0
        self._fragment_opcode = 0
        return _text(joined) if text else joined


def _check_control(first: int, length: int) -> None:
    opcode = first & 0x0F
    if opcode > OP_PONG:
        raise FrameError(f"unknown opcode {opcode:#x}")
    if first & 0x70:
        raise FrameError("a reserved bit is set (no extension was negotiated)")
    if not first & 0x80:
        raise FrameError("a fragmented control frame")
    if length > MAX_CONTROL_PAYLOAD:
        raise FrameError(f"a control frame of {length} bytes (the limit is {MAX_CONTROL_PAYLOAD})")


def _text(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError as exc:
        raise FrameError(f"a text message that is not UTF-8: {exc}", CLOSE_INVALID_DATA) from None


def _close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise FrameError("a close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _SENDABLE_PROTOCOL_CODES and not 3000 <= code <= 4999:
        raise FrameError(f"a close frame with code {code}, which a peer may not send")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError("a close reason that is not UTF-8", CLOSE_INVALID_DATA) from None
    return Close(code, reason)


def _too_big(size: int, limit: int) -> FrameError:
    return FrameError(f"a message of {size} bytes or more (the limit is {limit})", CLOSE_MESSAGE_TOO_BIG)


def encode_frame(opcode: int, payload: bytes, *, mask: bytes | None = None) -> bytes:
    """One final client frame: `opcode` and `payload`, masked with `mask` (4 bytes; random when None)."""
    if mask is None:
        mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length <= 0xFFFF:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + mask + _masked(payload, mask)


def _masked(payload: bytes, mask: bytes) -> bytes:
    length = len(payload)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def encode_text(text: str, *, mask: bytes | None = None) -> bytes:
    return encode_frame(OP_TEXT, text.encode(), mask=mask)


def encode_pong(payload: bytes, *, mask: bytes | None = None) -> bytes:
    return encode_frame(OP_PONG, payload, mask=mask)


def encode_close(code: int | None, reason: str = "", *, mask: bytes | None = None) -> bytes:
    """A close frame; `code` None sends none (and no reason). The reason is cut to fit 125 bytes."""
    if code is None:
        return encode_frame(OP_CLOSE, b"", mask=mask)
    data = reason.encode()[: MAX_CONTROL_PAYLOAD - 2]
    while data:  # never cut a character in half
        try:
            data.decode()
            break
        except UnicodeDecodeError:
            data = data[:-1]
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + data, mask=mask)
