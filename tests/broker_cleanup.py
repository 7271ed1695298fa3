"""Remove the queues the test suite declared on the shared RabbitMQ.

Tests use random group names (`test-<hex>`), and the workers declare durable command queues under them
(`test-<hex>:SEND`, `test-<hex>:<shard>`) that outlive the test. Left alone they pile up (a thousand after
a few dozen runs), and every broker restart in the recovery tests and the fault suite then spends seconds
recovering them. At the end of a session the queues named `test-*` go; the broker is the machine's own test
broker (README), so nothing else names its queues that way.
"""

from __future__ import annotations

import shutil
import subprocess

import trio

from workers.amqp_bridge import open_amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1/"
PREFIX = "test-"


def leftover_queues() -> list[str]:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        return []
    listed = subprocess.run(
        [rabbitmqctl, "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60, check=False
    )
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith(PREFIX)]


async def _delete(names: list[str]) -> None:
    async with open_amqp(AMQP_URL) as amqp:
        for name in names:
            await amqp.delete_queue(name)


def drop_test_queues() -> int:
    """Delete every `test-*` queue; how many."""
    names = leftover_queues()
    if names:
        trio.run(_delete, names)
    return len(names)
