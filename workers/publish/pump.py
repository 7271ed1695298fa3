"""From the gateway reader to the broker: a bounded, batching, retrying publish pump, and the seq it commits.

Rules this module implements (DESIGN 3.4, 5):
- The reader never blocks on the broker. ``try_put`` either takes the event or says the pump is full; the
  shell then drops the gateway connection (without a 1000/1001 close) and RESUMEs once ``wait_drained_below``
  returns. Blocking the reader instead would miss heartbeat ACKs and turn a slow broker into a zombie
  connection.
- At-least-once. A batch is retried, whole, until the publisher accepts it; only then are its events reported
  (``on_confirmed``), and :class:`CommittedSeq` advances only over a prefix of accepted (or filtered) seqs.
  The seq saved for RESUME after a crash is therefore one whose events the broker holds; later ones are
  replayed by Discord, and may reach consumers twice (they dedupe on ``(shard_id, session_id, seq)``).
- ``on_confirmed`` runs in batch order, even when a later batch is accepted first, so whatever it updates sees
  events in the order they were put.
- A broker outage is two log lines, not one per retry: ``publish.broker_unavailable`` (warning) at the first
  failed publish, ``publish.broker_recovered`` (with the outage's length and failed attempts) at the first
  accepted one after it; the retries between them are debug lines. With several batches in flight every one
  of them fails and retries, so a per-retry warning was dozens of lines a second that said the same thing.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio

from workers.errors import PublishError
from workers.publish.base import OutboundEvent, Publisher

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S: Final = 5.0
RETRY_INITIAL_S: Final = 0.05
RETRY_MAX_S: Final = 5.0


class CommittedSeq:
    """Per shard: the highest seq S such that every dispatch with seq <= S (of the current session) that
    needed publishing has been accepted by the sink. Dispatches that are filtered out (DISCORD_EVENTS) are
    committed as soon as everything before them is.

    ``received`` takes seqs in arrival order, strictly increasing (a gap is fine: a seq that never arrived has
    nothing to wait for). Seqs Discord replays after a RESUME that this tracker has already seen raise
    ValueError: compare with ``last_received`` and skip them (the pump still holds those events).
    ``confirmed`` takes seqs in any order and ignores ones it is not waiting for (a batch retried after a lost
    confirm). ``committed`` is always ``start_seq`` or a received seq. Everything is O(1) amortised.
    """

    __slots__ = ("_committed", "_last_received", "_order", "_unconfirmed", "session_id")

    def __init__(self, session_id: str, start_seq: int = 0) -> None:
        self.session_id = session_id
        self._committed = start_seq
        self._last_received = start_seq
        # Received seqs not yet committed, in arrival order, with whether each waits for a confirm.
        self._order: deque[tuple[int, bool]] = deque()
        self._unconfirmed: set[int] = set()

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def last_received(self) -> int:
        return self._last_received

    @property
    def pending(self) -> int:
        """How many received dispatches still wait to be published."""
        return len(self._unconfirmed)

    def received(self, seq: int, publish: bool) -> None:
        if seq <= self._last_received:
            raise ValueError(f"seq {seq} received after {self._last_received}: seqs must increase")
        self._last_received = seq
        if publish:
            self._unconfirmed.add(seq)
            self._order.append((seq, True))
        elif self._order:
            self._order.append((seq, False))
        else:
            self._committed = seq

    def confirmed(self, seq: int) -> None:
        if seq > self._last_received:
            raise ValueError(f"seq {seq} confirmed but never received (last received {self._last_received})")
        if seq not in self._unconfirmed:
            return
        self._unconfirmed.discard(seq)
        order = self._order
        while order:
            head, waits = order[0]
            if waits and head in self._unconfirmed:
                break
            order.popleft()
            self._committed = head


def commit_to(trackers: Mapping[int, CommittedSeq]) -> Callable[[Sequence[OutboundEvent]], None]:
    """An ``on_confirmed`` callback that feeds each event to its shard's tracker, if it is of that session.

    Events of an older session (or a shard this worker no longer runs) are ignored: their seqs mean nothing
    now. ``trackers`` is read at call time, so the shell replaces a shard's tracker when it starts a new
    session.
    """

    def on_confirmed(batch: Sequence[OutboundEvent]) -> None:
        for event in batch:
            tracker = trackers.get(event.shard_id)
            if tracker is not None and tracker.session_id == event.session_id:
                tracker.confirmed(event.seq)

    return on_confirmed


@dataclass(frozen=True, slots=True)
class PumpStatistics:
    queued: int  # put, not yet in a batch
    in_flight: int  # in batches being published (or retried)
    published: int  # events accepted by the sink
    batches: int  # batches accepted by the sink
    failures: int  # failed publish attempts (each retried)
    last_error: str | None


@dataclass(slots=True)
class _Batch:
    number: int
    events: list[OutboundEvent]
    turn: trio.Event = field(default_factory=trio.Event)  # set when this batch may call publish()
    done: bool = False


class PublishPump:
    """Owns a bounded queue of OutboundEvent and a nursery of publishing tasks: takes events in order, forms
    batches (up to ``max_batch`` events, or whatever arrived ``max_delay_s`` after a batch's first event),
    keeps up to ``window`` batches in flight, retries a failed batch with exponential backoff (forever,
    logging), and calls ``on_confirmed(batch)`` when a batch is accepted, in batch order. Open it with
    :func:`open_publish_pump`.

    Order: batches *enter* ``publisher.publish`` in batch order (a turnstile; trio itself runs tasks started
    together in no fixed order), so a publisher that fixes the wire order before its first checkpoint (the
    stdio lock, the AMQP bridge hand-off) keeps events in order on the wire while the broker is healthy. A
    retried batch goes out after the ones behind it; consumers already dedupe, and may see that reordering.
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        capacity: int,
        max_batch: int,
        max_delay_s: float,
        window: int,
        on_confirmed: Callable[[Sequence[OutboundEvent]], None],
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        if capacity < 1 or max_batch < 1 or window < 1 or max_delay_s < 0:
            raise ValueError("capacity, max_batch and window must be >= 1 and max_delay_s >= 0")
        self._publisher = publisher
        self._capacity = capacity
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._on_confirmed = on_confirmed
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._window = trio.Semaphore(window)
        self._queue: deque[OutboundEvent] = deque()
        self._in_flight = 0
        self._unreported: deque[_Batch] = deque()  # batches in flight, in batch order
        self._next_batch = 0
        self._last_started = -1
        self._published = 0
        self._batches = 0
        self._failures = 0
        self._last_error: str | None = None
        self._outage_since: float | None = None
        self._outage_failures = 0
        self._closing = False
        self._drain_deadline = math.inf
        self._batcher_wakeup = trio.Event()  # a first event, a full batch, or closing
        self._released = trio.Event()  # events left the pump

    # -- producer side (the shell) -------------------------------------------------------------------------
    def try_put(self, event: OutboundEvent) -> bool:
        """Take ``event`` unless the pump holds ``capacity`` events (queued plus in flight) or is closing.
        Never blocks; not a checkpoint."""
        queue = self._queue
        if self._closing or len(queue) + self._in_flight >= self._capacity:
            return False
        queue.append(event)
        if len(queue) == 1 or len(queue) == self._max_batch:
            self._batcher_wakeup.set()
        return True

    @property
    def capacity(self) -> int:
        """The most events the pump holds (queued plus in flight)."""
        return self._capacity

    @property
    def free_slots(self) -> int:
        return self._capacity - len(self._queue) - self._in_flight

    def limit_drain(self, deadline: float) -> None:
        """Have the drain on leaving :func:`open_publish_pump` end by ``deadline`` (trio time) at the latest,
        if that is before its ``drain_timeout_s`` (the owner's own stop deadline). Not a checkpoint."""
        self._drain_deadline = min(self._drain_deadline, deadline)

    async def wait_drained_below(self, n: int) -> None:
        """Return once fewer than ``n`` events are held (queued plus in flight). Checkpoint."""
        await trio.lowlevel.checkpoint()
        while len(self._queue) + self._in_flight >= n:
            await self._released.wait()

    def statistics(self) -> PumpStatistics:
        return PumpStatistics(
            queued=len(self._queue),
            in_flight=self._in_flight,
            published=self._published,
            batches=self._batches,
            failures=self._failures,
            last_error=self._last_error,
        )

    # -- the pump ------------------------------------------------------------------------------------------
    async def _wait_batcher_wakeup(self) -> None:
        await self._batcher_wakeup.wait()
        self._batcher_wakeup = trio.Event()

    async def run(self, nursery: trio.Nursery) -> None:
        """Form batches until closed and emptied, starting one publishing task per batch in ``nursery`` (the
        pump's own, opened by :func:`open_publish_pump`)."""
        while True:
            await self._window.acquire()
            while not self._queue:
                if self._closing:
                    self._window.release()
                    return
                await self._wait_batcher_wakeup()
            if len(self._queue) < self._max_batch and self._max_delay_s > 0:
                with trio.move_on_after(self._max_delay_s):
                    while len(self._queue) < self._max_batch and not self._closing:
                        await self._wait_batcher_wakeup()
            count = min(self._max_batch, len(self._queue))
            batch = _Batch(self._next_batch, [self._queue.popleft() for _ in range(count)])
            self._next_batch += 1
            self._in_flight += count
            self._unreported.append(batch)
            if self._last_started == batch.number - 1:
                batch.turn.set()
            nursery.start_soon(self._publish_batch, batch)

    def _pass_turn(self, batch: _Batch) -> None:
        self._last_started = batch.number
        following = batch.number + 1 - self._unreported[0].number
        if following < len(self._unreported):
            self._unreported[following].turn.set()

    async def _publish_batch(self, batch: _Batch) -> None:
        try:
            await batch.turn.wait()
            self._pass_turn(batch)  # no checkpoint between this and the publisher's first step
            delay = self._retry_initial_s
            while True:
                try:
                    await self._publisher.publish(batch.events)
                    break
                except PublishError as exc:
                    self._on_failure(batch, exc)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self._retry_max_s)
            self._on_success()
            batch.done = True
            reported = False
            while self._unreported and self._unreported[0].done:
                done = self._unreported.popleft()
                self._in_flight -= len(done.events)
                self._published += len(done.events)
                self._batches += 1
                self._on_confirmed(done.events)
                reported = True
            if reported:
                self._released.set()
                self._released = trio.Event()
        finally:
            self._window.release()

    def _on_failure(self, batch: _Batch, exc: PublishError) -> None:
        self._failures += 1
        self._outage_failures += 1
        self._last_error = repr(exc)
        extra = {"batch": batch.number, "events": len(batch.events), "error": repr(exc)}
        if self._outage_since is None:
            self._outage_since = trio.current_time()
            log.warning("publish.broker_unavailable", extra={**extra, "retrying": True})
        else:
            log.debug("publish.retry", extra=extra)

    def _on_success(self) -> None:
        if self._outage_since is None:
            return
        outage_s = trio.current_time() - self._outage_since
        log.warning(
            "publish.broker_recovered",
            extra={"outage_s": round(outage_s, 3), "failed_attempts": self._outage_failures},
        )
        self._outage_since = None
        self._outage_failures = 0

    def _close(self) -> None:
        self._closing = True
        self._batcher_wakeup.set()


@asynccontextmanager
async def open_publish_pump(
    publisher: Publisher,
    *,
    capacity: int,
    max_batch: int = 256,
    max_delay_s: float = 0.005,
    window: int = 4,
    on_confirmed: Callable[[Sequence[OutboundEvent]], None],
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    retry_initial_s: float = RETRY_INITIAL_S,
    retry_max_s: float = RETRY_MAX_S,
) -> AsyncIterator[PublishPump]:
    """Run a :class:`PublishPump` for the duration of the block.

    On a normal exit the pump stops taking events, publishes what it holds at once (no batching delay), and
    waits up to ``drain_timeout_s`` (or until :meth:`PublishPump.limit_drain`'s deadline, if sooner) for it to
    be accepted; what is still unaccepted then is cancelled (and is never reported, so the committed seqs stay
    behind it). If the block raises, or the enclosing scope is cancelled, the pump's tasks are cancelled at
    once.
    """
    pump = PublishPump(
        publisher,
        capacity=capacity,
        max_batch=max_batch,
        max_delay_s=max_delay_s,
        window=window,
        on_confirmed=on_confirmed,
        retry_initial_s=retry_initial_s,
        retry_max_s=retry_max_s,
    )
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, nursery)
        try:
            yield pump
        except BaseException as exc:
            # Re-raised below, outside the nursery, so the caller sees it bare (not in an ExceptionGroup).
            body_error = exc
            nursery.cancel_scope.cancel()
        else:
            pump._close()
            drain_deadline = min(trio.current_time() + drain_timeout_s, pump._drain_deadline)
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, drain_deadline)
    if body_error is not None:
        raise body_error
    if nursery.cancel_scope.cancelled_caught:
        stats = pump.statistics()
        log.warning(
            "publish.drain_timeout",
            extra={"queued": stats.queued, "in_flight": stats.in_flight, "last_error": stats.last_error},
        )
