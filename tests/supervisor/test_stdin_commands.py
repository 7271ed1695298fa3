"""Commands written to the supervisor's stdin (`BROKER_TYPE=stdio`) reach Discord on their shard, through
the worker that runs it: a real supervisor, two worker processes and the simulator."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any

import orjson
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import GatewayConfig, SimulatorConfig, open_simulator
from benchmarks.simulator.events import guild_ids_for_shard
from tests.supervisor_process import read_lines, running_supervisor, stop_gracefully, wait_ready

TIMEOUT_S = 90
PRESENCE = {"since": None, "activities": [], "status": "online", "afk": False}


def member_request(guild_id: int, nonce: str) -> dict[str, Any]:
    return {"op": 8, "d": {"guild_id": str(guild_id), "query": "a", "limit": 1, "nonce": nonce}}


def send_body(guild_id: int, nonce: str) -> dict[str, Any]:
    return {"guild_id": str(guild_id), "packet": member_request(guild_id, nonce)}


async def test_stdin_commands_reach_their_shard_under_the_supervisor(tmp_path: Path) -> None:
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=2, max_concurrency=2, guilds_per_shard=1, event_rate=0)
    )
    guild = {shard: guild_ids_for_shard(shard, 2, 1)[0] for shard in (0, 1)}
    chunks: dict[str, int] = {}
    log = tmp_path / "supervisor.log"
    port = free_port()
    with trio.fail_after(TIMEOUT_S), open(log, "wb") as log_file:
        async with open_simulator(config) as sim:
            env = worker_env(
                sim.addresses.rest_url, BROKER_TYPE="stdio", PROMETHEUS_ADDRESS=f"127.0.0.1:{port}"
            )
            async with (
                running_supervisor(
                    env, "--workers", "2", log=log_file, stdin=subprocess.PIPE, stdout=subprocess.PIPE
                ) as process,
                trio.open_nursery() as nursery,
            ):
                assert process.stdin is not None and process.stdout is not None
                stdout = process.stdout

                async def read_events() -> None:
                    async with contextlib.aclosing(read_lines(stdout)) as lines:
                        async for line in lines:
                            event = orjson.loads(line)
                            if event["t"] == "GUILD_MEMBERS_CHUNK":
                                chunks[event["d"]["nonce"]] = event["shard"]

                nursery.start_soon(read_events)
                await wait_ready(f"http://127.0.0.1:{port}")
                lines = [
                    {"t": "not a routing key", "d": {}},  # rejected and logged; nothing else stops
                    {"t": "SEND", "d": send_body(guild[1], "s1")},
                    {"t": "SEND", "d": send_body(guild[0], "s0")},
                    {"t": 1, "d": member_request(guild[1], "direct-1")},
                    {"t": "0", "d": member_request(guild[0], "direct-0")},
                    {"t": "1", "d": {"op": 3, "d": PRESENCE}},
                ]
                await process.stdin.send_all(b"".join(orjson.dumps(line) + b"\n" for line in lines))
                expected = {"s1": 1, "s0": 0, "direct-1": 1, "direct-0": 0}
                with trio.fail_after(30):
                    while not all(nonce in chunks for nonce in expected):
                        await trio.sleep(0.05)
                # The simulator answers a member request on the shard that received it.
                assert {nonce: chunks[nonce] for nonce in expected} == expected
                with trio.fail_after(10):
                    while not sim.gateway.ledger.counters["op3_received"]:
                        await trio.sleep(0.05)
                assert not sim.gateway.ledger.rules_broken()
                await process.stdin.aclose()  # end of stdin is not a reason to stop
                await trio.sleep(0.5)
                assert process.returncode is None
                await stop_gracefully(process)
                nursery.cancel_scope.cancel()
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert '"command.rejected"' in text
