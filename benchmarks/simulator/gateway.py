"""The simulated Discord gateway: the rules of anchors/gateway.md section 1, enforced and recorded.

Each WebSocket connection is served by one nursery holding a reader (client payloads, rule checks) and a
writer (the only task that writes to the socket, so the order of HELLO, dispatches, replay and RESUMED is
the order of one queue). Sessions (sessions.py) outlive connections and keep producing events while the
client is away, so RESUME has something real to replay.

The gateway in modules, each one idea:
- gateway.py (this one): the listeners, the WebSocket handshake (API version 9/10 or close 4012, JSON
  only, a known `compress`, else 4002), HELLO (or a withheld one) and the session reaper;
- gateway_state.py: the shared state and the server's own closes and timers;
- gateway_connection.py: one connection's state and its writer;
- gateway_reader.py: the client's payloads (opcodes, sizes, the send rate, heartbeats, member requests);
- gateway_identify.py: IDENTIFY and RESUME (tokens, shards, intents, the identify limits, replay);
- gateway_control.py: the control actions (faults and settings);
- gateway_ledger.py: what happened, and every rule broken (the rule name in the ledger);
- guild_stream.py and guild_ledger.py: guild-stream mode (`GatewayConfig.guild_count`), one bot-wide stream
  of guild events that every generation of shards sees, its generator task (started here, with the
  listeners) and its ledger.

Ledger maxima (counters holding the largest value seen, zeroed by `reset_maxima`): `send_window_max`
(payloads in one connection's 60 s window), `heartbeat_gap_max_ms` (between two heartbeats of one connection),
`payload_max_bytes` (one client payload, oversized ones included). Faults that starve the client of HELLO or
READY count `hello_withheld` per connection and `ready_withheld` per ignored IDENTIFY/RESUME.

Shard overlap (gateway_ledger.py): a connection serves its shard (id and shard count) from READY/RESUMED until
it ends (closed by either side, dropped, blackholed, taken over by a RESUME elsewhere); starting to serve a
shard another connection still serves is the rule `shard_served_twice` (shard 0 of 4 and shard 0 of 8 are
two shards, so two generations running at once do not overlap), counted in `shard_overlaps`, its duration in
`shard_overlap_s`. A RESUME on a new connection drops the old one before RESUMED (`sessions_taken_over`).
"""

from __future__ import annotations

from typing import Any, Final

import trio

from . import gateway_control
from .compression import TransportCompressor
from .gateway_connection import GatewayConnection
from .gateway_reader import drop_until_client_leaves, read_loop, watch_heartbeats
from .gateway_state import GatewayState
from .wsserver import ConnectionEnded, HandshakeInfo, ServerWebSocket

__all__ = ["GatewaySimulator"]

SESSION_REAPER_PERIOD_S: Final = 1.0


class GatewaySimulator(GatewayState):
    """The gateway half of the simulator: its state (`GatewayState`) served on two ports. See the module
    docstring for the rules, and gateway_control.py for the control actions."""

    # -- addresses and REST-facing info ------------------------------------------------------------------

    def set_public_urls(self, gateway_url: str, resume_gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.resume_gateway_url = resume_gateway_url

    def state(self) -> dict[str, Any]:
        return {
            "connections": [
                {
                    "shard": conn.shard_id,
                    "shard_count": conn.shard_count,
                    "session_id": conn.session.session_id if conn.session else None,
                    "identified": conn.identified,
                    "blackholed": conn.blackholed,
                    "via_resume_port": conn.via_resume_port,
                    "compression": conn.compressor.compression if conn.compressor else None,
                }
                for conn in self.connections
            ],
            "sessions": {
                sid: {
                    "shard": s.shard_id,
                    "shard_count": s.shard_count,
                    "state": s.state,
                    "last_seq": s.last_seq,
                }
                for sid, s in self.sessions.items()
            },
            "identify": self.gateway_bot_info()["session_start_limit"],
            "event_rate": self.rates.event_rate,
            "guild_count": len(self.guild_stream.guild_ids),
            "guild_event_rate": self.guild_stream.rate,
            "recommended_shards": self.recommended_shards,
            "min_shard_count": self.min_shard_count,
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
            self.nursery = nursery
            nursery.start_soon(self._reap_sessions)
            if self.guild_stream.active:
                nursery.start_soon(self.guild_stream.run)
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
                    self.guild_stream.discard(session)

    async def _serve_connection(self, ws: ServerWebSocket, via_resume_port: bool) -> None:
        try:
            info = await ws.accept()
        except (ConnectionEnded, TimeoutError, trio.BrokenResourceError, trio.ClosedResourceError):
            await ws.abort()
            return
        if info is None:
            return
        conn = GatewayConnection(ws, via_resume_port)
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
                    if self.reconnect_before_hello > 0:
                        self.reconnect_before_hello -= 1
                        self.ledger.count("op7_sent")
                        conn.send_payload({"op": 7, "d": None})
                        nursery.start_soon(self.close_later, conn)
                    elif self.withhold_hello > 0:
                        self.withhold_hello -= 1
                        self.ledger.count("hello_withheld")
                        hello_withheld = True
                    else:
                        if self.withhold_ready > 0:
                            self.withhold_ready -= 1
                            conn.ready_withheld = True
                        conn.hello_at = trio.current_time()
                        conn.send_payload(
                            {"op": 10, "d": {"heartbeat_interval": self.gw.heartbeat_interval_ms}}
                        )
                        nursery.start_soon(watch_heartbeats, self, conn)
                    if hello_withheld:
                        await drop_until_client_leaves(self, conn)
                    else:
                        await read_loop(self, conn)
                    nursery.cancel_scope.cancel()
        except ConnectionEnded:
            pass
        finally:
            self.ledger.serving_ended(conn)
            self.connections.discard(conn)
            if conn.session is not None:
                conn.session.detach(conn)
            await ws.abort()

    async def _check_handshake(self, conn: GatewayConnection, info: HandshakeInfo) -> bool:
        version = info.query.get("v", "10")
        encoding = info.query.get("encoding", "json")
        compression = info.query.get("compress", "none")
        if version not in ("9", "10"):
            await self.server_close(conn, 4012, "Invalid API version.")
            return False
        if encoding != "json":
            self.ledger.violation("unsupported_encoding", None, encoding)
            await self.server_close(conn, 4002, "The simulator speaks JSON only.")
            return False
        if compression not in self.gw.compressions:
            self.ledger.violation("unsupported_compression", None, compression)
            await self.server_close(conn, 4002, "Unknown compression.")
            return False
        conn.compressor = TransportCompressor(
            compression,
            zlib_level=self.gw.zlib_level,
            zlib_split_bytes=self.gw.zlib_split_bytes,
            zstd_window_log=self.gw.zstd_window_log,
        )
        return True

    # -- control -----------------------------------------------------------------------------------------

    async def control(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Carry out one control action (see gateway_control.py); returns how many it touched."""
        return await gateway_control.control(self, action, body)
