"""Publishing dispatches: the Publisher interface and its sinks (AMQP, stdio, null), and the batching pump
that feeds them and tracks which seqs are safely published."""

from workers.errors import PublishError
from workers.publish.base import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    ENCODINGS,
    Encoding,
    OutboundEvent,
    Publisher,
    encode_body,
)
from workers.publish.null import NullPublisher
from workers.publish.pump import CommittedSeq, PublishPump, PumpStatistics, commit_to, open_publish_pump
from workers.publish.stdio import StdioPublisher

__all__ = [
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_MSGPACK",
    "ENCODINGS",
    "CommittedSeq",
    "Encoding",
    "NullPublisher",
    "OutboundEvent",
    "PublishError",
    "PublishPump",
    "Publisher",
    "PumpStatistics",
    "StdioPublisher",
    "commit_to",
    "encode_body",
    "open_publish_pump",
]
