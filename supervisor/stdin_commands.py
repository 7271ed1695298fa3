"""Gateway commands on the supervisor's stdin, forwarded to the worker that runs their shard (DESIGN 3.3).

With `BROKER_TYPE=stdio` (the demo's mode) a bot talks to the gateway through pipes: events come out on
stdout, commands go in on stdin as `{"t": "SEND" | SHARD_ID, "d": BODY}` lines (`workers.commands`). Workers
started by the supervisor get /dev/null for stdin: several processes reading one pipe would each take
whatever lines they happened to read, not their own shards'. So the supervisor reads the lines, validates
them with the same parser a standalone worker uses, picks the owning worker by shard id, and sends the
command over that worker's control channel (`ShardCommand`). A command for a shard this host does not run,
or whose worker is being replaced, is logged and dropped, as a SEND to a stopped worker's AMQP queue would
wait: stdin has no queue to wait in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final

import trio

from workers.commands import read_stdin_commands
from workers.control_messages import ShardCommand
from workers.errors import CommandRejected

from .processes import WorkerSlot

__all__ = ["route_stdin_commands"]

LOGGER: Final = logging.getLogger("supervisor.commands")


async def route_stdin_commands(
    slots: Sequence[WorkerSlot],
    shard_count: int | Callable[[], int],
    stream: trio.abc.ReceiveStream | None = None,
) -> None:
    """Forward each command line of `stream` (default: a duplicate of stdin) to its shard's worker, until
    end of file. Bad lines are logged (`command.rejected`) and skipped."""
    if stream is None:
        try:
            stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        except (OSError, ValueError, AttributeError):  # no stdin at all (closed, or sys.stdin is None)
            LOGGER.info("command.no_stdin")
            return
    async with stream, contextlib.aclosing(read_stdin_commands(stream, shard_count)) as commands:
        async for item in commands:
            if isinstance(item, CommandRejected):
                LOGGER.warning("command.rejected", extra={"reason": item.reason})
                continue
            # Looked up per command: in cluster mode the node's slots come and go with its leases.
            slot = next((slot for slot in slots if item.shard_id in slot.shard_ids), None)
            if slot is None:
                LOGGER.warning("command.not_here", extra={"shard": item.shard_id})
            elif not await slot.send_command(ShardCommand(item.shard_id, item.op, item.d)):
                LOGGER.warning("command.worker_away", extra={"shard": item.shard_id, "worker": slot.index})
    LOGGER.debug("command.stdin_closed")
