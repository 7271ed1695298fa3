"""Guild-stream mode: one bot-wide stream of guild events that two generations of shards see at once.

The groundwork of live resharding: sessions of 2 and of 4 shards of one bot run side by side, each guild's
events reach the session of each generation whose shard routes the guild, the guild ledger records who got
what, and its audit judges what a consumer published. Also the recommended and minimum shard counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator
from benchmarks.simulator.events import bot_guild_ids
from benchmarks.simulator.gateway_control import control
from benchmarks.simulator.gateway_state import GatewayState
from benchmarks.simulator.guild_ledger import FIRST_EVENT_ID, GuildLedger, audit_guild_events
from benchmarks.simulator.sessions import MAX_CLIENT_LAG_EVENTS, Session
from benchmarks.simulator.tokens import TokenRegistry

from .gateway_client import GatewayTestClient, open_gateway_client
from .test_gateway import expect_close

TIMEOUT_S = 20
AUTH = {"Authorization": f"Bot {DEFAULT_TOKEN}"}


@asynccontextmanager
async def guild_simulator(**gateway: Any) -> AsyncIterator[Simulator]:
    settings: dict[str, Any] = {"heartbeat_interval_ms": 60_000, "max_concurrency": 16, "guild_count": 16}
    settings.update(gateway)
    async with open_simulator(SimulatorConfig(gateway=GatewayConfig(**settings))) as sim:
        yield sim


def shard_of(guild_id: int, shard_count: int) -> int:
    return (guild_id >> 22) % shard_count


@pytest.mark.usefixtures("no_identify_interval")  # shard i of 2 and shard i of 4 share an identify key
async def test_two_generations_see_every_guild_event_on_the_routed_shard() -> None:
    guilds = bot_guild_ids(16)
    with trio.fail_after(TIMEOUT_S):
        async with guild_simulator(shard_count=2) as sim, AsyncExitStack() as stack:
            clients: dict[tuple[int, int], GatewayTestClient] = {}
            sessions: dict[tuple[int, int], str] = {}
            for shard in [(i, 2) for i in range(2)] + [(i, 4) for i in range(4)]:
                client = await stack.enter_async_context(open_gateway_client(sim.addresses.gateway_url))
                ready = await client.ready(DEFAULT_TOKEN, shard)
                mine = [g for g in guilds if shard_of(g, shard[1]) == shard[0]]
                assert len(mine) == 16 // shard[1]
                assert [int(g["id"]) for g in ready["d"]["guilds"]] == mine
                assert all(g["unavailable"] for g in ready["d"]["guilds"])
                creates = [await client.recv() for _ in mine]
                assert [(c["t"], int(c["d"]["id"])) for c in creates] == [("GUILD_CREATE", g) for g in mine]
                clients[shard], sessions[shard] = client, ready["d"]["session_id"]

            await sim.gateway.control("guild_event_rate", {"rate": 500})
            while sim.gateway.guild_ledger.counters["guild_events"] < 64:
                await trio.sleep(0.01)
            await sim.gateway.control("guild_event_rate", {"rate": 0})

            received: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for shard, client in clients.items():
                last_seq = sim.gateway.sessions[sessions[shard]].last_seq
                received[shard] = []
                while not received[shard] or received[shard][-1]["s"] < last_seq:
                    received[shard].append(await client.recv())
                assert {p["t"] for p in received[shard]} == {"MESSAGE_CREATE"}
                assert all(shard_of(int(p["d"]["guild_id"]), shard[1]) == shard[0] for p in received[shard])
            for client in clients.values():
                await client.close()

            ledger = sim.gateway.guild_ledger
            events = ledger.counters["guild_events"]
            assert ledger.counters["guild_deliveries"] == 2 * events
            assert ledger.counters["guild_events_undelivered"] == 0
            assert len(ledger.records) == events
            for record in ledger.records:
                assert sorted(record.delivered_to) == [
                    (shard_of(record.guild_id, 2), 2),
                    (shard_of(record.guild_id, 4), 4),
                ]
            keys = [record.key for record in ledger.records]
            assert keys == [str(FIRST_EVENT_ID + n) for n in range(events)]
            for count in (2, 4):
                # Each generation, merged, holds every event exactly once.
                merged = [p for shard, ps in received.items() if shard[1] == count for p in ps]
                assert len(merged) == events and sorted(p["d"]["id"] for p in merged) == sorted(keys)
                published = [(p["d"]["id"], 0.0) for p in merged]
                audit = audit_guild_events(ledger, published)
                assert audit.clean and audit.published == events
                assert audit.deliveries_by_shard_count == {2: events, 4: events}
            # Both generations got the same body (serialised once).
            by_key = {p["d"]["id"]: p["d"] for p in received[(0, 2)]}
            assert all(by_key[p["d"]["id"]] == p["d"] for p in received[(0, 4)] + received[(2, 4)])

            async with httpx.AsyncClient() as http:
                snapshot = (await http.get(f"{sim.addresses.control_url}/ledger")).json()
            assert set(snapshot) == {"gateway", "rest", "guilds"}
            assert snapshot["guilds"]["counters"]["guild_events"] == events
            assert snapshot["guilds"]["deliveries_by_shard_count"] == {"2": events, "4": events}
            assert snapshot["guilds"]["records"][0]["key"] == keys[0]


async def test_the_stream_is_bot_wide_buffers_for_detached_sessions_and_waits_for_slow_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = SimulatorConfig(gateway=GatewayConfig(guild_count=8, guild_event_rate=100, session_ttl_s=30))
    state = GatewayState(config, TokenRegistry(config))
    stream = state.guild_stream
    guilds = stream.guild_ids

    def session(shard: tuple[int, int]) -> Session:
        created = Session.create(DEFAULT_TOKEN, shard, stream.guilds_for_shard(*shard), 100_000)
        stream.add(created)
        return created

    whole, half, other_half, ended, expired = (session(s) for s in [(0, 1), (0, 2), (1, 2), (1, 2), (0, 4)])
    ended.invalidate()
    expired.detached_at = trio.current_time() - 31  # past the resume TTL: not live, though not yet reaped
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run)
        await trio.sleep(10.001)
        # 100 events per second for the whole bot, not per session; detached sessions buffer them all.
        assert state.guild_ledger.counters["guild_events"] == 1000
        assert whole.last_seq == 1000 and half.last_seq == other_half.last_seq == 500
        assert ended.last_seq == expired.last_seq == 0
        assert stream.generations() == [1, 2, 4] and ended not in list(stream.sessions())
        assert state.guild_ledger.deliveries_by_shard_count == {1: 1000, 2: 1000}
        # Round-robin over the guild set: every guild had its share.
        assert {r.guild_id for r in state.guild_ledger.records} == set(guilds)

        # The control action sets the rate at run time; 0 stops the stream.
        assert await control(state, "guild_event_rate", {"rate": 0}) == {"guild_event_rate": 0.0}
        await trio.sleep(5)
        assert state.guild_ledger.counters["guild_events"] == 1000
        await control(state, "guild_event_rate", {"rate": 10})
        await trio.sleep(10)
        assert 99 <= state.guild_ledger.counters["guild_events"] - 1000 <= 100
        for bad in (-1, "fast", float("nan"), None):
            with pytest.raises(ValueError, match="rate"):
                await control(state, "guild_event_rate", {"rate": bad})
        nursery.cancel_scope.cancel()


async def test_a_slow_client_slows_the_stream(autojump_clock: trio.testing.MockClock) -> None:
    config = SimulatorConfig(gateway=GatewayConfig(guild_count=4, guild_event_rate=100))
    state = GatewayState(config, TokenRegistry(config))
    stream = state.guild_stream
    session = Session.create(DEFAULT_TOKEN, (0, 1), stream.guild_ids, 100_000)
    stream.add(session)

    class StalledClient:
        """An attached client whose writer wrote nothing yet."""

        sent_seq = 0
        cancel_scope = trio.CancelScope()
        progressed = trio.Event()

        def wake(self) -> None:
            pass

        async def wait_progress(self) -> None:
            await self.progressed.wait()

    client = StalledClient()
    session.attach(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.run)
        await trio.sleep(100)  # 10000 events' worth of time
        stalled_at = session.last_seq
        assert MAX_CLIENT_LAG_EVENTS < stalled_at <= MAX_CLIENT_LAG_EVENTS + 1
        client.sent_seq = session.last_seq  # the client caught up
        client.progressed.set()
        await trio.sleep(1.001)
        assert 99 <= session.last_seq - stalled_at <= 101
        nursery.cancel_scope.cancel()


def test_the_audit_finds_lost_duplicate_and_unknown_keys_and_the_longest_guild_gap() -> None:
    ledger = GuildLedger(max_records=3)
    a, b = bot_guild_ids(2)
    keys: list[str] = []
    for guild, delivered in [(a, [(0, 2)]), (b, [(1, 2)]), (a, [(0, 2), (0, 4)]), (b, []), (a, [(0, 2)])]:
        key = ledger.next_key()
        ledger.record(key, guild, 0.0, delivered)
        keys.append(str(key))
    k0, k1, k2, _k3, k4 = keys
    # k2 never published (lost); _k3 reached no session (not lost); k0 twice; two keys the ledger never made.
    published = [(k0, 1.0), (k1, 1.5), (k0, 2.0), ("123", 2.5), (k4, 4.0), ("not-a-key", 5.0), (k0, 6.0)]
    audit = audit_guild_events(ledger, published)
    assert audit.lost == (k2,)
    assert audit.duplicates == {k0: 2} and audit.duplicate_count == 2
    assert audit.unknown == ("123", "not-a-key")
    assert audit.max_guild_gap_s == 3.0  # guild a: first k0 at 1.0, then k4 at 4.0
    assert audit.published == 7 and audit.events == 5 and audit.undelivered == 1
    assert audit.deliveries_by_shard_count == {2: 4, 4: 1}
    assert not audit.clean
    # Counters stay exact past the record cap.
    assert ledger.counters == {"guild_events": 5, "guild_deliveries": 5, "guild_events_undelivered": 1}
    assert [r.key for r in ledger.records] == [k0, k1, k2]
    assert [r.delivered_to for r in ledger.records] == [((0, 2),), ((1, 2),), ((0, 2), (0, 4))]
    # After a reset the old keys are unknown and the numbering goes on.
    ledger.reset()
    assert ledger.next_key() == int(k4) + 1
    after = audit_guild_events(ledger, [(k4, 0.0)])
    assert after.unknown == (k4,) and after.events == 0 and not after.lost
    with pytest.raises(ValueError, match="out of order"):
        ledger.record(int(k4), a, 0.0, [])


async def test_recommended_shards_and_min_shard_count() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            guild_simulator(guild_count=0, shard_count=2) as sim,
            httpx.AsyncClient(headers=AUTH) as http,
        ):
            control = sim.addresses.control_url

            async def recommended() -> int:
                response = await http.get(f"{sim.addresses.rest_url}/gateway/bot")
                assert response.status_code == 200
                shards: int = response.json()["shards"]
                return shards

            assert await recommended() == 2
            answer = await http.post(f"{control}/gateway/recommended_shards", json={"shards": 8})
            assert answer.json() == {"shards": 8}
            assert await recommended() == 8
            for bad in ({"shards": 0}, {"shards": "8"}, {}):
                answer = await http.post(f"{control}/gateway/recommended_shards", json=bad)
                assert answer.status_code == 400 and "shards" in answer.json()["error"]
            answer = await http.post(f"{control}/gateway/min_shard_count", json={"count": -1})
            assert answer.status_code == 400 and "count" in answer.json()["error"]
            answer = await http.post(f"{control}/gateway/guild_event_rate", json={"rate": 5})
            assert answer.status_code == 400 and "guild-stream mode" in answer.json()["error"]

            async with open_gateway_client(sim.addresses.gateway_url) as client:
                ready = await client.ready(DEFAULT_TOKEN, (0, 2))
                await client.close()
            answer = await http.post(f"{control}/gateway/min_shard_count", json={"count": 4})
            assert answer.json() == {"min_shard_count": 4}
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.hello()
                await client.identify(DEFAULT_TOKEN, (1, 2))
                await expect_close(client, 4011)
            # Discord refuses new sessions only: the session of 2 shards still resumes.
            async with open_gateway_client(sim.addresses.resume_gateway_url) as client:
                await client.hello()
                await client.resume(DEFAULT_TOKEN, ready["d"]["session_id"], ready["s"])
                await client.recv_until(lambda p: p.get("t") == "RESUMED")
                await client.close()
            async with open_gateway_client(sim.addresses.gateway_url) as client:
                await client.ready(DEFAULT_TOKEN, (1, 4))
                await client.close()
            ledger = sim.gateway.ledger
            assert ledger.counters["identifies_below_min_shard_count"] == 1
            assert ledger.closes_sent["4011"] == 1
            assert ledger.counters["resumes_ok"] == 1 and ledger.counters["identifies_accepted"] == 2
