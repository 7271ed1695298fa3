"""Confirmed event publishing through each trio/asyncio bridge: ``python -m benchmarks.amqp_bridge``.

For every (bridge, publish mode) pair it opens :func:`workers.amqp_bridge.open_amqp`, feeds ``--events``
dispatches (spectacles encoding, ``--size`` bytes of JSON each) through the real :class:`PublishPump` and
:class:`AmqpPublisher` (batches of ``--batch``, ``--window`` in flight) into a queue bound to the exchange,
and prints confirmed events per second of wall time and per second of process CPU (all threads of this
process; RabbitMQ is not counted). ``null`` is the pump alone with a publisher that accepts at once.
Modes: ``frames`` (a batch marshalled as one write on aiormq's channel) and ``aio-pika`` (one
``Exchange.publish`` per event, gathered; the batch still crosses the bridge once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import trio

from workers.amqp_bridge import BRIDGES, Amqp, BridgeKind, OutgoingMessage, PublishMode, open_amqp
from workers.publish.amqp import AmqpPublisher, outgoing_message
from workers.publish.base import OutboundEvent, Publisher
from workers.publish.null import NullPublisher
from workers.publish.pump import open_publish_pump

EXCHANGE = "bench-gateway"
QUEUE = "bench-gateway:MESSAGE_CREATE"


@dataclass(frozen=True, slots=True)
class Result:
    label: str
    wall_rate: float
    cpu_rate: float


class PerMessagePublisher:
    """AmqpPublisher's body, but through aio-pika's per-message ``Exchange.publish`` (the reference)."""

    def __init__(self, amqp: Amqp, group: str) -> None:
        self._amqp = amqp
        self._group = group

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        messages: list[OutgoingMessage] = [outgoing_message(e, "spectacles", 120_000) for e in batch]
        await self._amqp.publish_batch_per_message(self._group, messages)


def make_events(count: int, size: int) -> list[OutboundEvent]:
    data = orjson.dumps({"id": "1234567890123456789", "content": "x" * max(0, size - 40)})
    return [OutboundEvent(0, "bench-session", seq, "MESSAGE_CREATE", data) for seq in range(1, count + 1)]


async def pump_through(publisher: Publisher, events: list[OutboundEvent], batch: int, window: int) -> None:
    """Push every event through a pump; returns when all are confirmed."""
    done = trio.Event()
    confirmed = 0

    def on_confirmed(confirmed_batch: Sequence[OutboundEvent]) -> None:
        nonlocal confirmed
        confirmed += len(confirmed_batch)
        if confirmed == len(events):
            done.set()

    async with open_publish_pump(
        publisher, capacity=batch * window * 2, max_batch=batch, window=window, on_confirmed=on_confirmed
    ) as pump:
        for event in events:
            while not pump.try_put(event):
                await pump.wait_drained_below(pump.free_slots + 1 + batch)
        await done.wait()


async def run_one(
    url: str,
    bridge: BridgeKind | None,
    mode: PublishMode,
    events: list[OutboundEvent],
    batch: int,
    window: int,
) -> tuple[float, float]:
    if bridge is None:
        publisher: Publisher = NullPublisher()
        t0, c0 = time.perf_counter(), time.process_time()
        await pump_through(publisher, events, batch, window)
        return time.perf_counter() - t0, time.process_time() - c0
    async with open_amqp(url, bridge=bridge, publish_mode=mode) as amqp:
        await amqp.declare_queue(
            QUEUE, ["MESSAGE_CREATE"], EXCHANGE, durable=False, arguments={"x-max-length": 50_000}
        )
        publisher = (
            AmqpPublisher(amqp, group=EXCHANGE, encoding="spectacles", message_ttl_s=120.0)
            if mode == "frames"
            else PerMessagePublisher(amqp, EXCHANGE)
        )
        await pump_through(publisher, events[: batch * window], batch, window)  # warm up
        t0, c0 = time.perf_counter(), time.process_time()
        await pump_through(publisher, events, batch, window)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        await amqp.delete_queue(QUEUE)
    return wall, cpu


async def main(args: argparse.Namespace) -> list[Result]:
    events = make_events(args.events, args.size)
    results: list[Result] = []
    combos: list[tuple[BridgeKind | None, PublishMode]] = [(None, "frames")]
    combos += [(b, m) for b in args.bridges for m in args.modes]
    # Runs are interleaved (every combination once, then again), so a burst of noise on the machine spreads
    # over all of them instead of sinking one.
    walls: dict[int, list[float]] = {i: [] for i in range(len(combos))}
    cpus: dict[int, list[float]] = {i: [] for i in range(len(combos))}
    for _ in range(args.runs):
        for i, (bridge, mode) in enumerate(combos):
            wall, cpu = await run_one(args.url, bridge, mode, events, args.batch, args.window)
            walls[i].append(len(events) / wall)
            cpus[i].append(len(events) / cpu)
    for i, (bridge, mode) in enumerate(combos):
        label = "null (pump only)" if bridge is None else f"{bridge} / {mode}"
        result = Result(label, statistics.median(walls[i]), statistics.median(cpus[i]))
        results.append(result)
        print(
            f"{label:28s} {result.wall_rate:9.0f} ev/s wall  {result.cpu_rate:9.0f} ev/CPU-s"
            f"   (wall {min(walls[i]):.0f}-{max(walls[i]):.0f}, cpu {min(cpus[i]):.0f}-{max(cpus[i]):.0f})",
            flush=True,
        )
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.amqp_bridge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1/")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=500, help="bytes of JSON per event")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bridges", nargs="+", choices=BRIDGES, default=list(BRIDGES))
    parser.add_argument("--modes", nargs="+", choices=["frames", "aio-pika"], default=["frames", "aio-pika"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
