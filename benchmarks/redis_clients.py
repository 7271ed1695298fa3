"""The Redis client choice (ratelimit/redis_client.py), measured: sequential script calls from one process.

`python -m benchmarks.redis_clients [--url URL] [--calls N] [--clients ours,redispy,coredis]`. Each client
runs `--calls` EVALSHAs of a one-key token-bucket-sized script, then as many 16-key session batches (the
session store's write shape), one at a time; printed: p50 wall per call and CPU per call of this process
(all threads). `redispy` is redis.asyncio on a uvloop thread, each call handed over and back the way the
AMQP bridge does it (two thread crossings); `coredis` (not a project dependency) runs when importable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import outcome
import trio

from ratelimit.redis_client import RedisClient, Script

BUCKET_LUA = """
local v = redis.call('HMGET', KEYS[1], 't', 'n')
local t = tonumber(v[1]) or 0
redis.call('HSET', KEYS[1], 't', t + 1, 'n', ARGV[1])
redis.call('PEXPIRE', KEYS[1], 60000)
return {1, t}
"""
BATCH_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'session_id', ARGV[1], 'seq', ARGV[i + 1])
  redis.call('PEXPIRE', key, 60000)
end
return #KEYS
"""
Timing = tuple[float, float]


async def _timed(calls: int, fn: Callable[[int], Awaitable[Any]]) -> Timing:
    samples = []
    cpu = time.process_time()
    for index in range(calls):
        start = time.perf_counter()
        await fn(index)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6, (time.process_time() - cpu) / calls * 1e6


async def run_ours(url: str, calls: int, tag: str) -> tuple[Timing, Timing]:
    bucket, batch = Script(BUCKET_LUA), Script(BATCH_LUA)
    keys = [f"{{{tag}}}:s{i}" for i in range(16)]
    async with RedisClient.from_url(url, timeout_s=5.0).closing() as client:
        one = await _timed(calls, lambda i: bucket(client, [f"{{{tag}}}:b"], [i]))
        many = await _timed(calls, lambda i: batch(client, keys, ["sid", *[i] * 16]))
    return one, many


async def run_redispy(url: str, calls: int, tag: str) -> tuple[Timing, Timing]:
    import uvloop
    from redis.asyncio import Redis

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    token = trio.lowlevel.current_trio_token()

    async def call(coroutine: Coroutine[Any, Any, Any]) -> Any:
        task = trio.lowlevel.current_task()
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        future.add_done_callback(
            lambda done: token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(done.result))
        )
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    keys = [f"{{{tag}}}:s{i}" for i in range(16)]
    client = Redis.from_url(url)
    bucket, batch = client.register_script(BUCKET_LUA), client.register_script(BATCH_LUA)
    try:
        one = await _timed(calls, lambda i: call(bucket(keys=[f"{{{tag}}}:b"], args=[i])))
        many = await _timed(calls, lambda i: call(batch(keys=keys, args=["sid", *[i] * 16])))
        await call(client.aclose())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    return one, many


async def run_coredis(url: str, calls: int, tag: str) -> tuple[Timing, Timing]:
    import coredis  # type: ignore[import-not-found, unused-ignore]

    keys = [f"{{{tag}}}:s{i}" for i in range(16)]
    client = coredis.Redis.from_url(url)
    async with client:
        bucket, batch = client.register_script(BUCKET_LUA), client.register_script(BATCH_LUA)
        one = await _timed(calls, lambda i: bucket(keys=[f"{{{tag}}}:b"], args=[i]))
        many = await _timed(calls, lambda i: batch(keys=keys, args=["sid", *[i] * 16]))
    return one, many


RUNNERS = {"ours": run_ours, "redispy": run_redispy, "coredis": run_coredis}


async def main(args: argparse.Namespace) -> None:
    for name in args.clients.split(","):
        tag = f"bench-clients-{uuid.uuid4().hex[:8]}"
        try:
            (one_p50, one_cpu), (many_p50, many_cpu) = await RUNNERS[name](args.url, args.calls, tag)
        except ImportError as exc:
            print(f"{name:8} skipped: {exc}")
            continue
        print(
            f"{name:8} script p50 {one_p50:7.1f} us  cpu {one_cpu:7.1f} us   "
            f"16-key batch p50 {many_p50:7.1f} us  cpu {many_cpu:7.1f} us",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--clients", default="ours,redispy,coredis")
    trio.run(main, parser.parse_args())
