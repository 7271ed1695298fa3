"""IDENTIFY and RESUME: how a connection gets a session (anchors/gateway.md section 1).

IDENTIFY: a bad token closes 4004, a bad `shard` 4010, a shard count below the minimum (`min_shard_count`,
counted in `identifies_below_min_shard_count`) or too many guilds per shard 4011, invalid intents 4013,
unapproved privileged intents 4014; one IDENTIFY per `shard_id % max_concurrency` per 5 s across all
connections, else op 9 false after a delay [identify_rate]; the daily budget, which when exceeded resets
the token and closes every connection with 4004 [identify_budget]. A second IDENTIFY or RESUME closes 4005
[second_identify].

The minimum shard count refuses new sessions only: a RESUME of an existing session of fewer shards works,
as on Discord. In guild-stream mode (guild_stream.py) a session holds its shard's share of the bot's guild
set under its own shard count, and the guild stream feeds it instead of a per-session firehose. The identify
window's key is `shard_id % max_concurrency` whatever the shard count, as on Discord: shard 0 of 4 and shard
0 of 8 share a key.

RESUME: one not sent to READY's `resume_gateway_url` is recorded [resume_not_on_resume_url]; one for an
unknown, expired or unreplayable session gets op 9 false; a seq beyond the session's closes 4007. A session
resumed on a new connection drops its old one, as Discord does: the old socket is closed without a close
frame (the client sees 1006, a lost connection it would RESUME from; counted in `sessions_taken_over`), and
this happens before the new connection is sent RESUMED, with no checkpoint in between, so a hand-over by
RESUME never has two connections serving the shard.

A connection serves its shard (shard id and shard count) from READY or RESUMED until it ends; one that starts
serving a shard another connection still serves (two IDENTIFYs of one shard of one shard count; shard 0 of 4
and shard 0 of 8 are two shards) is recorded [shard_served_twice] and counted in
`shard_overlaps` (gateway_ledger.py).
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson

from .events import guild_ids_for_shard, ready_payload
from .gateway_connection import GatewayConnection
from .gateway_ledger import IdentifyRecord, ResumeRecord
from .gateway_state import GatewayState
from .sessions import Session, guild_create_bodies

__all__ = ["PRIVILEGED_INTENTS", "VALID_INTENTS", "on_identify", "on_resume"]

VALID_INTENTS: Final = sum(1 << bit for bit in (*range(17), 20, 21, 24, 25))
PRIVILEGED_INTENTS: Final = (1 << 1) | (1 << 8) | (1 << 15)


async def on_identify(state: GatewayState, conn: GatewayConnection, data: Any) -> None:
    """op 2: check the token, shard and intents, account the identify, start a session and its firehose."""
    if conn.identified:
        state.ledger.violation("second_identify", conn.shard_id)
        await state.server_close(conn, 4005, "Already authenticated.")
        return
    if not isinstance(data, dict):
        state.ledger.violation("bad_json", None, "identify without an object")
        await state.server_close(conn, 4002, "Error while decoding payload.")
        return
    token = data.get("token")
    if not isinstance(token, str) or not state.tokens.is_valid(_strip_bot(token)):
        await state.server_close(conn, 4004, "Authentication failed.")
        return
    token = _strip_bot(token)
    shard = data.get("shard", [0, 1])
    total_guilds = state.gw.shard_count * state.gw.guilds_per_shard
    if (
        not isinstance(shard, list)
        or len(shard) != 2
        or not all(isinstance(x, int) for x in shard)
        or shard[1] < 1
        or not 0 <= shard[0] < shard[1]
        or (state.gw.shard_multiple and shard[1] % state.gw.shard_multiple)
    ):
        await state.server_close(conn, 4010, "Invalid shard.")
        return
    shard_id, shard_count = shard
    conn.shard_id = shard_id
    conn.shard_count = shard_count
    if shard_count < state.min_shard_count:
        state.ledger.count("identifies_below_min_shard_count")
        await state.server_close(conn, 4011, "Sharding required.")
        return
    stream = state.guild_stream
    if stream.active:
        guild_ids = stream.guilds_for_shard(shard_id, shard_count)
        guilds_on_shard = len(guild_ids)
    else:
        guilds_on_shard = math.ceil(total_guilds / shard_count)
        guild_ids = []
    if guilds_on_shard > state.gw.max_guilds_per_shard:
        await state.server_close(conn, 4011, "Sharding required.")
        return
    intents = data.get("intents")
    if not isinstance(intents, int) or intents < 0 or intents & ~VALID_INTENTS:
        await state.server_close(conn, 4013, "Invalid intent(s).")
        return
    if intents & PRIVILEGED_INTENTS and not state.gw.privileged_intents:
        await state.server_close(conn, 4014, "Disallowed intent(s).")
        return
    if not isinstance(data.get("properties"), dict):
        state.ledger.violation("identify_without_properties", shard_id)
    decision = state.identify.check(shard_id)
    key = shard_id % state.identify.max_concurrency
    if not decision.allowed:
        state.ledger.identify(
            IdentifyRecord(
                state.ledger.now(),
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
        state.ledger.violation("identify_budget", shard_id, "daily session start limit exceeded; token reset")
        await state.reset_token()
        return
    if not decision.allowed:
        state.ledger.violation(
            "identify_rate",
            shard_id,
            f"key {key} identified {decision.since_previous_s:.3f} s after the last",
        )
        state.start_soon(state.invalid_session_later, conn)
        return
    if not stream.active:
        guild_ids = guild_ids_for_shard(shard_id, shard_count, guilds_on_shard)
    session = Session.create(token, (shard_id, shard_count), guild_ids, state.gw.replay_buffer)
    state.ledger.identify(
        IdentifyRecord(
            state.ledger.now(),
            shard_id,
            shard_count,
            key,
            True,
            "",
            decision.since_previous_s,
            session.session_id,
        )
    )
    state.sessions[session.session_id] = session
    state.ledger.sessions[session.session_id] = session
    conn.identified = True
    conn.session = session
    session.attach(conn)
    state.ledger.serving_started(conn, shard_id, shard_count, session.session_id)
    conn.streaming = True
    ready = ready_payload(session.session_id, state.resume_gateway_url, [shard_id, shard_count], guild_ids)
    session.append(b"READY", orjson.dumps(ready))
    for body in guild_create_bodies(guild_ids):
        session.append(b"GUILD_CREATE", body)
    state.ledger.events_by_type["READY"] += 1
    state.ledger.events_by_type["GUILD_CREATE"] += len(guild_ids)
    if stream.active:
        stream.add(session)  # the bot-wide guild stream feeds it; no per-session firehose
    else:
        state.start_soon(session.run_firehose, state.rates, state.config.seed)


async def on_resume(state: GatewayState, conn: GatewayConnection, data: Any) -> None:
    """op 6: take the session over on this connection and replay what the client missed, or refuse."""
    if conn.identified:
        state.ledger.violation("second_identify", conn.shard_id, "RESUME after IDENTIFY/RESUME")
        await state.server_close(conn, 4005, "Already authenticated.")
        return
    if not isinstance(data, dict):
        await state.server_close(conn, 4002, "Error while decoding payload.")
        return
    token = _strip_bot(str(data.get("token", "")))
    session_id = str(data.get("session_id", ""))
    seq = data.get("seq")
    if not state.tokens.is_valid(token):
        await state.server_close(conn, 4004, "Authentication failed.")
        return
    session = state.sessions.get(session_id)
    seq_value = seq if isinstance(seq, int) else 0
    if not conn.via_resume_port:
        state.ledger.violation("resume_not_on_resume_url", session.shard_id if session else None)

    def record(ok: bool, reason: str, replayed: int = 0) -> None:
        state.ledger.resume(
            ResumeRecord(
                state.ledger.now(),
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
        state.ledger.count("op9_sent")
        conn.send_payload({"op": 9, "d": False})
        return
    conn.shard_id = session.shard_id
    conn.shard_count = session.shard_count
    if seq_value > session.last_seq:
        record(False, "invalid_seq")
        session.invalidate()
        await state.server_close(conn, 4007, "Invalid seq.")
        return
    if not session.can_replay_from(seq_value):
        record(False, "replay_unavailable")
        session.invalidate()
        state.ledger.count("op9_sent")
        conn.send_payload({"op": 9, "d": False})
        return
    previous = session.connection
    if previous is not None and previous is not conn:
        # The same session resumed on a new connection: Discord drops the old one, before RESUMED goes out.
        assert isinstance(previous, GatewayConnection)  # sessions are attached only to these
        state.drop_taken_over(previous)
    upto = session.last_seq
    record(True, "", upto - seq_value)
    session.resumes += 1
    conn.identified = True
    conn.session = session
    conn.sent_seq = seq_value
    session.attach(conn)
    state.ledger.serving_started(conn, session.shard_id, session.shard_count, session.session_id)
    conn.send_dispatches_upto(upto)
    conn.send_payload({"op": 0, "t": "RESUMED", "s": None, "d": {"_trace": ["gateway-sim"]}})
    conn.streaming = True


def _strip_bot(token: str) -> str:
    return token[4:] if token.startswith("Bot ") else token
