"""A TCP forwarder on loopback in front of the machine's real RabbitMQ or Redis: a dependency that is "not up
yet" (nothing listens on the port until `serve` runs) or that goes away (`cut`), without stopping the shared
server other tests use. A cluster node whose `REDIS_URL` goes through one is the node that a partition cuts
off from Redis while the others still reach it (`benchmarks.cluster_nodes`).

Tests and benchmarks both use it; it imports nothing from `tests`."""

from __future__ import annotations

import contextlib

import trio


class TcpForwarder:
    """127.0.0.1:`port` -> 127.0.0.1:`target_port` while `serve` runs; `cut()` drops every connection and
    refuses new ones until `restore()`."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.up = True
        self.connections = 0
        self._open: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the port (from now on) and forward each connection. Runs until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.up = False
        for scope in self._open:
            scope.cancel()

    def restore(self) -> None:
        self.up = True

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.up:
            await client.aclose()
            return
        self.connections += 1
        async with client:
            with trio.CancelScope() as scope:
                self._open.add(scope)
                try:
                    try:
                        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                    except OSError:
                        # The server behind is down (a Redis outage): the client sees its connection closed,
                        # as it would see it refused without the forwarder, and the forwarder goes on serving.
                        return
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(_pump, server, client, nursery.cancel_scope)
                finally:
                    self._open.discard(scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
    """Copy until either side closes; then end the other direction too."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for chunk in source:
            await sink.send_all(chunk)
    both.cancel()
