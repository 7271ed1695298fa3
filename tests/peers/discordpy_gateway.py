"""Peer program: discord.py's `AutoShardedClient` against the simulator's gateway.

Standalone asyncio script (run by tests/peers/test_peers.py in a subprocess, never imported by pytest):

    python tests/peers/discordpy_gateway.py --rest-url URL --token TOKEN [--compression zlib-stream]
        [--expect-resume SHARD ...] [--linger 1.0] [--timeout 30]

It points `discord.http.Route.BASE` at the simulator, lets discord.py ask `GET /gateway/bot` for the url and
shard count (`shard_count=None`), waits until every shard fired `on_shard_ready` (and `on_shard_resumed` for
each `--expect-resume` shard: the test injects op 7), lingers a little to collect dispatches, closes the
client and prints one JSON object on stdout:

    {"shard_count", "compression", "ready_shards", "resumed_shards", "dispatches" (per shard, per type),
     "socket_event_types" (on_socket_event_type totals), "seqs" (per shard: count, max, missing, duplicates),
     "ready_after_s", "resumed_after_s", "elapsed_s", "errors", "timed_out"}

Two things are changed from discord.py's defaults, both to keep the run short, neither touching the protocol:
`before_identify_hook` does not sleep 5 s between shards (the simulator runs with max_concurrency = shard
count, so every shard may identify at once), and `guild_ready_timeout` is 0.2 s instead of 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from collections import Counter, defaultdict
from typing import Any

from benchmarks.peers.discordpy_setup import run_discordpy_script


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rest-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--compression", choices=("zstd-stream", "zlib-stream"), default="zstd-stream")
    parser.add_argument("--expect-resume", type=int, action="append", default=[])
    parser.add_argument("--linger", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    return run_discordpy_script(parser.parse_args(), run)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import discord
    import discord.gateway
    import discord.http
    import discord.utils

    discord.http.Route.BASE = args.rest_url
    started = time.monotonic()
    ready_shards: dict[int, float] = {}
    resumed_shards: dict[int, float] = {}
    dispatches: defaultdict[int, Counter[str]] = defaultdict(Counter)
    seqs: defaultdict[int, list[int]] = defaultdict(list)
    socket_event_types: Counter[str] = Counter()
    errors: list[str] = []
    progress = asyncio.Event()

    def log_receive(ws: discord.gateway.DiscordWebSocket, data: Any, /) -> None:
        # discord.py hands the decompressed text of every gateway message to this hook when
        # `enable_debug_events` is on; it is the only place that knows the shard of a raw dispatch.
        try:
            message = json.loads(data)
        except (TypeError, ValueError) as exc:
            errors.append(f"undecodable message on shard {ws.shard_id}: {exc!r}")
            return
        if message.get("op") == 0:
            dispatches[ws.shard_id or 0][message.get("t")] += 1
            if isinstance(message.get("s"), int):
                seqs[ws.shard_id or 0].append(message["s"])

    discord.gateway.DiscordWebSocket.debug_log_receive = log_receive  # type: ignore[assignment,method-assign]

    class Client(discord.AutoShardedClient):
        async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
            return None

        async def on_shard_ready(self, shard_id: int) -> None:
            ready_shards.setdefault(shard_id, round(time.monotonic() - started, 3))
            progress.set()

        async def on_shard_resumed(self, shard_id: int) -> None:
            resumed_shards.setdefault(shard_id, round(time.monotonic() - started, 3))
            progress.set()

        async def on_socket_event_type(self, event_type: str) -> None:
            socket_event_types[event_type] += 1

        async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
            errors.append(f"{event_method}: {_describe(sys.exc_info()[1])}")

    client = Client(
        intents=discord.Intents.default(),
        shard_count=None,
        enable_debug_events=True,
        heartbeat_timeout=15.0,
        guild_ready_timeout=0.2,
    )
    timed_out = False

    def done() -> bool:
        count = client.shard_count
        if count is None or len(ready_shards) < count:
            return False
        return all(shard in resumed_shards for shard in args.expect_resume)

    async def watch() -> None:
        while not done():
            progress.clear()
            await progress.wait()
        await asyncio.sleep(args.linger)

    runner = asyncio.create_task(client.start(args.token))
    waiter = asyncio.create_task(watch())
    try:
        finished, _ = await asyncio.wait(
            {runner, waiter}, timeout=args.timeout, return_when="FIRST_COMPLETED"
        )
        if not finished:
            timed_out = True
        elif runner in finished and runner.exception() is not None:
            errors.append(f"client.start: {_describe(runner.exception())}")
    finally:
        waiter.cancel()
        await client.close()
        try:
            await asyncio.wait_for(runner, timeout=5.0)
        except Exception as exc:
            errors.append(f"client.start after close: {_describe(exc)}")

    seq_report = {}
    for shard, values in seqs.items():
        unique = set(values)
        top = max(unique)
        seq_report[str(shard)] = {
            "count": len(values),
            "max": top,
            "missing": len(set(range(1, top + 1)) - unique),
            "duplicates": len(values) - len(unique),
        }
    return {
        "shard_count": client.shard_count,
        "compression": discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE,
        "ready_shards": sorted(ready_shards),
        "resumed_shards": sorted(resumed_shards),
        "dispatches": {str(shard): dict(counts) for shard, counts in sorted(dispatches.items())},
        "socket_event_types": dict(socket_event_types),
        "seqs": seq_report,
        "ready_after_s": {str(k): v for k, v in sorted(ready_shards.items())},
        "resumed_after_s": {str(k): v for k, v in sorted(resumed_shards.items())},
        "elapsed_s": round(time.monotonic() - started, 3),
        "errors": errors,
        "timed_out": timed_out,
    }


def _describe(exc: BaseException | None) -> str:
    """The exception and the innermost frame it came from (where a simulator payload lacked something)."""
    if exc is None:
        return "None"
    frames = traceback.extract_tb(exc.__traceback__)
    where = (
        f" at {frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno} ({frames[-1].line})"
        if frames
        else ""
    )
    return f"{exc!r}{where}"


if __name__ == "__main__":
    sys.exit(main())
