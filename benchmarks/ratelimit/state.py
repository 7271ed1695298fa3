"""The shared engine's state for one variant of the ratelimit benchmark, and the suite's own Redis.

shm: the suite creates the segment (`owner=True`), the client processes open it by name, and the suite
removes it at the end (`open_backend` closes the segment but leaves the file to its owner). Redis: a
redis-server of the suite's own on a free loopback port, without persistence (the machine's Redis is
shared with test suites that flush scripts and keys); each variant works under its own key prefix,
deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import trio

from benchmarks.children import free_port
from benchmarks.harness import BenchmarkError, ChildProcess, open_child
from benchmarks.ratelimit.client import backend_spec
from benchmarks.ratelimit.settings import Backend
from benchmarks.ratelimit.workloads import EngineSpec
from ratelimit.configured import open_backend
from ratelimit.redis_client import RedisClient
from ratelimit.resp import RedisConnectionError, RedisReplyError
from ratelimit.shm import ShmBackend

#: Redis keys are deleted in batches of this many.
REDIS_DELETE_BATCH: Final = 500
REDIS_START_TIMEOUT_S: Final = 10.0


@contextlib.asynccontextmanager
async def open_engine_state(
    backend: Backend, label: str, global_rate: int, *, shm_dir: str, redis_url: str | None
) -> AsyncIterator[EngineSpec]:
    """A fresh shared state for one variant: an shm segment this process owns (removed on exit), or a
    Redis key prefix of its own (its keys deleted on exit)."""
    run_id = f"bench-ratelimit-{os.getpid()}-{label}"
    if backend == "shm":
        engine = EngineSpec("shm", global_rate, shm_name=run_id, shm_dir=shm_dir)
        async with open_backend(backend_spec(engine, owner=True)) as owned:
            try:
                yield engine
            finally:
                # open_backend closes the segment but leaves the file: its owner removes it.
                if isinstance(owned, ShmBackend) and owned.owns:
                    owned.unlink()
        return
    if redis_url is None:
        raise BenchmarkError("no Redis to run on")
    engine = EngineSpec("redis", global_rate, redis_prefix=run_id)
    client = RedisClient.from_url(redis_url, timeout_s=5.0)
    try:
        try:
            await client.execute("PING")
        except RedisConnectionError as exc:
            raise BenchmarkError(f"Redis: {exc}") from exc
        try:
            yield engine
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(RedisConnectionError):
                await delete_prefix(client, "{" + run_id + "}:*")
    finally:
        await client.aclose()


async def delete_prefix(client: RedisClient, pattern: str) -> int:
    """Delete every key matching `pattern` (SCAN, then DEL in batches); how many."""
    cursor = b"0"
    deleted = 0
    while True:
        reply = await client.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], list):
            raise BenchmarkError(f"unexpected SCAN reply {reply!r:.200}")
        cursor = bytes(reply[0]) if isinstance(reply[0], bytes) else str(reply[0]).encode()
        keys = [key for key in reply[1] if isinstance(key, bytes)]
        for start in range(0, len(keys), REDIS_DELETE_BATCH):
            answer = await client.execute("DEL", *keys[start : start + REDIS_DELETE_BATCH])
            deleted += answer if isinstance(answer, int) else 0
        if cursor == b"0":
            return deleted


@contextlib.asynccontextmanager
async def open_redis_server(log_dir: Path) -> AsyncIterator[tuple[str, str]]:
    """A redis-server of the suite's own on a free loopback port, without persistence: (url, version).

    Its own, because the machine's Redis is shared with test suites that flush scripts and keys."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchmarkError("no redis-server on PATH: install one or pass --redis-url")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    async with open_child("redis-server", argv, log_dir=log_dir) as child:
        url = f"redis://127.0.0.1:{port}"
        yield url, await wait_redis_ready(url, child)


async def wait_redis_ready(url: str, child: ChildProcess) -> str:
    """Poll until the server answers INFO; its version."""
    client = RedisClient.from_url(url, timeout_s=1.0)
    try:
        with trio.move_on_after(REDIS_START_TIMEOUT_S):
            while True:
                child.check_alive()
                try:
                    info = await client.execute("INFO", "server")
                except (RedisConnectionError, RedisReplyError):  # not listening yet, or still loading
                    await trio.sleep(0.05)
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                for line in text.splitlines():
                    if line.startswith("redis_version:"):
                        return line.split(":", 1)[1].strip()
                return "unknown"
    finally:
        await client.aclose()
    raise BenchmarkError(
        f"redis-server did not answer within {REDIS_START_TIMEOUT_S:g} s:\n{child.log_tail()}"
    )
