"""RedisIdentifyGate on the real Redis: one schedule for several gates ("hosts"), FIFO, cancellation, outages.

Real time, short intervals (0.2-0.6 s). Grant times are taken with ``trio.current_time()`` when
``wait_for_permit`` returns; per key they must never be closer than the interval, with `SLACK_S` allowed
for scheduling only in that direction (Redis's own timestamps are checked exactly). Each test uses its own
random key prefix on the shared Redis, deleted afterwards. Outages are simulated in front of Redis (a closed
port, and the switchable proxy from test_sessions), so the shared server is never stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

import pytest
import trio

from benchmarks.children import free_port
from ratelimit.redis_client import RedisClient, Script
from supervisor.identify_redis import (
    _GRANT_LUA,
    RedisIdentifyGate,
    budget_key,
    identify_key,
    open_redis_identify_gate,
)
from tests.workers.test_sessions import REDIS_URL, SwitchableProxy, redis_monitor
from tests.workers.test_sessions import Probe as RedisProbe
from workers.identify import IdentifyGate

#: Grants may look this much early on our clock: the task granted first can be scheduled late under load. The
#: exact check is the one on Redis's own timestamps (MONITOR, in `test_two_gates_share_one_schedule_per_key`).
SLACK_S = 0.02
LOGGER = "supervisor.identify_redis"


class Probe(RedisProbe):
    """Direct access to the shared Redis under one test's prefix, and gates on it."""

    def gate(
        self, max_concurrency: int, interval_s: float, url: str = REDIS_URL, **kwargs: Any
    ) -> AbstractAsyncContextManager[RedisIdentifyGate]:
        return open_redis_identify_gate(
            url, prefix=self.prefix, max_concurrency=max_concurrency, interval_s=interval_s, **kwargs
        )


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    async with RedisClient.from_url(REDIS_URL, timeout_s=5.0).closing() as client:
        probe = Probe(client, f"test-identify-{secrets.token_hex(6)}")
        try:
            yield probe
        finally:
            await probe.cleanup()


Grant = tuple[float, str, int]  # (trio time, gate name, shard id)


async def permit(gate: IdentifyGate, name: str, shard_id: int, grants: list[Grant]) -> None:
    await gate.wait_for_permit(shard_id)
    grants.append((trio.current_time(), name, shard_id))


def by_key(grants: list[Grant], max_concurrency: int) -> dict[int, list[float]]:
    times: dict[int, list[float]] = {}
    for at, _, shard_id in sorted(grants):
        times.setdefault(shard_id % max_concurrency, []).append(at)
    return times


def assert_spaced(grants: list[Grant], max_concurrency: int, interval_s: float) -> None:
    """No key granted twice within the interval, whichever gate granted it."""
    for key, times in by_key(grants, max_concurrency).items():
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= interval_s - SLACK_S for gap in gaps), (key, gaps)


LUA_COMMAND = re.compile(r'^\+?(\d+\.\d+) \[\d+ lua\] "(\w+)" "([^"]*)"')


def server_grant_times(monitor_lines: list[str], prefix: str) -> dict[str, list[float]]:
    """Redis's own timestamps of the SETs that took an identify key, from MONITOR: a SET that found the key
    taken is followed, in the same script, by a PTTL of that key (scripts run atomically, so nothing else
    comes between)."""
    commands = [(float(m[1]), m[2].upper(), m[3]) for line in monitor_lines if (m := LUA_COMMAND.match(line))]
    grants: dict[str, list[float]] = {}
    for index, (at, command, key) in enumerate(commands):
        if command != "SET" or not key.startswith(f"{{{prefix}}}:identify:"):
            continue
        following = commands[index + 1] if index + 1 < len(commands) else None
        if following is None or following[1:] != ("PTTL", key):
            grants.setdefault(key, []).append(at)
    return grants


def events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(record.message == name for record in caplog.records)


# -- one schedule across gates -------------------------------------------------------------------------------


async def test_a_grant_is_a_key_with_the_interval_as_px(probe: Probe) -> None:
    with trio.fail_after(5):
        async with probe.gate(4, 0.5) as gate:
            gate_protocol: IdentifyGate = gate  # mypy checks that it keeps the protocol
            await gate_protocol.wait_for_permit(7)  # key 3
            key = identify_key(probe.prefix, 3)
            assert key == f"{{{probe.prefix}}}:identify:3"
            assert 400 < await probe.call("PTTL", key) <= 500
            owner: bytes = await probe.call("GET", key)
            assert owner.decode().startswith(f"{socket.gethostname()}:")
            assert await probe.call("EXISTS", identify_key(probe.prefix, 0)) == 0
            stats = gate.statistics()
            assert (stats.granted, stats.waiting, stats.redis_calls, stats.redis_available) == (1, 0, 1, True)


async def test_two_gates_share_one_schedule_per_key(probe: Probe) -> None:
    interval, grants = 0.3, list[Grant]()
    with trio.fail_after(10):
        async with redis_monitor() as monitor, probe.gate(2, interval) as a, probe.gate(2, interval) as b:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for shard_id in range(8):  # 4 per key on each gate: 8 grants per key in all
                    nursery.start_soon(permit, a, "a", shard_id, grants)
                    nursery.start_soon(permit, b, "b", shard_id, grants)
            calls = (a.statistics().redis_calls, b.statistics().redis_calls)
            marker = f"marker-{probe.prefix}"
            await probe.call("ECHO", marker)
            monitor_lines = await monitor.read_until(marker)
    assert len(grants) == 16
    assert_spaced(grants, 2, interval)
    for times in by_key(grants, 2).values():
        assert len(times) == 8
        assert times[0] - start < 0.25
        # Each waiter sleeps the PTTL it was told, plus a few ms: no coarse polling, no lost intervals.
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert max(gaps) < interval + 0.2, gaps
    # About one call per interval and key on each gate (a call may find the key a ms early and ask again);
    # polling every 10 ms would be about 50 per gate.
    assert all(count <= 24 for count in calls), calls
    # The same rule on Redis's own clock, which no client's scheduling delays can blur.
    server = server_grant_times(monitor_lines, probe.prefix)
    assert sorted(server) == [identify_key(probe.prefix, 0), identify_key(probe.prefix, 1)]
    for times in server.values():
        assert len(times) == 8
        assert all(later - earlier >= interval - SLACK_S for earlier, later in itertools.pairwise(times))


async def test_different_keys_are_granted_in_parallel(probe: Probe) -> None:
    interval, grants = 0.4, list[Grant]()
    with trio.fail_after(10):
        async with probe.gate(4, interval) as a, probe.gate(4, interval) as b:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for shard_id in range(4):
                    nursery.start_soon(permit, a, "a", shard_id, grants)
                    nursery.start_soon(permit, b, "b", shard_id + 4, grants)
    assert_spaced(grants, 4, interval)
    first_wave = sorted(grants)[:4]
    assert {shard_id % 4 for _, _, shard_id in first_wave} == {0, 1, 2, 3}
    assert all(at - start < interval / 2 for at, _, _ in first_wave)
    assert all(at - start < interval + 0.25 for at, _, _ in grants)


async def test_fifo_within_a_gate(probe: Probe) -> None:
    interval, grants = 0.2, list[Grant]()
    with trio.fail_after(10):
        async with probe.gate(1, interval) as gate, trio.open_nursery() as nursery:
            for shard_id in [5, 2, 9, 0, 7]:
                nursery.start_soon(permit, gate, "a", shard_id, grants)
                await trio.sleep(0.01)  # queued in this order
    assert [shard_id for _, _, shard_id in grants] == [5, 2, 9, 0, 7]
    assert_spaced(grants, 1, interval)


# -- budget and key order ------------------------------------------------------------------------------------


async def test_budget_is_shared_and_spent_in_key_order(probe: Probe) -> None:
    grants = list[Grant]()
    with trio.fail_after(10):
        async with probe.gate(4, 0.3) as a, probe.gate(4, 0.3) as b:
            await a.set_budget(0, reset_after_s=100.0)
            async with trio.open_nursery() as nursery:
                for shard_id in [7, 6, 5, 4]:  # keys 3, 2, 1, 0
                    nursery.start_soon(permit, a, "a", shard_id, grants)
                await trio.sleep(0.2)
                assert grants == [] and a.statistics().waiting == 4
                # Four keys free at once with budget for two: the lowest keys win.
                await a.set_budget(2, reset_after_s=100.0)
                await trio.sleep(0.2)
                assert sorted(shard_id for _, _, shard_id in grants) == [4, 5]
                assert await probe.call("GET", budget_key(probe.prefix)) == b"0"
                assert a.statistics().budget_remaining == 0
                with trio.move_on_after(0.3) as scope:
                    await b.wait_for_permit(
                        8
                    )  # key 0 is free again by now, but the budget is spent everywhere
                assert scope.cancelled_caught
                assert b.statistics().budget_remaining == 0
                nursery.cancel_scope.cancel()


async def test_budget_reserve_and_reset(probe: Probe) -> None:
    with trio.fail_after(10):
        async with probe.gate(2, 0.2, budget_reserve=1) as gate:
            await gate.set_budget(2, reset_after_s=0.4)
            start = trio.current_time()
            await gate.wait_for_permit(0)  # 2 -> 1
            assert trio.current_time() - start < 0.1
            await gate.wait_for_permit(1)  # 1 is the reserve: waits for the reset, when the counter expires
            waited = trio.current_time() - start
            assert 0.4 - SLACK_S <= waited < 0.4 + 0.15
            assert gate.statistics().budget_remaining is None  # unknown after the reset
            assert await probe.call("EXISTS", budget_key(probe.prefix)) == 0


# -- cancellation --------------------------------------------------------------------------------------------


async def test_cancelled_waiter_consumes_nothing(probe: Probe) -> None:
    interval, grants = 0.4, list[Grant]()
    key = identify_key(probe.prefix, 0)
    with trio.fail_after(10):
        async with probe.gate(1, interval) as a, probe.gate(1, interval) as b:
            await permit(a, "a", 0, grants)
            owner = await probe.call("GET", key)
            with trio.move_on_after(0.1) as scope:
                await a.wait_for_permit(1)  # the head, waiting for the key
            assert scope.cancelled_caught
            assert await probe.call("GET", key) == owner
            await permit(b, "b", 2, grants)
            stats = a.statistics()
    # Shard 1 took nothing: the next grant comes one interval after shard 0's, not two.
    assert [shard_id for _, _, shard_id in grants] == [0, 2]
    assert interval - SLACK_S <= grants[1][0] - grants[0][0] < interval + 0.1
    assert (stats.granted, stats.wasted_grants, stats.waiting) == (1, 0, 0)


async def test_cancelled_before_waiting_is_never_queued(probe: Probe) -> None:
    with trio.fail_after(5):
        async with probe.gate(1, 0.3) as gate:
            with trio.CancelScope() as scope:
                scope.cancel()
                await gate.wait_for_permit(0)
            assert scope.cancelled_caught
            stats = gate.statistics()
            assert (stats.waiting, stats.granted, stats.redis_calls) == (0, 0, 0)
            start = trio.current_time()
            await gate.wait_for_permit(0)
            assert trio.current_time() - start < 0.1


async def test_grant_to_a_waiter_cancelled_in_that_instant_goes_to_the_next(
    probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval, grants = 0.3, list[Grant]()
    with trio.fail_after(10):
        async with probe.gate(1, interval) as gate, trio.open_nursery() as nursery:
            await permit(gate, "a", 0, grants)
            victim = trio.CancelScope()

            async def victim_waits() -> None:
                with victim:
                    await permit(gate, "a", 1, grants)

            nursery.start_soon(victim_waits)
            await trio.sleep(0.05)
            nursery.start_soon(permit, gate, "a", 2, grants)
            await trio.sleep(0.05)
            grant = gate._grant

            def cancel_then_grant(key: int, now: float) -> None:
                victim.cancel()  # Cancelled is delivered to the victim before it can see the grant
                grant(key, now)

            monkeypatch.setattr(gate, "_grant", cancel_then_grant)
    assert victim.cancelled_caught
    assert [shard_id for _, _, shard_id in grants] == [0, 2]
    assert interval - SLACK_S <= grants[1][0] - grants[0][0] < interval + 0.1
    assert (gate.statistics().granted, gate.statistics().wasted_grants) == (2, 0)


async def test_closing_wakes_waiters(probe: Probe) -> None:
    with trio.fail_after(5):
        async with probe.gate(1, 10.0) as gate:
            await gate.wait_for_permit(0)
            async with trio.open_nursery() as nursery:

                async def waits() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await gate.wait_for_permit(1)

                nursery.start_soon(waits)
                await trio.sleep(0.05)
                gate.close()
        with pytest.raises(trio.ClosedResourceError):
            await gate.wait_for_permit(2)


# -- outages -------------------------------------------------------------------------------------------------


async def test_redis_refusing_connections_falls_back_to_local_grants(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    interval, grants = 0.3, list[Grant]()
    url = f"redis://127.0.0.1:{free_port()}/0"
    with trio.fail_after(10):
        async with open_redis_identify_gate(
            url, prefix="unused", max_concurrency=2, interval_s=interval
        ) as gate:
            async with trio.open_nursery() as nursery:
                for shard_id in range(6):
                    nursery.start_soon(permit, gate, "a", shard_id, grants)
            while events(caplog, "identify_gate.redis_probe_failed") < 2:
                await trio.sleep(0.05)
            stats = gate.statistics()
    assert len(grants) == 6
    assert_spaced(grants, 2, interval)
    assert not stats.redis_available and stats.local_grants == 6
    assert events(caplog, "identify_gate.redis_unavailable") == 1  # once, however often the probe fails


async def test_outage_then_recovery(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    interval, grants = 0.6, list[Grant]()
    proxy = SwitchableProxy()
    proxy.set_up(True)
    key = identify_key(probe.prefix, 0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
            url = f"redis://127.0.0.1:{listener.socket.getsockname()[1]}/0"
            async with probe.gate(1, interval, url=url) as a, probe.gate(1, interval) as b:
                await a.set_budget(10, reset_after_s=100.0)
                await permit(a, "a", 0, grants)  # through Redis
                proxy.set_up(False)
                await permit(a, "a", 1, grants)  # locally, still an interval after its own Redis grant
                assert not a.statistics().redis_available and a.statistics().local_grants == 1
                proxy.set_up(True)
                while not a.statistics().redis_available:
                    await trio.sleep(0.02)
                # Back on Redis, A first wrote its local grant there, so the other gate honours it.
                assert (
                    trio.current_time() < grants[1][0] + interval - 0.1
                )  # (else the check below proves nothing)
                assert await probe.call("PTTL", key) > 0
                assert await probe.call("GET", budget_key(probe.prefix)) == b"8"  # one Redis, one local grant
                await permit(b, "b", 2, grants)
                await permit(a, "a", 3, grants)
            nursery.cancel_scope.cancel()
    assert [shard_id for _, _, shard_id in grants] == [0, 1, 2, 3]
    assert_spaced(grants, 1, interval)
    assert events(caplog, "identify_gate.redis_unavailable") == 1
    assert events(caplog, "identify_gate.redis_recovered") == 1


# -- the script and the arguments ----------------------------------------------------------------------------


async def test_script_recognises_its_own_grant_when_retried(probe: Probe) -> None:
    script = Script(_GRANT_LUA)
    keys = [budget_key(probe.prefix), identify_key(probe.prefix, 0), identify_key(probe.prefix, 1)]

    async def run(owner: str) -> list[int]:
        with trio.fail_after(5):
            result = await script(probe.client, keys, [owner, "5000", "0"])
        assert isinstance(result, list)
        return [value for value in result if isinstance(value, int)]

    await probe.call("SET", budget_key(probe.prefix), 5, "PX", 100_000)
    first = await run("host:1:abc:1")
    assert first[0] == 3 and 99_000 < first[1] <= 100_000 and first[2:] == [0, 0]
    assert (await run("host:1:abc:1"))[0::2] == [3, 0]  # the same call again: still granted, no budget spent
    other = await run("host:1:abc:2")
    assert other[0] == 3 and all(4_900 < wait <= 5_000 for wait in other[2:])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prefix": "a{b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"interval_s": math.nan}, "interval_s"),
        ({"budget_reserve": -1}, "budget_reserve"),
        ({"pool_size": 0}, "pool_size"),
    ],
)
async def test_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"prefix": "p", "max_concurrency": 1, **arguments}
    with pytest.raises(ValueError, match=message):
        async with open_redis_identify_gate(REDIS_URL, **kwargs):
            pass


async def test_bad_shard_id_and_budget(probe: Probe) -> None:
    async with probe.gate(1, 0.3) as gate:
        with pytest.raises(ValueError, match="shard_id"):
            await gate.wait_for_permit(-1)
        with pytest.raises(ValueError, match="remaining"):
            await gate.set_budget(-1, 10.0)
