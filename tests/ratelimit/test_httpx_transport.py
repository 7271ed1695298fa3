"""RatelimitedTransport against the simulator over real sockets: limits kept, 429s handled by scope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from ratelimit.backend import LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.httpx_transport import RatelimitedTransport, RateLimitTimeout, RequestRefused
from ratelimit.model import EngineConfig
from tests.simulator.rest_helpers import AUTH, RestHarness, rest_harness


async def test_concurrent_burst_on_one_channel_draws_no_429() -> None:
    async with rest_harness(latency_ms=5.0) as harness:
        limiter = Ratelimiter(LocalBackend())
        transport = RatelimitedTransport(limiter=limiter)
        statuses: list[int] = []
        async with httpx.AsyncClient(
            transport=transport, base_url=harness.sim.addresses.rest_url, headers=AUTH
        ) as client:

            async def post(n: int) -> None:
                response = await client.post("/channels/1/messages", json={"content": str(n)})
                statuses.append(response.status_code)

            async with trio.open_nursery() as nursery:
                for n in range(12):
                    nursery.start_soon(post, n)
        ledger = await harness.ledger()
        assert statuses == [200] * 12
        assert ledger["by_status"].get("429", 0) == 0, ledger["by_category"]


def client_on(harness: RestHarness, limiter: Ratelimiter, **options: Any) -> httpx.AsyncClient:
    transport = RatelimitedTransport(limiter=limiter, **options)
    return httpx.AsyncClient(transport=transport, base_url=harness.sim.addresses.rest_url, headers=AUTH)


async def test_shared_429_blocks_that_channel_only_and_the_retry_waits_it_out() -> None:
    async with rest_harness() as harness:
        await harness.control("shared", {"method": "POST", "path": "/channels/5/messages", "seconds": 0.6})
        limiter = Ratelimiter(LocalBackend())
        async with client_on(harness, limiter, max_wait_s=5.0) as client:
            start = trio.current_time()
            blocked = await client.post("/channels/5/messages", json={"content": "x"})
            elapsed = trio.current_time() - start
            other = await client.post("/channels/6/messages", json={"content": "y"})
        ledger = await harness.ledger()
        assert blocked.status_code == 200 and other.status_code == 200
        assert elapsed >= 0.5  # retried after the shared block (0.6 s from the control call), not before
        assert ledger["by_category"].get("shared") == 1
        assert limiter.statistics().outcomes["limited:shared"] == 1


async def test_a_wait_beyond_the_maximum_raises_without_sending() -> None:
    async with rest_harness() as harness:
        await harness.control("shared", {"method": "POST", "path": "/channels/5/messages", "seconds": 60})
        limiter = Ratelimiter(LocalBackend())
        async with client_on(harness, limiter, max_wait_s=1.0) as client:
            first = await client.post("/channels/5/messages", json={"content": "x"})
            with pytest.raises(RateLimitTimeout):
                await client.post("/channels/5/messages", json={"content": "x"})
        ledger = await harness.ledger()
        assert first.status_code == 429  # its retry would wait 60 s: Discord's 429 comes back
        assert first.json()["retry_after"] > 59
        assert ledger["total"] == 1  # and the second request never left


async def test_cloudflare_ban_stops_everything_and_counts_as_invalid() -> None:
    async with rest_harness(invalid_request_limit=3, invalid_window_s=60.0) as harness:
        limiter = Ratelimiter(LocalBackend(EngineConfig(ban_s=60.0)))
        await harness.control("forbid", {"major": "9"})
        async with client_on(harness, limiter, max_wait_s=2.0, retries_429=0) as client:
            statuses = [(await client.get("/channels/9/messages")).status_code for _ in range(3)]
            banned = await client.get("/channels/10/messages")  # the simulator bans the IP now
            with pytest.raises(RateLimitTimeout) as caught:
                await client.get("/channels/11/messages")
        assert statuses == [403, 403, 403]
        assert banned.status_code == 429 and "json" not in banned.headers.get("content-type", "")
        assert caught.value.reason == "ban"


async def test_revoked_token_is_refused_after_the_first_401() -> None:
    async with rest_harness() as harness:
        from benchmarks.simulator import DEFAULT_TOKEN

        await harness.control("revoke_token", {"token": DEFAULT_TOKEN})
        limiter = Ratelimiter(LocalBackend())
        async with client_on(harness, limiter) as client:
            first = await client.get("/users/@me")
            with pytest.raises(RequestRefused):
                await client.get("/channels/1/messages")
        ledger = await harness.ledger()
        assert first.status_code == 401 and ledger["total"] == 1


async def test_idempotent_requests_retry_server_errors_and_posts_do_not() -> None:
    async with rest_harness() as harness:
        limiter = Ratelimiter(LocalBackend())
        async with client_on(harness, limiter) as client:
            await harness.control("server_error", {"count": 1, "status": 502})
            fetched = await client.get("/channels/1/messages")
            await harness.control("server_error", {"count": 1, "status": 502})
            posted = await client.post("/channels/1/messages", json={"content": "once"})
        assert fetched.status_code == 200
        assert posted.status_code == 502


async def test_interaction_callbacks_skip_the_saturated_global_limit() -> None:
    async with rest_harness(global_limit=5) as harness:
        limiter = Ratelimiter(LocalBackend(EngineConfig(global_rate=5)))
        waits: list[float] = []
        async with client_on(harness, limiter) as client:
            async with trio.open_nursery() as nursery:
                for channel in range(15):
                    nursery.start_soon(client.get, f"/channels/{100 + channel}/messages")
                await trio.sleep(0.05)  # the global limit is now booked for ~2 s
                for interaction in range(3):
                    start = trio.current_time()
                    response = await client.post(
                        f"/interactions/{900 + interaction}/tok{interaction}/callback", json={"type": 1}
                    )
                    waits.append(trio.current_time() - start)
                    assert response.status_code in (200, 204)
        ledger = await harness.ledger()
        assert max(waits) < 0.5
        assert ledger["by_status"].get("429", 0) == 0, ledger["by_category"]
