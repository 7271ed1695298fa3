"""The gateway's control actions: faults injected into live connections and settings changed at run time.

Control actions (`POST /_sim/gateway/<action>`, JSON body; `shards` is a list of shard ids, omitted or
null for all; `shard_count`, an int, omitted or null for all, narrows the connection actions and
`expire_sessions` to one generation of shards, so shard 0 of 4 and shard 0 of 8 can be told apart):
- `reconnect` {shards, before_hello?: int}: send op 7; `before_hello` makes the next N connections get
  op 7 instead of HELLO.
- `invalidate` {shards, resumable: bool}: send op 9 with `d = resumable` (false ends the session).
- `close` {shards, code}: close with `code` (4007/4009 and fatal codes end the session).
- `drop` {shards}: reset the TCP connection (no close frame); the session stays resumable.
- `blackhole` {shards}: stop reading and writing, leave the TCP connection open.
- `corrupt` {shards}: send bytes that break the client's decompressor (or JSON).
- `request_heartbeat` {shards}: send op 1; the client must answer at once.
- `expire_sessions` {shards, shard_count?}: end sessions server-side without touching connections.
- `event_rate` {rate}: dispatches per second per session (no effect in guild-stream mode).
- `guild_event_rate` {rate: number >= 0}: guild events per second for the whole bot (guild-stream mode
  only, `GatewayConfig.guild_count > 0`; see guild_stream.py).
- `recommended_shards` {shards: int >= 1}: the `shards` that `GET /gateway/bot` returns from now on.
- `min_shard_count` {count: int >= 0}: IDENTIFYs with fewer shards close with 4011 from now on (0 = no
  minimum); RESUMEs of existing sessions are not affected.
- `session_start` {remaining?, total?, max_concurrency?, reset_after_ms?}: the identify budget.
- `restore_tokens` {}: undo a token reset.
- `withhold_hello` {count}: the next `count` connections get no HELLO and no heartbeat watchdog; their
  payloads are read and dropped until the client leaves. Counted in `hello_withheld`.
- `withhold_ready` {count}: the next `count` connections get HELLO and heartbeat ACKs, but their IDENTIFY
  and RESUME are ignored (no READY/RESUMED, no identify accounting). Counted in `ready_withheld`.
- `reset_maxima` {}: zero the ledger maxima (`send_window_max`, `heartbeat_gap_max_ms`,
  `payload_max_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from .gateway_connection import GatewayConnection
from .gateway_state import GatewayState
from .guild_stream import check_rate

__all__ = ["control"]


def _shard_filter(body: dict[str, Any]) -> Callable[[int | None, int | None], bool]:
    """Whether a (shard id, shard count) is one the body's `shards` and `shard_count` name."""
    shards = body.get("shards")
    if shards is not None and not isinstance(shards, list):
        raise ValueError("`shards` must be a list of shard ids or null")
    wanted = None if shards is None else {int(s) for s in shards}
    shard_count = body.get("shard_count")
    if shard_count is not None and (
        not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1
    ):
        raise ValueError("`shard_count` must be a positive integer or null")

    def selected(shard_id: int | None, count: int | None) -> bool:
        return (wanted is None or shard_id in wanted) and (shard_count is None or count == shard_count)

    return selected


def _targets(state: GatewayState, body: dict[str, Any]) -> list[GatewayConnection]:
    selected = _shard_filter(body)
    return [c for c in state.connections if c.identified and selected(c.shard_id, c.shard_count)]


async def control(state: GatewayState, action: str, body: dict[str, Any]) -> dict[str, Any]:
    """Carry out one control action (see the module docstring); returns how many it touched."""
    if action == "event_rate":
        state.rates.set_rate(float(body["rate"]))
        return {"event_rate": state.rates.event_rate}
    if action == "guild_event_rate":
        if not state.guild_stream.active:
            raise ValueError("`guild_event_rate` needs guild-stream mode (GatewayConfig.guild_count > 0)")
        state.guild_stream.set_rate(check_rate(body.get("rate")))
        return {"guild_event_rate": state.guild_stream.rate}
    if action == "recommended_shards":
        shards = body.get("shards")
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ValueError("`shards` must be an integer of at least 1")
        state.recommended_shards = shards
        return {"shards": shards}
    if action == "min_shard_count":
        state.min_shard_count = _count(body)
        return {"min_shard_count": state.min_shard_count}
    if action == "session_start":
        state.identify.set_budget(**{k: int(v) for k, v in body.items()})
        return {"session_start_limit": state.gateway_bot_info()["session_start_limit"]}
    if action == "restore_tokens":
        state.tokens.restore()
        return {"ok": True}
    if action == "reconnect" and body.get("before_hello"):
        state.reconnect_before_hello += int(body["before_hello"])
        return {"pending": state.reconnect_before_hello}
    if action == "withhold_hello":
        state.withhold_hello += _count(body)
        return {"pending": state.withhold_hello}
    if action == "withhold_ready":
        state.withhold_ready += _count(body)
        return {"pending": state.withhold_ready}
    if action == "reset_maxima":
        state.ledger.reset_maxima()
        return {"ok": True}
    if action == "expire_sessions":
        selected = _shard_filter(body)
        expired = [s for s in state.sessions.values() if selected(s.shard_id, s.shard_count)]
        for session in expired:
            session.invalid = True  # the connection stays; a later RESUME fails
            state.ledger.count("sessions_expired")
        return {"sessions": len(expired)}
    targets = _targets(state, body)
    if action not in _CONNECTION_ACTIONS:
        raise ValueError(f"unknown gateway action {action!r}")
    for conn in targets:
        await _CONNECTION_ACTIONS[action](state, conn, body)
    state.ledger.count(f"fault.{action}", len(targets))
    return {"connections": len(targets)}


async def _reconnect(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    state.ledger.count("op7_sent")
    conn.send_payload({"op": 7, "d": None})
    state.start_soon(state.close_later, conn)


async def _invalidate(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    resumable = bool(body.get("resumable", False))
    state.ledger.count("op9_sent")
    conn.send_payload({"op": 9, "d": resumable})
    if not resumable and conn.session is not None:
        conn.session.invalidate()
    state.start_soon(state.close_later, conn)


async def _close(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    await state.server_close(conn, int(body.get("code", 4000)), "Closed by the simulator.")


async def _drop(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    state.ledger.serving_ended(conn)
    conn.blackholed = True
    state.ledger.close(conn.shard_id, None, "server")
    await conn.ws.abort(reset=True)
    conn.cancel_scope.cancel()


async def _blackhole(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    # A dead connection to the client, who will leave it: it no longer serves its shard.
    state.ledger.serving_ended(conn)
    conn.blackholed = True
    if conn.session is not None:
        conn.session.detach(conn)


async def _corrupt(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    assert conn.compressor is not None
    await conn.ws.send_messages([conn.compressor.corrupt_message()])


async def _request_heartbeat(state: GatewayState, conn: GatewayConnection, body: dict[str, Any]) -> None:
    conn.send_payload({"op": 1, "d": None})


def _count(body: dict[str, Any]) -> int:
    count = body.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError("`count` must be a non-negative integer")
    return count


_CONNECTION_ACTIONS: Final = {
    "reconnect": _reconnect,
    "invalidate": _invalidate,
    "close": _close,
    "drop": _drop,
    "blackhole": _blackhole,
    "corrupt": _corrupt,
    "request_heartbeat": _request_heartbeat,
}
