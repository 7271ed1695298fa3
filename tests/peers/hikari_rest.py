"""Peer program: hikari's REST client (`RESTApp`) against the simulator's REST routes.

Standalone asyncio script (run by tests/peers/test_peers.py in a subprocess, never imported by pytest):

    python tests/peers/hikari_rest.py --rest-url URL --token TOKEN --channel ID --burst-channel ID
        [--sequential 10] [--concurrent 10]

It fetches the bot user, then creates `--sequential` messages in `--channel` one after another (so hikari
must itself wait whenever the bucket's headers say `X-RateLimit-Remaining: 0`), then one message in
`--burst-channel` (hikari learns that counter) followed by `--concurrent` more there all at once (hikari's
bucket manager must queue them). One channel per phase keeps the phases apart in the simulator's ledger,
which records each request's major parameter. It prints one JSON object on stdout:

    {"user": {"id", "username"}, "sequential": {"sent", "elapsed_s"}, "concurrent": {"sent", "elapsed_s"},
     "elapsed_s", "errors"}

429s are counted by the simulator's ledger, which the test reads.
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
    import hikari

    errors: list[str] = []
    report: dict[str, Any] = {"errors": errors}
    started = time.monotonic()
    app = hikari.RESTApp(url=args.rest_url)
    await app.start()
    try:
        async with app.acquire(args.token, hikari.TokenType.BOT) as rest:
            try:
                me = await rest.fetch_my_user()
                report["user"] = {"id": int(me.id), "username": me.username}
            except Exception as exc:
                errors.append(f"fetch_my_user: {exc!r}")

            await message_workload(
                rest.create_message,
                channel=args.channel,
                burst_channel=args.burst_channel,
                sequential=args.sequential,
                concurrent=args.concurrent,
                report=report,
                errors=errors,
            )
    finally:
        await app.close()
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    return report


if __name__ == "__main__":
    sys.exit(main())
