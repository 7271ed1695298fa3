"""The REST proxy's AMQP RPC front (DESIGN 3.6), for `@spectacles/proxy` over `@spectacles/brokers`.

Topology. Requests: exchange `AMQP_GROUP` (direct, durable), durable queue `AMQP_GROUP:AMQP_EVENT` bound
with routing key `AMQP_EVENT` (the `@spectacles/brokers` convention, so a JS consumer and we may even share
it); every worker consumes it, RabbitMQ spreads the requests. Replies: the default exchange, routing key =
the request's `reply_to`, same `correlation_id`, MessagePack (`ratelimit.proxy.rpc`). Cancels: routing key
`CANCEL` on the same exchange, bound to one auto-delete queue *per worker*
(`AMQP_GROUP:CANCEL:<host>.<pid>.<random>`), because the worker holding the request is not known to the
client: a shared `rest:CANCEL` queue (the Rust proxy's) delivers each cancel to one competing worker, which
with several workers is usually the wrong one.

Every request gets exactly one reply, errors included (the Rust proxy sent none on timeouts and on
undecodable messages, leaving callers to their own 5 s timeout; anchors/spectacles.md 2.6). A message that
has no `reply_to` is still executed (fire-and-forget), and one that is undecodable and has none is rejected.

Ack after reply. The request is acked once its reply is published (with a publisher confirm), so a reply is
never lost to a crash: a worker that dies mid-request leaves it unacked and RabbitMQ redelivers it to
another worker, which executes it again (at-least-once, like the event stream; a POST may then happen
twice). The Rust proxy acked before sending (at-most-once: a crash lost the request *and* its reply). If
publishing the reply fails (broker unreachable) the request is not acked either; it is redelivered after the
reconnect.

Concurrency. Each delivery is handled in its own task as soon as it arrives; the consumer's prefetch
(`max_in_flight`, 256 by default) bounds how many are in flight per worker, and RabbitMQ keeps the rest
queued (unacked elsewhere, or ready for another worker).

CANCEL. What the JS client expects: nothing. `@spectacles/brokers` 0.9.3 has no cancel (its `call` only
times out locally after 5 s and ignores a later reply: `_responses.emit` of an id nobody listens to); the
Rust `rustacles` client likewise drops replies it does not wait for. So replying after a cancel is safe for
every client, and we do, keeping "every request gets a reply": status 1 with "cancelled ... before it was
sent" or "... while Discord was answering (it may have taken effect)". A request not yet sent gives its
ratelimit permit back (the engine). A CANCEL that arrives before its request (another worker's, or the
request is still queued) is remembered for `CANCEL_MEMORY_S`, so the request is answered "cancelled"
without being sent when it arrives here.

Stopping (`stop(grace_s)`, on SIGTERM): the intake stops at once; requests in flight get `grace_s` to
finish and reply; then those still waiting for their limits (never sent) are rejected with requeue, so
another worker sends them, and those already sent get status 1 "the proxy stopped while Discord was
answering" and are acked. Deliveries that arrive during the drain are not started: they stay unacked and
go back to the queue when the consumer channel closes at its end (the bridge cancels a consumer only with
its channel, and the channel must stay open for the acks of the requests in flight). Cancelled without
`stop()` (a hard stop), nothing more is acked and RabbitMQ redelivers whatever was in flight.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from ratelimit.proxy.errors import ProxyError, RpcStatus, log_failure
from ratelimit.proxy.request import ProxyRequest, describe
from ratelimit.proxy.rest_proxy import RestProxy
from ratelimit.proxy.rpc import (
    CONTENT_TYPE,
    decode_cancel,
    decode_request,
    encode_error,
    encode_proxy_error,
    encode_response,
)
from ratelimit.proxy.send_mark import SendMark

__all__ = ["MAX_IN_FLIGHT", "RestRpcServer", "RpcBroker", "RpcDelivery"]

LOGGER: Final = logging.getLogger("ratelimit.proxy")

MAX_IN_FLIGHT: Final = 256
CANCEL_EVENT: Final = "CANCEL"
#: How long a CANCEL for a request this worker has not seen is remembered, and how many at most.
CANCEL_MEMORY_S: Final = 60.0
CANCEL_MEMORY_MAX: Final = 10_000
#: After the grace period, how long the last replies and requeues may take.
FINAL_SETTLE_S: Final = 5.0


class RpcDelivery(Protocol):
    """What the front needs of a consumed message (`workers.amqp_bridge.Delivery` is one)."""

    @property
    def body(self) -> bytes: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...

    async def ack(self) -> bool: ...
    async def reject(self, requeue: bool = False) -> bool: ...


class RpcBroker(Protocol):
    """What the front needs of the broker connection (`workers.amqp_bridge.Amqp` is one)."""

    def consume(
        self,
        queue_name: str,
        routing_keys: Sequence[str],
        exchange: str,
        *,
        prefetch: int = ...,
        durable: bool = ...,
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[RpcDelivery]]: ...

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
        *,
        content_type: str | None = None,
        correlation_id: str | None = None,
    ) -> None: ...


CANCELLED: Final = "cancelled"
STOPPING: Final = "stopping"


@dataclass(eq=False)
class _InFlight:
    correlation_id: str | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    mark: SendMark = field(default_factory=SendMark)
    reason: str | None = None

    def interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.scope.cancel()


@dataclass(frozen=True, slots=True)
class RpcStatistics:
    received: int
    replied: int
    requeued: int
    cancels: int
    in_flight: int


class RestRpcServer:
    """Serves `proxy` to RPC callers on `broker`. Run `serve()` in a nursery; `stop()` drains it."""

    def __init__(
        self,
        broker: RpcBroker,
        proxy: RestProxy,
        *,
        group: str = "rest",
        event: str = "REQUEST",
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.broker = broker
        self.proxy = proxy
        self.group = group
        self.event = event
        self.queue = f"{group}:{event}"
        self.cancel_queue = (
            f"{group}:{CANCEL_EVENT}:{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        )
        self.max_in_flight = max_in_flight
        self._in_flight: dict[str, list[_InFlight]] = {}
        self._anonymous: set[_InFlight] = set()
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self._intake = trio.CancelScope()
        self._grace_s = 0.0
        self._idle = trio.Event()
        self._idle.set()
        self._active = 0
        self._received = self._replied = self._requeued = self._cancels = 0

    def statistics(self) -> RpcStatistics:
        return RpcStatistics(self._received, self._replied, self._requeued, self._cancels, self._active)

    def stop(self, grace_s: float) -> None:
        """Stop taking requests; those in flight get `grace_s` to finish, then `serve` settles the rest and
        returns (see the module note). Not a checkpoint."""
        self._grace_s = grace_s
        self._intake.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume requests and cancels until `stop()` (then drain and return) or cancellation (then the
        broker redelivers what was unacked). Reports once both consumers are subscribed."""
        async with trio.open_nursery() as outer:
            await outer.start(self._serve_cancels)
            async with (
                self.broker.consume(
                    self.queue, [self.event], self.group, prefetch=self.max_in_flight
                ) as deliveries,
                trio.open_nursery() as handlers,
            ):
                task_status.started()
                LOGGER.info(
                    "proxy.amqp_ready", extra={"queue": self.queue, "max_in_flight": self.max_in_flight}
                )
                with self._intake:
                    async for delivery in deliveries:
                        self._received += 1
                        self._active += 1
                        if self._idle.is_set():
                            self._idle = trio.Event()
                        handlers.start_soon(self._handle, delivery)
                # Stopping. Deliveries the broker pushes from now on stay in the channel's buffer, unacked,
                # and go back to the queue when the consumer closes below.
                await self._drain()
                handlers.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    async def _drain(self) -> None:
        with trio.move_on_after(self._grace_s):
            await self._idle.wait()
        for entries in list(self._in_flight.values()):
            for entry in entries:
                entry.interrupt(STOPPING)
        for entry in list(self._anonymous):
            entry.interrupt(STOPPING)
        with trio.move_on_after(FINAL_SETTLE_S):
            await self._idle.wait()

    async def _serve_cancels(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.broker.consume(
            self.cancel_queue, [CANCEL_EVENT], self.group, prefetch=64, durable=False
        ) as cancels:
            task_status.started()
            async for message in cancels:
                await message.ack()
                correlation_id = decode_cancel(message.body)
                if correlation_id is None:
                    LOGGER.warning("proxy.bad_cancel", extra={"front": "amqp", "size": len(message.body)})
                    continue
                self._cancels += 1
                entries = self._in_flight.get(correlation_id)
                if entries:
                    for entry in entries:
                        entry.interrupt(CANCELLED)
                else:
                    self._remember_cancel(correlation_id)

    def _remember_cancel(self, correlation_id: str) -> None:
        now = time.monotonic()
        self._early_cancels[correlation_id] = now + CANCEL_MEMORY_S
        self._early_cancels.move_to_end(correlation_id)
        while self._early_cancels:
            oldest, expires = next(iter(self._early_cancels.items()))
            if expires > now and len(self._early_cancels) <= CANCEL_MEMORY_MAX:
                break
            del self._early_cancels[oldest]

    def _cancelled_early(self, correlation_id: str | None) -> bool:
        if correlation_id is None:
            return False
        expires = self._early_cancels.pop(correlation_id, None)
        return expires is not None and expires > time.monotonic()

    async def _handle(self, delivery: RpcDelivery) -> None:
        try:
            await self._handle_one(delivery)
        except Exception:
            # A bug must not take the consumer (and the worker) down; the message is redelivered later.
            LOGGER.exception("proxy.internal_error", extra={"front": "amqp"})
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _handle_one(self, delivery: RpcDelivery) -> None:
        try:
            request = decode_request(delivery.body)
        except ProxyError as exc:
            log_failure("amqp", exc, "(undecoded)")
            if delivery.reply_to:
                await self._reply(delivery, encode_proxy_error(exc))
            else:
                await delivery.reject(requeue=False)
            return
        route = describe(request.method, request.path)
        if self._cancelled_early(delivery.correlation_id):
            LOGGER.info("proxy.cancelled", extra={"front": "amqp", "route": route, "sent": False})
            await self._reply(
                delivery, encode_error(RpcStatus.UNKNOWN, _cancel_message(CANCELLED, sent=False))
            )
            return
        entry = _InFlight(delivery.correlation_id)
        self._track(entry)
        try:
            reply = await self._execute(entry, request, route)
        finally:
            self._untrack(entry)
        if reply is None:  # stopping before it was sent: another worker will send it
            await delivery.reject(requeue=True)
            self._requeued += 1
            return
        await self._reply(delivery, reply)

    async def _execute(self, entry: _InFlight, request: ProxyRequest, route: str) -> bytes | None:
        reply: bytes | None = None
        with entry.scope:
            try:
                response = await self.proxy.send(request, add_bot_token=True, decode=True, mark=entry.mark)
            except ProxyError as exc:
                log_failure("amqp", exc, route)
                reply = encode_proxy_error(exc)
            except Exception:
                LOGGER.exception("proxy.internal_error", extra={"front": "amqp", "route": route})
                reply = encode_error(RpcStatus.UNKNOWN, "internal error in the proxy")
            else:
                LOGGER.debug(
                    "proxy.response", extra={"front": "amqp", "route": route, "status": response.status}
                )
                reply = encode_response(response)
        if entry.scope.cancelled_caught:
            reason = entry.reason or STOPPING
            if reason == STOPPING and not entry.mark.sent:
                return None
            LOGGER.info(
                "proxy.interrupted",
                extra={"front": "amqp", "route": route, "reason": reason, "sent": entry.mark.sent},
            )
            reply = encode_error(RpcStatus.UNKNOWN, _cancel_message(reason, sent=entry.mark.sent))
        return reply

    async def _reply(self, delivery: RpcDelivery, reply: bytes) -> None:
        """Publish the reply (when there is someone to reply to), then ack the request."""
        if delivery.reply_to:
            try:
                await self.broker.publish_raw(
                    "",
                    delivery.reply_to,
                    reply,
                    content_type=CONTENT_TYPE,
                    correlation_id=delivery.correlation_id,
                )
            except Exception as exc:
                # Left unacked: redelivered (and executed again) once the broker is back.
                LOGGER.warning("proxy.reply_failed", extra={"front": "amqp", "error": type(exc).__name__})
                return
            self._replied += 1
        else:
            LOGGER.info("proxy.no_reply_to", extra={"front": "amqp"})
        await delivery.ack()

    def _track(self, entry: _InFlight) -> None:
        if entry.correlation_id is None:
            self._anonymous.add(entry)
        else:
            self._in_flight.setdefault(entry.correlation_id, []).append(entry)

    def _untrack(self, entry: _InFlight) -> None:
        if entry.correlation_id is None:
            self._anonymous.discard(entry)
        else:
            entries = self._in_flight.get(entry.correlation_id, [])
            if entry in entries:
                entries.remove(entry)
            if not entries:
                self._in_flight.pop(entry.correlation_id, None)


def _cancel_message(reason: str, *, sent: bool) -> str:
    if reason == CANCELLED:
        if sent:
            return "cancelled (CANCEL) while Discord was answering; the request may have taken effect"
        return "cancelled (CANCEL) before it was sent"
    return "the proxy stopped while Discord was answering; the request may have taken effect"
