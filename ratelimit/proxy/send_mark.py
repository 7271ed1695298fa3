"""Whether a request reached the network: `SendMark`, and the transport layer that sets it.

A front that must stop early (a drain, a CANCEL) requeues a request that was never sent and reports one
that was; only the innermost transport knows which, so `MarkingTransport` sits directly on httpx's own
transport, under `RatelimitedTransport`'s waiting, and sets the mark that travels on the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httpx

__all__ = ["MARK_EXTENSION", "MarkingTransport", "SendMark"]

#: Where `SendMark` travels on the httpx request (popped before the request reaches httpx's own transport).
MARK_EXTENSION: Final = "trio_shard_gateway.send_mark"


@dataclass(slots=True)
class SendMark:
    """Set once the request was handed to the network (it may then have reached Discord). A front that
    must stop early requeues a request that was never sent and reports one that was."""

    sent: bool = False


class MarkingTransport(httpx.AsyncBaseTransport):
    """Sets the request's `SendMark` as it goes to the network (and removes it, so httpx never sees it)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        mark = request.extensions.pop(MARK_EXTENSION, None)
        if isinstance(mark, SendMark):
            mark.sent = True
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
