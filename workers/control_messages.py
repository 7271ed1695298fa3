"""The supervisor <-> worker control channel's messages: one typed definition, one encoder, one decoder.

Design note. The supervisor starts each worker with one end of a Unix socketpair (its fd number in
`SUPERVISOR_CONTROL_FD`). Both ends speak JSON lines, one message per line, tagged by `type`:

    worker -> supervisor                          supervisor -> worker
    Hello(pid)                                    Configure(config)        first, answering Hello
    Heartbeat(shards: {id: ShardStatistics})      Permit(id)
    IdentifyRequest(id, shard)                    SessionReply(id, session | None)
    ConnectRequest(id, shard)  (cluster mode)     ShardCommand(shard, op, d)  from its stdin
    IdentifyCancel(id)  (cancels either request)
    SessionLoad(id, shard)                        Retire()                 live reshard: old generation
    SessionsUpdate(save: {shard: StoredSession}, delete: (shard, ...))
    Retired(digests)  answering Retire            GoLive(digests)          live reshard: new generation
    ShardingRequired(shard)  (close 4011, reshard=True)
                                                  Uncovered(shard_count, shards)  new generation, shadow

Both ends import these classes and `encode`/`decode`, so a message cannot be built one way and parsed another.
`Configure` carries the worker's settings as the settings table's text (`workers.settings.worker_wire`),
parsed by the same parsers as every other layer; it is how secrets reach a worker, instead of its
environment.

Live resharding (workers.reshard): `Retire` tells an old-generation worker to stop publishing, drain, report
and close; it answers `Retired` with the digests (`workers.reshard.event_digest`) of the events it published
in the last `RESHARD_DIGEST_WINDOW_S`. `GoLive` hands a shadow worker the union of those digests: it publishes
its buffered events that are not among them, then goes live. `ShardingRequired` reports a shard closed with
4011 by a worker that runs on (`ShardAssignment.reshard`). `Uncovered` tells a shadow worker which shards of
the old generation no longer publish (so it keeps their guilds' events past its shadow buffer until `GoLive`);
the latest one replaces the earlier, an empty `shards` clears it. Digests travel as one base64 string of
8-byte big-endian values (`workers.reshard.pack_digests`); a line holds at most `MAX_WIRE_DIGESTS`.
`read_messages` reads lines with tricycle's `TextReceiveStream` and yields a `ControlMessageError` for a
malformed line (the reader logs it and goes on), never raising for one bad line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias

import orjson
import trio
from tricycle import TextReceiveStream

from .config import ShardAssignment, WorkerConfig
from .errors import ConfigError, WorkerError
from .sessions import StoredSession
from .settings import settings_from_wire, worker_wire

__all__ = [
    "CONTROL_FD_ENV",
    "DIGEST_BYTES",
    "MAX_LINE_BYTES",
    "MAX_WIRE_DIGESTS",
    "Configure",
    "ConnectRequest",
    "ControlMessage",
    "ControlMessageError",
    "GoLive",
    "Heartbeat",
    "Hello",
    "IdentifyCancel",
    "IdentifyRequest",
    "Permit",
    "Retire",
    "Retired",
    "SessionLoad",
    "SessionReply",
    "SessionsUpdate",
    "ShardCommand",
    "ShardStatistics",
    "ShardingRequired",
    "Uncovered",
    "decode",
    "encode",
    "read_messages",
]

#: The environment variable holding the worker's end of the socketpair (a file descriptor number).
CONTROL_FD_ENV: Final = "SUPERVISOR_CONTROL_FD"
#: The longest line either end accepts (a heartbeat of thousands of shards stays far below).
MAX_LINE_BYTES: Final = 4 * 1024 * 1024
#: One event digest on the wire: 8 bytes, big-endian.
DIGEST_BYTES: Final = 8
#: The most digests one `Retired` or `GoLive` line may carry (base64: 4 characters per 3 bytes) with room
#: to spare under MAX_LINE_BYTES: about 390,000. A sender keeps the newest ones when it has more (what is left
#: out can only be published twice, never lost).
MAX_WIRE_DIGESTS: Final = (MAX_LINE_BYTES - 4096) * 3 // 4 // DIGEST_BYTES


class ControlMessageError(WorkerError):
    """A control line that is not a message of this protocol; `line` is its start, for the log."""

    def __init__(self, reason: str, line: bytes | str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = (line.encode() if isinstance(line, str) else line)[:200]


@dataclass(frozen=True, slots=True)
class ShardStatistics:
    """One shard's counters and state, a snapshot (`ShardRunner.statistics()`, sent in every Heartbeat)."""

    shard_id: int
    state: str
    seq: int | None
    committed_seq: int
    session_id: str | None
    heartbeat_latency_s: float | None
    identifies: int
    resumes: int
    reconnects: dict[str, int]
    dispatches: int
    published: int
    backpressure_drops: int
    transport_errors: int
    #: Events the broker confirmed (never more than `dispatches`: both count the same events, later).
    confirmed: int = 0
    #: Unix time of the READY that began the session, when this process saw it (None after a RESUME of a
    #: session an earlier worker began; the supervisor remembers the earlier worker's figure).
    session_started_at: float | None = None
    #: Guilds READY listed as unavailable whose GUILD_CREATE (or GUILD_DELETE) has not arrived on this
    #: session yet; 0 once `workers.reshard.GUILDS_ARRIVAL_TIMEOUT_S` has passed since READY.
    guilds_pending: int = 0
    #: The worker's reshard role (`ShardAssignment.role`): "shadow" until its GoLive, else "live".
    role: str = "live"


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    pid: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    shards: Mapping[int, ShardStatistics]


@dataclass(frozen=True, slots=True)
class IdentifyRequest:
    TYPE: ClassVar[str] = "identify"
    id: int
    shard: int


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Cluster mode: may `shard` open a connection now? Answered by `Permit` while this node holds the
    shard's lease; cancelled, like an identify request, by `IdentifyCancel(id)`."""

    TYPE: ClassVar[str] = "connect"
    id: int
    shard: int


@dataclass(frozen=True, slots=True)
class IdentifyCancel:
    TYPE: ClassVar[str] = "identify_cancel"
    id: int


@dataclass(frozen=True, slots=True)
class SessionLoad:
    TYPE: ClassVar[str] = "session_load"
    id: int
    shard: int


@dataclass(frozen=True, slots=True)
class SessionsUpdate:
    TYPE: ClassVar[str] = "sessions"
    save: Mapping[int, StoredSession]
    delete: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Configure:
    TYPE: ClassVar[str] = "configure"
    config: WorkerConfig


@dataclass(frozen=True, slots=True)
class Permit:
    TYPE: ClassVar[str] = "permit"
    id: int


@dataclass(frozen=True, slots=True)
class SessionReply:
    TYPE: ClassVar[str] = "session"
    id: int
    session: StoredSession | None


@dataclass(frozen=True, slots=True)
class ShardCommand:
    """A validated gateway command for one of the worker's shards: the supervisor read it from its own stdin
    (DESIGN 3.3, `BROKER_TYPE=stdio`) and sends it to the worker that runs `shard`. `d` is JSON-ready."""

    TYPE: ClassVar[str] = "command"
    shard: int
    op: int
    d: Any


@dataclass(frozen=True, slots=True)
class Retire:
    """Live reshard, to an old-generation worker: stop consuming commands and putting events into the publish
    pump, drain it, answer `Retired`, close every shard with 1000, delete their sessions and exit 0."""

    TYPE: ClassVar[str] = "retire"


@dataclass(frozen=True, slots=True)
class Retired:
    """The answer to `Retire`: the digests of the events this worker published in the last
    `RESHARD_DIGEST_WINDOW_S`, 8 bytes each, big-endian, concatenated (base64 on the wire)."""

    TYPE: ClassVar[str] = "retired"
    digests: bytes


@dataclass(frozen=True, slots=True)
class GoLive:
    """Live reshard, to a shadow worker: publish the buffered events whose digest is not in `digests` (the
    union of the old generation's `Retired`, same encoding), then every event, skipping those in `digests`
    for `RESHARD_DIGEST_WINDOW_S` more; and start consuming commands."""

    TYPE: ClassVar[str] = "go_live"
    digests: bytes


@dataclass(frozen=True, slots=True)
class ShardingRequired:
    """Discord closed `shard` with 4011 (sharding required) and the worker runs on without it
    (`ShardAssignment.reshard`); sent once per shard."""

    TYPE: ClassVar[str] = "sharding_required"
    shard: int


@dataclass(frozen=True, slots=True)
class Uncovered:
    """Live reshard, to a shadow worker: the old generation, which runs `shard_count` shards, no longer
    publishes for the shard ids `shards` (closed with 4011, or stopped for good). Until its `GoLive` the
    worker keeps every buffered event whose guild falls on one of them (`(guild_id >> 22) % shard_count in
    shards`) instead of letting it age out, and publishes it then (`workers.reshard`). Replaces any earlier
    `Uncovered`; an empty `shards` clears it. A live or retiring worker ignores it."""

    TYPE: ClassVar[str] = "uncovered"
    shard_count: int
    shards: tuple[int, ...]


ControlMessage: TypeAlias = (
    Hello
    | Heartbeat
    | IdentifyRequest
    | ConnectRequest
    | IdentifyCancel
    | SessionLoad
    | SessionsUpdate
    | Configure
    | Permit
    | SessionReply
    | ShardCommand
    | Retire
    | Retired
    | GoLive
    | ShardingRequired
    | Uncovered
)


def encode(message: ControlMessage) -> bytes:
    """One JSON line (newline included)."""
    if isinstance(message, Configure):
        body: dict[str, Any] = {
            "settings": worker_wire(message.config.settings),
            "assignment": dataclasses.asdict(message.config.assignment),
        }
    elif isinstance(message, Heartbeat | SessionsUpdate):
        body = {}
        if isinstance(message, Heartbeat):
            body["shards"] = {
                str(shard): dataclasses.asdict(stats) for shard, stats in message.shards.items()
            }
        else:
            body["save"] = {
                str(shard): dataclasses.asdict(session) for shard, session in message.save.items()
            }
            body["delete"] = list(message.delete)
    elif isinstance(message, Retired | GoLive):
        body = {"digests": base64.b64encode(message.digests).decode("ascii")}
    else:
        body = dataclasses.asdict(message)
    body["type"] = message.TYPE
    return orjson.dumps(body) + b"\n"


def decode(line: bytes | str) -> ControlMessage:
    """The message on one line; ControlMessageError when it is not one (bad JSON, type or fields)."""
    try:
        body = orjson.loads(line)
        kind = body.pop("type")
        return _DECODERS[kind](body)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        reason = exc.key if isinstance(exc, ConfigError) else type(exc).__name__
        raise ControlMessageError(f"not a control message ({reason})", line) from None


def _ids(values: Any) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


def _digests(value: Any) -> bytes:
    """Digests from their base64 text; binascii.Error, a ValueError, when it is not a whole number of them."""
    if not isinstance(value, str):
        raise TypeError("digests are a base64 string")
    digests = base64.b64decode(value, validate=True)
    if len(digests) % DIGEST_BYTES:
        raise binascii.Error(f"digests are {DIGEST_BYTES} bytes each")
    return digests


def _uncovered(body: dict[str, Any]) -> Uncovered:
    """ValueError unless `shards` are ids below a positive `shard_count`."""
    shard_count, shards = int(body["shard_count"]), _ids(body["shards"])
    if shard_count < 1 or any(not 0 <= shard < shard_count for shard in shards):
        raise ValueError(f"uncovered shards {shards} of {shard_count}")
    return Uncovered(shard_count, shards)


def _session(fields: Any) -> StoredSession:
    if not isinstance(fields, dict):
        raise TypeError("a session is an object")
    return StoredSession(**fields)


_DECODERS: Final[dict[str, Callable[[dict[str, Any]], ControlMessage]]] = {
    "hello": lambda b: Hello(int(b["pid"])),
    "heartbeat": lambda b: Heartbeat({int(k): ShardStatistics(**v) for k, v in b["shards"].items()}),
    "identify": lambda b: IdentifyRequest(int(b["id"]), int(b["shard"])),
    "connect": lambda b: ConnectRequest(int(b["id"]), int(b["shard"])),
    "identify_cancel": lambda b: IdentifyCancel(int(b["id"])),
    "session_load": lambda b: SessionLoad(int(b["id"]), int(b["shard"])),
    "sessions": lambda b: SessionsUpdate(
        {int(k): _session(v) for k, v in b["save"].items()}, _ids(b["delete"])
    ),
    "configure": lambda b: Configure(
        WorkerConfig(settings_from_wire(b["settings"]), ShardAssignment(**_assignment(b["assignment"])))
    ),
    "permit": lambda b: Permit(int(b["id"])),
    "command": lambda b: ShardCommand(int(b["shard"]), int(b["op"]), b["d"]),
    "session": lambda b: SessionReply(int(b["id"]), None if b["session"] is None else _session(b["session"])),
    "retire": lambda b: Retire(),
    "retired": lambda b: Retired(_digests(b["digests"])),
    "go_live": lambda b: GoLive(_digests(b["digests"])),
    "sharding_required": lambda b: ShardingRequired(int(b["shard"])),
    "uncovered": _uncovered,
}


def _assignment(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "shard_ids": _ids(fields["shard_ids"])}


async def read_messages(
    stream: trio.abc.ReceiveStream,
) -> AsyncIterator[ControlMessage | ControlMessageError]:
    """Each line of `stream` decoded, until EOF, a broken stream or a line over MAX_LINE_BYTES (which ends
    the channel: the peer is not speaking this protocol). Checkpoints at every read."""
    lines = TextReceiveStream(stream, "utf-8", errors="replace", newline="\n", chunk_size=65536)
    while True:
        try:
            line = await lines.receive_line(MAX_LINE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not line:
            return
        if not line.endswith("\n"):
            if len(line) >= MAX_LINE_BYTES:
                yield ControlMessageError("a control line over the size limit", line)
            return
        try:
            yield decode(line)
        except ControlMessageError as exc:
            yield exc
