"""The simulated gateway's rules, over real sockets, with an independent trio-websocket client."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
import zstandard
from trio_websocket import ConnectionClosed

from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator
from benchmarks.simulator.gateway_ledger import MAXIMA
from benchmarks.simulator.sessions import BUDGET_PERIOD_MS, IdentifyLimiter

from .gateway_client import GatewayTestClient, open_gateway_client

TIMEOUT_S = 20


@asynccontextmanager
async def simulator(**gateway: Any) -> AsyncIterator[Simulator]:
    settings: dict[str, Any] = {"heartbeat_interval_ms": 60_000, "max_concurrency": 16}
    settings.update(gateway)
    async with open_simulator(SimulatorConfig(gateway=GatewayConfig(**settings))) as sim:
        yield sim


async def expect_close(client: GatewayTestClient, code: int) -> None:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(1000):
            await client.recv()
    assert info.value.reason is not None
    assert info.value.reason.code == code, info.value.reason


async def test_hello_heartbeat_ack_and_jitter_rule() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(heartbeat_interval_ms=1234) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                assert await client.hello() == 1234
                await client.send({"op": 1, "d": None})  # immediately: no jitter
                assert (await client.recv())["op"] == 11
                await client.close()
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.hello()
                await trio.sleep(0.2)  # a jittered first beat
                await client.send({"op": 1, "d": None})
                assert (await client.recv())["op"] == 11
                await client.close()
            ledger = sim.gateway.ledger
            assert ledger.rules_broken() == {"heartbeat_no_jitter": 1}
            delays = sorted(h.delay_s for h in ledger.first_heartbeats)
            assert delays[0] < 0.01 and 0.2 <= delays[1] < 1.0


async def test_server_requests_heartbeat_and_closes_silent_clients() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(heartbeat_interval_ms=400) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN)
                await sim.gateway.control("request_heartbeat", {})
                request, _ = await client.recv_until(lambda p: p["op"] == 1)
                assert request == {"op": 1, "d": None}
                # No heartbeat for 1.5 intervals + 1 s: the session times out.
                await expect_close(client, 4009)
            assert sim.gateway.ledger.rules_broken()["heartbeat_timeout"] == 1


@pytest.mark.parametrize(
    ("identify", "code"),
    [
        ({"token": "not-a-token", "intents": 1, "properties": {}}, 4004),
        ({"token": DEFAULT_TOKEN, "intents": 1, "shard": [4, 4], "properties": {}}, 4010),
        ({"token": DEFAULT_TOKEN, "intents": 1, "shard": [0, 0], "properties": {}}, 4010),
        ({"token": DEFAULT_TOKEN, "intents": 1 << 30, "shard": [0, 1], "properties": {}}, 4013),
        ({"token": DEFAULT_TOKEN, "intents": 1 << 15, "shard": [0, 1], "properties": {}}, 4014),
        ({"token": DEFAULT_TOKEN, "intents": 1 << 1, "shard": [0, 1], "properties": {}}, 4014),
    ],
)
async def test_identify_validation(identify: dict[str, Any], code: int) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim, open_gateway_client(sim.addresses.gateway_url) as client:
            await client.hello()
            await client.send({"op": 2, "d": identify})
            await expect_close(client, code)
            assert sim.gateway.ledger.closes_sent[str(code)] == 1


async def test_sharding_rules_4011_and_shard_multiple() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(shard_count=4, guilds_per_shard=2000, max_guilds_per_shard=2500) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.hello()
                await client.identify(DEFAULT_TOKEN, (0, 2))  # 8000 guilds on 2 shards
                await expect_close(client, 4011)
        async with simulator(shard_multiple=16, shard_count=16) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.hello()
                await client.identify(DEFAULT_TOKEN, (0, 8))
                await expect_close(client, 4010)
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN, (0, 16))
                await client.close()


@pytest.mark.parametrize(
    ("first", "code", "rule"),
    [
        ({"op": 3, "d": {"status": "online"}}, 4003, "payload_before_identify"),
        ({"op": 99, "d": None}, 4001, "unknown_opcode"),
        ("{not json", 4002, "bad_json"),
        ({"op": 1, "d": "x" * 5000}, 4002, "payload_too_large"),
    ],
)
async def test_client_payload_rules(first: Any, code: int, rule: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim, open_gateway_client(sim.addresses.gateway_url) as client:
            await client.hello()
            await client.send(first)
            await expect_close(client, code)
            assert rule in sim.gateway.ledger.rules_broken()


async def test_second_identify_closes_4005_and_session_ends() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim, open_gateway_client(sim.addresses.gateway_url) as client:
            ready = await client.ready(DEFAULT_TOKEN, (0, 2))
            await client.identify(DEFAULT_TOKEN, (1, 2))
            await expect_close(client, 4005)
            assert sim.gateway.sessions[ready["d"]["session_id"]].invalid


async def test_send_rate_limit_counts_heartbeats() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim, open_gateway_client(sim.addresses.gateway_url) as client:
            await client.ready(DEFAULT_TOKEN)
            for _ in range(119):  # plus the IDENTIFY: 120 payloads, the limit
                await client.send({"op": 1, "d": None})
            for _ in range(119):
                assert (await client.recv())["op"] in (0, 11)
            assert "send_rate" not in sim.gateway.ledger.rules_broken()
            await client.send({"op": 1, "d": None})
            await expect_close(client, 4008)
            assert sim.gateway.ledger.rules_broken()["send_rate"] == 1


async def test_identify_window_is_global_across_connections() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(max_concurrency=2, shard_count=4, invalid_session_delay_s=0.1) as sim:
            url = sim.addresses.gateway_url
            async with (
                open_gateway_client(url) as a,
                open_gateway_client(url) as b,
                open_gateway_client(url) as c,
            ):
                await a.ready(DEFAULT_TOKEN, (0, 4))  # key 0
                await b.ready(DEFAULT_TOKEN, (1, 4))  # key 1: its own window
                await c.hello()
                await c.identify(DEFAULT_TOKEN, (2, 4))  # key 0 again within 5 s
                assert await c.recv() == {"op": 9, "d": False}
                for client in (a, b, c):
                    await client.close()
            ledger = sim.gateway.ledger
            assert [(r.shard, r.key, r.accepted, r.reason) for r in ledger.identifies] == [
                (0, 0, True, ""),
                (1, 1, True, ""),
                (2, 0, False, "rate_limited"),
            ]
            assert ledger.rules_broken() == {"identify_rate": 1}
            assert sim.gateway.identify.remaining == 998


async def test_daily_budget_exhaustion_resets_the_token() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(session_start_remaining=1, shard_count=2) as sim:
            url = sim.addresses.gateway_url
            async with httpx.AsyncClient(base_url=sim.addresses.rest_url) as http:
                auth = {"Authorization": f"Bot {DEFAULT_TOKEN}"}
                info = (await http.get("/gateway/bot", headers=auth)).json()
                assert info["session_start_limit"]["remaining"] == 1
                assert info["session_start_limit"]["max_concurrency"] == 16
                async with open_gateway_client(url) as first, open_gateway_client(url) as second:
                    await first.ready(DEFAULT_TOKEN, (0, 2))
                    await second.hello()
                    await second.identify(DEFAULT_TOKEN, (1, 2))
                    await expect_close(second, 4004)
                    await expect_close(first, 4004)
                assert (await http.get("/users/@me", headers=auth)).status_code == 401
            assert sim.gateway.ledger.rules_broken() == {"identify_budget": 1}


async def test_ready_guilds_and_routing() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(shard_count=3, guilds_per_shard=4) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                ready = await client.ready(DEFAULT_TOKEN, (1, 3))
                d = ready["d"]
                assert ready["s"] == 1
                assert (
                    d["resume_gateway_url"] == sim.addresses.resume_gateway_url != sim.addresses.gateway_url
                )
                assert d["shard"] == [1, 3] and len(d["session_id"]) == 32
                guild_ids = [int(g["id"]) for g in d["guilds"]]
                assert len(guild_ids) == 4 and all(g["unavailable"] for g in d["guilds"])
                assert all((gid >> 22) % 3 == 1 for gid in guild_ids)
                creates = [await client.recv() for _ in range(4)]
                assert [c["t"] for c in creates] == ["GUILD_CREATE"] * 4
                assert [c["s"] for c in creates] == [2, 3, 4, 5]
                assert sorted(int(c["d"]["id"]) for c in creates) == sorted(guild_ids)
                await client.close()


@pytest.mark.parametrize("compress", ["zlib-stream", "zstd-stream", "none"])
async def test_firehose_sequence_and_mix(compress: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(event_rate=500, guilds_per_shard=1, shard_count=1) as sim:
            async with open_gateway_client(sim.addresses.gateway_url, compress) as client:
                await client.ready(DEFAULT_TOKEN)
                payloads = [await client.recv() for _ in range(300)]
                await client.close()
            seqs = [p["s"] for p in payloads]
            assert seqs == list(range(2, 302))
            kinds = {p["t"] for p in payloads[1:]}
            assert kinds == {"MESSAGE_CREATE", "PRESENCE_UPDATE", "TYPING_START"}
            sizes = [len(orjson.dumps(p["d"])) for p in payloads if p["t"] == "MESSAGE_CREATE"]
            assert min(sizes) >= 400 and max(sizes) <= 2200
            session = next(iter(sim.gateway.ledger.sessions.values()))
            assert session.last_seq >= 301 and session.sent >= 301


async def test_zlib_split_across_frames_and_zstd_frame_without_content_size() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(zlib_split_bytes=128, guilds_per_shard=3, shard_count=1) as sim:
            async with open_gateway_client(sim.addresses.gateway_url, "zlib-stream") as client:
                await client.ready(DEFAULT_TOKEN)  # READY and GUILD_CREATEs exceed 512 compressed bytes
                for _ in range(3):
                    await client.recv()
                assert client.frames > 5  # HELLO + READY + 3 GUILD_CREATE, some split
                await client.close()
        async with simulator() as sim:
            # The first message carries the frame header; it must not declare a content size, so a one-shot
            # decompress fails while a streaming decompressor reads it (discord.py #10344).
            raw = await _first_zstd_message(sim)
            with pytest.raises(zstandard.ZstdError):
                zstandard.ZstdDecompressor().decompress(raw)


async def _first_zstd_message(sim: Simulator) -> bytes:
    async with open_gateway_client(sim.addresses.gateway_url, "zstd-stream") as client:
        message = await client.ws.get_message()
        await client.close()
    assert isinstance(message, bytes)
    assert orjson.loads(zstandard.ZstdDecompressor().decompressobj().decompress(message))["op"] == 10
    return message


async def test_resume_replays_exactly_the_missed_events() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(event_rate=400, guilds_per_shard=1) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                ready = await client.ready(DEFAULT_TOKEN)
                payloads = [await client.recv() for _ in range(50)]
                await client.close(4000)
            last = payloads[-1]["s"]
            await trio.sleep(0.3)  # events keep coming while we are away
            async with open_gateway_client(sim.addresses.resume_gateway_url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, ready["d"]["session_id"], last)
                _, replay = await client.recv_until(lambda p: p.get("t") == "RESUMED")
                assert len(replay) >= 50
                assert [p["s"] for p in replay] == list(range(last + 1, last + 1 + len(replay)))
                after = await client.recv()
                assert after["s"] == replay[-1]["s"] + 1
                await client.close()
            record = sim.gateway.ledger.resumes[0]
            assert record.ok and record.via_resume_url and record.replayed == len(replay)
            assert not sim.gateway.ledger.rules_broken()


async def test_failed_resumes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(event_rate=0, session_ttl_s=0.5) as sim:
            url, resume_url = sim.addresses.gateway_url, sim.addresses.resume_gateway_url
            async with open_gateway_client(url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, "0" * 32, 1)  # unknown session
                assert await client.recv() == {"op": 9, "d": False}
                await client.close()
            async with open_gateway_client(url) as client:
                ready = await client.ready(DEFAULT_TOKEN, (0, 1))
                await client.close()
            async with open_gateway_client(url) as client:  # on the wrong URL, and a seq never sent
                await client.hello()
                await client.resume(DEFAULT_TOKEN, ready["d"]["session_id"], 10_000)
                await expect_close(client, 4007)
            async with open_gateway_client(url, "zlib-stream") as client:
                ready = await client.ready(DEFAULT_TOKEN, (1, 4))
                await client.close()  # a 4000 close keeps the session, but only for session_ttl_s
            await trio.sleep(2.0)
            async with open_gateway_client(resume_url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, ready["d"]["session_id"], 1)
                assert await client.recv() == {"op": 9, "d": False}
                await client.close()
            reasons = [r.reason for r in sim.gateway.ledger.resumes]
            assert reasons == ["unknown_session", "invalid_seq", "unknown_session"]
            assert sim.gateway.ledger.rules_broken()["resume_not_on_resume_url"] == 2


async def test_client_close_1000_ends_the_session() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                ready = await client.ready(DEFAULT_TOKEN)
                await client.close(1000)
            async with open_gateway_client(sim.addresses.resume_gateway_url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, ready["d"]["session_id"], 1)
                assert await client.recv() == {"op": 9, "d": False}
                await client.close()
            assert sim.gateway.ledger.rules_broken() == {"client_close_kills_session": 1}
            assert sim.gateway.ledger.closes_received["1000"] == 1


async def test_faults_over_the_control_endpoint() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            simulator(shard_count=2) as sim,
            httpx.AsyncClient(base_url=sim.addresses.control_url) as ctl,
        ):
            url = sim.addresses.gateway_url
            async with open_gateway_client(url) as zero, open_gateway_client(url, "zstd-stream") as one:
                await zero.ready(DEFAULT_TOKEN, (0, 2))
                await one.ready(DEFAULT_TOKEN, (1, 2))
                answer = await ctl.post("/gateway/reconnect", json={"shards": [0]})
                assert answer.json() == {"connections": 1}
                assert (await zero.recv_until(lambda p: p["op"] == 7))[0] == {"op": 7, "d": None}
                await ctl.post("/gateway/invalidate", json={"shards": [1], "resumable": True})
                assert (await one.recv_until(lambda p: p["op"] == 9))[0] == {"op": 9, "d": True}
                await ctl.post("/gateway/corrupt", json={"shards": [1]})
                with pytest.raises(zstandard.ZstdError):
                    for _ in range(100):
                        await one.recv()
                await ctl.post("/gateway/close", json={"shards": [0], "code": 4000})
                await expect_close(zero, 4000)
            bad = await ctl.post("/gateway/explode", json={})
            assert bad.status_code == 400 and "unknown gateway action" in bad.json()["error"]
            ledger = (await ctl.get("/ledger")).json()["gateway"]
            assert ledger["counters"]["op7_sent"] == 1 and ledger["counters"]["op9_sent"] == 1
            assert ledger["closes_sent"] == {"4000": 1}


async def test_corrupt_zlib_frame_breaks_the_inflater() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim, open_gateway_client(sim.addresses.gateway_url) as client:
            await client.ready(DEFAULT_TOKEN)
            await sim.gateway.control("corrupt", {})
            with pytest.raises(zlib.error):
                for _ in range(100):  # the GUILD_CREATEs, then the corrupt frame
                    await client.recv()
            await client.close()


async def test_drop_and_blackhole() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(event_rate=100) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN)
                await sim.gateway.control("drop", {})
                with pytest.raises(ConnectionClosed) as info:
                    for _ in range(10_000):
                        await client.recv()
                assert info.value.reason is not None
                assert info.value.reason.code == 1006  # no close frame
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN, (1, 2))  # another identify key: no 5 s wait
                await sim.gateway.control("blackhole", {})
                await trio.sleep(0.05)
                await client.send({"op": 1, "d": None})
                with trio.move_on_after(1.0) as silent:
                    while True:  # drain what was in flight; then nothing, not even an ACK
                        payload = await client.recv(timeout=5)
                        assert payload["op"] == 0
                assert silent.cancelled_caught
                # A client that detected the zombie drops TCP without a close handshake.
                await trio.aclose_forcefully(client.ws._stream)
            states = {s["state"] for s in sim.gateway.state()["sessions"].values()}
            assert states == {"detached"}


async def test_op7_before_hello() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            await sim.gateway.control("reconnect", {"before_hello": 1})
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                assert await client.recv() == {"op": 7, "d": None}
                await client.close()
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                assert await client.hello() == 60_000
                await client.close()


async def test_withhold_hello() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(heartbeat_interval_ms=200) as sim:
            with pytest.raises(ValueError, match="count"):
                await sim.gateway.control("withhold_hello", {})
            assert await sim.gateway.control("withhold_hello", {"count": 1}) == {"pending": 1}
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                # Past the heartbeat watchdog's 1.5 intervals + 1 s: no HELLO, and no 4009 either.
                with trio.move_on_after(1.5) as silent:
                    await client.recv()
                assert silent.cancelled_caught
                await client.send({"op": 1, "d": None})  # read and dropped: no ACK
                with trio.move_on_after(0.2) as silent:
                    await client.recv()
                assert silent.cancelled_caught
                assert sim.gateway.ledger.counters["hello_withheld"] == 1
                async with open_gateway_client(sim.addresses.gateway_url) as second:
                    assert await second.hello() == 200
                    await second.close()
                await client.close()
            while sim.gateway.connections:  # the withheld connection ends when the client leaves
                await trio.sleep(0.01)
            ledger = sim.gateway.ledger
            assert ledger.counters["hello_withheld"] == 1 and ledger.counters["heartbeats"] == 0
            assert ledger.closes_received == {"4000": 2} and not ledger.closes_sent
            assert not ledger.rules_broken()


async def test_withhold_ready() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(heartbeat_interval_ms=200) as sim:
            url, resume_url = sim.addresses.gateway_url, sim.addresses.resume_gateway_url
            assert await sim.gateway.control("withhold_ready", {"count": 2}) == {"pending": 2}
            async with open_gateway_client(url) as client:
                assert await client.hello() == 200
                await client.identify(DEFAULT_TOKEN)
                # Beating past the watchdog's 1.3 s: each beat is ACKed and nothing comes before its ACK.
                for _ in range(8):
                    await trio.sleep(0.18)
                    await client.send({"op": 1, "d": None})
                    assert await client.recv(timeout=1) == {"op": 11}
                await client.close()
            async with open_gateway_client(resume_url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, "0" * 32, 1)  # an unknown session, yet not even op 9
                await trio.sleep(0.2)
                await client.send({"op": 1, "d": None})
                assert await client.recv(timeout=1) == {"op": 11}
                await client.close()
            ledger = sim.gateway.ledger
            assert ledger.counters["ready_withheld"] == 2
            assert ledger.counters["identifies"] == 0 and ledger.counters["resumes"] == 0
            assert not sim.gateway.sessions
            async with open_gateway_client(url) as client:
                # The same identify key at once: the withheld IDENTIFY took no place in the 5 s window.
                await client.ready(DEFAULT_TOKEN)
                await client.close()
            assert ledger.counters["identifies_accepted"] == 1 and sim.gateway.identify.remaining == 999
            assert not ledger.rules_broken()


async def test_ledger_maxima_and_reset() -> None:
    presence: dict[str, Any] = {
        "op": 3,
        "d": {"since": None, "activities": [], "status": "online", "afk": False, "padding": ""},
    }
    presence["d"]["padding"] = "x" * (3000 - len(orjson.dumps(presence)))
    assert len(orjson.dumps(presence)) == 3000
    with trio.fail_after(TIMEOUT_S):
        async with (
            simulator(heartbeat_interval_ms=1000) as sim,
            httpx.AsyncClient(base_url=sim.addresses.control_url) as ctl,
        ):
            assert (await ctl.get("/ledger")).json()["gateway"]["counters"] == dict.fromkeys(MAXIMA, 0)
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN)
                for pause in (0.05, 0.3, 0.1):  # the largest gap: the 0.3 s pause plus a round trip
                    await trio.sleep(pause)
                    await client.send({"op": 1, "d": None})
                    await client.recv_until(lambda p: p["op"] == 11)
                await client.send(presence)
                await client.send({"op": 1, "d": None})
                await client.recv_until(lambda p: p["op"] == 11)
                await client.close()
            counters = (await ctl.get("/ledger")).json()["gateway"]["counters"]
            assert counters["send_window_max"] == 6  # IDENTIFY, 4 heartbeats, the presence update
            assert counters["payload_max_bytes"] == 3000
            assert 295 <= counters["heartbeat_gap_max_ms"] < 800
            assert (await ctl.post("/gateway/reset_maxima")).json() == {"ok": True}
            counters = (await ctl.get("/ledger")).json()["gateway"]["counters"]
            assert {name: counters[name] for name in MAXIMA} == dict.fromkeys(MAXIMA, 0)
            assert counters["heartbeats"] == 4 and counters["op3_received"] == 1


async def test_request_all_members_is_rate_limited() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            simulator(guilds_per_shard=1) as sim,
            open_gateway_client(sim.addresses.gateway_url) as client,
        ):
            ready = await client.ready(DEFAULT_TOKEN)
            guild_id = ready["d"]["guilds"][0]["id"]
            request = {"op": 8, "d": {"guild_id": guild_id, "query": "", "limit": 0, "nonce": "n1"}}
            await client.send(request)
            chunk, _ = await client.recv_until(lambda p: p.get("t") == "GUILD_MEMBERS_CHUNK")
            assert chunk["d"]["nonce"] == "n1"
            await client.send(request)
            limited, _ = await client.recv_until(lambda p: p.get("t") == "RATE_LIMITED")
            assert limited["d"]["opcode"] == 8 and 0 < limited["d"]["retry_after"] <= 30
            assert limited["d"]["meta"]["guild_id"] == guild_id
            await client.close()


async def test_the_identify_budget_refills_after_reset_after(autojump_clock: trio.testing.MockClock) -> None:
    """As on Discord: once `reset_after` has passed, `remaining` is `total` again for another day."""
    limiter = IdentifyLimiter(max_concurrency=4, total=1000, remaining=1, reset_after_ms=3000)
    assert limiter.check(0).allowed
    assert limiter.check(1).reason == "budget_exhausted"
    await trio.sleep(2.9)
    assert limiter.reset_after_now_ms() == 100
    assert limiter.check(2).reason == "budget_exhausted"
    await trio.sleep(0.1)
    assert limiter.reset_after_now_ms() == BUDGET_PERIOD_MS
    assert limiter.remaining == 1000
    assert limiter.check(3).allowed and limiter.remaining == 999
