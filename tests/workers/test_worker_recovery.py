"""Nothing lost across a kill -9 of the worker or a RabbitMQ restart: real processes, RabbitMQ and Redis.

A consumer bound to every event name dedupes on `(shard_id, session_id, seq)` (the headers DESIGN 3.4 adds)
and must end up holding every seq from 1 to the last one the simulator produced, for every session.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from benchmarks.children import stop_process, worker_env
from benchmarks.simulator import GatewayConfig, Simulator, SimulatorConfig, open_simulator
from workers.amqp_bridge import open_amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1/"
EVENT_NAMES = ("READY", "RESUMED", "GUILD_CREATE", "MESSAGE_CREATE", "PRESENCE_UPDATE", "TYPING_START")
TIMEOUT_S = 90


class Received:
    def __init__(self) -> None:
        self.seqs: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.messages = 0

    def missing(self, sim: Simulator) -> dict[str, int]:
        """Per session, how many of its seqs 1..last_seq have not been consumed."""
        gaps = {}
        for session_id, view in sim.gateway.ledger.sessions.items():
            have = self.seqs.get((view.shard_id, session_id), set())
            missing = view.last_seq - len(have & set(range(1, view.last_seq + 1)))
            if missing:
                gaps[session_id] = missing
        return gaps


@asynccontextmanager
async def consuming(group: str) -> AsyncIterator[Received]:
    received = Received()
    async with open_amqp(AMQP_URL) as amqp, trio.open_nursery() as nursery:
        queue = f"{group}:test-all"

        async def consume(task_status: trio.TaskStatus[None]) -> None:
            async with amqp.consume(queue, EVENT_NAMES, group, durable=True) as deliveries:
                task_status.started()
                async for delivery in deliveries:
                    headers = delivery.headers
                    key = (int(headers["shard_id"]), str(headers["session_id"]))
                    received.seqs[key].add(int(headers["seq"]))
                    received.messages += 1
                    await delivery.ack()

        await nursery.start(consume)
        yield received
        nursery.cancel_scope.cancel()


async def start_worker(sim: Simulator, group: str, prefix: str, log: Any) -> trio.Process:
    env = worker_env(
        sim.addresses.rest_url,
        BROKER_TYPE="amqp",
        BROKER_GROUP=group,
        AMQP_URL=AMQP_URL,
        SHARD_STORE_TYPE="redis",
        SHARD_STORE_PREFIX=prefix,
    )
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "workers", "--shard-count", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def attached(sim: Simulator) -> int:
    return sum(1 for view in sim.gateway.ledger.sessions.values() if view.state == "attached")


async def drain_and_check(sim: Simulator, received: Received) -> None:
    """Stop the firehose, then wait until the consumer holds every seq of every session."""
    await sim.gateway.control("event_rate", {"rate": 0})
    await wait_until(lambda: not received.missing(sim), timeout=30)


@pytest.mark.parametrize("compression", ["zlib-stream"])
async def test_kill_9_worker_resumes_every_shard_and_loses_nothing(tmp_path: Any, compression: str) -> None:
    group, prefix = f"test-{secrets.token_hex(4)}", f"test-{secrets.token_hex(4)}"
    config = SimulatorConfig(
        gateway=GatewayConfig(
            shard_count=2, max_concurrency=2, event_rate=150, guilds_per_shard=1, heartbeat_interval_ms=41_250
        )
    )
    with trio.fail_after(TIMEOUT_S), open(tmp_path / "worker.log", "wb") as log:
        async with open_simulator(config) as sim, consuming(group) as received:
            first = await start_worker(sim, group, prefix, log)
            await wait_until(lambda: attached(sim) == 2 and received.messages > 300)
            first.kill()  # SIGKILL: no flush, no close frame
            await first.wait()
            await trio.sleep(0.5)  # events keep coming while no worker runs
            second = await start_worker(sim, group, prefix, log)
            try:
                ledger = sim.gateway.ledger
                await wait_until(lambda: ledger.counters["resumes_ok"] == 2)
                await drain_and_check(sim, received)
                assert ledger.counters["identifies"] == 2  # the new worker identified nothing
                assert len(ledger.sessions) == 2
            finally:
                await stop_process(second, grace_s=15)
            assert second.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to restart the broker")
async def test_rabbitmq_restart_mid_stream_loses_nothing(tmp_path: Any) -> None:
    group, prefix = f"test-{secrets.token_hex(4)}", f"test-{secrets.token_hex(4)}"
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=2, max_concurrency=2, event_rate=100, guilds_per_shard=1)
    )
    with trio.fail_after(TIMEOUT_S), open(tmp_path / "worker.log", "wb") as log:
        async with open_simulator(config) as sim, consuming(group) as received:
            worker = await start_worker(sim, group, prefix, log)
            try:
                await wait_until(lambda: attached(sim) == 2 and received.messages > 200)
                await trio.run_process(["rabbitmqctl", "stop_app"], capture_stdout=True, capture_stderr=True)
                await trio.sleep(2.0)
                await trio.run_process(["rabbitmqctl", "start_app"], capture_stdout=True, capture_stderr=True)
                await trio.run_process(
                    ["rabbitmqctl", "await_startup"], capture_stdout=True, capture_stderr=True
                )
                await drain_and_check(sim, received)
                assert sim.gateway.ledger.counters["identifies"] == 2
            finally:
                await stop_process(worker, grace_s=15)
            assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
