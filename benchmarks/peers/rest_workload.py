"""The REST workload the peer clients run against the simulator: the same for every client.

`sequential` message creates in one channel, then one warm-up and `concurrent` creates at once in another,
so the two phases land on separate counters. `create(channel, content)` is the client's own call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def message_workload(
    create: Callable[[int, str], Awaitable[Any]],
    *,
    channel: int,
    burst_channel: int,
    sequential: int,
    concurrent: int,
    report: dict[str, Any],
    errors: list[str],
) -> None:
    """Run both phases, recording each phase's sends and elapsed time in `report` and failures in `errors`."""
    phase_start = time.monotonic()
    sent = 0
    for index in range(sequential):
        try:
            await create(channel, f"sequential {index}")
            sent += 1
        except Exception as exc:
            errors.append(f"create message (sequential {index}): {exc!r}")
    report["sequential"] = {"sent": sent, "elapsed_s": round(time.monotonic() - phase_start, 3)}

    try:
        await create(burst_channel, "warm-up")
    except Exception as exc:
        errors.append(f"create message (warm-up): {exc!r}")
    phase_start = time.monotonic()
    results = await asyncio.gather(
        *(create(burst_channel, f"concurrent {i}") for i in range(concurrent)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    errors.extend(f"create message (concurrent): {exc!r}" for exc in failures)
    report["concurrent"] = {
        "sent": len(results) - len(failures),
        "elapsed_s": round(time.monotonic() - phase_start, 3),
    }
