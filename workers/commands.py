"""Commands from bots to the gateway: decoding, validation and routing to a shard (DESIGN 3.3, 3.5).

A command arrives on the ``BROKER_GROUP`` exchange with routing key ``SEND`` and body
``{"guild_id": ID, "packet": {"op": OP, "d": D}}`` (sent on shard ``(guild_id >> 22) % shard_count``), or with
routing key = a shard id (``"3"``) and body ``{"op": OP, "d": D}``. Bodies use the event encoding
(``BROKER_ENCODING``):

- ``spectacles``: a MessagePack str or bin whose bytes are the JSON text of the body: what the Go clients and
  spectacles/gateway itself send. Two more shapes are accepted because real Spectacles clients send them:
  a MessagePack *map* (``@spectacles/brokers`` encodes objects with ``@msgpack/msgpack``; spectacles/gateway
  logs and drops these, anchors/spectacles.md 1.6) and bare JSON text (a JS ``Buffer`` is published
  unencoded, and it was the format before December 2021). Bare JSON is recognised by its first byte ``{``,
  which as MessagePack would be the integer 123, never a valid command.
- ``msgpack``: the body as a MessagePack map.
- ``json``: the body as JSON text.

Everything malformed raises :class:`~workers.errors.CommandRejected` with a reason meant for a log line; the
consumer acks and logs it rather than requeueing a message that can never succeed (spectacles/gateway never
acked at all, so a bad SEND was redelivered forever). Rejected on purpose:

- ops 1, 2 and 6 (heartbeat, identify, resume): the shard's protocol core owns them, and a bot sending them
  would break the heartbeat schedule, the identify budget or the session;
- ops 0, 7, 9, 10 and 11, which Discord only ever sends (sending one gets close 4001);
- a ``d`` that has no JSON form (MessagePack bin or ext values, integers beyond 64 bits), so whatever passes
  here can be serialised by the shard with ``orjson``.

Keys other than ``op`` and ``d`` in a packet are ignored: the shard sends exactly ``{"op", "d"}``. The
4096-byte payload limit is the shard's to enforce (:class:`~workers.errors.CommandTooLarge`), since it applies
to the bytes actually sent; bodies over :data:`MAX_COMMAND_BODY_BYTES` are rejected here before any decoding.

stdin (DESIGN 3.3): one JSON object per line, mirroring an AMQP message as ``{"t": ROUTING_KEY, "d": BODY}``:
``{"t": "SEND", "d": {"guild_id": "81384788765712384", "packet": {"op": 8, "d": {...}}}}`` or
``{"t": "3", "d": {"op": 3, "d": {...}}}`` (``t`` may also be the shard id as a JSON integer). This is the
shape of the event lines on stdout (``{"t": EVENT, ..., "d": DATA}``) run backwards. Blank lines are skipped;
``\\r\\n`` endings are accepted; a line over :data:`MAX_STDIN_LINE_BYTES` is rejected whole.
"""

from __future__ import annotations

import functools
import reprlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import orjson
import trio

from workers.errors import CommandRejected
from workers.publish.base import Encoding

__all__ = [
    "CORE_OPS",
    "MAX_COMMAND_BODY_BYTES",
    "MAX_STDIN_LINE_BYTES",
    "RECEIVE_ONLY_OPS",
    "SEND_ROUTING_KEY",
    "GatewayCommand",
    "decode_command",
    "read_stdin_commands",
    "shard_for_guild",
]

SEND_ROUTING_KEY: Final = "SEND"
# Heartbeat, identify and resume belong to the shard's protocol core.
CORE_OPS: Final = frozenset({1, 2, 6})
# Dispatch, reconnect, invalid session, hello and heartbeat ACK: Discord sends these, a client never does.
RECEIVE_ONLY_OPS: Final = frozenset({0, 7, 9, 10, 11})
# Far above anything Discord accepts (4096 B per payload); only a bound on the work spent decoding junk.
MAX_COMMAND_BODY_BYTES: Final = 64 * 1024
MAX_STDIN_LINE_BYTES: Final = 64 * 1024
_MAX_SNOWFLAKE: Final = 2**64 - 1
_MAX_OP: Final = 255
_STDIN_READ_BYTES: Final = 16 * 1024
# Decoders raise these for malformed input: msgpack's own errors, ValueError (orjson.JSONDecodeError, bad
# UTF-8, bad timestamps), TypeError (orjson.JSONEncodeError, unhashable map keys) and OverflowError.
_DECODE_ERRORS: Final = (ValueError, TypeError, OverflowError, msgpack.UnpackException)
_SHOWN: Final = reprlib.Repr()


@dataclass(frozen=True, slots=True)
class GatewayCommand:
    """A packet for shard ``shard_id`` to send as ``{"op": op, "d": d}``; ``d`` is JSON-serialisable."""

    shard_id: int
    op: int
    d: Any


def shard_for_guild(guild_id: int, shard_count: int) -> int:
    """The shard that holds ``guild_id`` (Discord's sharding formula)."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, not {shard_count}")
    return (guild_id >> 22) % shard_count


def decode_command(routing_key: str, body: bytes, encoding: Encoding, shard_count: int) -> GatewayCommand:
    """Decode and validate one AMQP command; bad input raises :class:`CommandRejected` and nothing else."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, not {shard_count}")
    # Check the routing key first: it is cheap, and a message on a queue we never bound is a routing bug.
    _check_routing_key(routing_key, shard_count)
    if len(body) > MAX_COMMAND_BODY_BYTES:
        raise CommandRejected(f"body is {len(body)} bytes, over the {MAX_COMMAND_BODY_BYTES}-byte limit")
    return _command_from_message(routing_key, _decode_body(body, encoding), shard_count)


async def read_stdin_commands(
    stream: trio.abc.ReceiveStream, shard_count: int | Callable[[], int]
) -> AsyncGenerator[GatewayCommand | CommandRejected, None]:
    """Read commands from ``stream``, one JSON line each (module docstring), until end of file.

    ``shard_count`` routes ``SEND`` by guild id; a callable is asked per line (a live reshard changes it at
    the cut-over, and the commands follow their guilds to the new shards from then on).

    A bad line yields a :class:`CommandRejected` whose reason starts with ``line N:`` (counted from 1) and
    reading goes on. Each ``receive_some`` is a checkpoint; cancelling the iteration drops any partial line.
    Use it inside ``contextlib.aclosing`` (an async generator).
    """
    count_of = shard_count if callable(shard_count) else functools.partial(int, shard_count)
    if count_of() < 1:
        raise ValueError(f"shard_count must be at least 1, not {count_of()}")
    buffer = bytearray()
    line_number = 0
    discarding = False  # inside an over-long line, dropping bytes until its end
    while True:
        chunk = await stream.receive_some(_STDIN_READ_BYTES)
        if not chunk:
            break
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            line_number += 1
            if discarding:
                discarding = False
                continue
            if (result := _parse_stdin_line(line, line_number, count_of())) is not None:
                yield result
        if not discarding and len(buffer) > MAX_STDIN_LINE_BYTES:
            yield CommandRejected(f"line {line_number + 1}: longer than {MAX_STDIN_LINE_BYTES} bytes")
            discarding = True
        if discarding:
            buffer.clear()
    if buffer and not discarding:
        result = _parse_stdin_line(bytes(buffer), line_number + 1, count_of())
        if result is not None:
            yield result


def _parse_stdin_line(line: bytes, number: int, shard_count: int) -> GatewayCommand | CommandRejected | None:
    line = line.rstrip(b"\r")
    if not line.strip():
        return None
    if len(line) > MAX_STDIN_LINE_BYTES:
        return CommandRejected(f"line {number}: longer than {MAX_STDIN_LINE_BYTES} bytes")
    try:
        message = _loads_json(line)
        if not isinstance(message, dict):
            raise CommandRejected('a line must be a JSON object {"t": ROUTING_KEY, "d": BODY}')
        if "t" not in message or "d" not in message:
            raise CommandRejected('a line needs both "t" (SEND or a shard id) and "d"')
        routing_key = message["t"]
        if isinstance(routing_key, int) and not isinstance(routing_key, bool):
            routing_key = str(routing_key)
        if not isinstance(routing_key, str):
            raise CommandRejected(f'"t" must be "SEND" or a shard id, not {_describe(routing_key)}')
        _check_routing_key(routing_key, shard_count)
        return _command_from_message(routing_key, message["d"], shard_count)
    except CommandRejected as exc:
        return CommandRejected(f"line {number}: {exc.reason}")


def _check_routing_key(routing_key: str, shard_count: int) -> None:
    if routing_key == SEND_ROUTING_KEY:
        return
    # Only the canonical form: the queues are bound to exactly str(shard_id). The length check comes before
    # `int()`, which refuses strings of more than 4300 digits with a ValueError (a stdin `t` may be one).
    if (
        not (routing_key.isascii() and routing_key.isdigit())
        or len(routing_key) > 20
        or str(int(routing_key)) != routing_key
    ):
        raise CommandRejected(f"unknown routing key {routing_key[:64]!r}: expected SEND or a shard id")
    if int(routing_key) >= shard_count:
        raise CommandRejected(f"shard id {routing_key} out of range: the bot has {shard_count} shards")


def _decode_body(body: bytes, encoding: Encoding) -> object:
    try:
        if encoding == "json" or (encoding == "spectacles" and body[:1] == b"{"):
            return orjson.loads(body)
        value = msgpack.unpackb(body, raw=False)
        if encoding == "spectacles" and isinstance(value, str | bytes):
            return orjson.loads(value)
        return value
    except _DECODE_ERRORS as exc:
        raise CommandRejected(f"body is not valid {encoding}: {exc}") from exc


def _loads_json(text: bytes) -> object:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CommandRejected(f"not valid JSON: {exc}") from exc


def _command_from_message(routing_key: str, message: object, shard_count: int) -> GatewayCommand:
    if not isinstance(message, dict):
        raise CommandRejected(f"body must be an object, not {_describe(message)}")
    if routing_key == SEND_ROUTING_KEY:
        if "guild_id" not in message:
            raise CommandRejected("SEND body has no guild_id")
        guild_id = _snowflake(message["guild_id"])
        shard_id = shard_for_guild(guild_id, shard_count)
        if "packet" not in message:
            raise CommandRejected("SEND body has no packet")
        packet = message["packet"]
    else:
        shard_id = int(routing_key)
        packet = message
    if not isinstance(packet, dict):
        raise CommandRejected(f"packet must be an object {{op, d}}, not {_describe(packet)}")
    if "op" not in packet or "d" not in packet:
        raise CommandRejected('packet must have both "op" and "d"')
    op = packet["op"]
    if not isinstance(op, int) or isinstance(op, bool) or not 0 <= op <= _MAX_OP:
        raise CommandRejected(f"op must be an integer opcode, not {_describe(op)}")
    if op in CORE_OPS:
        raise CommandRejected(f"op {op} (heartbeat, identify or resume) is reserved for the gateway itself")
    if op in RECEIVE_ONLY_OPS:
        raise CommandRejected(f"op {op} is sent by Discord only")
    d = packet["d"]
    try:
        orjson.dumps(d)
    except orjson.JSONEncodeError as exc:
        raise CommandRejected(f"packet d has no JSON form: {exc}") from exc
    return GatewayCommand(shard_id=shard_id, op=op, d=d)


def _snowflake(value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise CommandRejected(f"guild_id must be a snowflake (string or integer), not {_describe(value)}")
    if not 0 < number <= _MAX_SNOWFLAKE:
        raise CommandRejected(f"guild_id {number} is not a valid snowflake")
    return number


def _describe(value: object) -> str:
    # reprlib: a value may be nested deeper than `repr` can recurse (JSON and MessagePack allow ~1000 levels).
    text = _SHOWN.repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
