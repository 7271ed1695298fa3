"""Peer program: discord.py's `HTTPClient` against the simulator's REST routes.

Standalone asyncio script (run by tests/peers/test_peers.py in a subprocess, never imported by pytest):

    python tests/peers/discordpy_rest.py --rest-url URL --token TOKEN --channel ID --burst-channel ID
        [--sequential 10] [--concurrent 10]

The same requests as hikari_rest.py: log in (`GET /users/@me`), create `--sequential` messages in
`--channel` one after another, then one in `--burst-channel` and `--concurrent` more there at once, through
`HTTPClient.request` (discord.py's rate limiter lives there; the message models are not needed). discord.py
logs every 429 it gets and every pre-emptive wait on `X-RateLimit-Remaining: 0`; the script counts those
records. It prints one JSON object on stdout:

    {"user": {"id", "username"}, "sequential": {"sent", "elapsed_s"}, "concurrent": {"sent", "elapsed_s"},
     "elapsed_s", "rate_limited_logs", "bucket_waits_logged", "errors"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from benchmarks.peers.rest_workload import message_workload


class _Counter(logging.Handler):
    """Counts discord.http's log records about 429s and about waiting for an exhausted bucket."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.rate_limited = 0
        self.bucket_waits = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "responded with 429" in text:
            self.rate_limited += 1
        elif "has been exhausted. Pre-emptively rate limiting" in text:
            self.bucket_waits += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rest-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--burst-channel", type=int, required=True)
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import discord.http
    from discord.http import Route

    discord.http.Route.BASE = args.rest_url
    counter = _Counter()
    http_logger = logging.getLogger("discord.http")
    http_logger.addHandler(counter)
    http_logger.setLevel(logging.DEBUG)
    http_logger.propagate = False

    errors: list[str] = []
    report: dict[str, Any] = {"errors": errors}
    started = time.monotonic()
    http = discord.http.HTTPClient(asyncio.get_running_loop())

    def create(channel: int, content: str) -> Any:
        route = Route("POST", "/channels/{channel_id}/messages", channel_id=channel)
        return http.request(route, json={"content": content})

    try:
        try:
            me = await http.static_login(args.token)
            report["user"] = {"id": int(me["id"]), "username": me["username"]}
        except Exception as exc:
            errors.append(f"static_login: {exc!r}")

        await message_workload(
            create,
            channel=args.channel,
            burst_channel=args.burst_channel,
            sequential=args.sequential,
            concurrent=args.concurrent,
            report=report,
            errors=errors,
        )
    finally:
        await http.close()
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    report["rate_limited_logs"] = counter.rate_limited
    report["bucket_waits_logged"] = counter.bucket_waits
    return report


if __name__ == "__main__":
    sys.exit(main())
