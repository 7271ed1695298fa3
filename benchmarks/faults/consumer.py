"""The fault suite's event consumer: `python -m benchmarks.faults.consumer URL EXCHANGE STATE_PATH SHARDS`.

An asyncio process of its own (aio-pika), so nothing the suite does to the workers or to its own trio loop
can slow it. It binds one durable queue to every dispatch name the simulator sends, deduplicates on the
`(shard_id, session_id, seq)` headers (seq restarts with every IDENTIFY, anchors gateway.md D2) and every
`SNAPSHOT_INTERVAL_S` replaces `STATE_PATH` with a JSON snapshot: per session its shard, distinct seqs,
highest seq and the holes below it (as ranges), per shard the wall time of the last *new* event, and the
duplicate count. The suite judges loss against the simulator's ledger from those snapshots.

It prints one JSON line (`{"ready": true}`) on stdout once its queue is bound, and reconnects (aio-pika's
robust connection) when RabbitMQ restarts; its queue is durable and the workers publish persistent
messages, so what is published while it reconnects waits for it. On SIGTERM (the suite stops it after the
supervisor) it deletes what the run left on the shared broker: its own queue, the workers' command queues
(`EXCHANGE:<shard>`, `EXCHANGE:SEND`) and the exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

import aio_pika

#: Every dispatch name the simulator writes (READY and GUILD_CREATE hold seqs 1 and 2 of each session).
DISPATCH_NAMES: Final = (
    "READY",
    "RESUMED",
    "GUILD_CREATE",
    "MESSAGE_CREATE",
    "PRESENCE_UPDATE",
    "TYPING_START",
    "GUILD_MEMBERS_CHUNK",
    "RATE_LIMITED",
)
SNAPSHOT_INTERVAL_S: Final = 0.2
PREFETCH: Final = 2000
QUEUE_EXPIRES_MS: Final = 60_000
RECONNECT_INTERVAL_S: Final = 1.0


class SessionRecord:
    """The seqs received for one session, as a bitmap (seqs are dense from 1)."""

    __slots__ = ("bits", "distinct", "highest", "shard")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.bits = bytearray()
        self.distinct = 0
        self.highest = 0

    def add(self, seq: int) -> bool:
        """Record `seq`; False if it was already received (a duplicate)."""
        if seq >= len(self.bits):
            self.bits.extend(bytes(max(seq + 1 - len(self.bits), 4096)))
        if self.bits[seq]:
            return False
        self.bits[seq] = 1
        self.distinct += 1
        self.highest = max(self.highest, seq)
        return True

    def holes(self, limit: int = 50) -> list[list[int]]:
        """Missing seq ranges `[first, last]` below the highest received (at most `limit`)."""
        ranges: list[list[int]] = []
        if self.distinct == self.highest:
            return ranges
        seq = 1
        while seq <= self.highest and len(ranges) < limit:
            if not self.bits[seq]:
                start = seq
                while seq <= self.highest and not self.bits[seq]:
                    seq += 1
                ranges.append([start, seq - 1])
            seq += 1
        return ranges


class Ledger:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.last_new_at: dict[int, float] = {}
        self.duplicates = 0
        self.received = 0
        self.unlabelled = 0

    def record(self, headers: dict[str, Any]) -> None:
        self.received += 1
        try:
            shard, session_id, seq = int(headers["shard_id"]), str(headers["session_id"]), int(headers["seq"])
        except (KeyError, TypeError, ValueError):
            self.unlabelled += 1
            return
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = SessionRecord(shard)
        if session.add(seq):
            self.last_new_at[shard] = time.time()
        else:
            self.duplicates += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "at": time.time(),
            "received": self.received,
            "duplicates": self.duplicates,
            "unlabelled": self.unlabelled,
            "last_new_at": {str(shard): at for shard, at in self.last_new_at.items()},
            "sessions": {
                sid: {
                    "shard": s.shard,
                    "distinct": s.distinct,
                    "highest": s.highest,
                    "holes": s.holes(),
                }
                for sid, s in self.sessions.items()
            },
        }


def write_snapshot(path: Path, ledger: Ledger) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(ledger.snapshot()))
    os.replace(temporary, path)


async def consume(url: str, exchange_name: str, state_path: Path, shards: int) -> None:
    ledger = Ledger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Reconnect within a second of RabbitMQ's return (aio-pika's default waits 5 s).
    connection = await aio_pika.connect_robust(url, reconnect_interval=RECONNECT_INTERVAL_S)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)
        # Durable: a non-durable queue (and what waits in it) is deleted when RabbitMQ stops, which is loss
        # the system cannot prevent; and while the consumer re-declared it, the workers' publishes were
        # unroutable (confirmed and dropped).
        queue = await channel.declare_queue(f"{exchange_name}:faults-consumer", durable=True)
        for name in DISPATCH_NAMES:
            await queue.bind(exchange, routing_key=name)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            ledger.record(dict(message.headers or {}))
            await message.ack()

        await queue.consume(on_message)
        print(json.dumps({"ready": True, "queue": queue.name}), flush=True)
        while not stop.is_set():
            write_snapshot(state_path, ledger)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SNAPSHOT_INTERVAL_S)
        write_snapshot(state_path, ledger)
        await queue.delete(if_unused=False, if_empty=False)
        for suffix in [*map(str, range(shards)), "SEND"]:
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(f"{exchange_name}:{suffix}")
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await exchange.delete()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(consume(argv[0], argv[1], Path(argv[2]), int(argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
