"""Peer for the ratelimit benchmark: discord.py's or hikari's own REST client running the benchmark's plan.

Standalone asyncio program, run as a subprocess by `benchmarks/ratelimit` (never imported by it):

    python -m benchmarks.peers.rest_bench --client discordpy|hikari --plan PATH --index I

Like our engine's client (`benchmarks/ratelimit/client.py`) it prints `{"ready": true}` once it is set up,
waits for SIGUSR1, makes the calls of `workloads.phases(plan, index)` at their times and prints one JSON
report line. The bot token comes in the environment (`DISCORD_TOKEN`). Each workload window gets a library
client of its own, all of them set up (discord.py logs in) before the start, while the API is idle. Each
process has its own client and so its own rate limiter: neither library shares limits between processes,
which is exactly what the benchmark compares.

The calls are each library's public API, as a bot on it would make them:

- discord.py: `HTTPClient.send_message`, `add_reaction`, `send_typing`, `add_role` (its `request`, where its
  bucket locks and its reactive global lock live); interaction callbacks go where discord.py sends them,
  `AsyncWebhookAdapter.create_interaction_response` (webhook-style, no Authorization header).
- hikari: `RESTClientImpl.create_message`, `add_reaction`, `trigger_typing`, `add_role_to_member`,
  `create_interaction_response`. The simulator answers an interaction callback with 204 and no body, so
  hikari's parse of the `with_response` body fails after the request was made and answered: that
  assertion counts as the 204 it was (the simulator's ledger has the real status).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from benchmarks.ratelimit.workloads import (
    STORM_ROLE,
    STORM_USER,
    TOKEN_ENV,
    Call,
    Plan,
    Scheduled,
    Tally,
    WorkloadName,
    new_tallies,
    phases,
)

#: The emoji of the storm's reactions (each library percent-encodes it itself).
REACTION_EMOJI: Final = "\N{THUMBS UP SIGN}"
CONTENT: Final = "benchmark"

Send = Callable[[Call], Awaitable[int]]


@contextlib.asynccontextmanager
async def open_discordpy(plan: Plan) -> AsyncIterator[Send]:
    import aiohttp
    import discord
    import discord.http
    from discord.http import MultipartParameters, handle_message_parameters
    from discord.webhook.async_ import AsyncWebhookAdapter

    discord.http.Route.BASE = plan.rest_url
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    adapter = AsyncWebhookAdapter()  # type: ignore[no-untyped-call]
    callback = MultipartParameters(
        payload={"type": 4, "data": {"content": CONTENT}}, multipart=None, files=None
    )
    async with aiohttp.ClientSession() as session:
        try:
            await http.static_login(os.environ[TOKEN_ENV])

            async def send(call: Call) -> int:
                try:
                    if call.kind == "message":
                        with handle_message_parameters(content=CONTENT) as params:
                            await http.send_message(call.channel, params=params)
                    elif call.kind == "reaction":
                        await http.add_reaction(call.channel, call.message, REACTION_EMOJI)
                    elif call.kind == "typing":
                        await http.send_typing(call.channel)
                    elif call.kind == "role":
                        await http.add_role(call.channel, STORM_USER, STORM_ROLE)
                    else:
                        await adapter.create_interaction_response(
                            call.interaction, call.token, session=session, params=callback
                        )
                except discord.HTTPException as exc:
                    return int(exc.status)
                return 200

            yield send
        finally:
            await http.close()


@contextlib.asynccontextmanager
async def open_hikari(plan: Plan) -> AsyncIterator[Send]:
    import hikari

    app = hikari.RESTApp(url=plan.rest_url)
    await app.start()
    try:
        async with app.acquire(os.environ[TOKEN_ENV], hikari.TokenType.BOT) as rest:

            async def send(call: Call) -> int:
                try:
                    if call.kind == "message":
                        await rest.create_message(call.channel, CONTENT)
                    elif call.kind == "reaction":
                        await rest.add_reaction(call.channel, call.message, REACTION_EMOJI)
                    elif call.kind == "typing":
                        await rest.trigger_typing(call.channel)
                    elif call.kind == "role":
                        await rest.add_role_to_member(call.channel, STORM_USER, STORM_ROLE)
                    else:
                        try:
                            await rest.create_interaction_response(
                                call.interaction, call.token, hikari.ResponseType.MESSAGE_CREATE, CONTENT
                            )
                        except AssertionError:
                            return 204  # answered without the `with_response` body (module docstring)
                except hikari.HTTPResponseError as exc:
                    return int(exc.status)
                return 200

            yield send
    finally:
        await app.close()


CLIENTS: Final = {"discordpy": open_discordpy, "hikari": open_hikari}


async def run_timeline(
    items: list[Scheduled], start: float, tallies: dict[WorkloadName, Tally], send: Send
) -> None:
    """Make every call at its time; the same rules as the trio client's `run_timeline`."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(item: Scheduled, tally: Tally) -> None:
        started = loop.time()
        try:
            async with asyncio.timeout_at(start + item.cancel_at_s):
                try:
                    status = await send(item.call)
                except Exception as exc:  # counted per type; the ledger has the details
                    tally.error(exc)
                else:
                    tally.status(status)
                    if item.call.kind == "interaction":
                        tally.latencies_s.append(loop.time() - started)
        except TimeoutError:
            tally.cancelled += 1
        finally:
            tally.outstanding -= 1

    for item in items:
        delay = start + item.at_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tally = tallies[item.workload]
        tally.scheduled += 1
        if tally.outstanding >= item.max_outstanding:
            tally.shed += 1
            continue
        tally.outstanding += 1
        task = asyncio.create_task(one(item, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.read(args.plan)
    plan_phases = phases(plan, args.index)
    tallies = new_tallies()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, started.set)
    async with contextlib.AsyncExitStack() as clients:
        # One client per window, all set up (and logged in) before the start, while the API is idle.
        sends = [await clients.enter_async_context(CLIENTS[args.client](plan)) for _ in plan_phases]
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        await started.wait()
        start = loop.time()
        for phase, send in zip(plan_phases, sends, strict=True):
            await run_timeline(phase.items, start, tallies, send)
    return {"workloads": {name: tally.to_json() for name, tally in tallies.items()}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=sorted(CLIENTS), required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
