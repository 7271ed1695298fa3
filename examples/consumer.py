"""A bot's side of trio-shard-gateway in Python: consume events from RabbitMQ and send a gateway command.

    pip install aio-pika msgpack
    python examples/consumer.py --group gateway          # BROKER_GROUP of the gateway

Events (README "Gateway workers", DESIGN 3.4): the gateway publishes every dispatch on the direct exchange
`BROKER_GROUP`, with the event name as routing key and only the dispatch's `d` as body. In the default
encoding, `spectacles`, the body is a MessagePack *string* whose bytes are the JSON text of `d`: unpack it,
then parse the JSON. Headers `shard_id`, `seq` and `session_id` say where it came from; delivery is at least
once, so a consumer drops the copies it has already seen by `(shard_id, session_id, seq)`.

Commands (DESIGN 3.5): publish `{"guild_id": ..., "packet": {"op": ..., "d": ...}}` with routing key `SEND`
on the same exchange, in the same encoding; the gateway sends the packet on the shard that holds the guild.
This example asks for a member of every guild it sees (op 8, REQUEST_GUILD_MEMBERS) and prints the
GUILD_MEMBERS_CHUNK that answers it.

Queues follow the `@spectacles/brokers` convention, `group:subgroup:EVENT`, durable, so events wait for a
bot that restarts. Plain asyncio: this is your bot's code, not the gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from typing import Any

import aio_pika
import msgpack

EVENTS = ("GUILD_CREATE", "MESSAGE_CREATE", "GUILD_MEMBERS_CHUNK")


def decode_event(body: bytes) -> Any:
    """A `spectacles`-encoded body: a MessagePack string holding the JSON text of the dispatch's `d`."""
    text = msgpack.unpackb(body, raw=False)
    return json.loads(text)


def encode_command(guild_id: str, op: int, d: Any) -> bytes:
    """A SEND command in the `spectacles` encoding: the body's JSON text, packed as a MessagePack string."""
    packed: bytes = msgpack.packb(json.dumps({"guild_id": guild_id, "packet": {"op": op, "d": d}}))
    return packed


async def run(amqp_url: str, group: str, subgroup: str, max_events: int) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        # The gateway declares the same exchange; declaring it here too lets the bot start first.
        exchange = await channel.declare_exchange(group, aio_pika.ExchangeType.DIRECT, durable=True)
        seen: set[tuple[int, str, int]] = set()
        received = 0
        done = asyncio.Event()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            async with message.process():
                headers = message.headers
                key = (int(str(headers["shard_id"])), str(headers["session_id"]), int(str(headers["seq"])))
                if key in seen:
                    return  # a redelivered copy (at-least-once delivery)
                seen.add(key)
                data = decode_event(message.body)
                name = message.routing_key or ""
                print(f"shard {key[0]} seq {key[2]} {name} {summary(name, data)}", flush=True)
                if name == "GUILD_CREATE":
                    request = {
                        "guild_id": data["id"],
                        "query": "",
                        "limit": 1,
                        "nonce": f"example-{data['id']}",
                    }
                    await exchange.publish(
                        aio_pika.Message(encode_command(data["id"], 8, request)), routing_key="SEND"
                    )
                received += 1
                if max_events and received >= max_events:
                    done.set()

        for event in EVENTS:
            queue = await channel.declare_queue(f"{group}:{subgroup}:{event}", durable=True)
            await queue.bind(exchange, routing_key=event)
            await queue.consume(on_event)
        print(f"consuming {', '.join(EVENTS)} from exchange {group!r}", flush=True)
        await done.wait()


def summary(name: str, data: Any) -> str:
    if name == "GUILD_CREATE":
        return f"guild {data['id']} {data.get('name', '')!r}"
    if name == "MESSAGE_CREATE":
        return f"channel {data['channel_id']}: {data.get('content', '')[:40]!r}"
    if name == "GUILD_MEMBERS_CHUNK":
        return f"guild {data['guild_id']}: {len(data['members'])} member(s), nonce {data.get('nonce')}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/"))
    parser.add_argument("--group", default=os.environ.get("BROKER_GROUP", "gateway"), help="BROKER_GROUP")
    parser.add_argument("--subgroup", default="example", help="this bot's part of the queue names")
    parser.add_argument("--max-events", type=int, default=0, help="stop after this many events (0: never)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        asyncio.run(run(args.amqp_url, args.group, args.subgroup, args.max_events))


if __name__ == "__main__":
    main()
