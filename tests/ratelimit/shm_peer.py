"""Another process on the shm segment, for tests/ratelimit/test_shm.py (run as `python -m`, never imported).

    python -m tests.ratelimit.shm_peer COMMAND DIRECTORY NAME CONFIG_JSON [ARG]

- `grants N`: attach, print "ready", wait for a line on stdin, then ask `ASK` N times without giving anything
  back; print the number of permits.
- `probe`: attach, take one permit of `ASK`, print "granted" and sleep (the test kills it).
- `hold`: take the segment's lock with a descriptor of its own, print "locked" and sleep (killed too).
- `create`: make the segment as its owner and exit without removing it (a crashed owner).
- `open`: attach and exit 0, or print the `ShmError` and exit 3.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import trio

from ratelimit.model import Ask, EngineConfig, Permit
from ratelimit.shm import ShmBackend, ShmError

#: An interaction route: never asked of the global limit, so only its bucket decides.
ASK = Ask(token="tok", route="POST /interactions/{interaction_id}/{token}/callback", major="1", exempt=True)


def config_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def say(line: str) -> None:
    print(line, flush=True)


async def grants(backend: ShmBackend, attempts: int) -> int:
    results = [await backend.acquire(ASK) for _ in range(attempts)]
    return sum(isinstance(result, Permit) for result in results)


def main(command: str, directory: str, name: str, config_text: str, *args: str) -> int:
    config = EngineConfig(**json.loads(config_text))
    if command == "hold":
        fd = os.open(Path(directory) / name, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        say("locked")
        time.sleep(60)
        return 0
    if command == "create":
        backend = ShmBackend.open(name, config, directory=directory, create=True)
        say(str(os.getpid()))
        return 0
    try:
        backend = ShmBackend.open(name, config, directory=directory)
    except ShmError as error:
        say(f"ShmError: {error}")
        return 3
    if command == "open":
        return 0
    if command == "grants":
        say("ready")
        sys.stdin.readline()
        say(str(trio.run(grants, backend, int(args[0]))))
        return 0
    if command == "probe":
        assert isinstance(trio.run(backend.acquire, ASK), Permit)
        say("granted")
        time.sleep(60)
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
