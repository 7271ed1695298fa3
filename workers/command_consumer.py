"""Commands to the gateway from RabbitMQ (DESIGN 3.5), delivered to the right shard.

Queues, all on exchange `BROKER_GROUP` and durable, so commands published while a worker restarts wait for
it instead of being dropped (the Spectacles gateway consumed neither, see anchors/spectacles.md 1.6):
- `{group}:SEND`, routing key `SEND`: shared by every worker (competing consumers). The body names a guild;
  the shard is `(guild_id >> 22) % shard_count`. A worker that does not run that shard hands the packet on
  through the exchange with the shard id as routing key, where the worker that runs it consumes it.
- `{group}:{shard_id}`, routing key `"{shard_id}"`: one per shard, consumed by the worker running it.

A delivery is acked once its packet was sent to Discord (or handed on), and rejected without requeue, with
the reason logged, when it is malformed or the core refuses it (too large, an op users may not send). When
a shard's command queue is full the delivery is requeued after a pause; nothing else stops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

import orjson
import trio

from .amqp_bridge import Amqp, Delivery
from .commands import GatewayCommand, decode_command
from .config import WorkerConfig
from .errors import CommandRejected
from .publish.base import encode_json_text
from .shard import ShardRunner

LOGGER: Final = logging.getLogger("workers.commands")
SEND_ROUTING_KEY: Final = "SEND"
#: How long a command for a shard whose queue is full waits before it goes back to the broker.
REQUEUE_PAUSE_S: Final = 0.5


def command_queues(config: WorkerConfig) -> dict[str, str]:
    """Queue name -> routing key, for the queues this worker consumes."""
    group = config.settings.broker_group
    queues = {f"{group}:{SEND_ROUTING_KEY}": SEND_ROUTING_KEY}
    queues.update({f"{group}:{shard}": str(shard) for shard in config.shard_ids})
    return queues


async def consume_amqp_commands(
    amqp: Amqp,
    config: WorkerConfig,
    runners: Mapping[int, ShardRunner],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume every command queue of this worker until cancelled; reports once all are subscribed."""
    async with trio.open_nursery() as nursery:
        for queue, routing_key in command_queues(config).items():
            await nursery.start(_consume_queue, amqp, config, runners, queue, routing_key)
        task_status.started()


async def _consume_queue(
    amqp: Amqp,
    config: WorkerConfig,
    runners: Mapping[int, ShardRunner],
    queue: str,
    routing_key: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with amqp.consume(queue, [routing_key], config.settings.broker_group) as deliveries:
        task_status.started()
        async for delivery in deliveries:
            await _handle(amqp, config, runners, delivery)


async def _handle(
    amqp: Amqp, config: WorkerConfig, runners: Mapping[int, ShardRunner], delivery: Delivery
) -> None:
    try:
        command = decode_command(
            delivery.routing_key, delivery.body, config.settings.broker_encoding, config.shard_count
        )
    except CommandRejected as exc:
        LOGGER.warning("command.rejected", extra={"reason": exc.reason, "routing_key": delivery.routing_key})
        await delivery.reject(requeue=False)
        return
    runner = runners.get(command.shard_id)
    if runner is None:
        await _hand_on(amqp, config, command)
        await delivery.ack()
        return

    async def settle(rejection: CommandRejected | None) -> None:
        if rejection is None:
            await delivery.ack()
        else:
            LOGGER.warning("command.rejected", extra={"reason": rejection.reason, "shard": command.shard_id})
            await delivery.reject(requeue=False)

    busy = runner.submit_command(command, settle)
    if busy is not None:
        LOGGER.warning("command.requeued", extra={"reason": busy.reason, "shard": command.shard_id})
        await trio.sleep(REQUEUE_PAUSE_S)
        await delivery.reject(requeue=True)


async def _hand_on(amqp: Amqp, config: WorkerConfig, command: GatewayCommand) -> None:
    """Publish a SEND for a shard another worker runs to that shard's routing key."""
    packet = orjson.dumps({"op": command.op, "d": command.d})
    body, content_type = encode_json_text(packet, config.settings.broker_encoding)
    # Declared first (idempotent), so a packet for a worker that has not started yet waits in its queue
    # rather than being dropped as unroutable.
    routing_key = str(command.shard_id)
    await amqp.declare_queue(
        f"{config.settings.broker_group}:{routing_key}", [routing_key], config.settings.broker_group
    )
    await amqp.publish_raw(
        config.settings.broker_group, str(command.shard_id), body, content_type=content_type
    )
    LOGGER.debug("command.handed_on", extra={"shard": command.shard_id})
