"""`python -m supervisor` as a child process for the tests that need the whole process tree: start it, wait
until its `/readyz` answers 200, stop it gracefully, read its (or any child's) output line by line."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Any

import httpx
import trio

from benchmarks.children import stop_process

__all__ = ["read_lines", "running_supervisor", "stop_gracefully", "wait_ready"]

#: How long a test waits for every shard to be READY (identify rounds take 5 s each on the simulator).
READY_TIMEOUT_S = 60.0


@asynccontextmanager
async def running_supervisor(
    env: dict[str, str],
    *args: str,
    log: IO[bytes],
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = subprocess.DEVNULL,
) -> AsyncIterator[trio.Process]:
    """A supervisor with `env` and `args`, its stderr in `log`; killed (after 5 s of SIGTERM) if it is still
    running when the block ends."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "supervisor", *args], env=env, stdin=stdin, stdout=stdout, stderr=log
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process, grace_s=5)


async def wait_ready(base: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until `base`/readyz answers 200 (every shard READY); TooSlowError after `timeout_s`."""
    with trio.fail_after(timeout_s):
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(base + "/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)


async def stop_gracefully(process: trio.Process, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then wait for the exit (TooSlowError after `timeout_s`); the exit status."""
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(timeout_s):
        await process.wait()
    return process.returncode


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncGenerator[str, None]:
    """Each complete line of `stream`, decoded, until EOF; close it with `aclose()` (an async generator)."""
    buffer = b""
    while chunk := await stream.receive_some(65536):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode()
