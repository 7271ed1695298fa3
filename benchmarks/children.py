"""What the suites and the tests both need to run our programs as child processes: a clean environment,
a free loopback port, and a stop that always ends.

- `inherited_environment()`: this process's environment without the service's own variables, so a
  `DISCORD_TOKEN` or `BROKER_TYPE` in the caller's shell cannot leak into a child; `worker_env(rest_url)`
  adds what a worker or supervisor needs to run against the simulator.
- `free_port()`: a loopback port nothing listens on now. The port is released before the child binds it,
  a short race with other programs that we accept (binding port 0 is not possible through the settings).
- `stop_process(process)`: signal the child, wait `grace_s`, then SIGKILL and reap it, so a child that
  ignores its signal cannot hang the caller.

Tests import this module; it imports nothing from `tests`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import Final

import trio

from benchmarks.simulator.config import DEFAULT_TOKEN

__all__ = ["STOP_GRACE_S", "free_port", "inherited_environment", "stop_process", "worker_env"]

#: How long a stopped child may take to exit after its stop signal before it gets SIGKILL.
STOP_GRACE_S: Final = 10.0


def inherited_environment() -> dict[str, str]:
    """This process's environment without any of the service's own variables, for a child that must see
    only what its caller sets (a `DISCORD_TOKEN` or `BROKER_TYPE` in the caller's shell must not leak in)."""
    from supervisor.config import OWN_PREFIXES

    return {key: value for key, value in os.environ.items() if not key.startswith((*OWN_PREFIXES, "LOG_"))}


def worker_env(rest_url: str, **values: str) -> dict[str, str]:
    """The environment of a worker or supervisor run against the simulator whose REST API is `rest_url`:
    `inherited_environment()`, the simulator's token, JSON logs, and `values` (which win)."""
    return {
        **inherited_environment(),
        "DISCORD_TOKEN": DEFAULT_TOKEN,
        "DISCORD_API_URL": rest_url,
        "LOG_FORMAT": "json",
        **values,
    }


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def stop_process(
    process: trio.Process, stop_signal: signal.Signals = signal.SIGTERM, *, grace_s: float = STOP_GRACE_S
) -> int | None:
    """Send `stop_signal` unless the child has exited, wait up to `grace_s` for it, then SIGKILL it and wait.

    Returns its exit status. A checkpoint: a caller in a `finally` that a cancellation must not cut short
    (leaving the child running or unreaped) shields it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(stop_signal)
        with trio.move_on_after(grace_s):
            await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
    return process.returncode
