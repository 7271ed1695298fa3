"""AMQP for a trio worker: aio-pika on an asyncio loop, reached from trio through one narrow bridge.

This is the only module that touches asyncio or aio-pika. Everything it hands to trio is plain data
(:class:`Delivery`, exceptions from :mod:`workers.errors`); aio-pika objects never leave the asyncio side.

Design note
-----------
Rule: events are published with publisher confirms and the worker must reach 10,000 confirmed events per
worker-CPU-second (spectacles encoding, DESIGN 5). aio-pika stays for what is hard to get right (connection
recovery, channel and topology restore, consumers); the hot path crosses the trio/asyncio boundary once per
*batch*, not per event.

Measured with ``python -m benchmarks.amqp_bridge`` (2026-11-27; 2-core machine shared with RabbitMQ 3.10 and
other work, CPython 3.11.7, aio-pika 10.2.1 / aiormq 7.2.4, uvloop 0.23.0; 20,000 events of ~500 B JSON,
spectacles encoding, through the real PublishPump and AmqpPublisher, batches of 256, 4 in flight, a bound
queue; confirmed events per second of wall time / per second of this process's CPU, all threads, RabbitMQ
not counted; median of interleaved runs, range in brackets). Two things vary: the bridge, and how a batch
goes on the wire: ``aio-pika`` = ``asyncio.gather`` of one ``Exchange.publish(Message(...))`` per event;
``frames`` = the batch marshalled into one write on aio-pika's underlying aiormq channel, with one
:class:`_BatchConfirm` entered in aiormq's confirm table under every delivery tag (``_publish_frames``).

    bridge           wire      ev/s wall                ev/CPU-s (3 runs)        ev/CPU-s (6 runs)
    uvloop thread    frames    14,930 (14.4k-17.0k)     23,063 (21.8k-23.6k)     29,675 (25.3k-32.9k)
    asyncio thread   frames     7,871 ( 6.0k-11.4k)      8,765 ( 6.6k-18.9k)      9,450 ( 8.4k-27.4k)
    trio-asyncio     frames     7,645 ( 6.9k- 8.6k)      8,715 ( 7.8k-11.8k)     10,441 ( 9.6k-11.0k)
    uvloop thread    aio-pika   4,394 ( 3.9k- 5.1k)      5,095 ( 4.4k- 5.6k)
    asyncio thread   aio-pika   1,927 ( 1.5k- 3.3k)      1,969 ( 1.6k- 4.3k)
    trio-asyncio     aio-pika   1,544 ( 1.5k- 1.6k)      1,623 ( 1.5k- 1.7k)
    (pump + NullPublisher alone: ~1.3M ev/s wall, ~1.9M ev/CPU-s)

Earlier variants on the same machine: ``frames`` with one asyncio future per event (aiormq's own way) gave
19.7k ev/CPU-s on the uvloop thread, 14.5k on the asyncio thread, 3.9k on trio-asyncio; cProfile showed ~7.5
``call_soon`` handles per event (future callbacks, gather, the ``multiple`` ack fan-out), hence _BatchConfirm.
The plain-asyncio thread is bimodal between runs (from 6.6k to 27k ev/CPU-s; uvloop never dropped below 21k):
two threads contending for the GIL around the selector loop's self-pipe wake-ups is the likely cause; not
investigated further because uvloop does not show it.

Choice: **a dedicated uvloop thread (``uvloop-thread``, the default) with the frames path**: about 2-3x the
10,000 ev/CPU-s target, consistently, and 5x the best per-event aio-pika path. ``uvloop`` is added to the
project's dependencies for it. The trio-asyncio bridge measured above is retired (its import warns on Python
3.12+ and breaks on 3.14); the same thread, as `open_asyncio_thread`, carries any other asyncio code a process
needs to run (the tests' plain aio-pika clients). What would go further: the anchor's pamqp-framed trio
publisher (17.3k confirmed/s wall with a 500-message window on this machine, against 12k for plain uvloop aio-
pika) would drop the thread hop and the GIL handoff, but reconnect, topology restore and consumers would then
be ours to write.

Why not the obvious alternatives:
- Per-event ``exchange.publish`` through any bridge spends most of its CPU in aio-pika/aiormq per-message
  machinery (a lock, a drain future, a ``Countdown`` and an ``asyncio.timeout`` per message); the bridge
  cannot win that back.
- trio-asyncio runs every asyncio callback as a pass of its own trio task loop (anchors/trio-asyncio.md 4),
  so confirm handling (callbacks per ack frame and per tag) costs several times more than on a real loop.
- A pamqp-framed trio-native client would remove the bridge, but then reconnect, topology restore and
  consumers are ours to write; the frames path gets most of its speed and keeps aio-pika's recovery.

The frames path uses aiormq attributes that are public but undocumented (``lock``, ``delivery_tag``,
``confirmations``, ``write_queue``, ``create_future``, ``max_content_size``, ``number``; aiormq 7.2.4) and
relies on aiormq calling only ``done/cancelled/set_result/set_exception`` on a confirm-table entry; if the
underlying channel is not an ``aiormq.Channel`` it falls back to ``basic_publish`` per event. The AMQP tests
exercise it (including a broker restart), so an aiormq upgrade that changes these breaks tests, not prod.

Broker outage: ``connect_robust`` reconnects every ``reconnect_interval_s``; while the channel is closed a
publish fails at once with PublishError (checked before anything is sent), and any publish waits at most
``confirm_timeout_s`` for its confirms. Pending confirms fail when the connection drops (aiormq rejects every
future of a closed channel). Once aio-pika has restored the channel, publishing works again.

Threading: with a thread bridge the asyncio loop runs in its own daemon thread; ``AsyncioThread.call`` runs a
coroutine there and parks the trio task (``wait_task_rescheduled``) until the asyncio task is done. Trio
cancellation cancels the asyncio task and waits for it, so no asyncio work outlives the trio call. Deliveries
come back through ``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar

import aio_pika
import aiormq
import outcome
import trio
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from workers.errors import PublishError, WorkerError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

BridgeKind = Literal["uvloop-thread", "asyncio-thread"]
BRIDGES: Final[tuple[BridgeKind, ...]] = ("uvloop-thread", "asyncio-thread")
DEFAULT_BRIDGE: Final[BridgeKind] = "uvloop-thread"
PublishMode = Literal["frames", "aio-pika"]

RECONNECT_INTERVAL_S: Final = 1.0
CONFIRM_TIMEOUT_S: Final = 10.0
CONSUMER_PREFETCH: Final = 100
# A batch is written in chunks of about this many body bytes, so one batch of large dispatches (GUILD_CREATE
# can be megabytes) is not marshalled into a single buffer.
WRITE_CHUNK_BYTES: Final = 1 << 20
PERSISTENT: Final = 2
THREAD_STOP_TIMEOUT_S: Final = 5.0


class AmqpConnectError(WorkerError):
    """The first connection to the broker failed (later outages are recovered by aio-pika)."""


class BridgeClosed(WorkerError):
    """The asyncio side stopped while a call was in flight."""


# ----------------------------------------------------------------------------------------------------------
# The bridge: run a coroutine function on the asyncio loop from a trio task.


class _Bridge(Protocol):
    async def call(self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the asyncio loop and return its result. Checkpoint. Cancelling the
        trio task cancels the asyncio task and waits for it to finish."""
        ...

    def to_trio(self, fn: Callable[[], object]) -> None:
        """Called on the asyncio side: run ``fn`` soon on the trio thread."""
        ...


class AsyncioThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self._loop = loop
        self._token = token

    def to_trio(self, fn: Callable[[], object]) -> None:
        self._token.run_sync_soon(fn)

    async def call(self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        trio_task = trio.lowlevel.current_task()
        token = self._token

        def reschedule(result: outcome.Outcome[Any]) -> None:  # any thread
            token.run_sync_soon(trio.lowlevel.reschedule, trio_task, result)

        # Written by the trio thread (abort), read by the asyncio thread after call_soon_threadsafe's handoff.
        raise_cancel: list[trio.lowlevel.RaiseCancelT] = []
        aio_task: list[asyncio.Task[T]] = []

        def on_done(task: asyncio.Task[T]) -> None:  # asyncio thread
            result: outcome.Outcome[T]
            if task.cancelled():
                if raise_cancel:
                    result = outcome.capture(raise_cancel[0])
                else:
                    result = outcome.Error(BridgeClosed("the asyncio loop stopped during the call"))
            elif (exc := task.exception()) is not None:
                result = outcome.Error(exc)
            else:
                result = outcome.Value(task.result())
            reschedule(result)

        def start() -> None:  # asyncio thread
            if raise_cancel:  # trio cancelled us before we got here
                reschedule(outcome.capture(raise_cancel[0]))
                return
            try:
                task = self._loop.create_task(fn(*args, **kwargs))
            except BaseException as exc:
                reschedule(outcome.Error(exc))
                return
            aio_task.append(task)
            task.add_done_callback(on_done)

        def cancel_started() -> None:  # asyncio thread
            if aio_task:
                aio_task[0].cancel()

        def abort(raise_cancel_fn: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:  # trio thread
            raise_cancel.append(raise_cancel_fn)
            # If the loop is closed, its shutdown has cancelled the task and rescheduled us already.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(cancel_started)
            return trio.lowlevel.Abort.FAILED

        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError as exc:
            raise BridgeClosed("the asyncio loop is closed") from exc
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result


@asynccontextmanager
async def open_asyncio_thread(use_uvloop: bool) -> AsyncIterator[AsyncioThread]:
    token = trio.lowlevel.current_trio_token()
    ready, finished = trio.Event(), trio.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        state["stop"] = stop = loop.create_future()
        state["loop"] = loop
        token.run_sync_soon(ready.set)
        await stop

    def thread_main() -> None:
        try:
            factory: Callable[[], asyncio.AbstractEventLoop] | None = None
            if use_uvloop:
                import uvloop

                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(serve())
        except BaseException as exc:
            state["error"] = exc
        finally:
            token.run_sync_soon(ready.set)
            token.run_sync_soon(finished.set)

    thread = threading.Thread(target=thread_main, name="amqp-asyncio", daemon=True)
    thread.start()
    try:
        await ready.wait()
        if "loop" not in state or finished.is_set():
            raise BridgeClosed("the asyncio thread failed to start") from state.get("error")
        yield AsyncioThread(state["loop"], token)
    finally:
        with trio.CancelScope(shield=True):
            if "stop" in state:
                loop: asyncio.AbstractEventLoop = state["loop"]
                stop: asyncio.Future[None] = state["stop"]

                def set_stop() -> None:
                    if not stop.done():
                        stop.set_result(None)

                with contextlib.suppress(RuntimeError):  # the loop already stopped
                    loop.call_soon_threadsafe(set_stop)
            with trio.move_on_after(THREAD_STOP_TIMEOUT_S):
                await finished.wait()
            if finished.is_set():
                thread.join()
            else:
                log.warning("amqp.thread_stuck", extra={"timeout_s": THREAD_STOP_TIMEOUT_S})


@asynccontextmanager
async def _open_bridge(kind: BridgeKind) -> AsyncIterator[_Bridge]:
    if kind in ("uvloop-thread", "asyncio-thread"):
        async with open_asyncio_thread(use_uvloop=kind == "uvloop-thread") as bridge:
            yield bridge
    else:
        raise ValueError(f"unknown bridge {kind!r}; expected one of {', '.join(BRIDGES)}")


# ----------------------------------------------------------------------------------------------------------
# Plain data that crosses the bridge.


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish: everything the wire needs, nothing of aio-pika."""

    routing_key: str
    body: bytes
    headers: Mapping[str, Any] | None = None
    content_type: str | None = None
    expiration_ms: int | None = None
    persistent: bool = True
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A consumed message. ``ack``/``reject`` cross the bridge; each returns False (and logs) when the message
    can no longer be settled (its channel closed; the broker redelivers it after the reconnect)."""

    body: bytes
    routing_key: str
    headers: Mapping[str, Any]
    content_type: str | None
    redelivered: bool
    reply_to: str | None
    correlation_id: str | None
    _settle: Callable[[bool, bool], Coroutine[Any, Any, bool]] = field(repr=False, compare=False)

    async def ack(self) -> bool:
        """Acknowledge the message. Checkpoint."""
        return await self._settle(True, False)

    async def reject(self, requeue: bool = False) -> bool:
        """Reject the message (dropped, or dead-lettered, unless ``requeue``). Checkpoint."""
        return await self._settle(False, requeue)


def _properties(message: OutgoingMessage) -> spec.Basic.Properties:
    headers: FieldTable | None = dict(message.headers) if message.headers is not None else None
    return spec.Basic.Properties(
        content_type=message.content_type,
        headers=headers,
        delivery_mode=PERSISTENT if message.persistent else 1,
        expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
        correlation_id=message.correlation_id,
    )


# ----------------------------------------------------------------------------------------------------------
# The asyncio side. Every method here runs on the asyncio loop.


class _BatchConfirm:
    """Stands in for aiormq's per-message confirmation future: the same object is entered in aiormq's confirm
    table under every delivery tag of a batch and counts the broker's answers down into one asyncio future.
    aiormq calls only ``done``, ``cancelled``, ``set_result`` and ``set_exception`` on a table entry (7.2.4),
    and rejects ``future`` (it comes from the channel's future store) if the channel closes. One future per
    batch instead of one per message saves a future, three done-callbacks and a gather slot per event."""

    __slots__ = ("_error", "_remaining", "future")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self._remaining = count
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self.future.done()

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def set_result(self, _frame: object) -> None:
        self._count_down()

    def set_exception(self, exc: BaseException) -> None:  # a nack: the batch fails once all are answered
        self._error = self._error or exc
        self._count_down()

    def _count_down(self) -> None:
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            if self._error is not None:
                self.future.set_exception(self._error)
            else:
                self.future.set_result(None)


async def _publish_frames(
    channel: aiormq.Channel, exchange: str, messages: Sequence[OutgoingMessage]
) -> None:
    """Publish ``messages`` as few socket writes (chunks of about WRITE_CHUNK_BYTES) and wait for every
    confirm (aiormq's own confirm table feeds one :class:`_BatchConfirm`, with its ``multiple`` handling).
    Tags are allocated under the channel's lock, so concurrent aiormq publishes keep tag order; tags of
    frames that never reached the write queue are rolled back, as ``aiormq.Channel.basic_publish`` does."""
    chunks: list[tuple[list[Any], int]] = []
    frames: list[Any] = []
    count = size = 0
    max_content = channel.max_content_size
    for message in messages:
        body = message.body
        frames.append(spec.Basic.Publish(exchange=exchange, routing_key=message.routing_key))
        frames.append(ContentHeader(properties=_properties(message), body_size=len(body)))
        if len(body) < max_content:
            if body:
                frames.append(ContentBody(body))
        else:
            frames.extend(ContentBody(body[i : i + max_content]) for i in range(0, len(body), max_content))
        count += 1
        size += len(body)
        if size >= WRITE_CHUNK_BYTES:
            chunks.append((frames, count))
            frames, count, size = [], 0, 0
    if count:
        chunks.append((frames, count))

    confirm = _BatchConfirm(channel.create_future(), len(messages))
    async with channel.lock:
        sent_tag = channel.delivery_tag
        try:
            for chunk_frames, chunk_count in chunks:
                for _ in range(chunk_count):
                    channel.delivery_tag += 1
                    channel.confirmations[channel.delivery_tag] = confirm  # type: ignore[assignment]
                await channel.write_queue.put(
                    ChannelFrame.marshall(channel_number=channel.number, frames=chunk_frames)
                )
                sent_tag = channel.delivery_tag
        except BaseException:
            for tag in range(sent_tag + 1, channel.delivery_tag + 1):
                channel.confirmations.pop(tag, None)
            channel.delivery_tag = sent_tag
            confirm.future.cancel()
            raise
    await confirm.future


class _AmqpSide:
    """aio-pika's connection and channels. Constructed and used on the asyncio loop only."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        confirm_timeout_s: float,
        mode: PublishMode,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._confirm_timeout_s = confirm_timeout_s
        self._mode = mode
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def connect(
        cls, url: str, reconnect_interval_s: float, confirm_timeout_s: float, mode: PublishMode
    ) -> _AmqpSide:
        connection = await aio_pika.connect_robust(url, reconnect_interval=reconnect_interval_s)
        try:
            channel = await connection.channel(publisher_confirms=True)
            assert isinstance(channel, AbstractRobustChannel)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, confirm_timeout_s, mode)

    async def close(self) -> None:
        await self._connection.close()

    async def _exchange(self, channel: AbstractRobustChannel, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name) if channel is self._channel else None
        if exchange is None:
            # A robust channel re-declares it after a reconnect.
            exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
            if channel is self._channel:
                self._exchanges[name] = exchange
        return exchange

    async def publish(self, exchange: str, messages: Sequence[OutgoingMessage]) -> None:
        """Publish ``messages`` on ``exchange`` ("" is the default exchange) and wait for every confirm.
        Raises PublishError when the broker is unreachable, nacks, or does not confirm in time."""
        if self._channel.is_closed:
            raise PublishError("AMQP channel is closed (broker unreachable; reconnecting)")
        try:
            async with asyncio.timeout(self._confirm_timeout_s):
                if exchange:
                    await self._exchange(self._channel, exchange)
                underlay = await self._channel.get_underlay_channel()
                if self._mode == "frames" and isinstance(underlay, aiormq.Channel):
                    await _publish_frames(underlay, exchange, messages)
                else:
                    await asyncio.gather(
                        *(
                            underlay.basic_publish(
                                m.body,
                                exchange=exchange,
                                routing_key=m.routing_key,
                                properties=_properties(m),
                            )
                            for m in messages
                        )
                    )
        except TimeoutError as exc:
            raise PublishError(f"no publisher confirm within {self._confirm_timeout_s} s") from exc
        except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
            raise PublishError(f"publish failed: {exc!r}") from exc

    async def publish_per_message(self, exchange: str, messages: Sequence[OutgoingMessage]) -> None:
        """The reference path for the benchmark: one aio-pika ``Exchange.publish`` per message."""
        target = await self._exchange(self._channel, exchange)
        await asyncio.gather(
            *(
                target.publish(
                    aio_pika.Message(
                        m.body,
                        headers=dict(m.headers) if m.headers is not None else None,
                        content_type=m.content_type,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        expiration=m.expiration_ms / 1000 if m.expiration_ms is not None else None,
                    ),
                    m.routing_key,
                    mandatory=False,
                )
                for m in messages
            )
        )

    async def declare_queue(
        self,
        queue_name: str,
        routing_keys: Sequence[str],
        exchange: str,
        durable: bool,
        arguments: Mapping[str, Any] | None,
    ) -> None:
        target = await self._exchange(self._channel, exchange)
        queue = await self._channel.declare_queue(
            queue_name, durable=durable, arguments=dict(arguments) if arguments else None
        )
        for key in routing_keys:
            await queue.bind(target, key)

    async def delete_queue(self, queue_name: str) -> None:
        underlay = await self._channel.get_underlay_channel()
        await underlay.queue_delete(queue_name)

    async def start_consumer(
        self,
        queue_name: str,
        routing_keys: Sequence[str],
        exchange: str,
        prefetch: int,
        durable: bool,
        on_message: Callable[[AbstractIncomingMessage], None],
    ) -> tuple[AbstractRobustChannel, AbstractQueue, str]:
        channel = await self._connection.channel()
        assert isinstance(channel, AbstractRobustChannel)
        try:
            await channel.set_qos(prefetch_count=prefetch)
            target = await self._exchange(channel, exchange)
            queue = await channel.declare_queue(queue_name, durable=durable, auto_delete=not durable)
            for key in routing_keys:
                await queue.bind(target, key)

            async def callback(message: AbstractIncomingMessage) -> None:
                on_message(message)

            tag = await queue.consume(callback)
        except BaseException:
            await channel.close()
            raise
        return channel, queue, tag

    async def stop_consumer(self, channel: AbstractRobustChannel, queue: AbstractQueue, tag: str) -> None:
        try:
            if not channel.is_closed:
                await queue.cancel(tag)
        finally:
            await channel.close()

    @staticmethod
    async def settle(message: AbstractIncomingMessage, ack: bool, requeue: bool) -> bool:
        try:
            if ack:
                await message.ack()
            else:
                await message.reject(requeue=requeue)
        except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
            log.warning("amqp.settle_failed", extra={"ack": ack, "error": repr(exc)})
            return False
        return True


# ----------------------------------------------------------------------------------------------------------
# The trio side.


class Amqp:
    """One broker connection of a worker, used from trio. Open it with :func:`open_amqp`."""

    def __init__(self, bridge: _Bridge, side: _AmqpSide) -> None:
        self._bridge = bridge
        self._side = side

    async def publish_batch(self, exchange: str, messages: Sequence[OutgoingMessage]) -> None:
        """Publish ``messages`` on ``exchange`` (declared direct and durable on first use; "" is the default
        exchange) and return once the broker has confirmed every one. One bridge crossing. Raises
        PublishError if any may not have been accepted; a cancelled call has an unknown outcome."""
        await self._bridge.call(self._side.publish, exchange, messages)

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
        *,
        content_type: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Publish one message with confirms (re-routing commands, RPC replies)."""
        message = OutgoingMessage(
            routing_key, body, headers, content_type=content_type, correlation_id=correlation_id
        )
        await self.publish_batch(exchange, (message,))

    async def declare_queue(
        self,
        queue_name: str,
        routing_keys: Sequence[str],
        exchange: str,
        *,
        durable: bool = True,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare ``queue_name`` and bind it to ``exchange`` (direct, durable) under each routing key,
        without consuming it. Spectacles consumers name theirs ``group:[subgroup:]EVENT``; declaring them
        up front keeps events published before the first consumer starts from being dropped as unroutable."""
        side = self._side
        await self._bridge.call(side.declare_queue, queue_name, routing_keys, exchange, durable, arguments)

    async def delete_queue(self, queue_name: str) -> None:
        await self._bridge.call(self._side.delete_queue, queue_name)

    @asynccontextmanager
    async def consume(
        self,
        queue_name: str,
        routing_keys: Sequence[str],
        exchange: str,
        *,
        prefetch: int = CONSUMER_PREFETCH,
        durable: bool = True,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Delivery]]:
        """Declare ``queue_name`` (durable unless told otherwise) bound to ``exchange`` under each routing
        key, consume it with ``prefetch`` unacknowledged messages at most, and yield a channel of deliveries.
        On exit the consumer is cancelled; deliveries not yet acked are requeued by the broker. aio-pika
        re-declares and re-subscribes after a reconnect; the broker then redelivers what was unacked."""
        # The buffer is unbounded: the broker's prefetch bounds it per channel incarnation, and after a
        # reconnect redelivered copies may briefly add to deliveries still waiting here.
        send, receive = trio.open_memory_channel[Delivery](math.inf)
        bridge, side = self._bridge, self._side

        def on_message(message: AbstractIncomingMessage) -> None:  # asyncio side
            async def settle(ack: bool, requeue: bool) -> bool:
                return await bridge.call(side.settle, message, ack, requeue)

            delivery = Delivery(
                body=message.body,
                routing_key=message.routing_key or "",
                headers=dict(message.headers),
                content_type=message.content_type,
                redelivered=bool(message.redelivered),
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                _settle=settle,
            )
            bridge.to_trio(functools.partial(_deliver, send, delivery))

        channel, queue, tag = await bridge.call(
            side.start_consumer, queue_name, routing_keys, exchange, prefetch, durable, on_message
        )
        try:
            async with receive:
                yield receive
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_TIMEOUT_S):
                try:
                    await bridge.call(side.stop_consumer, channel, queue, tag)
                except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
                    log.warning("amqp.consumer_stop_failed", extra={"error": repr(exc)})
            send.close()

    async def publish_batch_per_message(self, exchange: str, messages: Sequence[OutgoingMessage]) -> None:
        """Benchmark reference: one aio-pika ``Exchange.publish`` per message, crossing the bridge once."""
        await self._bridge.call(self._side.publish_per_message, exchange, messages)


def _deliver(send: trio.MemorySendChannel[Delivery], delivery: Delivery) -> None:
    # If the consumer is gone, the broker requeues the unacked message when its channel closes.
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        send.send_nowait(delivery)


@asynccontextmanager
async def open_amqp(
    url: str,
    *,
    bridge: BridgeKind = DEFAULT_BRIDGE,
    reconnect_interval_s: float = RECONNECT_INTERVAL_S,
    confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    publish_mode: PublishMode = "frames",
) -> AsyncIterator[Amqp]:
    """Connect to RabbitMQ at ``url`` (robustly: aio-pika reconnects and restores channels, exchanges, queues,
    bindings and consumers) and yield an :class:`Amqp`. Raises AmqpConnectError if the first connection fails.
    On exit the connection is closed and the asyncio side stopped, even if the block was cancelled."""
    async with _open_bridge(bridge) as loop_bridge:
        try:
            side = await loop_bridge.call(
                _AmqpSide.connect, url, reconnect_interval_s, confirm_timeout_s, publish_mode
            )
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise AmqpConnectError(f"cannot connect to {_redact(url)}: {exc!r}") from exc
        try:
            yield Amqp(loop_bridge, side)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(confirm_timeout_s):
                await loop_bridge.call(side.close)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
