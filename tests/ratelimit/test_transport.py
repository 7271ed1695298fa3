"""RatelimitedTransport against the simulator over real sockets: limits kept, 429s handled by scope."""

from __future__ import annotations

import httpx
import trio

from ratelimit.backend import LocalBackend
from ratelimit.engine import Ratelimiter
from ratelimit.transport import RatelimitedTransport
from tests.simulator.rest_helpers import AUTH, rest_harness


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
