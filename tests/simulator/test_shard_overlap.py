"""Two connections serving one shard at once: the ledger's `shard_served_twice` rule, over real sockets.

A connection serves its shard from READY or RESUMED until it ends. Cluster mode moves shards between hosts,
and a hand-over must never leave two connections serving one shard; a RESUME on a new connection is a
correct hand-over (the simulator drops the old connection before RESUMED), two IDENTIFYs are not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator

from .gateway_client import GatewayTestClient, open_gateway_client

TIMEOUT_S = 20


# Two IDENTIFYs of one shard back to back, without waiting out Discord's 5 s per identify key.
pytestmark = pytest.mark.usefixtures("no_identify_interval")


@asynccontextmanager
async def simulator(**gateway: Any) -> AsyncIterator[Simulator]:
    settings: dict[str, Any] = {"heartbeat_interval_ms": 60_000, "max_concurrency": 16, "shard_count": 2}
    settings.update(gateway)
    async with open_simulator(SimulatorConfig(gateway=GatewayConfig(**settings))) as sim:
        yield sim


def counters(sim: Simulator) -> dict[str, Any]:
    """The gateway ledger's counters as the control endpoint and the fault suite see them."""
    result: dict[str, Any] = sim.ledger()["gateway"]["counters"]
    return result


async def closed_code(client: GatewayTestClient) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(10_000):
            await client.recv()
    return info.value.reason.code if info.value.reason is not None else None


async def test_two_identifies_of_one_shard_are_recorded() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            url = sim.addresses.gateway_url
            async with open_gateway_client(url) as first, open_gateway_client(url) as second:
                one = await first.ready(DEFAULT_TOKEN, (1, 2))
                two = await second.ready(DEFAULT_TOKEN, (1, 2))
                await trio.sleep(0.1)  # both serve shard 1 for a while
                await first.close()
                await second.close()
            ledger = sim.gateway.ledger
            assert ledger.rules_broken() == {"shard_served_twice": 1}
            (violation,) = ledger.violations
            assert violation.shard == 1
            assert one["d"]["session_id"] in violation.detail and two["d"]["session_id"] in violation.detail
            snapshot = counters(sim)
            assert snapshot["shard_overlaps"] == 1
            assert 0.1 <= snapshot["shard_overlap_s"] < 5.0
            assert not ledger.serving and not ledger.overlap_since
            # Another shard, or the same shard id of another shard count, is not the same shard.
            async with open_gateway_client(url) as first, open_gateway_client(url) as second:
                await first.ready(DEFAULT_TOKEN, (0, 2))
                await second.ready(DEFAULT_TOKEN, (1, 2))
                await first.close()
                await second.close()
            assert counters(sim)["shard_overlaps"] == 1


async def test_resume_on_a_new_connection_drops_the_old_one_first() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator(event_rate=200) as sim:
            async with open_gateway_client(sim.addresses.gateway_url) as old:
                ready = await old.ready(DEFAULT_TOKEN, (0, 2))
                seen = [await old.recv() for _ in range(20)]
                async with open_gateway_client(sim.addresses.resume_gateway_url) as new:
                    await new.hello()
                    await new.resume(DEFAULT_TOKEN, ready["d"]["session_id"], seen[-1]["s"])
                    await new.recv_until(lambda p: p.get("t") == "RESUMED")
                    # The old connection was closed without a close frame: 1006, a connection to RESUME from.
                    assert await closed_code(old) == 1006
                    assert (await new.recv())["op"] == 0  # the session streams on the new connection
                    (serving,) = sim.gateway.ledger.serving.values()
                    assert serving.session_id == ready["d"]["session_id"]
                    await new.close()
            ledger = sim.gateway.ledger
            assert not ledger.rules_broken()
            snapshot = counters(sim)
            assert snapshot.get("shard_overlaps", 0) == 0 and "shard_overlap_s" not in snapshot
            assert snapshot["sessions_taken_over"] == 1 and snapshot["resumes_ok"] == 1
            assert ledger.closes_sent == {"None": 1}


@pytest.mark.parametrize("leave", ["close", "tcp_drop"])
async def test_sequential_connections_do_not_overlap(leave: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            url = sim.addresses.gateway_url
            for _ in range(3):
                async with open_gateway_client(url) as client:
                    await client.ready(DEFAULT_TOKEN, (0, 2))
                    if leave == "close":
                        await client.close()
                    else:  # the TCP connection goes without a closing handshake
                        await trio.aclose_forcefully(client.ws._stream)
                        await closed_code(client)  # unblocks the client's reader, which holds a message
            ledger = sim.gateway.ledger
            assert ledger.counters["identifies_accepted"] == 3
            assert not ledger.rules_broken()
            assert counters(sim).get("shard_overlaps", 0) == 0


async def test_a_blackholed_connection_no_longer_serves() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            url = sim.addresses.gateway_url
            async with open_gateway_client(url) as dead:
                await dead.ready(DEFAULT_TOKEN, (0, 2))
                await sim.gateway.control("blackhole", {})
                # The server holds the dead TCP connection; the client identifies afresh elsewhere.
                async with open_gateway_client(url) as fresh:
                    await fresh.ready(DEFAULT_TOKEN, (0, 2))
                    await fresh.close()
                await trio.aclose_forcefully(dead.ws._stream)
                await closed_code(dead)
            assert not sim.gateway.ledger.rules_broken()
            assert counters(sim).get("shard_overlaps", 0) == 0


async def test_serving_survives_a_ledger_reset() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            url = sim.addresses.gateway_url
            async with open_gateway_client(url) as first:
                await first.ready(DEFAULT_TOKEN, (1, 2))
                sim.gateway.ledger.reset()
                async with open_gateway_client(url) as second:
                    await second.ready(DEFAULT_TOKEN, (1, 2))
                    await second.close()
                await first.close()
            assert sim.gateway.ledger.rules_broken() == {"shard_served_twice": 1}
            assert counters(sim)["shard_overlaps"] == 1


async def test_one_shard_id_of_two_shard_counts_is_two_shards() -> None:
    """Two generations of a bot at once (a live reshard): shard 0 of 2 and shard 0 of 4 do not overlap, two
    connections on shard 0 of 4 do; control actions tell the generations apart by `shard_count`."""
    with trio.fail_after(TIMEOUT_S):
        async with simulator() as sim:
            url = sim.addresses.gateway_url
            async with (
                open_gateway_client(url) as old,
                open_gateway_client(url) as new,
                open_gateway_client(url) as twin,
            ):
                await old.ready(DEFAULT_TOKEN, (0, 2))
                await new.ready(DEFAULT_TOKEN, (0, 4))
                assert counters(sim).get("shard_overlaps", 0) == 0
                assert not sim.gateway.ledger.rules_broken()
                await twin.ready(DEFAULT_TOKEN, (0, 4))
                assert counters(sim)["shard_overlaps"] == 1
                (violation,) = sim.gateway.ledger.violations
                assert violation.rule == "shard_served_twice" and "shard 0/4" in violation.detail
                # `shard_count` narrows a connection action to one generation.
                asked = await sim.gateway.control("request_heartbeat", {"shard_count": 2})
                assert asked == {"connections": 1}
                assert (await old.recv_until(lambda p: p["op"] == 1))[0]["op"] == 1
                closed = await sim.gateway.control("close", {"shards": [0], "shard_count": 4, "code": 4000})
                assert closed == {"connections": 2}
                assert await closed_code(new) == 4000 and await closed_code(twin) == 4000
                with pytest.raises(ValueError, match="shard_count"):
                    await sim.gateway.control("drop", {"shard_count": 0})
                expired = await sim.gateway.control("expire_sessions", {"shard_count": 2})
                assert expired == {"sessions": 1}
                (session,) = (s for s in sim.gateway.sessions.values() if s.shard_count == 2)
                assert session.invalid
                await old.close()
            assert counters(sim)["shard_overlaps"] == 1
