"""The worker's exception hierarchy.

`WorkerError` is the root, so a shell can catch everything a worker raises on purpose in one place; library
errors (orjson, the WebSocket codec, aio-pika) are translated into these at the boundary and chained with
`from`.
"""

from __future__ import annotations

__all__ = [
    "CommandRejected",
    "CommandTooLarge",
    "ConfigError",
    "FatalCloseCode",
    "ProtocolError",
    "PublishError",
    "SessionStoreError",
    "TransportError",
    "WorkerError",
]


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ProtocolError(WorkerError):
    """A gateway payload is malformed: not JSON, not an object, no int `op`, or a field we need is missing."""


class CommandRejected(WorkerError):
    """A command was refused locally, before anything was sent; the connection is unaffected."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommandTooLarge(CommandRejected):
    """A command's JSON is over Discord's 4096-byte limit (which would earn close code 4002)."""


class FatalCloseCode(WorkerError):
    """Discord closed the shard with a code after which reconnecting can never succeed (4004, 4010-4014)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"fatal close code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class PublishError(WorkerError):
    """The sink may not have accepted every event of a batch; the caller retries the whole batch."""


class SessionStoreError(WorkerError):
    """The session store was misused or misconfigured; an outage is never raised (loads return None)."""


class TransportError(WorkerError):
    """A WebSocket message could not be decompressed (corrupt stream); the connection must be replaced."""


class ConfigError(WorkerError):
    """A setting has a bad value; `key` names it (a variable or flag); entry points exit with status 2."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: expected {expected}")
        self.key = key
        self.expected = expected
