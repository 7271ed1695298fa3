"""The reshard suite's consumer: `python -m benchmarks.reshard_consumer URL EXCHANGE EVENTS_PATH SHARDS`.

An asyncio process of its own (aio-pika), like the fault suite's consumer (`benchmarks.faults.consumer`),
but keyed by the event, not by the session: during a live reshard two generations of shards receive the same
guild events under different sessions and seqs, so `(shard, session, seq)` cannot tell a duplicate. Each
guild event of the simulator's guild stream is a MESSAGE_CREATE whose `id` is unique to it
(benchmarks/simulator/guild_ledger.py), so the consumer records, for every MESSAGE_CREATE it receives, the
`id`, the wall time it was received and the `shard_id` header, and the suite audits those against the
simulator's guild ledger (`audit_guild_events`: lost, duplicates, unknown, the longest gap of one guild).

It binds one queue (expiring a minute after it is left unused, so a killed consumer leaves nothing behind)
to MESSAGE_CREATE on EXCHANGE (the workers publish with `BROKER_ENCODING=json`: the body is the event's
`d`), prints one JSON line (`{"ready": true}`) on stdout once bound, and every `SNAPSHOT_INTERVAL_S` appends
what it received since to EVENTS_PATH, one line per event: `id<TAB>receive time<TAB>shard_id`. A reader
takes whole lines only (the last may be partial). On SIGTERM it writes what is left, then deletes what the
run left on the shared broker: its queue, the workers' command queues (`EXCHANGE:<shard>` for every shard
below SHARDS, the larger generation's count, and `EXCHANGE:SEND`) and the exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Final, TextIO

import aio_pika
import orjson

from benchmarks.faults.consumer import PREFETCH, QUEUE_EXPIRES_MS, RECONNECT_INTERVAL_S, SNAPSHOT_INTERVAL_S

__all__ = ["EVENT_NAME", "main", "parse_events"]

#: The guild stream's dispatch name (guild_stream.py).
EVENT_NAME: Final = "MESSAGE_CREATE"


class EventLog:
    """What was received since the last flush, appended to the events file on each flush."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.pending: list[str] = []
        self.received = 0
        self.unreadable = 0

    def record(self, body: bytes, shard: object) -> None:
        received_at = time.time()
        self.received += 1
        try:
            key = orjson.loads(body)["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.unreadable += 1
            return
        self.pending.append(f"{key}\t{received_at:.6f}\t{shard}\n")

    def flush(self) -> None:
        if self.pending:
            self.out.write("".join(self.pending))
            self.pending.clear()
        self.out.flush()


def parse_events(text: str) -> list[tuple[str, float, int | None]]:
    """`(id, receive time, shard_id)` of every whole line of an events file, in the order received."""
    events: list[tuple[str, float, int | None]] = []
    for line in text.split("\n")[:-1]:  # the part after the last newline may be half written
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        key, received_at, shard = parts
        events.append((key, float(received_at), int(shard) if shard.isdecimal() else None))
    return events


async def consume(url: str, exchange_name: str, events_path: Path, shards: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(url, reconnect_interval=RECONNECT_INTERVAL_S)
    with open(events_path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - a local file, flushed in bulk
        log = EventLog(out)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            exchange = await channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await channel.declare_queue(
                f"{exchange_name}:reshard-consumer", durable=True, arguments={"x-expires": QUEUE_EXPIRES_MS}
            )
            await queue.bind(exchange, routing_key=EVENT_NAME)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                log.record(message.body, (message.headers or {}).get("shard_id"))
                await message.ack()

            await queue.consume(on_message)
            print(json.dumps({"ready": True, "queue": queue.name}), flush=True)
            while not stop.is_set():
                log.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SNAPSHOT_INTERVAL_S)
            log.flush()
            await queue.delete(if_unused=False, if_empty=False)
            for suffix in [*map(str, range(shards)), "SEND"]:
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(f"{exchange_name}:{suffix}")
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await exchange.delete()
        print(
            json.dumps({"received": log.received, "unreadable": log.unreadable}), file=sys.stderr, flush=True
        )


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(consume(argv[0], argv[1], Path(argv[2]), int(argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
