"""The simulated Discord gateway: the rules of anchors/gateway.md section 1, enforced and recorded.

Each WebSocket connection is served by one nursery holding a reader (client payloads, rule checks) and a
writer (the only task that writes to the socket, so the order of HELLO, dispatches, replay and RESUMED is
the order of one queue). Sessions (sessions.py) outlive connections and keep producing events while the
client is away, so RESUME has something real to replay.

Rules enforced (each violation is recorded in the ledger under the rule name in brackets):
- payload before IDENTIFY/RESUME closes 4003 [payload_before_identify]; a second IDENTIFY closes 4005
  [second_identify]; a bad token closes 4004; bad `shard` closes 4010; too many guilds per shard closes 4011;
  invalid intents close 4013, unapproved privileged intents 4014; unknown opcode closes 4001
  [unknown_opcode]; bad JSON or a payload over 4096 bytes closes 4002 [payload_too_large, bad_json];
  more than 120 payloads in 60 s closes 4008 [send_rate].
- one IDENTIFY per `shard_id % max_concurrency` per 5 s across all connections, else op 9 false after a
  delay [identify_rate]; the daily budget, which when exceeded resets the token and closes every connection
  with 4004 [identify_budget].
- a RESUME that is not sent to READY's `resume_gateway_url` [resume_not_on_resume_url]; a RESUME for an
  unknown, expired or unreplayable session gets op 9 false; a seq beyond the session's closes 4007.
- a first heartbeat sooner than 1% of the interval after HELLO [heartbeat_no_jitter]; no heartbeat for 1.5
  intervals plus 1 s closes 4009 [heartbeat_timeout]; a client close with 1000/1001 ends the session
  [client_close_kills_session] (recorded because clients that mean to resume must not do it).

Ledger maxima (counters holding the largest value seen, zeroed by `reset_maxima`): `send_window_max`
(payloads in one connection's 60 s window), `heartbeat_gap_max_ms` (between two heartbeats of one connection),
`payload_max_bytes` (one client payload, oversized ones included). Faults that starve the client of HELLO or
READY count `hello_withheld` per connection and `ready_withheld` per ignored IDENTIFY/RESUME.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Final

import orjson
import trio

from .compression import TransportCompressor
from .config import SimulatorConfig
from .events import guild_ids_for_shard, ready_payload
from .gateway_ledger import GatewayLedger, IdentifyRecord, ResumeRecord
from .sessions import FirehoseRates, IdentifyLimiter, Session, guild_create_bodies
from .tokens import TokenRegistry
from .wsserver import ConnectionEnded, HandshakeInfo, MessageTooLarge, ServerWebSocket

LOGGER: Final = logging.getLogger("benchmarks.simulator.gateway")

MAX_PAYLOAD_BYTES: Final = 4096
SEND_LIMIT: Final = 120
SEND_WINDOW_S: Final = 60.0
#: Client ops Discord accepts: heartbeat, identify, presence, voice state, resume, request members,
#: request soundboard sounds.
CLIENT_OPS: Final = frozenset({1, 2, 3, 4, 6, 8, 31})
VALID_INTENTS: Final = sum(1 << bit for bit in (*range(17), 20, 21, 24, 25))
PRIVILEGED_INTENTS: Final = (1 << 1) | (1 << 8) | (1 << 15)
FATAL_SERVER_CODES: Final = frozenset({4004, 4010, 4011, 4012, 4013, 4014})
#: Server closes after which the session cannot be resumed.
SESSION_ENDING_CODES: Final = FATAL_SERVER_CODES | {4003, 4005, 4007, 4009}
#: A first heartbeat sooner than this fraction of the interval shows the client skipped the jitter.
NO_JITTER_FRACTION: Final = 0.01
#: After op 7 or op 9, Discord closes the socket itself if the client has not within a few seconds.
SERVER_CLOSE_AFTER_S: Final = 5.0
MAX_BATCH_MESSAGES: Final = 256
#: Dispatch envelopes larger than this are sent alone, so a huge GUILD_CREATE does not delay ACKs much.
SESSION_REAPER_PERIOD_S: Final = 1.0
MEMBER_REQUEST_WINDOW_S: Final = 30.0


class GatewayConnection:
    """One client connection: its socket, compressor, send-rate window and the session it drives."""

    def __init__(self, gateway: GatewaySimulator, ws: ServerWebSocket, via_resume_port: bool) -> None:
        self.gateway = gateway
        self.ws = ws
        self.via_resume_port = via_resume_port
        self.compressor: TransportCompressor | None = None
        self.session: Session | None = None
        self.shard_id: int | None = None
        self.sent_seq = 0
        self.streaming = False
        self.identified = False
        self.blackholed = False
        #: IDENTIFY and RESUME go unanswered on this connection (the `withhold_ready` fault).
        self.ready_withheld = False
        self.hello_at = 0.0
        self.last_heartbeat_at: float | None = None
        self.sent_times: deque[float] = deque()
        self._outbox: deque[bytes | int] = deque()
        self._wake = trio.Event()
        self._progress = trio.Event()
        self.cancel_scope = trio.CancelScope()

    # -- writer side ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def wait_progress(self) -> None:
        await self._progress.wait()

    def send_payload(self, payload: dict[str, Any]) -> None:
        """Queue a non-dispatch payload (HELLO, ACK, op 7, op 9, RESUMED) in order."""
        self._outbox.append(orjson.dumps(payload))
        self.wake()

    def send_dispatches_upto(self, seq: int) -> None:
        """Queue the session's dispatches up to `seq` (a replay) at this point of the outbox."""
        self._outbox.append(seq)
        self.wake()

    async def run_writer(self) -> None:
        """Write queued payloads and the session's dispatches; a broken socket ends the connection."""
        try:
            await self._write_forever()
        except ConnectionEnded:
            self.cancel_scope.cancel()

    async def _write_forever(self) -> None:
        compressor = self.compressor
        assert compressor is not None
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while not self.blackholed:
                batch = self._next_batch()
                if not batch:
                    break
                messages: list[tuple[bytes, bool]] = []
                for payload in batch:
                    messages.extend(compressor.encode(payload))
                await self.ws.send_messages(messages)
                self._progress.set()
                self._progress = trio.Event()

    def _next_batch(self) -> list[bytes]:
        batch: list[bytes] = []
        session = self.session
        while self._outbox and len(batch) < MAX_BATCH_MESSAGES:
            item = self._outbox[0]
            if isinstance(item, bytes):
                batch.append(item)
                self._outbox.popleft()
                continue
            if session is None or self.sent_seq >= item:
                self._outbox.popleft()
                continue
            upto = min(item, self.sent_seq + MAX_BATCH_MESSAGES - len(batch))
            replay = session.events_between(self.sent_seq, upto)
            batch.extend(replay)
            session.replayed += len(replay)
            session.sent += len(replay)
            self.sent_seq = upto
        if self.streaming and session is not None and not self._outbox and len(batch) < MAX_BATCH_MESSAGES:
            upto = min(session.last_seq, self.sent_seq + MAX_BATCH_MESSAGES - len(batch))
            if upto > self.sent_seq:
                fresh = session.events_between(self.sent_seq, upto)
                batch.extend(fresh)
                session.sent += len(fresh)
                self.sent_seq = upto
        return batch


class GatewaySimulator:
    """The gateway half of the simulator. See the module docstring for the rules.

    Control actions (`POST /_sim/gateway/<action>`, JSON body; `shards` is a list of shard ids, omitted or
    null for all):
    - `reconnect` {shards, before_hello?: int}: send op 7; `before_hello` makes the next N connections get
      op 7 instead of HELLO.
    - `invalidate` {shards, resumable: bool}: send op 9 with `d = resumable` (false ends the session).
    - `close` {shards, code}: close with `code` (4007/4009 and fatal codes end the session).
    - `drop` {shards}: reset the TCP connection (no close frame); the session stays resumable.
    - `blackhole` {shards}: stop reading and writing, leave the TCP connection open.
    - `corrupt` {shards}: send bytes that break the client's decompressor (or JSON).
    - `request_heartbeat` {shards}: send op 1; the client must answer at once.
    - `expire_sessions` {shards}: end sessions server-side without touching connections.
    - `event_rate` {rate}: dispatches per second per session.
    - `session_start` {remaining?, total?, max_concurrency?, reset_after_ms?}: the identify budget.
    - `restore_tokens` {}: undo a token reset.
    - `withhold_hello` {count}: the next `count` connections get no HELLO and no heartbeat watchdog; their
      payloads are read and dropped until the client leaves. Counted in `hello_withheld`.
    - `withhold_ready` {count}: the next `count` connections get HELLO and heartbeat ACKs, but their IDENTIFY
      and RESUME are ignored (no READY/RESUMED, no identify accounting). Counted in `ready_withheld`.
    - `reset_maxima` {}: zero the ledger maxima (`send_window_max`, `heartbeat_gap_max_ms`,
      `payload_max_bytes`).
    """

    def __init__(self, config: SimulatorConfig, tokens: TokenRegistry) -> None:
        self.config = config
        self.gw = config.gateway
        self.tokens = tokens
        self.ledger = GatewayLedger()
        self.identify = IdentifyLimiter(
            self.gw.max_concurrency,
            self.gw.session_start_total,
            self.gw.session_start_remaining,
            self.gw.session_start_reset_after_ms,
        )
        self.rates = FirehoseRates(
            self.gw.event_rate, self.gw.large_guild_probability, self.gw.large_guild_bytes
        )
        self.sessions: dict[str, Session] = {}
        self.connections: set[GatewayConnection] = set()
        self.gateway_url = ""
        self.resume_gateway_url = ""
        self._reconnect_before_hello = 0
        self._withhold_hello = 0
        self._withhold_ready = 0
        self._member_requests: dict[int, float] = {}
        self._nursery: trio.Nursery | None = None

    # -- addresses and REST-facing info ------------------------------------------------------------------

    def set_public_urls(self, gateway_url: str, resume_gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.resume_gateway_url = resume_gateway_url

    def gateway_bot_info(self) -> dict[str, Any]:
        """The body of `GET /gateway/bot`."""
        return {
            "url": self.gateway_url,
            "shards": self.gw.shard_count,
            "session_start_limit": {
                "total": self.identify.total,
                "remaining": self.identify.remaining,
                "reset_after": self.identify.reset_after_now_ms(),
                "max_concurrency": self.identify.max_concurrency,
            },
        }

    def state(self) -> dict[str, Any]:
        return {
            "connections": [
                {
                    "shard": conn.shard_id,
                    "session_id": conn.session.session_id if conn.session else None,
                    "identified": conn.identified,
                    "blackholed": conn.blackholed,
                    "via_resume_port": conn.via_resume_port,
                    "compression": conn.compressor.compression if conn.compressor else None,
                }
                for conn in self.connections
            ],
            "sessions": {
                sid: {"shard": s.shard_id, "state": s.state, "last_seq": s.last_seq}
                for sid, s in self.sessions.items()
            },
            "identify": self.gateway_bot_info()["session_start_limit"],
            "event_rate": self.rates.event_rate,
        }

    # -- serving --------------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the gateway and resume-gateway ports until cancelled; reports `(port, resume_port)`."""
        host = self.config.host
        main = await trio.open_tcp_listeners(self.config.gateway_port, host=host)
        resume = await trio.open_tcp_listeners(self.config.resume_port, host=host)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reap_sessions)
            nursery.start_soon(trio.serve_listeners, self._make_handler(False), main)
            nursery.start_soon(trio.serve_listeners, self._make_handler(True), resume)
            task_status.started((main[0].socket.getsockname()[1], resume[0].socket.getsockname()[1]))

    def _make_handler(self, via_resume_port: bool) -> Any:
        async def handler(stream: trio.SocketStream) -> None:
            await self._serve_connection(ServerWebSocket(stream), via_resume_port)

        return handler

    async def _reap_sessions(self) -> None:
        while True:
            await trio.sleep(SESSION_REAPER_PERIOD_S)
            now = trio.current_time()
            for session_id, session in list(self.sessions.items()):
                expired = (
                    session.detached_at is not None and now - session.detached_at > self.gw.session_ttl_s
                )
                if session.invalid or expired:
                    if expired and not session.invalid:
                        self.ledger.count("sessions_expired")
                    session.invalidate()
                    del self.sessions[session_id]

    async def _serve_connection(self, ws: ServerWebSocket, via_resume_port: bool) -> None:
        try:
            info = await ws.accept()
        except (ConnectionEnded, TimeoutError, trio.BrokenResourceError, trio.ClosedResourceError):
            await ws.abort()
            return
        if info is None:
            return
        conn = GatewayConnection(self, ws, via_resume_port)
        if not await self._check_handshake(conn, info):
            return
        self.connections.add(conn)
        self.ledger.count("connections")
        self.ledger.count(f"connections.{conn.compressor.compression if conn.compressor else 'none'}")
        try:
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.run_writer)
                    hello_withheld = False
                    if self._reconnect_before_hello > 0:
                        self._reconnect_before_hello -= 1
                        self.ledger.count("op7_sent")
                        conn.send_payload({"op": 7, "d": None})
                        nursery.start_soon(self._close_later, conn)
                    elif self._withhold_hello > 0:
                        self._withhold_hello -= 1
                        self.ledger.count("hello_withheld")
                        hello_withheld = True
                    else:
                        if self._withhold_ready > 0:
                            self._withhold_ready -= 1
                            conn.ready_withheld = True
                        conn.hello_at = trio.current_time()
                        conn.send_payload(
                            {"op": 10, "d": {"heartbeat_interval": self.gw.heartbeat_interval_ms}}
                        )
                        nursery.start_soon(self._watch_heartbeats, conn)
                    if hello_withheld:
                        await self._drop_until_client_leaves(conn)
                    else:
                        await self._read_loop(conn)
                    nursery.cancel_scope.cancel()
        except ConnectionEnded:
            pass
        finally:
            self.connections.discard(conn)
            if conn.session is not None:
                conn.session.detach(conn)
            await ws.abort()

    async def _check_handshake(self, conn: GatewayConnection, info: HandshakeInfo) -> bool:
        version = info.query.get("v", "10")
        encoding = info.query.get("encoding", "json")
        compression = info.query.get("compress", "none")
        if version not in ("9", "10"):
            await self._server_close(conn, 4012, "Invalid API version.")
            return False
        if encoding != "json":
            self.ledger.violation("unsupported_encoding", None, encoding)
            await self._server_close(conn, 4002, "The simulator speaks JSON only.")
            return False
        if compression not in self.gw.compressions:
            self.ledger.violation("unsupported_compression", None, compression)
            await self._server_close(conn, 4002, "Unknown compression.")
            return False
        conn.compressor = TransportCompressor(
            compression,
            zlib_level=self.gw.zlib_level,
            zlib_split_bytes=self.gw.zlib_split_bytes,
            zstd_window_log=self.gw.zstd_window_log,
        )
        return True

    async def _read_loop(self, conn: GatewayConnection) -> None:
        while True:
            if conn.blackholed:
                # Hold the TCP connection open, unread and unanswered, until the client gives up.
                await trio.sleep(self.gw.session_ttl_s)
                return
            try:
                message = await conn.ws.receive()
            except MessageTooLarge:
                self.ledger.violation("payload_too_large", conn.shard_id, "over 1 MiB")
                await self._server_close(conn, 4002, "Payload too large.")
                return
            except ConnectionEnded as ended:
                if not ended.reply:
                    self._client_closed(conn, ended.code)
                return
            await self._handle_payload(conn, message)
            if conn.ws.closed:
                return

    async def _drop_until_client_leaves(self, conn: GatewayConnection) -> None:
        """Read and drop the client's messages, answering nothing, until it closes or drops the connection;
        at most `session_ttl_s`, as long as a blackhole holds one."""
        conn.blackholed = True  # the writer sends nothing, not even a stray queued payload
        with trio.move_on_after(self.gw.session_ttl_s):
            while True:
                try:
                    await conn.ws.receive()
                except MessageTooLarge:
                    return
                except ConnectionEnded as ended:
                    if not ended.reply:
                        self._client_closed(conn, ended.code)
                    return

    def _client_closed(self, conn: GatewayConnection, code: int | None) -> None:
        self.ledger.close(conn.shard_id, code, "client")
        if code in (1000, 1001) and conn.session is not None:
            self.ledger.violation("client_close_kills_session", conn.shard_id, str(code))
            conn.session.invalidate()

    async def _handle_payload(self, conn: GatewayConnection, message: bytes | str) -> None:
        if conn.blackholed:
            return  # read while the blackhole began: dropped unanswered
        raw = message.encode() if isinstance(message, str) else message
        now = trio.current_time()
        window = conn.sent_times
        window.append(now)
        while window and window[0] <= now - SEND_WINDOW_S:
            window.popleft()
        self.ledger.record_max("send_window_max", len(window))
        self.ledger.record_max("payload_max_bytes", len(raw))
        if len(window) > SEND_LIMIT:
            self.ledger.violation(
                "send_rate", conn.shard_id, f"{len(window)} payloads in {SEND_WINDOW_S:g} s"
            )
            await self._server_close(conn, 4008, "Rate limited.")
            return
        if len(raw) > MAX_PAYLOAD_BYTES:
            self.ledger.violation("payload_too_large", conn.shard_id, f"{len(raw)} bytes")
            await self._server_close(conn, 4002, "Payload too large.")
            return
        try:
            payload = orjson.loads(raw)
            op = payload["op"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.ledger.violation("bad_json", conn.shard_id, raw[:80].decode("utf-8", "replace"))
            await self._server_close(conn, 4002, "Error while decoding payload.")
            return
        if op not in CLIENT_OPS:
            self.ledger.violation("unknown_opcode", conn.shard_id, repr(op))
            await self._server_close(conn, 4001, "Unknown opcode.")
            return
        data = payload.get("d")
        if op == 1:
            await self._on_heartbeat(conn, data)
        elif op in (2, 6) and conn.ready_withheld:
            self.ledger.count("ready_withheld")  # unanswered: the client must give up waiting for READY
        elif op == 2:
            await self._on_identify(conn, data)
        elif op == 6:
            await self._on_resume(conn, data)
        elif not conn.identified:
            self.ledger.violation("payload_before_identify", conn.shard_id, f"op {op}")
            await self._server_close(conn, 4003, "Not authenticated.")
        elif op == 8:
            self._on_request_members(conn, data)
        else:
            self.ledger.count(f"op{op}_received")

    async def _on_heartbeat(self, conn: GatewayConnection, data: Any) -> None:
        now = trio.current_time()
        self.ledger.count("heartbeats")
        if conn.last_heartbeat_at is None and conn.hello_at:
            interval_s = self.gw.heartbeat_interval_ms / 1000
            delay = now - conn.hello_at
            self.ledger.first_heartbeat(conn.shard_id, delay, interval_s)
            if delay < NO_JITTER_FRACTION * interval_s:
                self.ledger.violation(
                    "heartbeat_no_jitter", conn.shard_id, f"first beat after {delay * 1000:.1f} ms"
                )
        elif conn.last_heartbeat_at is not None:
            self.ledger.record_max("heartbeat_gap_max_ms", round((now - conn.last_heartbeat_at) * 1000))
        # Before IDENTIFY/RESUME a client may beat with the seq it is about to resume from; only a seq the
        # session never reached is wrong.
        session = conn.session
        if data is not None and not isinstance(data, int):
            self.ledger.violation("heartbeat_bad_seq", conn.shard_id, repr(data)[:40])
        elif isinstance(data, int) and session is not None and data > session.last_seq:
            self.ledger.violation("heartbeat_bad_seq", conn.shard_id, f"{data} > last seq {session.last_seq}")
        conn.last_heartbeat_at = now
        conn.send_payload({"op": 11})

    async def _watch_heartbeats(self, conn: GatewayConnection) -> None:
        limit = 1.5 * self.gw.heartbeat_interval_ms / 1000 + 1.0
        while True:
            last = conn.last_heartbeat_at if conn.last_heartbeat_at is not None else conn.hello_at
            await trio.sleep_until(last + limit)
            last_now = conn.last_heartbeat_at if conn.last_heartbeat_at is not None else conn.hello_at
            if last_now == last and not conn.blackholed:
                self.ledger.violation("heartbeat_timeout", conn.shard_id, f"none for {limit:.1f} s")
                await self._server_close(conn, 4009, "Session timed out.")
                return

    async def _on_identify(self, conn: GatewayConnection, data: Any) -> None:
        if conn.identified:
            self.ledger.violation("second_identify", conn.shard_id)
            await self._server_close(conn, 4005, "Already authenticated.")
            return
        if not isinstance(data, dict):
            self.ledger.violation("bad_json", None, "identify without an object")
            await self._server_close(conn, 4002, "Error while decoding payload.")
            return
        token = data.get("token")
        if not isinstance(token, str) or not self.tokens.is_valid(_strip_bot(token)):
            await self._server_close(conn, 4004, "Authentication failed.")
            return
        token = _strip_bot(token)
        shard = data.get("shard", [0, 1])
        total_guilds = self.gw.shard_count * self.gw.guilds_per_shard
        if (
            not isinstance(shard, list)
            or len(shard) != 2
            or not all(isinstance(x, int) for x in shard)
            or shard[1] < 1
            or not 0 <= shard[0] < shard[1]
            or (self.gw.shard_multiple and shard[1] % self.gw.shard_multiple)
        ):
            await self._server_close(conn, 4010, "Invalid shard.")
            return
        shard_id, shard_count = shard
        conn.shard_id = shard_id
        if math.ceil(total_guilds / shard_count) > self.gw.max_guilds_per_shard:
            await self._server_close(conn, 4011, "Sharding required.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents & ~VALID_INTENTS:
            await self._server_close(conn, 4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS and not self.gw.privileged_intents:
            await self._server_close(conn, 4014, "Disallowed intent(s).")
            return
        if not isinstance(data.get("properties"), dict):
            self.ledger.violation("identify_without_properties", shard_id)
        decision = self.identify.check(shard_id)
        key = shard_id % self.identify.max_concurrency
        if not decision.allowed:
            self.ledger.identify(
                IdentifyRecord(
                    self.ledger.now(),
                    shard_id,
                    shard_count,
                    key,
                    False,
                    decision.reason,
                    decision.since_previous_s,
                    None,
                )
            )
        if decision.reason == "budget_exhausted":
            self.ledger.violation(
                "identify_budget", shard_id, "daily session start limit exceeded; token reset"
            )
            await self._reset_token()
            return
        if not decision.allowed:
            self.ledger.violation(
                "identify_rate",
                shard_id,
                f"key {key} identified {decision.since_previous_s:.3f} s after the last",
            )
            assert self._nursery is not None
            self._nursery.start_soon(self._invalid_session_later, conn)
            return
        guild_ids = guild_ids_for_shard(shard_id, shard_count, math.ceil(total_guilds / shard_count))
        session = Session.create(token, (shard_id, shard_count), guild_ids, self.gw.replay_buffer)
        self.ledger.identify(
            IdentifyRecord(
                self.ledger.now(),
                shard_id,
                shard_count,
                key,
                True,
                "",
                decision.since_previous_s,
                session.session_id,
            )
        )
        self.sessions[session.session_id] = session
        self.ledger.sessions[session.session_id] = session
        conn.identified = True
        conn.session = session
        session.attach(conn)
        conn.streaming = True
        ready = ready_payload(session.session_id, self.resume_gateway_url, [shard_id, shard_count], guild_ids)
        session.append(b"READY", orjson.dumps(ready))
        for body in guild_create_bodies(guild_ids):
            session.append(b"GUILD_CREATE", body)
        self.ledger.events_by_type["READY"] += 1
        self.ledger.events_by_type["GUILD_CREATE"] += len(guild_ids)
        assert self._nursery is not None
        self._nursery.start_soon(session.run_firehose, self.rates, self.config.seed)

    async def _on_resume(self, conn: GatewayConnection, data: Any) -> None:
        if conn.identified:
            self.ledger.violation("second_identify", conn.shard_id, "RESUME after IDENTIFY/RESUME")
            await self._server_close(conn, 4005, "Already authenticated.")
            return
        if not isinstance(data, dict):
            await self._server_close(conn, 4002, "Error while decoding payload.")
            return
        token = _strip_bot(str(data.get("token", "")))
        session_id = str(data.get("session_id", ""))
        seq = data.get("seq")
        if not self.tokens.is_valid(token):
            await self._server_close(conn, 4004, "Authentication failed.")
            return
        session = self.sessions.get(session_id)
        seq_value = seq if isinstance(seq, int) else 0
        if not conn.via_resume_port:
            self.ledger.violation("resume_not_on_resume_url", session.shard_id if session else None)

        def record(ok: bool, reason: str, replayed: int = 0) -> None:
            self.ledger.resume(
                ResumeRecord(
                    self.ledger.now(),
                    session.shard_id if session else None,
                    session_id,
                    seq_value,
                    ok,
                    reason,
                    replayed,
                    conn.via_resume_port,
                )
            )

        if session is None or session.invalid or session.token != token:
            record(False, "unknown_session" if session is None else "session_ended")
            self.ledger.count("op9_sent")
            conn.send_payload({"op": 9, "d": False})
            return
        conn.shard_id = session.shard_id
        if seq_value > session.last_seq:
            record(False, "invalid_seq")
            session.invalidate()
            await self._server_close(conn, 4007, "Invalid seq.")
            return
        if not session.can_replay_from(seq_value):
            record(False, "replay_unavailable")
            session.invalidate()
            self.ledger.count("op9_sent")
            conn.send_payload({"op": 9, "d": False})
            return
        previous = session.connection
        if previous is not None and previous is not conn:
            # The same session resumed on a new connection: Discord drops the old one.
            previous.cancel_scope.cancel()
            session.detach(previous)
        upto = session.last_seq
        record(True, "", upto - seq_value)
        session.resumes += 1
        conn.identified = True
        conn.session = session
        conn.sent_seq = seq_value
        session.attach(conn)
        conn.send_dispatches_upto(upto)
        conn.send_payload({"op": 0, "t": "RESUMED", "s": None, "d": {"_trace": ["gateway-sim"]}})
        conn.streaming = True

    def _on_request_members(self, conn: GatewayConnection, data: Any) -> None:
        """op 8: answer with an empty GUILD_MEMBERS_CHUNK; requests for all members are limited (G3)."""
        if not isinstance(data, dict) or "guild_id" not in data:
            return
        guild_id = int(data["guild_id"])
        session = conn.session
        if session is None:
            return
        if data.get("query", None) == "" and data.get("limit", 0) == 0:
            now = trio.current_time()
            previous = self._member_requests.get(guild_id)
            if previous is not None and now - previous < MEMBER_REQUEST_WINDOW_S:
                body = {
                    "opcode": 8,
                    "retry_after": round(MEMBER_REQUEST_WINDOW_S - (now - previous), 3),
                    "meta": {"guild_id": str(guild_id), "nonce": data.get("nonce")},
                }
                session.append(b"RATE_LIMITED", orjson.dumps(body))
                self.ledger.violation("member_request_rate", conn.shard_id, str(guild_id))
                return
            self._member_requests[guild_id] = now
        chunk: dict[str, Any] = {
            "guild_id": str(guild_id),
            "members": [],
            "chunk_index": 0,
            "chunk_count": 1,
            "nonce": data.get("nonce"),
        }
        session.append(b"GUILD_MEMBERS_CHUNK", orjson.dumps(chunk))

    async def _server_close(self, conn: GatewayConnection, code: int, reason: str) -> None:
        self.ledger.close(conn.shard_id, code, "server")
        if conn.session is not None and code in SESSION_ENDING_CODES:
            conn.session.invalidate()
        conn.blackholed = True  # stop the writer before the close frame goes out
        await conn.ws.close(code, reason)
        conn.cancel_scope.cancel()

    async def _invalid_session_later(self, conn: GatewayConnection) -> None:
        await trio.sleep(self.gw.invalid_session_delay_s)
        self.ledger.count("op9_sent")
        conn.send_payload({"op": 9, "d": False})

    async def _close_later(self, conn: GatewayConnection) -> None:
        await trio.sleep(SERVER_CLOSE_AFTER_S)
        conn.cancel_scope.cancel()

    async def _reset_token(self) -> None:
        """The daily budget ran out: Discord resets the token and every session ends."""
        self.tokens.revoke_all()
        for session in self.sessions.values():
            session.invalidate()
        # Closed from the gateway's nursery: the caller is one of these connections' readers, and closing its
        # own connection cancels it.
        assert self._nursery is not None
        for conn in list(self.connections):
            self._nursery.start_soon(self._server_close, conn, 4004, "Authentication failed.")

    # -- control -----------------------------------------------------------------------------------------

    def _targets(self, body: dict[str, Any]) -> list[GatewayConnection]:
        shards = body.get("shards")
        if shards is not None and not isinstance(shards, list):
            raise ValueError("`shards` must be a list of shard ids or null")
        wanted = None if shards is None else {int(s) for s in shards}
        return [c for c in self.connections if c.identified and (wanted is None or c.shard_id in wanted)]

    async def control(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Carry out one control action (see the class docstring); returns how many it touched."""
        if action == "event_rate":
            self.rates.set_rate(float(body["rate"]))
            return {"event_rate": self.rates.event_rate}
        if action == "session_start":
            self.identify.set_budget(**{k: int(v) for k, v in body.items()})
            return {"session_start_limit": self.gateway_bot_info()["session_start_limit"]}
        if action == "restore_tokens":
            self.tokens.restore()
            return {"ok": True}
        if action == "reconnect" and body.get("before_hello"):
            self._reconnect_before_hello += int(body["before_hello"])
            return {"pending": self._reconnect_before_hello}
        if action == "withhold_hello":
            self._withhold_hello += _count(body)
            return {"pending": self._withhold_hello}
        if action == "withhold_ready":
            self._withhold_ready += _count(body)
            return {"pending": self._withhold_ready}
        if action == "reset_maxima":
            self.ledger.reset_maxima()
            return {"ok": True}
        if action == "expire_sessions":
            shards = body.get("shards")
            wanted = None if shards is None else {int(s) for s in shards}
            expired = [s for s in self.sessions.values() if wanted is None or s.shard_id in wanted]
            for session in expired:
                session.invalid = True  # the connection stays; a later RESUME fails
                self.ledger.count("sessions_expired")
            return {"sessions": len(expired)}
        targets = self._targets(body)
        if action not in _CONNECTION_ACTIONS:
            raise ValueError(f"unknown gateway action {action!r}")
        for conn in targets:
            await _CONNECTION_ACTIONS[action](self, conn, body)
        self.ledger.count(f"fault.{action}", len(targets))
        return {"connections": len(targets)}

    async def _fault_reconnect(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        self.ledger.count("op7_sent")
        conn.send_payload({"op": 7, "d": None})
        assert self._nursery is not None
        self._nursery.start_soon(self._close_later, conn)

    async def _fault_invalidate(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        resumable = bool(body.get("resumable", False))
        self.ledger.count("op9_sent")
        conn.send_payload({"op": 9, "d": resumable})
        if not resumable and conn.session is not None:
            conn.session.invalidate()
        assert self._nursery is not None
        self._nursery.start_soon(self._close_later, conn)

    async def _fault_close(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        await self._server_close(conn, int(body.get("code", 4000)), "Closed by the simulator.")

    async def _fault_drop(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        conn.blackholed = True
        self.ledger.close(conn.shard_id, None, "server")
        await conn.ws.abort(reset=True)
        conn.cancel_scope.cancel()

    async def _fault_blackhole(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        conn.blackholed = True
        if conn.session is not None:
            conn.session.detach(conn)

    async def _fault_corrupt(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        assert conn.compressor is not None
        await conn.ws.send_messages([conn.compressor.corrupt_message()])

    async def _fault_request_heartbeat(self, conn: GatewayConnection, body: dict[str, Any]) -> None:
        conn.send_payload({"op": 1, "d": None})


def _strip_bot(token: str) -> str:
    return token[4:] if token.startswith("Bot ") else token


def _count(body: dict[str, Any]) -> int:
    count = body.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError("`count` must be a non-negative integer")
    return count


_CONNECTION_ACTIONS: Final = {
    "reconnect": GatewaySimulator._fault_reconnect,
    "invalidate": GatewaySimulator._fault_invalidate,
    "close": GatewaySimulator._fault_close,
    "drop": GatewaySimulator._fault_drop,
    "blackhole": GatewaySimulator._fault_blackhole,
    "corrupt": GatewaySimulator._fault_corrupt,
    "request_heartbeat": GatewaySimulator._fault_request_heartbeat,
}
