"""The sans-io shard core against anchors/gateway.md section 1 and the fault criteria in 6.3.

Time-dependent tests run under pytest-trio's `autojump_clock` fixture (a MockClock with autojump_threshold=0,
starting at 0.0): they sleep until `next_deadline()` and assert exact virtual times. Jitter is drawn from a
seeded Random; the expected values come from a twin Random with the same seed, drawn in the same order.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.errors import CommandRejected, CommandTooLarge, ProtocolError
from workers.protocol import (
    ACK_TIMEOUT_S,
    HELLO_TIMEOUT_S,
    MAX_PAYLOAD_BYTES,
    READY_TIMEOUT_S,
    RESUMABLE_CLOSE_CODE,
    Dispatch,
    Event,
    Fatal,
    GatewayPayload,
    HeartbeatAck,
    RateLimited,
    Ready,
    Reconnect,
    RequestIdentify,
    Resumed,
    Send,
    SessionSnapshot,
    ShardProtocol,
    ShardState,
    decode_payload,
    first_beat_fraction,
)

INTERVAL_MS = 41_250
INTERVAL_S = 41.25
GATEWAY_URL = "wss://gateway.example"
RESUME_URL = "wss://resume.example"
TOKEN = "Bot secret"
SEED = 1234
FIRST_BEAT_S = INTERVAL_S * first_beat_fraction(
    random.Random(SEED).random()
)  # where a `ready_shard()` beats first

ACK = GatewayPayload(11, None, None, None)
HEARTBEAT_REQUEST = GatewayPayload(1, None, None, None)
RECONNECT = GatewayPayload(7, None, None, None)


def hello(interval_ms: int = INTERVAL_MS) -> GatewayPayload:
    return GatewayPayload(10, {"heartbeat_interval": interval_ms}, None, None)


def dispatch(name: str, s: int | None, d: Any = None) -> GatewayPayload:
    return GatewayPayload(0, d if d is not None else {}, s, name)


def ready(s: int = 1, session_id: str = "sess-1", url: str = RESUME_URL) -> GatewayPayload:
    return dispatch("READY", s, {"session_id": session_id, "resume_gateway_url": url, "v": 10})


def invalid_session(resumable: bool) -> GatewayPayload:
    return GatewayPayload(9, resumable, None, None)


def make(seed: int = SEED, **kwargs: Any) -> tuple[ShardProtocol, random.Random]:
    """A protocol and a twin of its Random."""
    options: dict[str, Any] = {
        "shard_id": 3,
        "shard_count": 16,
        "token": TOKEN,
        "intents": 513,
        "gateway_url": GATEWAY_URL,
    }
    options.update(kwargs)
    return ShardProtocol(rng=random.Random(seed), **options), random.Random(seed)


def state_of(proto: ShardProtocol) -> ShardState:
    """The state, read through a call so mypy does not keep a narrowing across the calls that change it."""
    return proto.state


def sent(event: Event) -> dict[str, Any]:
    assert isinstance(event, Send)
    payload = orjson.loads(event.data)
    assert isinstance(payload, dict)
    return payload


def ready_shard(now: float = 0.0, **kwargs: Any) -> tuple[ShardProtocol, random.Random]:
    """A shard that connected at `now`, identified and got READY (seq 1); the twin has drawn the same."""
    proto, twin = make(**kwargs)
    proto.on_connected(now)
    assert proto.receive(hello(), now) == [RequestIdentify()]
    twin.random()  # the first-heartbeat jitter
    proto.on_identify_permitted(now)
    proto.receive(ready(), now)
    assert proto.state is ShardState.READY
    return proto, twin


async def advance(proto: ShardProtocol) -> list[Event]:
    """Sleep until the next deadline and fire it."""
    deadline = proto.next_deadline()
    assert deadline < math.inf
    await trio.sleep_until(deadline)
    return proto.poll(trio.current_time())


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# -- decoding ---------------------------------------------------------------------------------------------


def test_decode_payload() -> None:
    assert decode_payload(b'{"op":0,"d":{"a":1},"s":5,"t":"MESSAGE_CREATE"}') == GatewayPayload(
        0, {"a": 1}, 5, "MESSAGE_CREATE"
    )
    assert decode_payload('{"op":11}') == GatewayPayload(11, None, None, None)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1,2]", b'"op"', b"{}", b'{"op":"0"}', b'{"op":true}', b'{"op":0,"s":"1"}'],
)
def test_decode_payload_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_payload(raw)


# -- HELLO, IDENTIFY, RESUME ------------------------------------------------------------------------------


def test_hello_without_session_requests_identify_and_identify_payload() -> None:
    proto, _ = make(presence={"status": "idle"}, large_threshold=100)
    assert state_of(proto) is ShardState.DISCONNECTED
    assert proto.connect_url() == GATEWAY_URL
    proto.on_connected(0.0)
    assert state_of(proto) is ShardState.CONNECTING
    assert proto.receive(hello(), 0.5) == [RequestIdentify()]
    assert state_of(proto) is ShardState.IDENTIFYING
    [event] = proto.on_identify_permitted(2.0)
    assert isinstance(event, Send) and event.kind == "identify"
    assert sent(event) == {
        "op": 2,
        "d": {
            "token": TOKEN,
            "intents": 513,
            "properties": {
                "os": sys.platform,
                "browser": "trio-shard-gateway",
                "device": "trio-shard-gateway",
            },
            "shard": [3, 16],
            "large_threshold": 100,
            "presence": {"status": "idle"},
            "compress": False,
        },
    }
    assert proto.state is ShardState.AUTHENTICATING
    assert proto.on_identify_permitted(2.5) == []  # a second permit sends nothing (4005)


def test_identify_properties_override_defaults_and_presence_is_optional() -> None:
    proto, _ = make(properties={"os": "linux", "browser": "b"})
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    d = sent(proto.on_identify_permitted(0.0)[0])["d"]
    assert d["properties"] == {"os": "linux", "browser": "b", "device": "trio-shard-gateway"}
    assert "presence" not in d
    assert d["large_threshold"] == 250


def test_identify_permit_after_the_connection_dropped_sends_nothing() -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    proto.on_connection_lost(None, 1.0)
    assert proto.on_identify_permitted(2.0) == []
    proto.on_connected(3.0)
    assert proto.on_identify_permitted(3.0) == []  # no HELLO yet on the new socket


def test_hello_with_session_resumes() -> None:
    session = SessionSnapshot("sess-9", 42, RESUME_URL)
    proto, _ = make(session=session)
    assert proto.session == session
    assert proto.connect_url() == RESUME_URL
    proto.on_connected(0.0)
    [event] = proto.receive(hello(), 0.0)
    assert isinstance(event, Send) and event.kind == "resume"
    assert sent(event) == {"op": 6, "d": {"token": TOKEN, "session_id": "sess-9", "seq": 42}}
    assert proto.state is ShardState.AUTHENTICATING
    # Replayed events arrive before RESUMED and advance seq.
    assert proto.receive(dispatch("MESSAGE_CREATE", 43), 1.0) == [Dispatch("MESSAGE_CREATE", 43)]
    assert proto.receive(dispatch("RESUMED", 44), 1.0) == [Resumed(), Dispatch("RESUMED", 44)]
    assert state_of(proto) is ShardState.READY
    assert proto.session == SessionSnapshot("sess-9", 44, RESUME_URL)
    stats = proto.statistics()
    assert (stats.resumes, stats.identifies, stats.seq, stats.session_id) == (1, 0, 44, "sess-9")


def test_ready_stores_the_session_and_emits_ready_then_dispatch() -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    proto.on_identify_permitted(0.0)
    assert proto.receive(ready(s=1, session_id="abc"), 1.0) == [
        Ready("abc", RESUME_URL),
        Dispatch("READY", 1),
    ]
    assert proto.session == SessionSnapshot("abc", 1, RESUME_URL)
    assert proto.connect_url() == RESUME_URL
    assert proto.state is ShardState.READY


@pytest.mark.parametrize(
    "payload",
    [
        GatewayPayload(10, {}, None, None),
        GatewayPayload(10, {"heartbeat_interval": 0}, None, None),
        GatewayPayload(10, None, None, None),
        dispatch("READY", 1, {"session_id": "x"}),
        GatewayPayload(0, {}, 3, None),
    ],
)
def test_malformed_payloads_we_parse_raise_protocol_error(payload: GatewayPayload) -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    if payload.op == 0:
        proto.receive(hello(), 0.0)
    with pytest.raises(ProtocolError):
        proto.receive(payload, 0.0)


def test_seq_is_the_highest_s_seen_and_unknown_ops_are_ignored() -> None:
    proto, _ = ready_shard()
    for s in (2, 5, 4, 3):
        proto.receive(dispatch("X", s), 1.0)
    assert proto.receive(dispatch("TYPING_START", None), 1.0) == [Dispatch("TYPING_START", None)]
    assert proto.receive(GatewayPayload(99, None, None, None), 1.0) == []
    assert proto.session is not None and proto.session.seq == 5
    assert proto.statistics().seq == 5


def test_rate_limited_dispatch_is_published_and_reported() -> None:
    proto, _ = ready_shard()
    d = {"opcode": 8, "retry_after": 27.5, "meta": {"guild_id": "1", "nonce": "n"}}
    assert proto.receive(dispatch("RATE_LIMITED", 2, d), 1.0) == [
        Dispatch("RATE_LIMITED", 2),
        RateLimited(8, 27.5, {"guild_id": "1", "nonce": "n"}),
    ]
    with pytest.raises(ProtocolError):
        proto.receive(dispatch("RATE_LIMITED", 3, {"opcode": 8}), 1.0)


# -- heartbeats and zombies ---------------------------------------------------------------------------


async def test_heartbeat_schedule_is_jittered_then_periodic(autojump_clock: trio.testing.MockClock) -> None:
    proto, twin = make()
    proto.on_connected(trio.current_time())
    proto.receive(hello(), trio.current_time())
    first = INTERVAL_S * first_beat_fraction(twin.random())
    assert proto.next_deadline() == first  # the HELLO timeout is off
    [beat] = await advance(proto)
    assert trio.current_time() == first
    assert sent(beat) == {"op": 1, "d": None}  # no seq yet
    await trio.sleep(0.1)
    [ack] = proto.receive(ACK, trio.current_time())
    assert isinstance(ack, HeartbeatAck) and ack.latency_s == pytest.approx(0.1)
    proto.on_identify_permitted(trio.current_time())
    proto.receive(ready(s=7), trio.current_time())
    for n in range(1, 4):
        [beat] = await advance(proto)
        assert trio.current_time() == pytest.approx(first + n * INTERVAL_S)
        assert sent(beat) == {"op": 1, "d": 7}
        proto.receive(ACK, trio.current_time())
    assert proto.statistics().heartbeat_latency_s == 0.0


async def test_zombie_with_no_traffic_is_detected_at_the_ack_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, _ = ready_shard()
    first = FIRST_BEAT_S
    [beat] = await advance(proto)
    assert isinstance(beat, Send) and beat.kind == "heartbeat"
    events = await advance(proto)
    assert trio.current_time() == first + ACK_TIMEOUT_S
    assert events == [Reconnect(True, 0.0, RESUMABLE_CLOSE_CODE, "zombie")]
    assert proto.state is ShardState.DISCONNECTED
    assert proto.next_deadline() == math.inf
    assert proto.connect_url() == RESUME_URL
    assert proto.statistics().reconnects == {"zombie": 1}


async def test_zombie_with_traffic_but_no_ack_waits_for_the_next_beat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, _ = ready_shard()
    first = FIRST_BEAT_S
    await advance(proto)
    await trio.sleep(1.0)
    proto.receive(dispatch("MESSAGE_CREATE", 2), trio.current_time())
    assert await advance(proto) == []  # the ACK deadline passes: traffic flows, so wait
    assert trio.current_time() == first + ACK_TIMEOUT_S
    events = await advance(proto)
    assert trio.current_time() == first + INTERVAL_S
    assert events == [Reconnect(True, 0.0, RESUMABLE_CLOSE_CODE, "zombie")]


async def test_ack_deadline_is_the_interval_when_shorter_than_10_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, twin = make()
    proto.on_connected(0.0)
    proto.receive(hello(interval_ms=4_000), 0.0)
    first = 4.0 * first_beat_fraction(twin.random())
    await advance(proto)
    events = await advance(proto)
    assert trio.current_time() == first + 4.0
    assert events == [Reconnect(False, 0.0, RESUMABLE_CLOSE_CODE, "zombie")]


async def test_server_heartbeat_request_is_answered_at_once_off_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, _ = ready_shard()
    first = FIRST_BEAT_S
    await trio.sleep(first / 2)
    [answer] = proto.receive(HEARTBEAT_REQUEST, trio.current_time())
    assert sent(answer) == {"op": 1, "d": 1}
    assert proto.next_deadline() == first  # schedule undisturbed
    await advance(proto)
    await trio.sleep(0.5)
    proto.receive(ACK, trio.current_time())
    # A request while our beat is unacknowledged is answered too and does not count as the awaited ACK.
    [beat] = await advance(proto)
    assert trio.current_time() == first + INTERVAL_S
    [answer] = proto.receive(HEARTBEAT_REQUEST, trio.current_time())
    assert isinstance(answer, Send) and answer.kind == "heartbeat"
    proto.receive(ACK, trio.current_time())
    [beat] = await advance(proto)
    assert trio.current_time() == first + 2 * INTERVAL_S
    assert isinstance(beat, Send)


# -- reconnect, resume, invalid session ---------------------------------------------------------------


def test_op7_mid_stream_resumes_at_once() -> None:
    proto, _ = ready_shard()
    assert proto.receive(RECONNECT, 30.0) == [
        Reconnect(True, 0.0, RESUMABLE_CLOSE_CODE, "reconnect-requested")
    ]
    assert proto.state is ShardState.DISCONNECTED
    assert proto.connect_url() == RESUME_URL
    assert proto.receive(dispatch("X", 9), 30.0) == []  # stragglers from the old socket are ignored
    proto.on_connected(30.2)
    [resume] = proto.receive(hello(), 30.3)
    assert sent(resume)["d"] == {"token": TOKEN, "session_id": "sess-1", "seq": 1}


@pytest.mark.parametrize("with_session", [False, True])
def test_op7_before_hello(with_session: bool) -> None:
    session = SessionSnapshot("s", 5, RESUME_URL) if with_session else None
    proto, _ = make(session=session)
    proto.on_connected(10.0)
    [event] = proto.receive(RECONNECT, 10.25)
    # Delay 0, floored so attempts stay 1 s apart (F14): the socket was opened at 10.0.
    assert event == Reconnect(with_session, 0.75, RESUMABLE_CLOSE_CODE, "reconnect-requested")
    # op 7 is an instruction, not a failure of the resume URL.
    assert proto.connect_url() == (RESUME_URL if with_session else GATEWAY_URL)


def test_op9_true_resumes_after_a_short_jitter() -> None:
    proto, twin = ready_shard()
    delay = twin.uniform(0.0, 1.0)
    events = proto.receive(invalid_session(True), 100.0)
    assert events == [Reconnect(True, delay, RESUMABLE_CLOSE_CODE, "invalid-session-resumable")]
    assert proto.session is not None


def test_op9_false_drops_the_session_and_identifies_after_1_to_5_s() -> None:
    proto, twin = ready_shard()
    delay = twin.uniform(1.0, 5.0)
    events = proto.receive(invalid_session(False), 100.0)
    assert events == [Reconnect(False, delay, RESUMABLE_CLOSE_CODE, "invalid-session")]
    assert 1.0 <= delay <= 5.0
    assert proto.session is None
    assert proto.connect_url() == GATEWAY_URL
    proto.on_connected(100.0 + delay)
    assert proto.receive(hello(), 100.0 + delay) == [RequestIdentify()]


def test_resume_answered_by_op9_false_leads_to_identify_not_a_second_resume() -> None:
    proto, _ = make(session=SessionSnapshot("expired", 10, RESUME_URL))
    proto.on_connected(0.0)
    [resume] = proto.receive(hello(), 0.0)
    assert isinstance(resume, Send) and resume.kind == "resume"
    [reconnect] = proto.receive(invalid_session(False), 0.5)
    assert isinstance(reconnect, Reconnect) and not reconnect.resume
    proto.on_connected(10.0)
    assert proto.receive(hello(), 10.0) == [RequestIdentify()]
    [identify] = proto.on_identify_permitted(10.0)
    assert isinstance(identify, Send) and identify.kind == "identify"
    heartbeat_d = sent(proto.receive(HEARTBEAT_REQUEST, 10.0)[0])["d"]
    assert heartbeat_d is None  # the old session's seq is gone too
    stats = proto.statistics()
    assert (stats.resumes, stats.identifies) == (1, 1)


def test_op9_true_without_a_session_identifies_again() -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    proto.on_identify_permitted(0.0)
    [event] = proto.receive(invalid_session(True), 5.0)
    assert isinstance(event, Reconnect) and event.resume is False


# -- close codes ----------------------------------------------------------------------------------------

RESUME_CODES = [4000, 4001, 4002, 4008, None, 1000, 1001, 1006, 1011, 4006, 4999]
NEW_SESSION_CODES = [4003, 4005, 4007, 4009]
FATAL_CODES = [4004, 4010, 4011, 4012, 4013, 4014]


@pytest.mark.parametrize("code", RESUME_CODES)
def test_close_codes_that_resume(code: int | None) -> None:
    proto, _ = ready_shard()
    events = proto.on_connection_lost(code, 50.0)
    reason = "dropped" if code is None else f"close-{code}"
    assert events == [Reconnect(True, 0.0, RESUMABLE_CLOSE_CODE, reason)]
    assert proto.connect_url() == RESUME_URL
    proto.on_connected(50.1)
    [resume] = proto.receive(hello(), 50.1)
    assert isinstance(resume, Send) and resume.kind == "resume"
    assert proto.statistics().reconnects == {reason: 1}


@pytest.mark.parametrize("code", NEW_SESSION_CODES)
def test_close_codes_that_identify_with_a_new_session(code: int) -> None:
    proto, _ = ready_shard()
    events = proto.on_connection_lost(code, 50.0)
    assert events == [Reconnect(False, 0.0, RESUMABLE_CLOSE_CODE, f"close-{code}")]
    assert proto.session is None
    assert proto.connect_url() == GATEWAY_URL
    proto.on_connected(50.1)
    assert proto.receive(hello(), 50.1) == [RequestIdentify()]


@pytest.mark.parametrize("code", FATAL_CODES)
async def test_fatal_close_codes_stay_fatal(code: int) -> None:
    proto, _ = ready_shard()
    [event] = proto.on_connection_lost(code, 50.0)
    assert isinstance(event, Fatal) and event.code == code
    assert proto.state is ShardState.FATAL
    stats = proto.statistics()
    assert (
        stats.state is ShardState.FATAL and stats.fatal_reason is not None and str(code) in stats.fatal_reason
    )
    assert stats.reconnects == {}
    # Every later call is inert.
    proto.on_connected(51.0)
    assert proto.state is ShardState.FATAL
    assert proto.receive(hello(), 51.0) == []
    assert proto.receive(RECONNECT, 51.0) == []
    assert proto.poll(1e9) == []
    assert proto.next_deadline() == math.inf
    assert proto.on_identify_permitted(52.0) == []
    assert proto.on_connection_lost(None, 53.0) == []
    assert proto.on_connection_lost(4000, 53.0) == []
    assert proto.command_delay(53.0) == math.inf


def test_fatal_before_ready() -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    proto.on_identify_permitted(0.0)
    assert proto.on_connection_lost(4004, 0.5) == [Fatal(4004, "close code 4004 (authentication failed)")]


# -- timeouts, backoff, resume URL fallback -----------------------------------------------------------


async def test_hello_timeout_reconnects_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    proto, twin = make()
    proto.on_connected(trio.current_time())
    events = await advance(proto)
    assert trio.current_time() == HELLO_TIMEOUT_S
    assert events == [Reconnect(False, twin.uniform(0.0, 1.0), RESUMABLE_CLOSE_CODE, "hello-timeout")]


async def test_ready_timeout_counts_from_identify(autojump_clock: trio.testing.MockClock) -> None:
    proto, twin = make()
    proto.on_connected(0.0)
    proto.receive(hello(interval_ms=60_000), 0.0)
    first = 60.0 * first_beat_fraction(twin.random())
    await trio.sleep(3.0)  # the identify gate took 3 s: no READY timeout meanwhile
    proto.on_identify_permitted(trio.current_time())
    events: list[Event] = []
    while not events or isinstance(events[0], Send):
        events = await advance(proto)
        if events and isinstance(events[0], Send):
            proto.receive(ACK, trio.current_time())
    assert first != 3.0 + READY_TIMEOUT_S
    assert trio.current_time() == 3.0 + READY_TIMEOUT_S
    assert events == [Reconnect(False, twin.uniform(0.0, 1.0), RESUMABLE_CLOSE_CODE, "ready-timeout")]


async def test_resume_timeout_keeps_the_session(autojump_clock: trio.testing.MockClock) -> None:
    proto, twin = make(session=SessionSnapshot("s", 3, RESUME_URL))
    proto.on_connected(0.0)
    proto.receive(hello(interval_ms=60_000), 0.0)
    twin.random()
    proto.receive(HEARTBEAT_REQUEST, 0.0)
    while True:
        events = await advance(proto)
        if events and isinstance(events[0], Reconnect):
            break
        proto.receive(ACK, trio.current_time())
    assert trio.current_time() == READY_TIMEOUT_S
    assert events == [Reconnect(True, twin.uniform(0.0, 1.0), RESUMABLE_CLOSE_CODE, "ready-timeout")]
    assert proto.connect_url() == RESUME_URL  # HELLO came, so the resume URL works


async def test_failed_connects_back_off_with_full_jitter_and_a_1_s_floor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, twin = make(seed=99)
    attempts: list[float] = []
    for n in range(10):
        attempts.append(trio.current_time())
        proto.on_connected(trio.current_time())
        await trio.sleep(0.25)  # the socket dies 250 ms after opening, before HELLO
        [event] = proto.on_connection_lost(None, trio.current_time())
        expected = max(twin.uniform(0.0, min(60.0, 2.0**n)), 0.75)
        assert isinstance(event, Reconnect)
        assert event.delay_s == pytest.approx(expected)
        assert event.reason == "dropped"
        await trio.sleep(event.delay_s)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert min(gaps) >= 1.0 - 1e-9


async def test_dial_failures_count_as_failed_connects(autojump_clock: trio.testing.MockClock) -> None:
    proto, twin = make(seed=5)
    delays = []
    for n in range(6):
        # The dial itself fails: no on_connected, so the floor counts from the planned attempt time.
        [event] = proto.on_connection_lost(None, trio.current_time())
        assert isinstance(event, Reconnect) and event.reason == "connect-failed"
        draw = twin.uniform(0.0, min(60.0, 2.0**n))
        assert event.delay_s == pytest.approx(draw if n == 0 else max(draw, 1.0))
        delays.append(event.delay_s)
        await trio.sleep(event.delay_s)
    assert proto.statistics().reconnects == {"connect-failed": 6}


def test_ready_resets_the_failure_count() -> None:
    proto, twin = make(seed=11)
    proto.on_connected(0.0)
    proto.on_connection_lost(None, 0.5)  # n=0
    twin.uniform(0.0, 1.0)
    proto.on_connected(100.0)
    proto.on_connection_lost(None, 100.5)  # n=1
    twin.uniform(0.0, 2.0)
    proto.on_connected(200.0)
    proto.receive(hello(), 200.0)
    twin.random()
    proto.on_identify_permitted(200.0)
    proto.receive(ready(), 200.0)
    # A READY session that drops reconnects at once, not with backoff...
    assert proto.on_connection_lost(None, 300.0) == [Reconnect(True, 0.0, RESUMABLE_CLOSE_CODE, "dropped")]
    # ...and the next failure starts again at n=0.
    proto.on_connected(300.0)
    [event] = proto.on_connection_lost(4000, 400.0)
    assert isinstance(event, Reconnect)
    assert event.delay_s == twin.uniform(0.0, 1.0)


def test_a_ready_session_dropping_within_a_second_is_floored() -> None:
    proto, _ = ready_shard(now=10.0)
    [event] = proto.on_connection_lost(1006, 10.4)
    assert isinstance(event, Reconnect) and event.resume and event.reason == "close-1006"
    assert event.delay_s == pytest.approx(0.6)


def test_resume_url_failing_before_hello_falls_back_to_gateway_url_still_resuming() -> None:
    proto, _ = ready_shard()
    proto.on_connection_lost(None, 100.0)
    assert proto.connect_url() == RESUME_URL
    proto.on_connected(100.0)
    proto.on_connection_lost(None, 100.5)  # the resume URL failed before HELLO
    assert proto.connect_url() == GATEWAY_URL
    proto.on_connected(102.0)
    [resume] = proto.receive(hello(), 102.0)
    assert isinstance(resume, Send) and resume.kind == "resume"
    proto.receive(dispatch("RESUMED", 2), 102.5)
    assert proto.connect_url() == RESUME_URL  # a working session tries its resume URL again next time


def test_resume_url_dial_failure_falls_back() -> None:
    proto, _ = make(session=SessionSnapshot("s", 1, RESUME_URL))
    assert proto.connect_url() == RESUME_URL
    [event] = proto.on_connection_lost(None, 0.0)
    assert isinstance(event, Reconnect) and event.resume
    assert proto.connect_url() == GATEWAY_URL


async def test_hello_timeout_on_the_resume_url_falls_back(autojump_clock: trio.testing.MockClock) -> None:
    proto, _ = make(session=SessionSnapshot("s", 1, RESUME_URL))
    proto.on_connected(0.0)
    [event] = await advance(proto)
    assert isinstance(event, Reconnect) and event.resume and event.reason == "hello-timeout"
    assert proto.connect_url() == GATEWAY_URL


def test_failure_after_hello_keeps_the_resume_url() -> None:
    proto, _ = make(session=SessionSnapshot("s", 1, RESUME_URL))
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    proto.on_connection_lost(4000, 1.0)
    assert proto.connect_url() == RESUME_URL


# -- commands and the send window ---------------------------------------------------------------------


def test_commands_only_while_ready() -> None:
    proto, _ = make()
    assert proto.command_delay(0.0) == math.inf
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    assert proto.command_delay(0.0) == math.inf
    proto.on_identify_permitted(0.0)
    assert proto.command_delay(0.0) == math.inf
    proto.receive(ready(), 0.0)
    assert proto.command_delay(0.0) == 0.0


async def test_117_commands_pass_and_the_118th_waits_for_the_first_to_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    proto, twin = make()
    proto.on_connected(0.0)
    proto.receive(hello(), 0.0)
    first_beat = INTERVAL_S * twin.random()
    proto.on_identify_permitted(0.0)  # IDENTIFY counts: 1
    proto.receive(ready(), 0.0)
    await trio.sleep(1.0)
    first_command = trio.current_time()
    for _ in range(116):
        assert proto.command_delay(trio.current_time()) == 0.0
        await trio.sleep(0.01)
    # 1 identify + 116 commands = 117 = 120 - 3 reserved for heartbeats.
    wait = proto.command_delay(trio.current_time())
    assert wait == pytest.approx(60.0 - trio.current_time())  # until the IDENTIFY (sent at 0.0) expires
    assert first_command == 1.0
    await trio.sleep(wait)
    assert proto.command_delay(trio.current_time()) == 0.0
    # Heartbeats went out meanwhile, never delayed.
    assert first_beat < 60.0


async def test_heartbeats_are_never_delayed_by_commands(autojump_clock: trio.testing.MockClock) -> None:
    proto, _ = ready_shard()
    first = FIRST_BEAT_S
    sent_commands = 0
    while trio.current_time() < 200.0:
        delay = proto.command_delay(trio.current_time())
        if delay == 0.0:
            sent_commands += 1
            continue
        await trio.sleep(min(delay, proto.next_deadline() - trio.current_time()))
        for event in proto.poll(trio.current_time()):
            assert isinstance(event, Send) and event.kind == "heartbeat"
            beats = round((trio.current_time() - first) / INTERVAL_S)
            assert trio.current_time() == pytest.approx(first + INTERVAL_S * beats)
            proto.receive(ACK, trio.current_time())
    assert proto.state is ShardState.READY
    # 117 per 60 s window, and the identify in the first one.
    assert 117 * 3 <= sent_commands + 1 <= 117 * 4


def test_on_connected_resets_the_send_window() -> None:
    proto, _ = ready_shard()
    while proto.command_delay(1.0) == 0.0:
        pass
    proto.on_connection_lost(None, 2.0)
    proto.on_connected(2.0)
    proto.receive(hello(), 2.0)
    proto.on_identify_permitted(2.0)
    proto.receive(ready(), 2.0)
    assert proto.command_delay(2.0) == 0.0


def test_prepare_command_encodes_a_valid_command_without_using_the_window() -> None:
    proto, _ = ready_shard()
    payload = {"op": 8, "d": {"guild_id": "1", "query": "", "limit": 0}}
    for _ in range(200):
        assert orjson.loads(proto.prepare_command(payload, 1.0)) == payload
    assert proto.command_delay(1.0) == 0.0


def test_prepare_command_rejects_oversized_payloads_and_the_connection_stays_up() -> None:
    proto, _ = ready_shard()
    overhead = len(orjson.dumps({"op": 3, "d": ""}))
    fits = {"op": 3, "d": "x" * (MAX_PAYLOAD_BYTES - overhead)}
    assert len(proto.prepare_command(fits, 1.0)) == MAX_PAYLOAD_BYTES
    too_big = {"op": 3, "d": "x" * (MAX_PAYLOAD_BYTES - overhead + 1)}
    with pytest.raises(CommandTooLarge) as info:
        proto.prepare_command(too_big, 1.0)
    assert isinstance(info.value, CommandRejected) and "4097" in info.value.reason
    assert proto.state is ShardState.READY
    assert proto.command_delay(1.0) == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        {"op": 1, "d": None},
        {"op": 2, "d": {}},
        {"op": 6, "d": {}},
        {"op": 0, "d": {}},
        {"op": 11, "d": None},
        {"op": 99, "d": None},
        {"op": "3", "d": {}},
        {"op": True, "d": {}},
        {"d": {}},
        {"op": 3},
        {"op": 3, "d": {}, "s": 1},
        {"op": 3, "d": object()},
    ],
)
def test_prepare_command_rejects_non_client_commands(payload: dict[str, Any]) -> None:
    proto, _ = ready_shard()
    with pytest.raises(CommandRejected):
        proto.prepare_command(payload, 1.0)


@pytest.mark.parametrize("op", [3, 4, 8, 31])
def test_prepare_command_accepts_every_client_op(op: int) -> None:
    proto, _ = ready_shard()
    assert orjson.loads(proto.prepare_command({"op": op, "d": {}}, 1.0)) == {"op": op, "d": {}}


# -- properties -----------------------------------------------------------------------------------------

_PAYLOADS = st.sampled_from(
    [
        hello(),
        hello(interval_ms=5_000),
        ACK,
        HEARTBEAT_REQUEST,
        RECONNECT,
        invalid_session(True),
        invalid_session(False),
        ready(s=1, session_id="a"),
        ready(s=1, session_id="b"),
        dispatch("RESUMED", None),
        dispatch("MESSAGE_CREATE", 5),
        GatewayPayload(99, None, None, None),
    ]
)
_INPUTS = st.one_of(
    st.tuples(st.just("receive"), _PAYLOADS),
    st.tuples(st.just("connected"), st.none()),
    st.tuples(st.just("identify"), st.none()),
    st.tuples(st.just("poll"), st.none()),
    st.tuples(st.just("lost"), st.sampled_from([None, 1000, 1001, 1006, 4000, 4003, 4004, 4007, 4008, 4009])),
    st.tuples(st.just("command"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.lists(st.tuples(_INPUTS, st.floats(0.0, 30.0)), max_size=60),
    start_with_session=st.booleans(),
)
def test_never_closes_with_1000_or_1001_and_never_resumes_an_invalidated_session(
    inputs: list[tuple[tuple[str, Any], float]], start_with_session: bool
) -> None:
    session = SessionSnapshot("start", 1, RESUME_URL) if start_with_session else None
    proto, _ = make(seed=0, session=session)
    now = 0.0
    invalidated: set[str] = set()
    for (kind, arg), step in inputs:
        now += step
        session_before = proto.session
        events: list[Event]
        if kind == "receive":
            events = proto.receive(arg, now)
        elif kind == "connected":
            proto.on_connected(now)
            events = []
        elif kind == "identify":
            events = proto.on_identify_permitted(now)
        elif kind == "poll":
            now = max(now, min(proto.next_deadline(), now + 60.0))
            events = proto.poll(now)
        elif kind == "lost":
            events = proto.on_connection_lost(arg, now)
        else:
            proto.command_delay(now)
            events = []
        for event in events:
            if isinstance(event, Ready):
                invalidated.discard(event.session_id)  # a new session that happens to reuse the id
            if isinstance(event, Reconnect) and event.reason == "invalid-session" and session_before:
                invalidated.add(session_before.session_id)
            if isinstance(event, Reconnect):
                assert event.close_code not in (1000, 1001)
                assert event.delay_s >= 0.0
            if isinstance(event, Send) and event.kind == "resume":
                assert sent(event)["d"]["session_id"] not in invalidated
        if proto.state is ShardState.FATAL:
            assert proto.next_deadline() == math.inf


def test_a_second_hello_on_one_connection_is_ignored() -> None:
    proto, _ = make()
    proto.on_connected(0.0)
    assert proto.receive(hello(), 0.0) == [RequestIdentify()]
    assert proto.receive(hello(), 1.0) == []
    assert state_of(proto) is ShardState.IDENTIFYING


def test_statistics_count_identifies_resumes_and_reconnect_reasons() -> None:
    proto, _ = ready_shard()
    proto.receive(RECONNECT, 10.0)
    proto.on_connected(10.0)
    proto.receive(hello(), 10.0)
    proto.receive(dispatch("RESUMED", 2), 10.5)
    proto.on_connection_lost(4000, 20.0)
    proto.on_connected(20.0)
    proto.on_connection_lost(4009, 20.5)
    stats = proto.statistics()
    assert stats.identifies == 1 and stats.resumes == 1
    assert stats.reconnects == {"reconnect-requested": 1, "close-4000": 1, "close-4009": 1}
    assert stats.session_id is None and stats.seq is None
    assert stats.state is ShardState.DISCONNECTED and stats.fatal_reason is None
    with pytest.raises(TypeError):
        stats.reconnects["zombie"] = 1  # type: ignore[index]
