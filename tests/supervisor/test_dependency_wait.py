"""A supervisor started before RabbitMQ or Redis is up waits for it (workers.dependencies): it keeps running,
logs one clear warning naming the redacted URL, is live but not ready on /readyz, and becomes ready without a
restart once the dependency answers. "Not up yet" is a loopback port where nothing listens; "up" is a TCP
forwarder started there, in front of the machine's real RabbitMQ (5672) or Redis (6379)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import open_simulator
from benchmarks.tcp_forwarder import TcpForwarder
from tests.supervisor.test_supervisor import gateway, ready, supervisor, wait_until

TIMEOUT_S = 120
#: Longer than the crash-loop cap used to take to end the supervisor (about 3 s) on this loaded machine.
OUTLIVES_CRASH_LOOP_S = 6.0


def log_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def readyz(base: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(base + "/readyz")
        body: dict[str, Any] = response.json()
        return response.status_code, body


async def dependency_up(base: str, dependency: str) -> float | None:
    async with httpx.AsyncClient() as http:
        text = (await http.get(base + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'discord_dependency_up{{dependency="{dependency}"}}'):
            return float(line.split()[-1])
    return None


@pytest.mark.parametrize("dependency", ["amqp", "redis"])
async def test_waits_for_a_dependency_that_is_not_up_yet(tmp_path: Path, dependency: str) -> None:
    log = tmp_path / "supervisor.log"
    port = free_port()
    if dependency == "amqp":
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        env = {"BROKER_TYPE": "amqp", "AMQP_URL": url, "BROKER_GROUP": f"test-{uuid.uuid4().hex[:12]}"}
        target = 5672
    else:
        url = f"redis://127.0.0.1:{port}"
        env = {
            "SHARD_STORE_TYPE": "redis",
            "REDIS_URL": url,
            "SHARD_STORE_PREFIX": f"t{uuid.uuid4().hex[:12]}",
        }
        target = 6379
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_simulator(gateway(shard_count=2)) as sim,
            supervisor(sim, log, **env) as (process, base),
            trio.open_nursery() as nursery,
        ):

            async def warned() -> bool:
                return any(e["event"] == "dependency.waiting" for e in log_events(log))

            await wait_until(warned, timeout=60)
            status, body = await readyz(base)
            assert status == 503 and body["detail"]["waiting_for"] == dependency, body
            assert await dependency_up(base, dependency) == 0.0
            await trio.sleep(OUTLIVES_CRASH_LOOP_S)
            assert process.returncode is None, log.read_text()[-3000:]
            assert (await readyz(base))[0] == 503

            forwarder = TcpForwarder(port, target)
            await nursery.start(forwarder.serve)
            up_at = trio.current_time()

            async def all_ready() -> bool:
                return await ready(base)

            await wait_until(all_ready, timeout=60)
            assert await dependency_up(base, dependency) == 1.0, log.read_text()[-3000:]
            waited_s = trio.current_time() - up_at + OUTLIVES_CRASH_LOOP_S + 30
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()
    assert process.returncode == 0, log.read_text()[-3000:]
    events = log_events(log)
    names = [e["event"] for e in events]
    waiting = [e for e in events if e["event"] == "dependency.waiting"]
    print(log.read_text()[-6000:])  # shown when an assertion below fails
    # The first failure at once, then at most one every 30 s.
    assert 1 <= len(waiting) <= 1 + waited_s // 30, waiting
    assert waiting[0]["level"] == "warning" and waiting[0]["dependency"] == dependency
    assert waiting[0]["setting"] in ("AMQP_URL", "REDIS_URL")
    # Redacted (for AMQP the filter also hides "guest" as a user, since it is the password too).
    assert waiting[0]["url"].endswith(f"127.0.0.1:{port}/" if dependency == "amqp" else f"127.0.0.1:{port}")
    assert "guest:guest" not in log.read_text()
    assert names.count("dependency.up") == 1
    assert "worker.restarting" not in names and "supervisor.crash_loop" not in names
    assert names.index("dependency.up") < names.index("worker.started")
    assert "Traceback" not in log.read_text()
    assert names[-1] == "supervisor.stopped" and events[-1]["status"] == 0


async def test_a_stop_while_waiting_is_clean(tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_simulator(gateway(shard_count=1)) as sim,
            supervisor(sim, log, BROKER_TYPE="amqp", AMQP_URL=url) as (process, _),
        ):

            async def warned() -> bool:
                return any(e["event"] == "dependency.waiting" for e in log_events(log))

            await wait_until(warned)
            process.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                await process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    names = [e["event"] for e in log_events(log)]
    assert "worker.started" not in names and names[-1] == "supervisor.stopped"
    assert "Traceback" not in log.read_text()


async def test_a_worker_waits_for_the_broker_too(tmp_path: Path) -> None:
    """A worker started while RabbitMQ is away (a restart during an outage) waits instead of exiting 1, and a
    SIGTERM while it waits is a clean stop."""
    log = tmp_path / "worker.log"
    port = free_port()
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(gateway(shard_count=1)) as sim, trio.open_nursery() as nursery:
            env = worker_env(
                sim.addresses.rest_url,
                BROKER_TYPE="amqp",
                AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
                BROKER_GROUP=f"test-{uuid.uuid4().hex[:12]}",
            )
            with open(log, "wb") as stderr:
                worker = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-count", "1"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stderr=stderr,
                )

            async def said(event: str) -> bool:
                return any(e["event"] == event for e in log_events(log))

            await wait_until(lambda: said("dependency.waiting"))
            await nursery.start(TcpForwarder(port, 5672).serve)
            await wait_until(lambda: said("dependency.up"))
            worker.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await worker.wait()
            nursery.cancel_scope.cancel()
    assert worker.returncode == 0, log.read_text()[-3000:]
