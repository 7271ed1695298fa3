"""A client process of the ratelimit benchmark on our engine (run by the suite, never imported by it):

    python -m benchmarks.ratelimit.client --plan PATH --index I

It opens the shared engine the plan names (`ratelimit.configured.open_backend`: the shm segment the suite
created, or the suite's Redis prefix; the bot token and the Redis URL come in the environment), prints
`{"ready": true}` on stdout once it is set up, waits for SIGUSR1 (the suite signals every process at once),
then runs its part of the plan and prints one JSON report line. Two modes:

- HTTP workloads (`plan.capacity` is None): `workloads.phases(plan, index)`, each window through an
  `httpx.AsyncClient` of its own on `ratelimit.RatelimitedTransport` (default retries, no maximum wait),
  all on one limiter, against the simulator. The limiter also times every `acquire` of an interaction
  callback (`interaction_waits_s` in the report).
- Capacity (`plan.capacity`): no HTTP. Before `ready`, one probe per bucket teaches the engine a bucket too
  large to run out (`CAPACITY_LIMIT` per hour); after the signal, `tasks_per_process` tasks acquire and
  release as fast as they can for `duration_s`, timing every acquire; then process 0 alone times
  `latency_samples` sequential acquires with capacity available and nothing else running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.ratelimit.workloads import (
    REACTION_EMOJI,
    REDIS_URL_ENV,
    STORM_ROLE,
    STORM_USER,
    TOKEN_ENV,
    Call,
    CapacityPlan,
    EngineSpec,
    Plan,
    Scheduled,
    Tally,
    WorkloadName,
    engine_config,
    new_tallies,
    phases,
)
from ratelimit.backend import Backend
from ratelimit.buckets import RateLimitHeaders
from ratelimit.configured import BackendSpec, open_backend
from ratelimit.engine import Ratelimiter
from ratelimit.httpx_transport import RatelimitedTransport
from ratelimit.model import Ask, Outcome, Permit

#: The capacity run's buckets: this many requests per `CAPACITY_RESET_AFTER_S`, i.e. never exhausted.
CAPACITY_LIMIT: Final = 1_000_000_000
CAPACITY_RESET_AFTER_S: Final = 3600.0
CAPACITY_BUCKET: Final = "0123456789abcdef0123456789abcdef"
CAPACITY_ROUTE: Final = "POST /channels/{channel_id}/messages"
CAPACITY_TOKEN: Final = "capacity-bench"
CAPACITY_FIRST_MAJOR: Final = 1_300_000_000_000_000_000
#: Acquire timings kept per process for the report (a uniform sample of all of them).
MAX_TIMINGS: Final = 4000
HTTP_TIMEOUT_S: Final = 30.0
#: Backend statistics that describe the whole shm segment rather than this process (not summed).
SEGMENT_WIDE: Final = frozenset({"slots", "slots_used"})


def backend_spec(engine: EngineSpec, *, redis_url: str = "", owner: bool = False) -> BackendSpec:
    kind = engine.kind
    if kind not in ("memory", "shm", "redis"):
        raise ValueError(f"unknown engine backend {kind!r}")
    return BackendSpec(
        kind=kind,  # type: ignore[arg-type]  # checked above
        config=engine_config(engine),
        shm_name=engine.shm_name,
        shm_dir=engine.shm_dir,
        owner=owner,
        redis_url=redis_url,
        redis_prefix=engine.redis_prefix,
    )


class TimedRatelimiter(Ratelimiter):
    """A `Ratelimiter` that records how long each acquire of a global-exempt request took (seconds)."""

    def __init__(self, backend: Backend, *, fallback_share: int) -> None:
        super().__init__(backend, fallback_share=fallback_share)
        self.exempt_waits_s: list[float] = []

    async def acquire(self, ask: Ask, *, max_wait_s: float | None = None) -> Permit:
        if not ask.exempt:
            return await super().acquire(ask, max_wait_s=max_wait_s)
        started = time.perf_counter()
        permit = await super().acquire(ask, max_wait_s=max_wait_s)
        self.exempt_waits_s.append(time.perf_counter() - started)
        return permit


def backend_statistics(backend: Backend) -> dict[str, int]:
    """The backend's own counters (shm: lock acquisitions and contention; Redis: calls, errors), if any."""
    read = getattr(backend, "statistics", None)
    value = read() if callable(read) else None
    if value is None or not dataclasses.is_dataclass(value) or isinstance(value, type):
        return {}
    return {
        key: item
        for key, item in dataclasses.asdict(value).items()
        if isinstance(item, int) and not isinstance(item, bool) and key not in SEGMENT_WIDE
    }


def engine_report(limiter: Ratelimiter) -> dict[str, Any]:
    stats = limiter.statistics()
    return {
        "grants": stats.grants,
        "waits": stats.waits,
        "outcomes": stats.outcomes,
        "timeouts": stats.timeouts,
        "fallback_grants": stats.fallback_grants,
        "backend_errors": stats.backend_errors,
        "backend": backend_statistics(limiter.backend),
    }


def print_line(value: dict[str, Any]) -> None:
    print(json.dumps(value), flush=True)


async def wait_for_start(signals: Any) -> float:
    """Wait for the suite's SIGUSR1; the start time on trio's clock."""
    async for _ in signals:
        break
    return trio.current_time()


# --- HTTP workloads -------------------------------------------------------------------------------


def request_for(call: Call, token: str) -> tuple[str, str, dict[str, Any] | None, dict[str, str]]:
    """(method, path, JSON body, headers) of `call`. Interaction callbacks carry no Authorization, as
    Discord's own clients send them."""
    auth = {"Authorization": f"Bot {token}"}
    if call.kind == "message":
        return "POST", f"/channels/{call.channel}/messages", {"content": "benchmark"}, auth
    if call.kind == "reaction":
        path = f"/channels/{call.channel}/messages/{call.message}/reactions/{REACTION_EMOJI}/@me"
        return "PUT", path, None, auth
    if call.kind == "typing":
        return "POST", f"/channels/{call.channel}/typing", None, auth
    if call.kind == "role":
        return "PUT", f"/guilds/{call.channel}/members/{STORM_USER}/roles/{STORM_ROLE}", None, auth
    body = {"type": 4, "data": {"content": "benchmark"}}
    return "POST", f"/interactions/{call.interaction}/{call.token}/callback", body, {}


async def run_timeline(
    items: list[Scheduled],
    start: float,
    tallies: dict[WorkloadName, Tally],
    send: Callable[[Call], Awaitable[int]],
) -> None:
    """Make every call at its time (see workloads.py for shedding and cancellation)."""

    async def one(item: Scheduled, tally: Tally) -> None:
        started = trio.current_time()
        try:
            with trio.move_on_at(start + item.cancel_at_s) as scope:
                try:
                    status = await send(item.call)
                except Exception as exc:  # counted per type; the ledger has the details
                    tally.error(exc)
                else:
                    tally.status(status)
                    if item.call.kind == "interaction":
                        tally.latencies_s.append(trio.current_time() - started)
            if scope.cancelled_caught:
                tally.cancelled += 1
        finally:
            tally.outstanding -= 1

    async with trio.open_nursery() as nursery:
        for item in items:
            await trio.sleep_until(start + item.at_s)
            tally = tallies[item.workload]
            tally.scheduled += 1
            if tally.outstanding >= item.max_outstanding:
                tally.shed += 1
                continue
            tally.outstanding += 1
            nursery.start_soon(one, item, tally)


async def run_http(plan: Plan, index: int, limiter: TimedRatelimiter, signals: Any) -> dict[str, Any]:
    token = os.environ[TOKEN_ENV]
    tallies = new_tallies()
    print_line({"ready": True, "pid": os.getpid()})
    start = await wait_for_start(signals)
    for phase in phases(plan, index):
        transport = RatelimitedTransport(limiter=limiter)
        async with httpx.AsyncClient(
            base_url=plan.rest_url, transport=transport, timeout=HTTP_TIMEOUT_S
        ) as http:

            async def send(call: Call, http: httpx.AsyncClient = http) -> int:
                method, path, body, headers = request_for(call, token)
                response = await http.request(method, path, json=body, headers=headers)
                return response.status_code

            await run_timeline(phase.items, start, tallies, send)
    return {
        "workloads": {name: tally.to_json() for name, tally in tallies.items()},
        "interaction_waits_s": [round(value, 7) for value in limiter.exempt_waits_s],
        "engine": engine_report(limiter),
    }


# --- capacity -------------------------------------------------------------------------------------


def capacity_asks(capacity: CapacityPlan, index: int) -> list[Ask]:
    first = CAPACITY_FIRST_MAJOR + index * 1_000_000
    return [
        Ask(token=CAPACITY_TOKEN, route=CAPACITY_ROUTE, major=str(first + key))
        for key in range(capacity.keys_per_process)
    ]


CAPACITY_ANSWER: Final = Outcome(
    "response",
    status=200,
    headers=RateLimitHeaders(
        limit=CAPACITY_LIMIT,
        remaining=CAPACITY_LIMIT - 1,
        reset_after=CAPACITY_RESET_AFTER_S,
        bucket=CAPACITY_BUCKET,
    ),
)


def sample(values: list[float], limit: int = MAX_TIMINGS) -> list[float]:
    if len(values) <= limit:
        return values
    return random.Random(0).sample(values, limit)


async def run_capacity(plan: Plan, index: int, limiter: Ratelimiter, signals: Any) -> dict[str, Any]:
    assert plan.capacity is not None
    capacity = plan.capacity
    asks = capacity_asks(capacity, index)
    for ask in asks:  # the probes: each bucket learns its (huge) limit
        await limiter.release(await limiter.acquire(ask), CAPACITY_ANSWER)
    print_line({"ready": True, "pid": os.getpid()})
    start = await wait_for_start(signals)
    end = start + capacity.duration_s
    grants = 0
    timings_s: list[float] = []
    cpu_0 = time.process_time()

    async def hammer(offset: int) -> None:
        nonlocal grants
        position = offset
        while trio.current_time() < end:
            ask = asks[position % len(asks)]
            position += capacity.tasks_per_process
            started = time.perf_counter()
            permit = await limiter.acquire(ask)
            timings_s.append(time.perf_counter() - started)
            await limiter.release(permit, CAPACITY_ANSWER)
            grants += 1

    async with trio.open_nursery() as nursery:
        for offset in range(capacity.tasks_per_process):
            nursery.start_soon(hammer, offset)
    elapsed = trio.current_time() - start
    cpu_s = time.process_time() - cpu_0
    latencies_s: list[float] = []
    if index == 0 and capacity.latency_samples:
        await trio.sleep(0.2)  # the other processes finish their last grants and exit
        for number in range(capacity.latency_samples):
            ask = asks[number % len(asks)]
            started = time.perf_counter()
            permit = await limiter.acquire(ask)
            latencies_s.append(time.perf_counter() - started)
            await limiter.release(permit, CAPACITY_ANSWER)
    return {
        "grants": grants,
        "elapsed_s": round(elapsed, 4),
        "cpu_s": round(cpu_s, 3),
        "loaded_acquire_s": [round(value, 7) for value in sample(timings_s)],
        "acquire_s": [round(value, 7) for value in latencies_s],
        "engine": engine_report(limiter),
    }


async def run(plan: Plan, index: int) -> dict[str, Any]:
    if plan.engine is None:
        raise ValueError("the plan names no engine")
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        spec = backend_spec(plan.engine, redis_url=os.environ.get(REDIS_URL_ENV, ""))
        async with open_backend(spec) as backend:
            # While the shared backend is unreachable each process keeps its share of the global limit,
            # as a deployment that knows its process count configures it (R10).
            limiter = TimedRatelimiter(backend, fallback_share=plan.processes)
            if plan.capacity is not None:
                return await run_capacity(plan, index, limiter, signals)
            return await run_http(plan, index, limiter, signals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = trio.run(run, Plan.read(args.plan), args.index)
    print_line(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
