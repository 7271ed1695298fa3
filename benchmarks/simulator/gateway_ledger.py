"""The gateway's ledger: what the simulator saw and did, for tests and the fault suite to judge.

Dispatch accounting is per session: seqs are dense (1..last_seq), so "every dispatch sent" is the pair
`(session_id, last_seq)` plus how often each was written to a socket; a consumer that deduplicates on
`(shard, session_id, seq)` has lost nothing exactly when it holds every seq up to `last_seq` of every session.
Rule violations carry a stable `rule` name so tests can assert on them. A few counters are maxima rather than
sums (`MAXIMA`): how close clients came to a limit, zeroed by `reset_maxima` so a fault can measure its own.

Shard overlap (cluster mode moves shards between hosts; two hosts must never run one shard at once): a
connection serves shard S of C from the moment it is sent READY or RESUMED (`serving_started`) until it is
closed, dropped, blackholed or gone (`serving_ended`). A connection that starts serving (S, C) while another
one still does is the violation `shard_served_twice` (detail: both sessions) and counts in `shard_overlaps`
(shard 0 of 4 and shard 0 of 8, two generations of a bot during a reshard, are two shards, not an overlap);
`shard_overlap_s` (in the snapshot's counters, a float) is the time during which some shard had two or more
connections, ongoing overlaps included. Like every counter, each is absent until it is non-zero (read them
with `.get(name, 0)`). What is being served survives `reset`, like live sessions; an overlap in progress then
counts its time from the reset on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

import trio

#: Bounded lists keep a long benchmark run from growing the ledger without limit; counters stay exact.
MAX_RECORDS: Final = 20_000
#: Counters that hold the largest value seen, not a sum: client payloads in one connection's 60 s window,
#: milliseconds between two heartbeats of one connection, bytes in one client payload.
MAXIMA: Final = ("send_window_max", "heartbeat_gap_max_ms", "payload_max_bytes")


class SessionView(Protocol):
    """What the ledger reads from a gateway session."""

    session_id: str
    shard_id: int
    shard_count: int
    last_seq: int
    sent: int
    replayed: int
    resumes: int
    invalid: bool

    @property
    def state(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Violation:
    at: float
    rule: str
    shard: int | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class IdentifyRecord:
    at: float
    shard: int
    shard_count: int
    key: int
    accepted: bool
    reason: str
    since_previous_s: float | None
    session_id: str | None


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    at: float
    shard: int | None
    session_id: str
    seq: int
    ok: bool
    reason: str
    replayed: int
    via_resume_url: bool


@dataclass(frozen=True, slots=True)
class CloseRecord:
    at: float
    shard: int | None
    code: int | None
    by: str  # "client" or "server"


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    at: float
    shard: int | None
    delay_s: float
    fraction_of_interval: float


@dataclass(frozen=True, slots=True)
class Serving:
    """What one connection serves: a shard of a shard count, for a session."""

    shard: int
    shard_count: int
    session_id: str


@dataclass
class GatewayLedger:
    started_at: float = field(default_factory=trio.current_time)
    counters: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(MAXIMA, 0)))
    events_by_type: Counter[str] = field(default_factory=Counter)
    closes_received: Counter[str] = field(default_factory=Counter)
    closes_sent: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    identifies: list[IdentifyRecord] = field(default_factory=list)
    resumes: list[ResumeRecord] = field(default_factory=list)
    closes: list[CloseRecord] = field(default_factory=list)
    first_heartbeats: list[HeartbeatRecord] = field(default_factory=list)
    #: Every session created since the last reset, ended ones included (their dispatches still count).
    sessions: dict[str, SessionView] = field(default_factory=dict)
    #: Seconds of finished overlaps (see the module docstring); `shard_overlap_total_s` adds ongoing ones.
    shard_overlap_s: float = 0.0
    #: Connection -> what it serves, and (shard, shard count) -> the connections serving it.
    serving: dict[object, Serving] = field(default_factory=dict)
    servers: dict[tuple[int, int], dict[object, str]] = field(default_factory=dict)
    #: (shard, shard count) -> when (trio clock) it began to have more than one connection.
    overlap_since: dict[tuple[int, int], float] = field(default_factory=dict)

    def now(self) -> float:
        return round(trio.current_time() - self.started_at, 6)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def record_max(self, name: str, value: int) -> None:
        """Raise the maximum `name` (one of `MAXIMA`) to `value` if it is larger."""
        if value > self.counters[name]:
            self.counters[name] = value

    def reset_maxima(self) -> None:
        for name in MAXIMA:
            self.counters[name] = 0

    def violation(self, rule: str, shard: int | None, detail: str = "") -> None:
        self.counters["violations"] += 1
        _append(self.violations, Violation(self.now(), rule, shard, detail))

    def identify(self, record: IdentifyRecord) -> None:
        self.counters["identifies"] += 1
        self.counters["identifies_accepted" if record.accepted else "identifies_refused"] += 1
        _append(self.identifies, record)

    def resume(self, record: ResumeRecord) -> None:
        self.counters["resumes"] += 1
        self.counters["resumes_ok" if record.ok else "resumes_failed"] += 1
        _append(self.resumes, record)

    def close(self, shard: int | None, code: int | None, by: str) -> None:
        (self.closes_received if by == "client" else self.closes_sent)[str(code)] += 1
        _append(self.closes, CloseRecord(self.now(), shard, code, by))

    def first_heartbeat(self, shard: int | None, delay_s: float, interval_s: float) -> None:
        _append(self.first_heartbeats, HeartbeatRecord(self.now(), shard, delay_s, delay_s / interval_s))

    def serving_started(self, conn: object, shard: int, shard_count: int, session_id: str) -> None:
        """`conn` was sent READY or RESUMED for `session_id`: it serves (shard, shard_count) from now on."""
        self.serving_ended(conn)
        key = (shard, shard_count)
        servers = self.servers.setdefault(key, {})
        if servers:
            others = ", ".join(sorted(set(servers.values())))
            self.counters["shard_overlaps"] += 1
            self.violation(
                "shard_served_twice",
                shard,
                f"shard {shard}/{shard_count}: session {session_id} started on a new connection while "
                f"session {others} still served it on another",
            )
            self.overlap_since.setdefault(key, trio.current_time())
        servers[conn] = session_id
        self.serving[conn] = Serving(shard, shard_count, session_id)

    def serving_ended(self, conn: object) -> None:
        """`conn` no longer serves its shard (closed, dropped, blackholed or gone); idempotent."""
        serving = self.serving.pop(conn, None)
        if serving is None:
            return
        key = (serving.shard, serving.shard_count)
        servers = self.servers[key]
        del servers[conn]
        if not servers:
            del self.servers[key]
        if len(servers) < 2 and key in self.overlap_since:
            self.shard_overlap_s += trio.current_time() - self.overlap_since.pop(key)

    def shard_overlap_total_s(self) -> float:
        """Seconds during which a shard had two connections, the overlaps still going on included."""
        now = trio.current_time()
        return round(self.shard_overlap_s + sum(now - since for since in self.overlap_since.values()), 6)

    def counters_snapshot(self) -> dict[str, float]:
        """The counters, with `shard_overlap_s` once there was an overlap."""
        counters: dict[str, float] = dict(self.counters)
        overlap_s = self.shard_overlap_total_s()
        if overlap_s > 0:
            counters["shard_overlap_s"] = overlap_s
        return counters

    def rules_broken(self) -> dict[str, int]:
        return dict(Counter(v.rule for v in self.violations))

    def reset(self) -> None:
        sessions, serving, servers, overlapping = (
            self.sessions,
            self.serving,
            self.servers,
            self.overlap_since,
        )
        self.__init__()  # type: ignore[misc]
        self.sessions = {sid: view for sid, view in sessions.items() if view.state != "ended"}
        self.serving, self.servers = serving, servers
        self.overlap_since = dict.fromkeys(overlapping, trio.current_time())

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": self.counters_snapshot(),
            "events_by_type": dict(self.events_by_type),
            "closes_received": dict(self.closes_received),
            "closes_sent": dict(self.closes_sent),
            "rules_broken": self.rules_broken(),
            "violations": [asdict(v) for v in self.violations],
            "identifies": [asdict(r) for r in self.identifies],
            "resumes": [asdict(r) for r in self.resumes],
            "closes": [asdict(r) for r in self.closes],
            "first_heartbeats": [asdict(r) for r in self.first_heartbeats],
            "sessions": {
                sid: {
                    "shard": view.shard_id,
                    "shard_count": view.shard_count,
                    "last_seq": view.last_seq,
                    "sent": view.sent,
                    "replayed": view.replayed,
                    "resumes": view.resumes,
                    "state": view.state,
                }
                for sid, view in self.sessions.items()
            },
        }


def _append(records: list[Any], record: object) -> None:
    if len(records) < MAX_RECORDS:
        records.append(record)
