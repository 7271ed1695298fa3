"""The stdio broker (DESIGN 3.3): one JSON line per dispatch on stdout, ``{"t", "s", "shard", "d"}``.

The line is assembled from bytes; ``d`` is Discord's JSON text and is never parsed again. Writes go through a
non-blocking trio stream over a *dup* of fd 1, so a slow reader applies back-pressure to this task only and
never blocks the trio run. Caveat: O_NONBLOCK belongs to the open file description, which the dup shares with
fd 1 while this publisher is open, so nothing else may write to stdout (logs go to stderr; trio restores the
blocking mode when the stream is closed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

import orjson
import trio

from workers.errors import PublishError
from workers.publish.base import OutboundEvent


def stdio_line(event: OutboundEvent) -> bytes:
    """``{"t":NAME,"s":SEQ,"shard":ID,"d":DATA}`` and a newline, with DATA copied verbatim."""
    return b"".join(
        (
            b'{"t":',
            orjson.dumps(event.name),
            b',"s":',
            str(event.seq).encode(),
            b',"shard":',
            str(event.shard_id).encode(),
            b',"d":',
            event.data,
            b"}\n",
        )
    )


class StdioPublisher:
    """Writes each batch as JSON lines and returns once the kernel has them (there is no user-space buffer).

    ``stream`` (any trio SendStream) or ``fd`` (dup'ed; the caller keeps its own) select the sink; the default
    is a dup of fd 1. Concurrent ``publish`` calls are serialised in call order (``trio.Lock`` is fair), so
    lines of one batch are never interleaved with another's.
    """

    def __init__(self, stream: trio.abc.SendStream | None = None, *, fd: int | None = None) -> None:
        if stream is not None and fd is not None:
            raise ValueError("give a stream or an fd, not both")
        self._stream: trio.abc.SendStream = (
            stream if stream is not None else trio.lowlevel.FdStream(os.dup(1 if fd is None else fd))
        )
        self._lock = trio.Lock()

    async def publish(self, batch: Sequence[OutboundEvent]) -> None:
        """Write every line of ``batch``. Checkpoint. Raises PublishError if the stream is broken."""
        payload = b"".join(map(stdio_line, batch))
        async with self._lock:
            try:
                await self._stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PublishError(f"stdout write failed: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> StdioPublisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
