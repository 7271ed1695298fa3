"""Per-shard visibility from a real supervisor against the simulator: `/shards`, the per-shard gauges, the
build-info metric, and `discord_events_published_total` never ahead of `..._received_total`."""

from __future__ import annotations

import os
import platform
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import GatewayConfig, SimulatorConfig, open_simulator
from supervisor.shard_status import build_version
from tests.supervisor_process import running_supervisor, stop_gracefully

TIMEOUT_S = 90


def metric_value(text: str, sample: str) -> float | None:
    """The value of the sample line that starts with `sample` (name and labels, exactly)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def get(base: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(base + path)


async def test_shards_endpoint_per_shard_gauges_and_published_never_ahead_of_received(tmp_path: Path) -> None:
    config = SimulatorConfig(
        gateway=GatewayConfig(
            shard_count=3, max_concurrency=3, guilds_per_shard=1, event_rate=100, heartbeat_interval_ms=500
        )
    )
    log = tmp_path / "supervisor.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with trio.fail_after(TIMEOUT_S), open(log, "wb") as log_file:
        async with open_simulator(config) as sim:
            env = worker_env(
                sim.addresses.rest_url, BROKER_TYPE="stdio", PROMETHEUS_ADDRESS=f"127.0.0.1:{port}"
            )
            # stdout: /dev/null takes the events, published (and confirmed) as they are written.
            async with running_supervisor(env, "--workers", "2", log=log_file) as process:
                rows = await _wait_for_rows(base, lambda rows: all(r["latency_s"] is not None for r in rows))
                assert [row["shard"] for row in rows] == [0, 1, 2]
                assert {row["state"] for row in rows} == {"ready"}
                assert {row["node"] for row in rows} == {socket.gethostname()}
                assert {row["worker"] for row in rows} == {0, 1}
                assert all(row["seq"] >= 1 and row["session_age_s"] >= 0 for row in rows)

                # Published is counted with received, from one snapshot: no scrape sees it ahead.
                for _ in range(15):
                    text = (await get(base, "/metrics")).text
                    received = metric_value(text, "discord_events_received_total") or 0.0
                    published = metric_value(text, "discord_events_published_total") or 0.0
                    assert published <= received, (published, received)
                    await trio.sleep(0.2)
                assert published > 0

                async def gauges_set() -> str | None:
                    text = (await get(base, "/metrics")).text
                    ready = metric_value(text, 'discord_shard_state{shard="2",state="ready"}')
                    return (
                        text if ready == 1.0 and 'discord_shard_latency_seconds{shard="2"}' in text else None
                    )

                text = await _wait_for(gauges_set)
                assert 0.0 <= (metric_value(text, 'discord_shard_latency_seconds{shard="0"}') or -1) < 10
                labels = f'python="{platform.python_version()}",version="{build_version()}"'
                build = f"discord_gateway_build_info{{{labels}}}"
                assert metric_value(text, build) == 1.0, [
                    line for line in text.splitlines() if "build" in line
                ]

                # A replaced worker RESUMEs, and its shards keep their session's age.
                owner = next(row for row in rows if row["shard"] == 0)
                os.kill(owner["pid"], signal.SIGKILL)

                def resumed(now: list[dict[str, Any]]) -> bool:
                    row = now[0]
                    return (
                        row["pid"] != owner["pid"]
                        and row["state"] == "ready"
                        and row["session_age_s"] is not None
                    )

                after = await _wait_for_rows(base, resumed)
                assert after[0]["session_age_s"] >= owner["session_age_s"]
                assert sim.gateway.ledger.counters["identifies"] == 3  # resumed, not identified again
                await stop_gracefully(process)
    assert process.returncode == 0, log.read_text()[-3000:]


async def _wait_for(probe: Any, timeout: float = 40.0) -> Any:
    with trio.fail_after(timeout):
        while True:
            try:
                result = await probe()
            except httpx.HTTPError:
                result = None
            if result:
                return result
            await trio.sleep(0.1)


async def _wait_for_rows(base: str, predicate: Any) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = (await get(base, "/shards")).json()
        return rows if rows and predicate(rows) else None

    result: list[dict[str, Any]] = await _wait_for(probe)
    return result
