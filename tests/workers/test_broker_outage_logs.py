"""A broker outage in a worker's log: one warning when publishing starts failing, one when it works again,
and none of the AMQP library's internal errors. The outage is a TCP forwarder in front of the machine's
RabbitMQ that the test cuts and restores (restarting the shared broker is the fault suite's job:
`python -m benchmarks faults --only rabbitmq_outage`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import GatewayConfig, SimulatorConfig, open_simulator
from benchmarks.tcp_forwarder import TcpForwarder

TIMEOUT_S = 120
#: Long enough for several of aio-pika's reconnect attempts (one a second) to fail during the outage.
OUTAGE_S = 4.0


def log_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def wait_for_event(log: Path, event: str, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not any(e["event"] == event for e in log_events(log)):
            await trio.sleep(0.1)


async def test_an_outage_is_two_lines(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    forwarder = TcpForwarder(free_port(), 5672)
    config = SimulatorConfig(gateway=GatewayConfig(shard_count=1, max_concurrency=1, event_rate=50))
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(config) as sim, trio.open_nursery() as nursery:
            await nursery.start(forwarder.serve)
            env = worker_env(
                sim.addresses.rest_url,
                BROKER_TYPE="amqp",
                AMQP_URL=f"amqp://guest:guest@127.0.0.1:{forwarder.port}/",
                BROKER_GROUP=f"test-{uuid.uuid4().hex[:12]}",
            )
            with open(log, "wb") as stderr:
                worker = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-count", "1"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stderr=stderr,
                )
            try:
                await wait_for_event(log, "shard.ready")
                # Cut only once the start-up's queue declarations are done: a drop in the middle of them
                # ends the worker (exit 1, and the supervisor's replacement waits for the broker); that is
                # not the outage this test is about.
                await wait_for_event(log, "proxy.amqp_ready")
                forwarder.cut()
                await wait_for_event(log, "publish.broker_unavailable")
                await trio.sleep(OUTAGE_S)
                forwarder.restore()
                await wait_for_event(log, "publish.broker_recovered", timeout=60)
                worker.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    await worker.wait()
            finally:
                if worker.returncode is None:
                    worker.kill()
                nursery.cancel_scope.cancel()
    assert worker.returncode == 0, log.read_text()[-3000:]
    events = log_events(log)
    loud = [(e["logger"], e["event"]) for e in events if e["level"] in ("warning", "error", "critical")]
    assert loud.count(("workers.publish.pump", "publish.broker_unavailable")) == 1, loud
    assert loud.count(("workers.publish.pump", "publish.broker_recovered")) == 1, loud
    assert not [name for name, _ in loud if name.startswith(("aiormq", "aio_pika"))], loud
    assert len(loud) <= 4, loud  # the two, and at most a command consumer's or shard's own note
    assert "Traceback" not in log.read_text()
