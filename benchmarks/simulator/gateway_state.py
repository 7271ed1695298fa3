"""What every part of the simulated gateway shares, and the server's own moves on a connection.

`GatewayState` holds the configuration, the token registry, the ledger, the identify limiter, the firehose
rates, the guild stream and its ledger (guild-stream mode, guild_stream.py), the live sessions and
connections, the settings changed at run time (the recommended and minimum shard counts) and the faults
waiting for the next connections. The reader
(gateway_reader.py), IDENTIFY/RESUME (gateway_identify.py) and the control actions (gateway_control.py) are
functions of it; `GatewaySimulator` (gateway.py) is the state plus the listeners that serve it.

The server's moves: close a connection with a code (the codes in `SESSION_ENDING_CODES` end its session),
drop a connection whose session a RESUME took over (`drop_taken_over`), send op 9 after Discord's delay,
drop a connection the client has not closed `SERVER_CLOSE_AFTER_S` after op 7/op 9, and reset the token
when the identify budget is spent. Timers run in the gateway's nursery, not the connection's: a
connection's reader may be what they close.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from .config import SimulatorConfig
from .events import bot_guild_ids
from .gateway_connection import GatewayConnection
from .gateway_ledger import GatewayLedger
from .guild_ledger import GuildLedger
from .guild_stream import GuildStream
from .sessions import FirehoseRates, IdentifyLimiter, Session
from .tokens import TokenRegistry

__all__ = [
    "FATAL_SERVER_CODES",
    "SERVER_CLOSE_AFTER_S",
    "SESSION_ENDING_CODES",
    "GatewayState",
]

FATAL_SERVER_CODES: Final = frozenset({4004, 4010, 4011, 4012, 4013, 4014})
#: Server closes after which the session cannot be resumed.
SESSION_ENDING_CODES: Final = FATAL_SERVER_CODES | {4003, 4005, 4007, 4009}
#: After op 7 or op 9, Discord closes the socket itself if the client has not within a few seconds.
SERVER_CLOSE_AFTER_S: Final = 5.0


class GatewayState:
    """The gateway's shared state; see the module docstring."""

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
        self.guild_ledger = GuildLedger(self.gw.guild_ledger_records)
        self.guild_stream = GuildStream(
            bot_guild_ids(self.gw.guild_count),
            self.gw.guild_event_rate,
            self.guild_ledger,
            self.gw.session_ttl_s,
            config.seed,
        )
        #: `GET /gateway/bot`'s `shards` (control action `recommended_shards`).
        self.recommended_shards = self.gw.shard_count
        #: IDENTIFYs with fewer shards close with 4011 (control action `min_shard_count`).
        self.min_shard_count = self.gw.min_shard_count
        self.sessions: dict[str, Session] = {}
        self.connections: set[GatewayConnection] = set()
        self.gateway_url = ""
        self.resume_gateway_url = ""
        #: Faults waiting for the next connections (control actions `reconnect` with `before_hello`,
        #: `withhold_hello`, `withhold_ready`).
        self.reconnect_before_hello = 0
        self.withhold_hello = 0
        self.withhold_ready = 0
        #: Guild id -> when its last request for all members was answered (op 8).
        self.member_requests: dict[int, float] = {}
        self.nursery: trio.Nursery | None = None

    def gateway_bot_info(self) -> dict[str, Any]:
        """The body of `GET /gateway/bot`."""
        return {
            "url": self.gateway_url,
            "shards": self.recommended_shards,
            "session_start_limit": {
                "total": self.identify.total,
                "remaining": self.identify.remaining,
                "reset_after": self.identify.reset_after_now_ms(),
                "max_concurrency": self.identify.max_concurrency,
            },
        }

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `function(*args)` in the gateway's nursery (it outlives every connection)."""
        assert self.nursery is not None
        self.nursery.start_soon(function, *args)

    async def server_close(self, conn: GatewayConnection, code: int, reason: str) -> None:
        self.ledger.serving_ended(conn)
        self.ledger.close(conn.shard_id, code, "server")
        if conn.session is not None and code in SESSION_ENDING_CODES:
            conn.session.invalidate()
        conn.blackholed = True  # stop the writer before the close frame goes out
        await conn.ws.close(code, reason)
        conn.cancel_scope.cancel()

    def drop_taken_over(self, conn: GatewayConnection) -> None:
        """A RESUME on another connection took `conn`'s session: drop `conn` now, without a checkpoint, so it
        has stopped serving and its socket is closed before the new connection is sent RESUMED.

        No close frame, as when Discord drops the old socket on a takeover: the client sees 1006 (abnormal
        closure), which clients treat as a lost connection to RESUME from, not as an ended session.
        Recorded as a server close with code None (like the `drop` fault) and counted in
        `sessions_taken_over`.
        """
        self.ledger.serving_ended(conn)
        self.ledger.close(conn.shard_id, None, "server")
        self.ledger.count("sessions_taken_over")
        conn.blackholed = True  # the writer sends nothing more, not even what is queued
        if conn.session is not None:
            conn.session.detach(conn)
        # Cancel first: the connection's reader then ends on the cancellation, not on the closed socket (which
        # would read as the client leaving).
        conn.cancel_scope.cancel()
        conn.ws.abort_now()

    async def invalid_session_later(self, conn: GatewayConnection) -> None:
        await trio.sleep(self.gw.invalid_session_delay_s)
        self.ledger.count("op9_sent")
        conn.send_payload({"op": 9, "d": False})

    async def close_later(self, conn: GatewayConnection) -> None:
        await trio.sleep(SERVER_CLOSE_AFTER_S)
        conn.cancel_scope.cancel()

    async def reset_token(self) -> None:
        """The daily budget ran out: Discord resets the token and every session ends."""
        self.tokens.revoke_all()
        for session in self.sessions.values():
            session.invalidate()
        # Closed from the gateway's nursery: the caller is one of these connections' readers, and closing its
        # own connection cancels it.
        assert self.nursery is not None
        for conn in list(self.connections):
            self.start_soon(self.server_close, conn, 4004, "Authentication failed.")
