"""A process that takes a ratelimit permit on the supervisor's shm segment and never gives it back:
`python -m benchmarks.faults.permit_holder DIRECTORY SEGMENT GLOBAL_RATE MAJOR`.

It attaches to the segment (`ratelimit.configured`'s configuration, so the segment accepts it), takes the
first permit of an interaction callback under `MAJOR` (a bucket nobody has learned yet, so it is the only
request allowed in flight: a probe), prints `granted` and sleeps until the fault suite SIGKILLs it.
Everyone else must then wait no longer than the permit's lease (EngineConfig.lease_s; ratelimit.md 5.3
scenario 6).
"""

from __future__ import annotations

import sys
import time
from typing import Final

import trio

from ratelimit.configured import engine_config
from ratelimit.model import Ask, Permit
from ratelimit.shm import ShmBackend

#: Long enough for the suite to kill it first.
HOLD_S: Final = 600.0


ROUTE: Final = "POST /interactions/{interaction_id}/{interaction_token}/callback"


def holder_ask(major: str) -> Ask:
    """An interaction route (never asks the global limit), so only its bucket decides."""
    return Ask(token="faults", route=ROUTE, major=major, exempt=True)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    directory, segment, global_rate, major = argv
    backend = ShmBackend.open(segment, engine_config(int(global_rate)), directory=directory)
    result = trio.run(backend.acquire, holder_ask(major))
    if not isinstance(result, Permit):
        print(f"not granted: {result}", flush=True)
        return 1
    print("granted", flush=True)
    time.sleep(HOLD_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
