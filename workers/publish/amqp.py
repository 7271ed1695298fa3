"""The AMQP event publisher (DESIGN 3.4): events on exchange ``BROKER_GROUP``, compatible with Spectacles.

Routing key = the dispatch name; body = ``d`` in the configured encoding; headers ``shard_id``, ``seq``,
``session_id`` (consumers dedupe on them); ``content_type``; ``expiration`` = BROKER_MESSAGE_TIMEOUT;
persistent; publisher confirms. A batch crosses into the asyncio side once (:mod:`workers.amqp_bridge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from workers.amqp_bridge import OutgoingMessage
from workers.publish.base import Encoding, OutboundEvent, encode_body

if TYPE_CHECKING:
    from workers.amqp_bridge import Amqp


def outgoing_message(event: OutboundEvent, encoding: Encoding, expiration_ms: int | None) -> OutgoingMessage:
    body, content_type = encode_body(event, encoding)
    return OutgoingMessage(
        routing_key=event.name,
        body=body,
        headers={"shard_id": event.shard_id, "seq": event.seq, "session_id": event.session_id},
        content_type=content_type,
        expiration_ms=expiration_ms,
        persistent=True,
    )


class AmqpPublisher:
    """Publishes batches on exchange ``group`` (direct, durable, declared on first use) and returns once the
    broker has confirmed all of a batch. ``message_ttl_s`` (BROKER_MESSAGE_TIMEOUT) becomes each message's
    ``expiration``; None publishes without one. Raises PublishError; see :meth:`Amqp.publish_batch`."""

    def __init__(self, amqp: Amqp, *, group: str, encoding: Encoding, message_ttl_s: float | None) -> None:
        if not group:
            raise ValueError("the event exchange (BROKER_GROUP) must be named")
        self._amqp = amqp
        self.group = group
        self.encoding: Encoding = encoding
        self._expiration_ms = None if message_ttl_s is None else max(0, round(message_ttl_s * 1000))

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        if not batch:
            return
        messages = [outgoing_message(event, self.encoding, self._expiration_ms) for event in batch]
        await self._amqp.publish_batch(self.group, messages)
