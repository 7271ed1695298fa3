"""What a publisher is: the event it takes, the contract it keeps, and the three body encodings.

Encodings (DESIGN 3.4):
- ``spectacles``: a MessagePack *str* whose bytes are the JSON text of ``d``. spectacles/gateway encodes ``d``
  (a Go ``json.RawMessage``) with ugorji's MessagePack handle, ``WriteExt=false``, which writes the *legacy
  raw* container: fixstr below 32 bytes, then str16 (0xda) up to 65535 and str32 (0xdb); it never writes str8
  (0xd9). We write the same header, so our bodies are byte-identical to the Go gateway's
  (``msgpack.packb(text)`` would use str8 for 32-255 bytes: every decoder reads both, but byte identity costs
  nothing). Building the header by hand also skips a UTF-8 decode and re-encode of every payload.
- ``msgpack``: ``d`` as a MessagePack value (a map for every dispatch Discord sends).
- ``json``: the JSON text of ``d``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

import msgpack
import orjson

Encoding = Literal["spectacles", "msgpack", "json"]
ENCODINGS: Final[tuple[Encoding, ...]] = get_args(Encoding)

CONTENT_TYPE_MSGPACK: Final = "application/msgpack"
CONTENT_TYPE_JSON: Final = "application/json"


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    """One dispatch (op 0) to publish. ``data`` is the JSON text of its ``d``, exactly as Discord sent it."""

    shard_id: int
    session_id: str
    seq: int
    name: str
    data: bytes
    #: `trio.current_time()` when the dispatch arrived (for the publish-confirm lag metric).
    received_at: float = 0.0


class Publisher(Protocol):
    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        """Return once the sink has accepted every event of ``batch`` (AMQP: publisher confirms; stdio:
        written and flushed). Raise :class:`workers.errors.PublishError` if any event may not have been
        accepted; the caller then retries the whole batch (at-least-once). A cancelled publish has an unknown
        outcome: some of its events may still reach the sink."""
        ...


def msgpack_str_header(length: int) -> bytes:
    """The MessagePack legacy-raw header that ugorji (spectacles/gateway) writes before ``length`` bytes."""
    if length < 32:
        return bytes((0xA0 | length,))
    if length < 0x10000:
        return b"\xda" + length.to_bytes(2, "big")
    return b"\xdb" + length.to_bytes(4, "big")


def encode_spectacles(data: bytes) -> bytes:
    """``data`` (JSON text) as a MessagePack str, byte-identical to spectacles/gateway."""
    return msgpack_str_header(len(data)) + data


def encode_json_text(data: bytes, encoding: Encoding) -> tuple[bytes, str]:
    """An AMQP body and content type carrying the JSON text ``data`` under ``encoding``."""
    if encoding == "spectacles":
        return encode_spectacles(data), CONTENT_TYPE_MSGPACK
    if encoding == "msgpack":
        packed: bytes = msgpack.packb(orjson.loads(data))
        return packed, CONTENT_TYPE_MSGPACK
    if encoding == "json":
        return data, CONTENT_TYPE_JSON
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def encode_body(event: OutboundEvent, encoding: Encoding) -> tuple[bytes, str]:
    """The AMQP body and content type of ``event`` under ``encoding``."""
    return encode_json_text(event.data, encoding)
