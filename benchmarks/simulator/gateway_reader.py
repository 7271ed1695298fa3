"""The reading side of one gateway connection: client payloads checked against Discord's rules and answered.

Rules enforced here (each violation is recorded in the ledger under the rule name in brackets): a payload
before IDENTIFY/RESUME closes 4003 [payload_before_identify]; an unknown opcode closes 4001
[unknown_opcode]; bad JSON or a payload over 4096 bytes closes 4002 [payload_too_large, bad_json]; more
than 120 payloads in 60 s closes 4008 [send_rate]; a first heartbeat sooner than 1% of the interval after
HELLO [heartbeat_no_jitter]; no heartbeat for 1.5 intervals plus 1 s closes 4009 [heartbeat_timeout]; a
client close with 1000/1001 ends the session [client_close_kills_session] (recorded because clients that
mean to resume must not do it); requests for all of a guild's members more often than every 30 s get
RATE_LIMITED [member_request_rate]. IDENTIFY and RESUME are gateway_identify.py's.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
import trio

from .gateway_connection import GatewayConnection
from .gateway_identify import on_identify, on_resume
from .gateway_state import GatewayState
from .wsserver import ConnectionEnded, MessageTooLarge

__all__ = [
    "CLIENT_OPS",
    "MAX_PAYLOAD_BYTES",
    "SEND_LIMIT",
    "SEND_WINDOW_S",
    "drop_until_client_leaves",
    "read_loop",
    "watch_heartbeats",
]

MAX_PAYLOAD_BYTES: Final = 4096
SEND_LIMIT: Final = 120
SEND_WINDOW_S: Final = 60.0
#: Client ops Discord accepts: heartbeat, identify, presence, voice state, resume, request members,
#: request soundboard sounds.
CLIENT_OPS: Final = frozenset({1, 2, 3, 4, 6, 8, 31})
#: A first heartbeat sooner than this fraction of the interval shows the client skipped the jitter.
NO_JITTER_FRACTION: Final = 0.01
MEMBER_REQUEST_WINDOW_S: Final = 30.0


async def read_loop(state: GatewayState, conn: GatewayConnection) -> None:
    while True:
        if conn.blackholed:
            # Hold the TCP connection open, unread and unanswered, until the client gives up.
            await trio.sleep(state.gw.session_ttl_s)
            return
        try:
            message = await conn.ws.receive()
        except MessageTooLarge:
            state.ledger.violation("payload_too_large", conn.shard_id, "over 1 MiB")
            await state.server_close(conn, 4002, "Payload too large.")
            return
        except ConnectionEnded as ended:
            state.ledger.serving_ended(conn)
            if not ended.reply:
                _client_closed(state, conn, ended.code)
            return
        await _handle_payload(state, conn, message)
        if conn.ws.closed:
            return


async def drop_until_client_leaves(state: GatewayState, conn: GatewayConnection) -> None:
    """Read and drop the client's messages, answering nothing, until it closes or drops the connection;
    at most `session_ttl_s`, as long as a blackhole holds one."""
    conn.blackholed = True  # the writer sends nothing, not even a stray queued payload
    with trio.move_on_after(state.gw.session_ttl_s):
        while True:
            try:
                await conn.ws.receive()
            except MessageTooLarge:
                return
            except ConnectionEnded as ended:
                if not ended.reply:
                    _client_closed(state, conn, ended.code)
                return


def _client_closed(state: GatewayState, conn: GatewayConnection, code: int | None) -> None:
    state.ledger.close(conn.shard_id, code, "client")
    if code in (1000, 1001) and conn.session is not None:
        state.ledger.violation("client_close_kills_session", conn.shard_id, str(code))
        conn.session.invalidate()


async def _handle_payload(state: GatewayState, conn: GatewayConnection, message: bytes | str) -> None:
    if conn.blackholed:
        return  # read while the blackhole began: dropped unanswered
    raw = message.encode() if isinstance(message, str) else message
    now = trio.current_time()
    window = conn.sent_times
    window.append(now)
    while window and window[0] <= now - SEND_WINDOW_S:
        window.popleft()
    state.ledger.record_max("send_window_max", len(window))
    state.ledger.record_max("payload_max_bytes", len(raw))
    if len(window) > SEND_LIMIT:
        state.ledger.violation("send_rate", conn.shard_id, f"{len(window)} payloads in {SEND_WINDOW_S:g} s")
        await state.server_close(conn, 4008, "Rate limited.")
        return
    if len(raw) > MAX_PAYLOAD_BYTES:
        state.ledger.violation("payload_too_large", conn.shard_id, f"{len(raw)} bytes")
        await state.server_close(conn, 4002, "Payload too large.")
        return
    try:
        payload = orjson.loads(raw)
        op = payload["op"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        state.ledger.violation("bad_json", conn.shard_id, raw[:80].decode("utf-8", "replace"))
        await state.server_close(conn, 4002, "Error while decoding payload.")
        return
    if op not in CLIENT_OPS:
        state.ledger.violation("unknown_opcode", conn.shard_id, repr(op))
        await state.server_close(conn, 4001, "Unknown opcode.")
        return
    data = payload.get("d")
    if op == 1:
        await _on_heartbeat(state, conn, data)
    elif op in (2, 6) and conn.ready_withheld:
        state.ledger.count("ready_withheld")  # unanswered: the client must give up waiting for READY
    elif op == 2:
        await on_identify(state, conn, data)
    elif op == 6:
        await on_resume(state, conn, data)
    elif not conn.identified:
        state.ledger.violation("payload_before_identify", conn.shard_id, f"op {op}")
        await state.server_close(conn, 4003, "Not authenticated.")
    elif op == 8:
        _on_request_members(state, conn, data)
    else:
        state.ledger.count(f"op{op}_received")


async def _on_heartbeat(state: GatewayState, conn: GatewayConnection, data: Any) -> None:
    now = trio.current_time()
    state.ledger.count("heartbeats")
    if conn.last_heartbeat_at is None and conn.hello_at:
        interval_s = state.gw.heartbeat_interval_ms / 1000
        delay = now - conn.hello_at
        state.ledger.first_heartbeat(conn.shard_id, delay, interval_s)
        if delay < NO_JITTER_FRACTION * interval_s:
            state.ledger.violation(
                "heartbeat_no_jitter", conn.shard_id, f"first beat after {delay * 1000:.1f} ms"
            )
    elif conn.last_heartbeat_at is not None:
        state.ledger.record_max("heartbeat_gap_max_ms", round((now - conn.last_heartbeat_at) * 1000))
    # Before IDENTIFY/RESUME a client may beat with the seq it is about to resume from; only a seq the
    # session never reached is wrong.
    session = conn.session
    if data is not None and not isinstance(data, int):
        state.ledger.violation("heartbeat_bad_seq", conn.shard_id, repr(data)[:40])
    elif isinstance(data, int) and session is not None and data > session.last_seq:
        state.ledger.violation("heartbeat_bad_seq", conn.shard_id, f"{data} > last seq {session.last_seq}")
    conn.last_heartbeat_at = now
    conn.send_payload({"op": 11})


async def watch_heartbeats(state: GatewayState, conn: GatewayConnection) -> None:
    limit = 1.5 * state.gw.heartbeat_interval_ms / 1000 + 1.0
    while True:
        last = conn.last_heartbeat_at if conn.last_heartbeat_at is not None else conn.hello_at
        await trio.sleep_until(last + limit)
        last_now = conn.last_heartbeat_at if conn.last_heartbeat_at is not None else conn.hello_at
        if last_now == last and not conn.blackholed:
            state.ledger.violation("heartbeat_timeout", conn.shard_id, f"none for {limit:.1f} s")
            await state.server_close(conn, 4009, "Session timed out.")
            return


def _on_request_members(state: GatewayState, conn: GatewayConnection, data: Any) -> None:
    """op 8: answer with an empty GUILD_MEMBERS_CHUNK; requests for all members are limited (G3)."""
    if not isinstance(data, dict) or "guild_id" not in data:
        return
    guild_id = int(data["guild_id"])
    session = conn.session
    if session is None:
        return
    if data.get("query", None) == "" and data.get("limit", 0) == 0:
        now = trio.current_time()
        previous = state.member_requests.get(guild_id)
        if previous is not None and now - previous < MEMBER_REQUEST_WINDOW_S:
            body = {
                "opcode": 8,
                "retry_after": round(MEMBER_REQUEST_WINDOW_S - (now - previous), 3),
                "meta": {"guild_id": str(guild_id), "nonce": data.get("nonce")},
            }
            session.append(b"RATE_LIMITED", orjson.dumps(body))
            state.ledger.violation("member_request_rate", conn.shard_id, str(guild_id))
            return
        state.member_requests[guild_id] = now
    chunk: dict[str, Any] = {
        "guild_id": str(guild_id),
        "members": [],
        "chunk_index": 0,
        "chunk_count": 1,
        "nonce": data.get("nonce"),
    }
    session.append(b"GUILD_MEMBERS_CHUNK", orjson.dumps(chunk))
