"""Helpers for the REST simulator's socket tests: a running simulator and an httpx client on it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx

from benchmarks.simulator import DEFAULT_TOKEN, RestConfig, Simulator, SimulatorConfig, open_simulator

AUTH: Final = {"Authorization": f"Bot {DEFAULT_TOKEN}"}
RESET_FORMAT: Final = re.compile(r"^\d+\.\d{3}$")
#: Windows short enough that refill tests wait well under a second.
FAST_SCALE: Final = 0.2


@dataclasses.dataclass
class RestHarness:
    sim: Simulator
    client: httpx.AsyncClient

    async def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.client.post(f"{self.sim.addresses.control_url}/rest/{action}", json=body or {})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def ledger(self) -> dict[str, Any]:
        response = await self.client.get(f"{self.sim.addresses.control_url}/ledger")
        assert response.status_code == 200
        rest: dict[str, Any] = response.json()["rest"]
        return rest


@asynccontextmanager
async def rest_harness(*, accept_any_token: bool = False, **rest: Any) -> AsyncIterator[RestHarness]:
    """A simulator with `RestConfig(**rest)` (default `bucket_time_scale=FAST_SCALE`) and a client on it."""
    rest.setdefault("bucket_time_scale", FAST_SCALE)
    config = SimulatorConfig(rest=RestConfig(**rest), accept_any_token=accept_any_token)
    async with (
        open_simulator(config) as sim,
        httpx.AsyncClient(base_url=sim.addresses.rest_url, headers=AUTH) as client,
    ):
        yield RestHarness(sim, client)


def limits(response: httpx.Response) -> tuple[int, int, float, str]:
    """(Limit, Remaining, Reset-After, Bucket) of an answer."""
    headers = response.headers
    return (
        int(headers["x-ratelimit-limit"]),
        int(headers["x-ratelimit-remaining"]),
        float(headers["x-ratelimit-reset-after"]),
        headers["x-ratelimit-bucket"],
    )
