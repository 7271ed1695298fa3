"""Peer for the gateway benchmark: discord.py's `AutoShardedClient` consuming the simulator's stream.

Standalone asyncio script, run as a subprocess by `benchmarks/gateway.py` (never imported by it):

    python benchmarks/peers/discordpy_bench.py --rest-url URL --token TOKEN [--compression zlib-stream]
        [--raw] [--duration SECONDS]

It points `discord.http.Route.BASE` at the simulator and lets discord.py ask `GET /gateway/bot` for the url
and shard count (the simulator's `--shard-count` sets how many shards it runs). It runs until SIGTERM or
SIGINT (or `--duration`), then closes the client and prints one JSON object on stdout:
`{"shard_count", "compression", "raw", "parsers_dropped", "ready_shards", "messages_received", "elapsed_s",
"errors"}`. The
benchmark takes its figures from the simulator's ledger and this process's /proc entries; the count here is
a cross-check.

Changed from discord.py's defaults, neither touching the hot path: `before_identify_hook` does not sleep 5 s
between shards (the simulator runs with max_concurrency = shard count, so every shard may identify at once),
and `log_receive`, which discord.py calls with each decompressed gateway message (a no-op unless debug
events are on), counts messages instead. Everything else is stock: discord.py parses each dispatch into its
models and caches, as a bot on it would; that figure is what a bot on discord.py pays per event.

`--raw` is discord.py on the work our worker does (equal work): every dispatch parser except READY, RESUMED
and GUILD_CREATE (`KEPT_PARSERS`, which a shard needs to come up and resume) is replaced by a no-op in the
client's parser table (`ConnectionState.parsers`, the dict each shard's websocket looks its dispatches up
in), so each message is still read off the socket, decompressed, decoded from JSON and routed by `t`, then
dropped. The report then says how many parsers were switched off (`parsers_dropped`).

Transport compression: discord.py 2.x reads zstd-stream natively (`discord.utils._ZstdDecompressionContext`,
a `zstandard` decompressobj, chosen whenever `zstandard` imports), so `--compression zstd-stream` needs no
shim; `zlib-stream` hides zstandard from it (discordpy_setup.py). The report's `compression` is what
discord.py actually negotiated.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any, Final

from benchmarks.peers.discordpy_setup import run_discordpy_script

#: The dispatch parsers `--raw` keeps: a shard needs them to become ready and to resume.
KEPT_PARSERS: Final = frozenset({"READY", "RESUMED", "GUILD_CREATE"})


def drop_dispatch(data: Any, /) -> None:
    """The parser `--raw` puts in place of every other: the dispatch is dropped."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rest-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--compression", choices=("zstd-stream", "zlib-stream"), default="zlib-stream")
    parser.add_argument(
        "--raw", action="store_true", help="equal work: no-op every dispatch parser but KEPT_PARSERS"
    )
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: never)")
    return run_discordpy_script(parser.parse_args(), run)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import discord
    import discord.gateway
    import discord.http
    import discord.utils

    discord.http.Route.BASE = args.rest_url
    started = time.monotonic()
    received = 0
    ready_shards: set[int] = set()
    errors: list[str] = []

    def count_receive(ws: discord.gateway.DiscordWebSocket, data: Any, /) -> None:
        nonlocal received
        received += 1

    discord.gateway.DiscordWebSocket.log_receive = count_receive  # type: ignore[method-assign]

    class Client(discord.AutoShardedClient):
        async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
            return None

        async def on_shard_ready(self, shard_id: int) -> None:
            ready_shards.add(shard_id)

        async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
            errors.append(f"{event_method}: {sys.exc_info()[1]!r}")

    client = Client(intents=discord.Intents.default(), shard_count=None)
    parsers_dropped = 0
    if args.raw:
        parsers = client._connection.parsers  # the same dict every shard's websocket dispatches through
        for event in parsers:
            if event not in KEPT_PARSERS:
                parsers[event] = drop_dispatch
                parsers_dropped += 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.duration > 0:
        loop.call_later(args.duration, stop.set)
    runner = asyncio.create_task(client.start(args.token))
    stopper = asyncio.create_task(stop.wait())
    try:
        finished, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner in finished and runner.exception() is not None:
            errors.append(f"client.start: {runner.exception()!r}")
    finally:
        stopper.cancel()
        await client.close()
        try:
            await asyncio.wait_for(runner, timeout=10.0)
        except Exception as exc:
            errors.append(f"client.start after close: {exc!r}")
    return {
        "shard_count": client.shard_count,
        "compression": discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE,
        "raw": args.raw,
        "parsers_dropped": parsers_dropped,
        "ready_shards": len(ready_shards),
        "messages_received": received,
        "elapsed_s": round(time.monotonic() - started, 3),
        "errors": errors[:20],
    }


if __name__ == "__main__":
    sys.exit(main())
