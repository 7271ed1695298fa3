"""The trio shell of one shard: sockets, timers, decompression and publishing around the sans-io core.

Design note. Every decision is `ShardProtocol`'s (workers/protocol.py); this module only performs them. Each
connection gets its own nursery holding the reader (this task), the timer task (heartbeats, zombie and
timeout deadlines), the identify waiter and the command sender, plus its own `Decompressor`; when the
connection ends the nursery is cancelled, so nothing of an old connection can touch a new one (STYLE).

The reader never blocks on the broker (anchors/gateway.md 6.4, F11): dispatches go to the publish pump with
`try_put`. When the pump is full (and stays full for `PUMP_GRACE_S`, 20 ms: a pump that is only forming a
batch frees room in that time) the shard closes its connection with a resumable code *before* the
dispatch reaches the core, so the core's seq (what RESUME sends) never covers an event that was not queued;
it reconnects and RESUMEs once the pump has drained below half, and Discord replays what was missed. Memory
stays bounded, heartbeat ACKs never wait behind the broker, and no event is lost.

The WebSocket (workers/websocket.py, anchors/gateway.md section 4): messages up to 64 MiB (a large
GUILD_CREATE), 64 KiB socket reads, connect bounded by `CONNECT_TIMEOUT_S`, and a zombie is dropped by
closing the TCP stream without a closing handshake. The reader is this task: each `receive()` is one socket
read and returns every message it completed, which are decompressed and handed to the core in one go (one
scheduler round per read, not per message). Every connection's stream is closed explicitly when its nursery
ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import trio

from . import logs
from .commands import GatewayCommand
from .config import WorkerConfig
from .control_messages import ShardStatistics
from .decompress import Decompressor, gateway_query
from .errors import CommandRejected, FatalCloseCode, ProtocolError, TransportError
from .identify import IdentifyGate
from .protocol import (
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
)
from .publish.base import OutboundEvent
from .publish.pump import CommittedSeq, PublishPump
from .reshard import GuildArrivals, Offer, ShardOutlet
from .sessions import SessionStore, StoredSession
from .websocket import ConnectionClosed, HandshakeError, WebSocket, connect

LOGGER: Final = logging.getLogger("workers.shard")
CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_HANDSHAKE_TIMEOUT_S: Final = 1.0
#: A normal close: Discord ends the session. Only a retiring worker sends it (`ShardRunner.retire`).
NORMAL_CLOSE_CODE: Final = 1000
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
RECEIVE_BUFFER_BYTES: Final = 65_536
#: How long the reader lets a full pump free a slot before it closes for backpressure (`_pump_freed_room`):
#: four times the pump's batching delay.
PUMP_GRACE_S: Final = 0.02
#: Commands queued per shard while it is not READY; more are rejected.
COMMAND_QUEUE: Final = 1024

#: Called once a command was sent (None) or refused locally; AMQP acks or rejects the delivery in it.
CommandAck = Callable[[CommandRejected | None], Awaitable[None]]


@dataclass(slots=True)
class _Counters:
    dispatches: int = 0
    confirmed: int = 0
    backpressure_drops: int = 0
    transport_errors: int = 0
    reconnects: dict[str, int] = field(default_factory=dict)


class ShardRunner:
    """Runs one shard until it meets a fatal close code (raises `FatalCloseCode`) or is cancelled."""

    def __init__(
        self,
        config: WorkerConfig,
        shard_id: int,
        *,
        gate: IdentifyGate,
        store: SessionStore,
        pump: PublishPump,
        gateway_url: str,
        lease: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.shard_id = shard_id
        self._gate = gate
        self._store = store
        self._pump = pump
        self._gateway_url = gateway_url
        #: Cluster mode: awaited before every connection; returns while this node holds the shard's lease.
        self._lease = lease
        self._lease_wait = trio.CancelScope()
        self.protocol: ShardProtocol | None = None
        self.committed: CommittedSeq | None = None
        self._saved_seq = -1
        #: Wall-clock time (Unix seconds) of the READY that began the current session, when this process saw
        #: it (None after RESUMing a session an earlier process began).
        self._session_started_at: float | None = None
        self._counters = _Counters()
        self._commands_send, self._commands = trio.open_memory_channel[tuple[GatewayCommand, CommandAck]](
            COMMAND_QUEUE
        )
        self._held_command: tuple[GatewayCommand, CommandAck] | None = None
        self._ws: WebSocket | None = None
        self._stopping = False
        #: Set once the current connection is READY or RESUMED; replaced per connection.
        self._ready = trio.Event()
        #: Set when an input moved the core's next deadline before the one the timer task sleeps until.
        self._deadline_changed = trio.Event()
        self._timer_deadline = math.inf
        #: The current connection's outcome, once a task has met it; and that connection's cancel scope.
        self._step: Reconnect | Fatal | None = None
        #: The JSON text of the payload being handled (its `d` is published without re-encoding).
        self._raw = b""
        self._connection_scope = trio.CancelScope()
        #: Where wanted events go: the pump, or a shadow buffer during a live reshard (`workers.reshard`).
        self.outlet = ShardOutlet(
            shard_id, pump, role=config.assignment.role, commit=self._commit_unpublished
        )
        self._guilds = GuildArrivals(shard_id)
        #: Retired (`retire`): the session is deleted, so nothing may save it again.
        self._retired = False

    # -- public --------------------------------------------------------------------------------

    def submit_command(self, command: GatewayCommand, ack: CommandAck) -> CommandRejected | None:
        """Queue a command for this shard; `ack(None)` is awaited once it is sent, `ack(CommandRejected)` if
        the core refuses it. Returns the rejection instead when the shard's queue is full (ack not called)."""
        try:
            self._commands_send.send_nowait((command, ack))
        except trio.WouldBlock:
            return CommandRejected(f"shard {self.shard_id} has {COMMAND_QUEUE} commands queued already")
        return None

    async def stop(self) -> None:
        """Graceful stop: close the connection with a resumable code and let `run` return (session kept)."""
        self._stopping = True
        self._lease_wait.cancel()
        ws = self._ws
        if ws is not None:
            await _close(ws, RESUMABLE_CLOSE_CODE)

    async def retire(self) -> None:
        """Live reshard, old generation: close with 1000 (Discord ends the session; nobody resumes it), let
        `run` return, and delete the stored session."""
        self._stopping = True
        self._retired = True
        self._lease_wait.cancel()
        ws = self._ws
        if ws is not None:
            await _close(ws, NORMAL_CLOSE_CODE)
        self._store.delete(self.shard_id)

    def on_confirmed(self, event: OutboundEvent) -> None:
        """The pump reports an event accepted by the broker: advance the committed seq and persist it."""
        self._counters.confirmed += 1
        committed = self.committed
        if committed is None or committed.session_id != event.session_id:
            return  # an event of a session this shard has since left
        committed.confirmed(event.seq)
        self._save_committed()

    def statistics(self) -> ShardStatistics:
        stats = self.protocol.statistics() if self.protocol else None
        return ShardStatistics(
            shard_id=self.shard_id,
            state=stats.state.value if stats else ShardState.DISCONNECTED.value,
            seq=stats.seq if stats else None,
            committed_seq=self.committed.committed if self.committed else 0,
            session_id=stats.session_id if stats else None,
            heartbeat_latency_s=stats.heartbeat_latency_s if stats else None,
            identifies=stats.identifies if stats else 0,
            resumes=stats.resumes if stats else 0,
            reconnects=dict(self._counters.reconnects),
            dispatches=self._counters.dispatches,
            published=self.outlet.published,
            confirmed=self._counters.confirmed,
            session_started_at=self._session_started_at,
            backpressure_drops=self._counters.backpressure_drops,
            transport_errors=self._counters.transport_errors,
            guilds_pending=self._guilds.pending(trio.current_time()),
            role=self.outlet.role,
        )

    async def run(self) -> None:
        """Connect, and reconnect as the core says, until a fatal close code or cancellation.

        Cancellation (graceful stop) closes the socket with a resumable code, never 1000/1001.
        """
        logs.SHARD_ID.set(self.shard_id)
        stored = await self._store.load(self.shard_id)
        session = None
        if stored is not None and stored.shard_count == self.config.shard_count:
            session = SessionSnapshot(stored.session_id, stored.seq, stored.resume_url)
            self.committed = CommittedSeq(stored.session_id, stored.seq)
            self._saved_seq = stored.seq
            LOGGER.info("shard.session_loaded", extra={"session": stored.session_id, "seq": stored.seq})
        self.protocol = ShardProtocol(
            shard_id=self.shard_id,
            shard_count=self.config.shard_count,
            token=self.config.settings.token,
            intents=self.config.settings.intents,
            gateway_url=self._gateway_url,
            presence=self.config.settings.presence,
            session=session,
        )
        delay = 0.0
        while not self._stop_requested():
            if delay > 0:
                await trio.sleep(delay)
            if self._pump.free_slots <= 0:
                await self._pump.wait_drained_below(self._pump.capacity // 2)
            if self._lease is not None:
                self._lease_wait = trio.CancelScope()  # stop() cancels the wait (a scope is entered once)
                with self._lease_wait:
                    await self._lease(self.shard_id)
                if self._stop_requested():
                    return
            event = await self._run_connection(self.protocol)
            if self._stop_requested():
                return
            if isinstance(event, Fatal):
                self._store.delete(self.shard_id)
                LOGGER.error("shard.fatal", extra={"code": event.code, "reason": event.reason})
                raise FatalCloseCode(event.code or 0, event.reason)
            self._counters.reconnects[event.reason] = self._counters.reconnects.get(event.reason, 0) + 1
            if not event.resume:
                self._store.delete(self.shard_id)
            LOGGER.info(
                "shard.reconnect",
                extra={"reason": event.reason, "resume": event.resume, "delay_s": round(event.delay_s, 3)},
            )
            delay = event.delay_s

    def _stop_requested(self) -> bool:
        # A method, not the attribute, so type checkers don't assume `stop()` cannot run between checks.
        return self._stopping

    # -- one connection ------------------------------------------------------------------------

    async def _run_connection(self, protocol: ShardProtocol) -> Reconnect | Fatal:
        """Run one connection; returns the core's next step (a Reconnect or a Fatal).

        Whichever task meets the step first (reader, timers, identify) records it in `_step` and cancels the
        connection's nursery; the close the shell performs for it is then never reported back to the core.
        """
        url = protocol.connect_url().rstrip("/") + "/?" + gateway_query(self.config.settings.compression)
        self._step = None
        ws: WebSocket | None = None
        LOGGER.debug("shard.connecting", extra={"url": url})
        try:
            async with trio.open_nursery() as nursery:
                self._connection_scope = nursery.cancel_scope
                try:
                    with trio.fail_after(CONNECT_TIMEOUT_S):
                        ws = await connect(
                            url, max_message_bytes=MAX_MESSAGE_BYTES, receive_bytes=RECEIVE_BUFFER_BYTES
                        )
                except (HandshakeError, OSError, trio.TooSlowError) as exc:
                    LOGGER.warning("shard.connect_failed", extra={"url": url, "error": repr(exc)})
                    return self._first_step(protocol.on_connection_lost(None, trio.current_time()))
                self._ws = ws
                self._ready = trio.Event()
                protocol.on_connected(trio.current_time())
                nursery.start_soon(self._run_timers, protocol, ws, nursery)
                nursery.start_soon(self._send_commands, protocol, ws)
                step = await self._read(protocol, ws, nursery)
                if self._step is None:
                    self._step = step
                nursery.cancel_scope.cancel()
        finally:
            self._ws = None
            if ws is not None:
                with trio.CancelScope(shield=True):
                    await _close_stream(ws)
        assert self._step is not None
        return self._step

    async def _end_connection(self, ws: WebSocket, step: Reconnect | Fatal) -> None:
        """Carry out the core's Reconnect or Fatal: close the socket and end the connection's nursery."""
        if self._step is not None:
            return  # another task already ended this connection
        self._step = step
        if isinstance(step, Reconnect) and step.reason == "zombie":
            await _close_stream(ws)  # no closing handshake with a dead peer
        else:
            await _close(ws, RESUMABLE_CLOSE_CODE if isinstance(step, Fatal) else step.close_code)
        self._connection_scope.cancel()

    async def _read(self, protocol: ShardProtocol, ws: WebSocket, nursery: trio.Nursery) -> Reconnect | Fatal:
        decompressor = Decompressor(self.config.settings.compression)
        while True:
            try:
                messages = await ws.receive()
            except ConnectionClosed as closed:
                if self._step is not None:
                    return self._step  # the close was ours, for a step the core already chose
                code = None if closed.code in (1005, 1006) else closed.code
                return self._first_step(protocol.on_connection_lost(code, trio.current_time()))
            for message in messages:
                try:
                    raw = decompressor.feed(message)
                    if raw is None:
                        continue
                    payload = decode_payload(raw)
                    if (
                        payload.op == 0
                        and self._pump.free_slots <= 0
                        and self.outlet.needs_pump
                        and self._wants(payload.t)
                        and not await self._pump_freed_room()
                    ):
                        if self._step is not None:
                            return self._step
                        # The broker is behind: stop reading before the core counts this dispatch (module
                        # note).
                        self._counters.backpressure_drops += 1
                        LOGGER.warning("shard.backpressure", extra={"queued": self._pump.statistics().queued})
                        await _close(ws, RESUMABLE_CLOSE_CODE)
                        return self._first_step(protocol.on_connection_lost(None, trio.current_time()))
                    events = protocol.receive(payload, trio.current_time())
                except (TransportError, ProtocolError) as exc:
                    # Corrupt input: the stream is unusable; drop it and RESUME on a fresh decompressor.
                    self._counters.transport_errors += 1
                    LOGGER.warning("shard.bad_payload", extra={"error": str(exc)})
                    await _close(ws, RESUMABLE_CLOSE_CODE)
                    return self._first_step(protocol.on_connection_lost(None, trio.current_time()))
                self._raw = raw
                await self._perform(events, protocol, ws, nursery, payload)
                if self._step is not None:
                    return self._step  # a step ended this connection: the rest of the batch is dropped

    async def _pump_freed_room(self) -> bool:
        """The pump is full: give it `PUMP_GRACE_S` to free a slot. True if it did (and no step ended the
        connection meanwhile).

        One socket read holds hundreds of events (a RESUME replay arrives as full reads), and the reader
        handles them without a checkpoint. A pump that is only forming a batch (it waits up to 5 ms for one
        to fill) would otherwise be found full within one read, and the shard would close for backpressure on
        every resume; a broker that is really behind frees nothing in that time.
        """
        with trio.move_on_after(PUMP_GRACE_S):
            await self._pump.wait_drained_below(self._pump.capacity)
        return self._pump.free_slots > 0 and self._step is None

    async def _run_timers(self, protocol: ShardProtocol, ws: WebSocket, nursery: trio.Nursery) -> None:
        """Fire the core's timers.

        An input to the core may move its next deadline earlier (HELLO schedules the first heartbeat before
        the HELLO timeout); `_perform` then wakes this task to re-read it. Only then: waking it for every
        message cost a sixth of the worker's CPU in the gateway benchmark.
        """
        while True:
            self._deadline_changed = trio.Event()
            self._timer_deadline = protocol.next_deadline()
            with trio.move_on_at(self._timer_deadline):
                await self._deadline_changed.wait()
                continue
            await self._perform(protocol.poll(trio.current_time()), protocol, ws, nursery, None)

    async def _identify(self, protocol: ShardProtocol, ws: WebSocket, nursery: trio.Nursery) -> None:
        await self._gate.wait_for_permit(self.shard_id)
        await self._perform(protocol.on_identify_permitted(trio.current_time()), protocol, ws, nursery, None)

    async def _send_commands(self, protocol: ShardProtocol, ws: WebSocket) -> None:
        while True:
            if self._held_command is None:
                self._held_command = await self._commands.receive()
            command, ack = self._held_command
            try:
                data = protocol.prepare_command({"op": command.op, "d": command.d}, trio.current_time())
            except CommandRejected as exc:
                self._held_command = None
                LOGGER.warning("shard.command_rejected", extra={"reason": exc.reason, "op": command.op})
                await ack(exc)
                continue
            await self._ready.wait()  # command_delay is inf until READY
            delay = protocol.command_delay(trio.current_time())
            while delay > 0:  # the send window is full: wait until its oldest entry expires
                await trio.sleep(delay)
                delay = protocol.command_delay(trio.current_time())
            await ws.send_message(data.decode())
            self._held_command = None  # sent: a connection lost after this point does not resend it
            await ack(None)

    async def _perform(
        self,
        events: list[Event],
        protocol: ShardProtocol,
        ws: WebSocket,
        nursery: trio.Nursery,
        payload: GatewayPayload | None,
    ) -> None:
        if protocol.next_deadline() < self._timer_deadline:
            self._deadline_changed.set()
        for event in events:
            if isinstance(event, Send):
                with contextlib.suppress(ConnectionClosed):  # the reader sees the close and reports it
                    await ws.send_message(event.data.decode())
            elif isinstance(event, Dispatch):
                assert payload is not None
                self._dispatch(event, payload, protocol)
            elif isinstance(event, RequestIdentify):
                nursery.start_soon(self._identify, protocol, ws, nursery)
            elif isinstance(event, Ready):
                self._ready.set()
                self.committed = CommittedSeq(event.session_id, 0)
                self._saved_seq = -1
                self._session_started_at = time.time()
                LOGGER.info("shard.ready", extra={"session": event.session_id})
                if self.outlet.in_shadow:
                    # A live shard's session is saved once its first event is committed (confirmed, or
                    # not wanted), moments after READY. A shadow commits nothing for SHADOW_BUFFER_S
                    # (workers.reshard), so it saves its session now, at seq 0: killed within those seconds,
                    # it RESUMEs from 0 instead of identifying again. The replay only refills its buffer
                    # (nothing lost; nothing published twice, since a shadow publishes nothing).
                    self._save_committed()
            elif isinstance(event, Resumed):
                self._ready.set()
                LOGGER.info("shard.resumed", extra={"seq": protocol.statistics().seq})
            elif isinstance(event, HeartbeatAck):
                pass
            elif isinstance(event, RateLimited):
                LOGGER.warning(
                    "shard.rate_limited", extra={"opcode": event.opcode, "retry_after_s": event.retry_after_s}
                )
            elif isinstance(event, Reconnect | Fatal):
                await self._end_connection(ws, event)
                return

    @staticmethod
    def _first_step(events: list[Event]) -> Reconnect | Fatal:
        for event in events:
            if isinstance(event, Reconnect | Fatal):
                return event
        raise AssertionError(f"the core answered a lost connection with {events!r}")

    def _dispatch(self, event: Dispatch, payload: GatewayPayload, protocol: ShardProtocol) -> None:
        self._counters.dispatches += 1
        name = event.name
        if name == "READY":
            self._guilds.on_ready(payload.d, trio.current_time())
        elif name == "GUILD_CREATE" or name == "GUILD_DELETE":
            self._guilds.on_guild(payload.d)
        seq = event.seq
        session = protocol.session
        if seq is None or session is None:
            return  # a dispatch outside a session (none in practice) has nothing to commit
        committed = self.committed
        if committed is None or committed.session_id != session.session_id:
            committed = self.committed = CommittedSeq(session.session_id, 0)
        if seq <= committed.last_received:
            return  # a replayed copy of an event this process already holds or published
        if self._wants(name):
            data = _data_bytes(self._raw, payload) or orjson.dumps(payload.d)
            offer = self.outlet.offer(
                OutboundEvent(self.shard_id, session.session_id, seq, name, data, trio.current_time())
            )
            if offer is not Offer.SKIPPED:
                # Put, buffered or dropped: the committed seq waits for it (a dropped one forever: the
                # retiring worker ends the session).
                committed.received(seq, True)
                return
        committed.received(seq, False)
        self._save_committed()

    def _commit_unpublished(self, event: OutboundEvent) -> None:
        """The outlet let go of an event it will not publish (aged out of a shadow buffer, or skipped as the
        old generation's): commit it as if published."""
        committed = self.committed
        if committed is not None and committed.session_id == event.session_id:
            committed.confirmed(event.seq)
            self._save_committed()

    def _wants(self, name: Any) -> bool:
        events = self.config.settings.events
        return events is None or (isinstance(name, str) and name in events)

    def _save_committed(self) -> None:
        if self._retired:
            return
        committed = self.committed
        protocol = self.protocol
        session = protocol.session if protocol else None
        if committed is None or session is None or session.session_id != committed.session_id:
            return
        if committed.committed > self._saved_seq:
            self._saved_seq = committed.committed
            self._store.save(
                self.shard_id,
                StoredSession(
                    session.session_id, committed.committed, session.resume_url, self.config.shard_count
                ),
            )


def _data_bytes(raw: bytes, payload: GatewayPayload) -> bytes | None:
    """The JSON text of `payload.d`, sliced from `raw` when it has Discord's own layout
    (`{"t":NAME,"s":SEQ,"op":0,"d":...}`: these four keys only, `d` last, no spaces); None otherwise (then `d`
    is re-encoded).

    The envelope before `d` is compared byte for byte, so a `"d"` inside another value cannot be mistaken;
    it also makes `t`, `s`, `op`, `d` the object's first four keys (orjson keeps their order), so an object
    of four keys has nothing after `d`. Not caught: a key *repeated* after `d`, which orjson folds into the
    four (JSON leaves duplicate keys undefined, RFC 8259 section 4; Discord never sends them). Catching it
    would mean scanning `d`'s text on every event.
    """
    name, seq = payload.t, payload.s
    if payload.key_count != 4 or name is None or seq is None:
        return None
    head = b'{"t":"%s","s":%d,"op":0,"d":' % (name.encode(), seq)
    if raw.startswith(head) and raw.endswith(b"}"):
        return raw[len(head) : -1]
    return None


async def _close(ws: WebSocket, code: int) -> None:
    """Close with `code` (never 1000/1001, but for a retiring shard's 1000), waiting briefly for the
    handshake, then drop the stream."""
    with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT_S):
        await ws.close(code)
    await _close_stream(ws)


async def _close_stream(ws: WebSocket) -> None:
    await ws.abort()
