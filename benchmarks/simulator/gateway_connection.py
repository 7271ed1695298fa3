"""One gateway connection's state and its writer: the only task that writes to the socket.

The writer drains one queue, so the order of HELLO, dispatches, replay and RESUMED on the wire is the order
they were queued in. A queued int means "the session's dispatches up to this seq" (a replay), read from the
session's buffer when the writer gets to it; while `streaming`, fresh dispatches follow once the queue is
empty. Batches hold at most `MAX_BATCH_MESSAGES` payloads, so a long replay does not hold up an ACK long.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import orjson
import trio

from .compression import TransportCompressor
from .sessions import Session
from .wsserver import ConnectionEnded, ServerWebSocket

__all__ = ["MAX_BATCH_MESSAGES", "GatewayConnection"]

MAX_BATCH_MESSAGES: Final = 256


class GatewayConnection:
    """One client connection: its socket, compressor, send-rate window and the session it drives."""

    def __init__(self, ws: ServerWebSocket, via_resume_port: bool) -> None:
        self.ws = ws
        self.via_resume_port = via_resume_port
        self.compressor: TransportCompressor | None = None
        self.session: Session | None = None
        self.shard_id: int | None = None
        #: The shard count of `shard_id` (two generations of a bot run shard 0 of 4 and shard 0 of 8 at once).
        self.shard_count: int | None = None
        self.sent_seq = 0
        self.streaming = False
        self.identified = False
        self.blackholed = False
        #: IDENTIFY and RESUME go unanswered on this connection (the `withhold_ready` fault).
        self.ready_withheld = False
        self.hello_at = 0.0
        self.last_heartbeat_at: float | None = None
        self.sent_times: deque[float] = deque()
        self._outbox: deque[bytes | int] = deque()
        self._wake = trio.Event()
        self._progress = trio.Event()
        self.cancel_scope = trio.CancelScope()

    # -- writer side ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def wait_progress(self) -> None:
        await self._progress.wait()

    def send_payload(self, payload: dict[str, Any]) -> None:
        """Queue a non-dispatch payload (HELLO, ACK, op 7, op 9, RESUMED) in order."""
        self._outbox.append(orjson.dumps(payload))
        self.wake()

    def send_dispatches_upto(self, seq: int) -> None:
        """Queue the session's dispatches up to `seq` (a replay) at this point of the outbox."""
        self._outbox.append(seq)
        self.wake()

    async def run_writer(self) -> None:
        """Write queued payloads and the session's dispatches; a broken socket ends the connection."""
        try:
            await self._write_forever()
        except ConnectionEnded:
            self.cancel_scope.cancel()

    async def _write_forever(self) -> None:
        compressor = self.compressor
        assert compressor is not None
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while not self.blackholed:
                batch = self._next_batch()
                if not batch:
                    break
                messages: list[tuple[bytes, bool]] = []
                for payload in batch:
                    messages.extend(compressor.encode(payload))
                await self.ws.send_messages(messages)
                self._progress.set()
                self._progress = trio.Event()

    def _next_batch(self) -> list[bytes]:
        batch: list[bytes] = []
        session = self.session
        while self._outbox and len(batch) < MAX_BATCH_MESSAGES:
            item = self._outbox[0]
            if isinstance(item, bytes):
                batch.append(item)
                self._outbox.popleft()
                continue
            if session is None or self.sent_seq >= item:
                self._outbox.popleft()
                continue
            upto = min(item, self.sent_seq + MAX_BATCH_MESSAGES - len(batch))
            replay = session.events_between(self.sent_seq, upto)
            batch.extend(replay)
            session.replayed += len(replay)
            session.sent += len(replay)
            self.sent_seq = upto
        if self.streaming and session is not None and not self._outbox and len(batch) < MAX_BATCH_MESSAGES:
            upto = min(session.last_seq, self.sent_seq + MAX_BATCH_MESSAGES - len(batch))
            if upto > self.sent_seq:
                fresh = session.events_between(self.sent_seq, upto)
                batch.extend(fresh)
                session.sent += len(fresh)
                self.sent_seq = upto
        return batch
