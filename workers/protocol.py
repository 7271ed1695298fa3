"""The sans-io core of one gateway shard: decoded payloads and the time go in, events come out.

Design note. The rules are anchors/gateway.md section 1 (A-H), the fault criteria 6.3 F3-F6, F9, F10, F14 and
the implications in 6.4; DESIGN.md section 4 lists the ones most often broken. The shell (workers/shard.py)
owns the socket, the decompressor and the clock; this class owns every decision, so all of them are tested
without I/O. The choices that are easy to get wrong:

- Zombies (B4, 6.4): a heartbeat sent at t must be ACKed by t + min(10 s, interval). If *nothing* arrived
  since t we reconnect at that deadline (twilight: any inbound message is liveness); if other messages
  arrived we wait for the next beat and call it a zombie only if the ACK is still missing then (Discord's
  rule). A server op 1 is answered at once and is not a beat we wait on (discord.js #3993).
- We never close with 1000/1001 (E4: that kills the session); every Reconnect carries RESUMABLE_CLOSE_CODE,
  also when the session is already gone, so the shell needs no second rule.
- 4007/4009 and op 9 `false` drop the session before reconnecting, so the next HELLO leads to IDENTIFY:
  never a doomed RESUME (twilight keeps the session there; F5/F6 forbid that).
- Failed connects back off with full jitter capped at 60 s, and *every* Reconnect, the delay-0 ones included
  (op 7, zombie, drops of a READY session), is floored so attempts are at least 1 s apart (F14).
- op 9 `true` waits uniform(0, 1) s (our choice: the session is still good, a short jitter only
  de-synchronises a mass invalidation); op 9 `false` waits uniform(1, 5) s (E3).
- When a connection to `resume_gateway_url` fails before HELLO, the next attempts use the base URL, still
  resuming (A2/F3), until READY or RESUMED.

Shell contract for `on_connection_lost`: call it when an open socket closes without the core asking
(server close or drop), or when dialing fails (no `on_connected` since the last Reconnect). Don't report the
close that the shell itself performs for a Reconnect or Fatal the core returned: the core already counts that
socket as gone.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import reprlib
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import orjson

from .backoff import ReconnectBackoff
from .errors import CommandRejected, CommandTooLarge, ProtocolError
from .sendwindow import SendWindow

__all__ = [
    "ACK_TIMEOUT_S",
    "FATAL_CLOSE_CODES",
    "HELLO_TIMEOUT_S",
    "MAX_PAYLOAD_BYTES",
    "READY_TIMEOUT_S",
    "RESUMABLE_CLOSE_CODE",
    "Dispatch",
    "Event",
    "Fatal",
    "GatewayPayload",
    "HeartbeatAck",
    "RateLimited",
    "Ready",
    "Reconnect",
    "RequestIdentify",
    "Resumed",
    "Send",
    "SessionSnapshot",
    "ShardProtocol",
    "ShardProtocolStats",
    "ShardState",
    "decode_payload",
]

#: The earliest first heartbeat, as a fraction of the interval (B2 jitter draws from here to 1).
FIRST_BEAT_MIN: Final = 0.01


def first_beat_fraction(uniform: float) -> float:
    """Where in the interval the first heartbeat goes, for a uniform draw in [0, 1)."""
    return FIRST_BEAT_MIN + (1.0 - FIRST_BEAT_MIN) * uniform


RESUMABLE_CLOSE_CODE: Final = 4900  # any code but 1000/1001 keeps the session resumable (E4)
HELLO_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 15.0
ACK_TIMEOUT_S: Final = 10.0
MAX_PAYLOAD_BYTES: Final = 4096
INVALID_SESSION_RESUMABLE_DELAY_S: Final = (0.0, 1.0)
INVALID_SESSION_DELAY_S: Final = (1.0, 5.0)
DEFAULT_CLIENT_NAME: Final = "trio-shard-gateway"

# Ops a user command may carry: presence, voice state, request members, soundboard sounds. 1, 2 and 6 are the
# core's alone; 43 (request channel info) is left out until the simulator accepts it.
COMMAND_OPS: Final = frozenset({3, 4, 8, 31})
FATAL_CLOSE_CODES: Final = frozenset({4004, 4010, 4011, 4012, 4013, 4014})
NEW_SESSION_CLOSE_CODES: Final = frozenset({4003, 4005, 4007, 4009})
CLOSE_CODE_NAMES: Final[Mapping[int, str]] = {
    4000: "unknown error",
    4001: "unknown opcode",
    4002: "decode error",
    4003: "not authenticated",
    4004: "authentication failed",
    4005: "already authenticated",
    4007: "invalid seq",
    4008: "rate limited",
    4009: "session timed out",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents",
}


@dataclass(frozen=True, slots=True)
class GatewayPayload:
    op: int
    d: Any
    s: int | None
    t: str | None
    #: How many keys the JSON object had: how its text was laid out, not what it says, so not compared. The
    #: shell slices `d`'s text out of the raw payload only when it is 4 (`workers.shard._data_bytes`).
    key_count: int = field(default=0, compare=False)


def decode_payload(raw: bytes | str) -> GatewayPayload:
    """Parse one gateway message. ProtocolError unless it is a JSON object with an int `op`."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"gateway payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("gateway payload is not a JSON object")
    op, s, t = obj.get("op"), obj.get("s"), obj.get("t")
    if type(op) is not int:
        raise ProtocolError(f"gateway payload has no int op: {_shown(op)}")
    if s is not None and type(s) is not int:
        raise ProtocolError(f"gateway payload has a non-int s: {_shown(s)}")
    if t is not None and not isinstance(t, str):
        raise ProtocolError(f"gateway payload has a non-string t: {_shown(t)}")
    return GatewayPayload(op, obj.get("d"), s, t, len(obj))  # positional: cheaper, once per message


#: Shows a malformed field in an error message: a few levels and characters of it, since it may be
#: megabytes long or nested deeper than `repr` can recurse.
_SHOWN: Final = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What RESUME needs, and what is persisted so another process can resume."""

    session_id: str
    seq: int
    resume_url: str


class ShardState(enum.Enum):
    DISCONNECTED = "disconnected"  # no socket: before the first connect, or a Reconnect is pending
    CONNECTING = "connecting"  # socket open, waiting for HELLO
    IDENTIFYING = "identifying"  # HELLO seen, waiting for the identify gate
    AUTHENTICATING = "authenticating"  # IDENTIFY or RESUME sent, waiting for READY or RESUMED
    READY = "ready"
    FATAL = "fatal"  # never reconnect; every later call returns no events


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    kind: Literal["heartbeat", "identify", "resume", "command"]


@dataclass(frozen=True, slots=True)
class RequestIdentify:
    """Wait for the identify gate, then call `on_identify_permitted`."""


@dataclass(frozen=True, slots=True)
class Ready:
    session_id: str
    resume_url: str


@dataclass(frozen=True, slots=True)
class Resumed:
    pass


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An op 0 payload (READY, RESUMED and RATE_LIMITED included): the shell publishes it."""

    name: str
    seq: int | None


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    latency_s: float


@dataclass(frozen=True, slots=True)
class RateLimited:
    opcode: int
    retry_after_s: float
    meta: Any


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Close the socket with `close_code` (skip if closed), wait `delay_s`, dial `connect_url()`."""

    resume: bool
    delay_s: float
    close_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop this shard; never reconnect."""

    code: int | None
    reason: str


Event: TypeAlias = (
    Send | RequestIdentify | Ready | Resumed | Dispatch | HeartbeatAck | RateLimited | Reconnect | Fatal
)


@dataclass(frozen=True, slots=True)
class ShardProtocolStats:
    state: ShardState
    seq: int | None
    session_id: str | None
    heartbeat_latency_s: float | None
    identifies: int
    resumes: int
    reconnects: Mapping[str, int]  # reason -> count
    fatal_reason: str | None  # why the shard is FATAL, if it is


class ShardProtocol:
    """The state machine of one shard across all its connections. Pure: no I/O, time passed in."""

    def __init__(
        self,
        *,
        shard_id: int,
        shard_count: int,
        token: str,
        intents: int,
        gateway_url: str,
        properties: Mapping[str, str] | None = None,
        presence: Mapping[str, Any] | None = None,
        large_threshold: int = 250,
        session: SessionSnapshot | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.shard_count = shard_count
        self._token = token
        self._intents = intents
        self.gateway_url = gateway_url
        self._properties = {"os": sys.platform, "browser": DEFAULT_CLIENT_NAME, "device": DEFAULT_CLIENT_NAME}
        self._properties.update(properties or {})
        self._presence = dict(presence) if presence is not None else None
        self._large_threshold = large_threshold
        self._rng = rng if rng is not None else random.Random()
        self.state = ShardState.DISCONNECTED
        self._session_id: str | None = session.session_id if session else None
        self._resume_url: str | None = session.resume_url if session else None
        self._seq: int | None = session.seq if session else None
        self._resume_url_failed = False
        self._backoff = ReconnectBackoff(self._rng)
        self._window = SendWindow()
        # Per connection; `_reset_connection` sets them all.
        self._connected = False
        self._hello_seen = False
        self._hello_deadline = math.inf
        self._ready_deadline = math.inf
        self._interval_s = 0.0
        self._next_heartbeat_at = math.inf
        self._ack_deadline = math.inf
        self._ack_pending = False
        self._heartbeat_sent_at = 0.0
        self._received_since_heartbeat = False
        # Statistics.
        self._latency_s: float | None = None
        self._identifies = 0
        self._resumes = 0
        self._reconnects: collections.Counter[str] = collections.Counter()
        self._fatal_reason: str | None = None

    # -- queries ---------------------------------------------------------------------------------------------

    @property
    def session(self) -> SessionSnapshot | None:
        """The current session; `seq` is the last received seq. Built on demand."""
        if self._session_id is None or self._resume_url is None:
            return None
        return SessionSnapshot(self._session_id, self._seq or 0, self._resume_url)

    def connect_url(self) -> str:
        """The base URL (no query string) to dial now."""
        if self._resume_url is not None and self._session_id is not None and not self._resume_url_failed:
            return self._resume_url
        return self.gateway_url

    def next_deadline(self) -> float:
        """When `poll` next has work; math.inf if none."""
        if not self._connected:
            return math.inf
        return min(self._hello_deadline, self._ready_deadline, self._ack_deadline, self._next_heartbeat_at)

    def statistics(self) -> ShardProtocolStats:
        return ShardProtocolStats(
            state=self.state,
            seq=self._seq,
            session_id=self._session_id,
            heartbeat_latency_s=self._latency_s,
            identifies=self._identifies,
            resumes=self._resumes,
            reconnects=types.MappingProxyType(dict(self._reconnects)),
            fatal_reason=self._fatal_reason,
        )

    # -- inputs ----------------------------------------------------------------------------------------------

    def on_connected(self, now: float) -> None:
        """A new socket is open: reset per-connection state and start the HELLO timeout."""
        if self.state is ShardState.FATAL:
            return
        self._reset_connection()
        self._connected = True
        self.state = ShardState.CONNECTING
        self._hello_deadline = now + HELLO_TIMEOUT_S
        self._backoff.attempt_started(now)

    def receive(self, payload: GatewayPayload, now: float) -> list[Event]:
        """Handle one server payload. ProtocolError if a HELLO, READY or RATE_LIMITED is malformed."""
        if not self._connected:
            return []  # a straggler from a socket we already gave up on
        self._received_since_heartbeat = True
        op = payload.op
        if op == 0:
            return self._on_dispatch(payload, now)
        if op == 11:
            if not self._ack_pending:
                return []
            self._ack_pending = False
            self._ack_deadline = math.inf
            self._latency_s = now - self._heartbeat_sent_at
            return [HeartbeatAck(self._latency_s)]
        if op == 1:
            # Answer at once, off the schedule; the beat we are waiting on (if any) stays the one we wait on.
            return [self._heartbeat_send(now)]
        if op == 10:
            return self._on_hello(payload, now)
        if op == 7:
            return self._reconnect(now, resume=True, delay_s=0.0, reason="reconnect-requested")
        if op == 9:
            if payload.d is True:
                delay = self._rng.uniform(*INVALID_SESSION_RESUMABLE_DELAY_S)
                return self._reconnect(now, resume=True, delay_s=delay, reason="invalid-session-resumable")
            delay = self._rng.uniform(*INVALID_SESSION_DELAY_S)
            return self._reconnect(now, resume=False, delay_s=delay, reason="invalid-session")
        return []  # an op we don't know: ignore it, as Discord asks of clients

    def on_identify_permitted(self, now: float) -> list[Event]:
        """The identify gate let us through: [Send(identify)], or [] if we are no longer waiting for it."""
        if not self._connected or self.state is not ShardState.IDENTIFYING:
            return []
        d: dict[str, Any] = {
            "token": self._token,
            "intents": self._intents,
            "properties": self._properties,
            "shard": [self.shard_id, self.shard_count],
            "large_threshold": self._large_threshold,
            "compress": False,
        }
        if self._presence is not None:
            d["presence"] = self._presence
        self._seq = None  # a new session numbers its events from 1 (D2)
        self._identifies += 1
        return [self._authenticate(now, orjson.dumps({"op": 2, "d": d}), "identify")]

    def poll(self, now: float) -> list[Event]:
        """Fire every timer due at `now`: HELLO/READY timeouts, the ACK deadline, the heartbeat."""
        if not self._connected:
            return []
        if now >= self._hello_deadline:
            return self._failed_connect(now, "hello-timeout")
        if now >= self._ready_deadline:
            return self._failed_connect(now, "ready-timeout")
        if now >= self._ack_deadline:
            if not self._received_since_heartbeat:
                return self._reconnect(now, resume=True, delay_s=0.0, reason="zombie")
            self._ack_deadline = math.inf  # traffic flows: give the ACK until the next beat
        if now >= self._next_heartbeat_at:
            if self._ack_pending:
                return self._reconnect(now, resume=True, delay_s=0.0, reason="zombie")
            due = self._next_heartbeat_at + self._interval_s
            self._next_heartbeat_at = due if due > now else now + self._interval_s
            self._ack_pending = True
            self._heartbeat_sent_at = now
            self._ack_deadline = now + min(ACK_TIMEOUT_S, self._interval_s)
            self._received_since_heartbeat = False
            return [self._heartbeat_send(now)]
        return []

    def on_connection_lost(self, code: int | None, now: float) -> list[Event]:
        """The server closed the socket (`code`), it dropped (None) or the dial failed: Reconnect or Fatal."""
        if self.state is ShardState.FATAL:
            return []
        if code in FATAL_CLOSE_CODES:
            self._reset_connection()
            self.state = ShardState.FATAL
            self._fatal_reason = f"close code {code} ({CLOSE_CODE_NAMES.get(code, '?')})"
            return [Fatal(code, self._fatal_reason)]
        reason = "dropped" if code is None else f"close-{code}"
        if not self._connected:
            reason = "connect-failed"
        resume = code not in NEW_SESSION_CLOSE_CODES
        if self._connected and self.state is ShardState.READY:
            return self._reconnect(now, resume=resume, delay_s=0.0, reason=reason)
        return self._failed_connect(now, reason, resume=resume)

    # -- commands --------------------------------------------------------------------------------------------

    def prepare_command(self, payload: Mapping[str, Any], now: float) -> bytes:
        """Validate and encode a user command; doesn't consume the send window.

        CommandTooLarge if the JSON is over 4096 bytes; CommandRejected if it isn't `{op, d}`, op a client op.
        """
        op = payload.get("op")
        if type(op) is not int:
            raise CommandRejected(f"command has no int op: {_shown(op)}")
        if op not in COMMAND_OPS:
            raise CommandRejected(f"op {op} is not a command a client may send")
        if "d" not in payload or set(payload) - {"op", "d"}:
            raise CommandRejected("a command is exactly {op, d}")
        try:
            data = orjson.dumps({"op": op, "d": payload["d"]})
        except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
            raise CommandRejected(f"command is not JSON-serialisable: {exc}") from exc
        if len(data) > MAX_PAYLOAD_BYTES:
            raise CommandTooLarge(f"command is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
        return data

    def command_delay(self, now: float) -> float:
        """0.0 if a command may go now (and records it as sent), else seconds to wait.

        Commands go only while READY; in any other state this returns math.inf (wait for READY, or give up).
        """
        if not self._connected or self.state is not ShardState.READY:
            return math.inf
        delay = self._window.delay_for_command(now)
        if delay == 0.0:
            self._window.record(now, heartbeat=False)
        return delay

    # -- internals -------------------------------------------------------------------------------------------

    def _on_dispatch(self, payload: GatewayPayload, now: float) -> list[Event]:
        s, name = payload.s, payload.t
        if s is not None and (self._seq is None or s > self._seq):
            self._seq = s
        if name is None:
            raise ProtocolError("dispatch without t")
        if name == "READY":
            d = payload.d
            session_id = d.get("session_id") if isinstance(d, dict) else None
            resume_url = d.get("resume_gateway_url") if isinstance(d, dict) else None
            if not isinstance(session_id, str) or not isinstance(resume_url, str):
                raise ProtocolError("READY without session_id and resume_gateway_url")
            self._session_id, self._resume_url, self._seq = session_id, resume_url, s
            self._became_ready()
            return [Ready(session_id, resume_url), Dispatch(name, s)]
        if name == "RESUMED":
            self._became_ready()
            return [Resumed(), Dispatch(name, s)]
        if name == "RATE_LIMITED":
            d = payload.d
            opcode = d.get("opcode") if isinstance(d, dict) else None
            retry_after = d.get("retry_after") if isinstance(d, dict) else None
            if type(opcode) is not int or not isinstance(retry_after, int | float):
                raise ProtocolError("RATE_LIMITED without opcode and retry_after")
            return [Dispatch(name, s), RateLimited(opcode, float(retry_after), d.get("meta"))]
        return [Dispatch(name, s)]

    def _on_hello(self, payload: GatewayPayload, now: float) -> list[Event]:
        if self._hello_seen:
            return []
        d = payload.d
        interval_ms = d.get("heartbeat_interval") if isinstance(d, dict) else None
        # In seconds it must stay above zero: 5e-324 ms underflows to 0.0 s (the send window divides by it).
        if (
            not isinstance(interval_ms, int | float)
            or isinstance(interval_ms, bool)
            or not interval_ms / 1000.0 > 0
        ):
            raise ProtocolError(f"HELLO without a positive heartbeat_interval: {_shown(d)}")
        self._hello_seen = True
        self._hello_deadline = math.inf
        self._interval_s = interval_ms / 1000.0
        self._window.set_heartbeat_interval(self._interval_s)
        # B2: jitter the first beat, uniformly over [1 %, 100 %) of the interval: the first percent is where a
        # client that does not jitter at all beats, which a "no jitter" check (the simulator's) flags.
        self._next_heartbeat_at = now + self._interval_s * first_beat_fraction(self._rng.random())
        if self._session_id is None:
            self.state = ShardState.IDENTIFYING
            return [RequestIdentify()]
        self._resumes += 1
        d_resume = {"token": self._token, "session_id": self._session_id, "seq": self._seq}
        return [self._authenticate(now, orjson.dumps({"op": 6, "d": d_resume}), "resume")]

    def _authenticate(self, now: float, data: bytes, kind: Literal["identify", "resume"]) -> Send:
        self.state = ShardState.AUTHENTICATING
        self._ready_deadline = now + READY_TIMEOUT_S
        self._window.record(now, heartbeat=False)
        return Send(data, kind)

    def _heartbeat_send(self, now: float) -> Send:
        self._window.record(now, heartbeat=True)
        return Send(orjson.dumps({"op": 1, "d": self._seq}), "heartbeat")

    def _became_ready(self) -> None:
        self.state = ShardState.READY
        self._ready_deadline = math.inf
        self._resume_url_failed = False
        self._backoff.reset()

    def _failed_connect(self, now: float, reason: str, *, resume: bool = True) -> list[Event]:
        """A connect that never reached READY/RESUMED: back off, and stop trying a resume URL that failed."""
        if not self._hello_seen and self.connect_url() != self.gateway_url:
            self._resume_url_failed = True
        delay = self._backoff.failure_delay(now)
        return self._reconnect(now, resume=resume, delay_s=delay, reason=reason)

    def _reconnect(self, now: float, *, resume: bool, delay_s: float, reason: str) -> list[Event]:
        if not resume:
            self._drop_session()
        delay = self._backoff.floored(now, delay_s)
        self._backoff.attempt_started(now + delay)
        self._reset_connection()
        self.state = ShardState.DISCONNECTED
        self._reconnects[reason] += 1
        return [Reconnect(self._session_id is not None, delay, RESUMABLE_CLOSE_CODE, reason)]

    def _drop_session(self) -> None:
        self._session_id = self._resume_url = self._seq = None
        self._resume_url_failed = False

    def _reset_connection(self) -> None:
        self._connected = False
        self._hello_seen = False
        self._hello_deadline = self._ready_deadline = math.inf
        self._next_heartbeat_at = self._ack_deadline = math.inf
        self._ack_pending = False
        self._received_since_heartbeat = False
        self._window.reset()
