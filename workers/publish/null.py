"""A publisher that accepts everything at once: for benchmarks of the gateway side alone."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from workers.publish.base import OutboundEvent


class NullPublisher:
    """Accepts every batch immediately (one checkpoint) and counts what it was given."""

    def __init__(self) -> None:
        self.events = 0
        self.batches = 0

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        await trio.lowlevel.checkpoint()
        self.events += len(batch)
        self.batches += 1
