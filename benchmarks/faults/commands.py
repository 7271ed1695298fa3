"""Gateway commands for the fault suite: `python -m benchmarks.faults.commands URL EXCHANGE ROUTING_KEY COUNT
BODY`.

Publishes BODY (JSON text, DESIGN 3.5: `{op, d}` for a shard's routing key) COUNT times on EXCHANGE with
ROUTING_KEY, persistent and with publisher confirms, then prints `{"published": COUNT}` and exits. The
queue (`EXCHANGE:ROUTING_KEY`) is declared first (durable, as the workers declare it), so nothing is
unroutable. An asyncio process of its own, like the consumer.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aio_pika


async def publish(url: str, exchange_name: str, routing_key: str, count: int, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(f"{exchange_name}:{routing_key}", durable=True)
        await queue.bind(exchange, routing_key=routing_key)
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await asyncio.gather(*(exchange.publish(message, routing_key) for _ in range(count)))


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    url, exchange, routing_key, count, body = argv
    asyncio.run(publish(url, exchange, routing_key, int(count), body.encode()))
    print(json.dumps({"published": int(count)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
