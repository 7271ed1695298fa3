"""The supervisor <-> worker control channel's messages: one typed definition, one encoder, one decoder.

Design note. The supervisor starts each worker with one end of a Unix socketpair (its fd number in
`SUPERVISOR_CONTROL_FD`). Both ends speak JSON lines, one message per line, tagged by `type`:

    worker -> supervisor                          supervisor -> worker
    Hello(pid)                                    Configure(config)        first, answering Hello
    Heartbeat(shards: {id: ShardStatistics})      Permit(id)
    IdentifyRequest(id, shard)                    SessionReply(id, session | None)
    ConnectRequest(id, shard)  (cluster mode)     ShardCommand(shard, op, d)  from its stdin
    IdentifyCancel(id)  (cancels either request)
    SessionLoad(id, shard)
    SessionsUpdate(save: {shard: StoredSession}, delete: (shard, ...))

Both ends import these classes and `encode`/`decode`, so a message cannot be built one way and parsed another.
`Configure` carries the worker's settings as the settings table's text (`workers.settings.worker_wire`),
parsed by the same parsers as every other layer; it is how secrets reach a worker, instead of its
environment. `read_messages` reads lines with tricycle's `TextReceiveStream` and yields a
`ControlMessageError` for a malformed line (the reader logs it and goes on), never raising for one bad line.
"""

from __future__ import annotations

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
    "MAX_LINE_BYTES",
    "Configure",
    "ConnectRequest",
    "ControlMessage",
    "ControlMessageError",
    "Heartbeat",
    "Hello",
    "IdentifyCancel",
    "IdentifyRequest",
    "Permit",
    "SessionLoad",
    "SessionReply",
    "SessionsUpdate",
    "ShardCommand",
    "ShardStatistics",
    "decode",
    "encode",
    "read_messages",
]

#: The environment variable holding the worker's end of the socketpair (a file descriptor number).
CONTROL_FD_ENV: Final = "SUPERVISOR_CONTROL_FD"
#: The longest line either end accepts (a heartbeat of thousands of shards stays far below).
MAX_LINE_BYTES: Final = 4 * 1024 * 1024


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
