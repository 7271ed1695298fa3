"""`python -m benchmarks.demo`: the whole service on embedded defaults, no token, Redis or RabbitMQ needed.

Starts the bundled Discord simulator, then `python -m supervisor --shards auto` pointed at it with the stdio
broker, so every dispatch of every shard appears on stdout as one JSON line (DESIGN 3.3) while the logs go
to stderr. Stops after `--seconds` (or on Ctrl-C) with SIGTERM, as systemd would, and prints a summary from
the simulator's ledger: sessions, identifies, resumes, dispatches sent, rule violations.

Ctrl-C in a terminal sends SIGINT to the whole process group: the supervisor and its workers drain on it by
themselves, and this process waits for them (forwarding SIGTERM, for a SIGINT sent to it alone). The
simulator runs in a session of its own, so the terminal's SIGINT does not stop it before its ledger is read;
this process stops it last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Final

import httpx
import trio

from .children import stop_process
from .simulator import DEFAULT_TOKEN

#: How long the simulator may take to exit after SIGINT before it gets SIGKILL.
SIMULATOR_STOP_GRACE_S: Final = 5.0


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError("the simulator exited before it was ready")
        line += chunk
    return line


async def run_demo(shards: int, seconds: float, event_rate: float) -> int:
    simulator = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "benchmarks.simulator",
            "--shard-count",
            str(shards),
            "--max-concurrency",
            str(min(shards, 16)),
            "--event-rate",
            str(event_rate),
            "--heartbeat-interval-ms",
            "41250",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert simulator.stdout is not None
        addresses: dict[str, Any] = json.loads(await _read_line(simulator.stdout))
        env = dict(os.environ)
        env.update(
            {"DISCORD_TOKEN": DEFAULT_TOKEN, "DISCORD_API_URL": addresses["rest_url"], "BROKER_TYPE": "stdio"}
        )
        supervisor = await trio.lowlevel.open_process(
            [sys.executable, "-m", "supervisor", "--shards", "auto"], env=env
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                with trio.move_on_after(seconds if seconds > 0 else float("inf")):
                    await supervisor.wait()
                nursery.cancel_scope.cancel()
            if supervisor.returncode is None:
                supervisor.send_signal(signal.SIGTERM)  # ignored by a supervisor already draining on SIGINT
                await supervisor.wait()
        async with httpx.AsyncClient() as http:
            ledger = (await http.get(addresses["control_url"] + "/ledger")).json()["gateway"]
        counters = ledger["counters"]
        summary = {
            "supervisor_exit": supervisor.returncode,
            "sessions": len(ledger["sessions"]),
            "identifies": counters.get("identifies_accepted", 0),
            "resumes": counters.get("resumes_ok", 0),
            "dispatches_sent": sum(s["sent"] for s in ledger["sessions"].values()),
            "rules_broken": ledger["rules_broken"],
        }
        print("demo summary: " + json.dumps(summary), file=sys.stderr)
        return int(supervisor.returncode or 0)
    finally:
        await stop_process(simulator, signal.SIGINT, grace_s=SIMULATOR_STOP_GRACE_S)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__)
    parser.add_argument("--shards", type=int, default=4, help="shards the simulator recommends (default 4)")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="run this long, 0 = until Ctrl-C (default 15)"
    )
    parser.add_argument(
        "--event-rate", type=float, default=5.0, help="dispatches per second per shard (default 5)"
    )
    args = parser.parse_args(argv)
    try:
        return trio.run(run_demo, args.shards, args.seconds, args.event_rate)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
