"""Live resharding as real processes: `python -m supervisor --shards auto` (RESHARD=auto, two workers per
generation) against the simulator's bot-wide guild stream, events to RabbitMQ, and the consumer's record of
every MESSAGE_CREATE audited against the simulator's guild ledger (benchmarks/reshard.py's harness).

One supervisor goes through everything, in order (each reshard waits out the identify window of the one
before, so separate systems would cost more than the sequence does):
1. the budget guard: a new generation that would eat into SESSION_START_RESERVE is refused, the old one runs;
2. 4 -> 8 by SIGUSR1;
3. 8 -> 16 by 4011: one running shard must IDENTIFY and is refused with 4011, and a worker of the new
   generation is SIGKILLed while the new generation is still in the shadow (it RESUMEs);
4. 16 -> 2: shrinking.
Every reshard: 0 lost, 0 duplicated, each new shard identified exactly once, no shard served twice.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import trio

from benchmarks.faults.reshard import new_workers, ready_shards_of, sharding_required
from benchmarks.harness import Progress
from benchmarks.reshard import (
    ReshardRun,
    ReshardSystem,
    Settings,
    measure_reshard,
    open_reshard_system,
    request_by_signal,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SETTINGS = Settings(
    "test",
    shards=4,
    target=8,
    workers=2,
    max_concurrency=16,
    guild_count=32,
    guild_event_rate=64.0,
    warmup_s=0.5,
    settle_s=1.0,
)
TIMEOUT_S = 240


def assert_exactly_once(run: ReshardRun, target: int, generation: int) -> None:
    assert (run.target, run.generation) == (target, generation)
    assert run.lost == 0, run.lost_sample
    assert run.duplicates == 0, run.duplicate_sample
    assert run.unknown == 0
    assert run.identifies == target, run
    assert run.overlaps == 0
    assert set(run.rules_broken) <= {"client_close_kills_session"}, run.rules_broken  # the retired 1000s
    assert run.log_events.get("reshard.done") == generation


async def wait_logged(system: ReshardSystem, event: str, count: int = 1, timeout_s: float = 30.0) -> None:
    with trio.fail_after(timeout_s):
        while len(system.log_records(event)) < count:
            system.check_alive()
            await trio.sleep(0.1)


async def grow_by_4011_and_kill_a_new_worker(system: ReshardSystem) -> None:
    old_workers = {int(r["worker"]) for r in system.log_records("worker.started")}
    await sharding_required(system)
    workers = await new_workers(system, old_workers)
    with trio.fail_after(60):
        while True:
            ready = [pid for pid, n in sorted(workers.values()) if len(ready_shards_of(system, pid)) >= n]
            if ready:
                break
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # its sessions reach the supervisor's book
    detail = await system.reshard_detail()
    assert detail is not None and detail["state"] == "starting", detail
    os.kill(ready[0], signal.SIGKILL)


async def test_live_reshards_guarded_grown_by_signal_and_4011_with_a_kill_and_shrunk(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_reshard_system(SETTINGS, tmp_path, Progress(), AMQP_URL, name="test") as system:
            # 1. The guard: 8 identifies from 15 would leave 7 of a reserve of 10.
            await system.control("session_start", {"remaining": 15})
            await system.control("recommended_shards", {"shards": 8})
            system.supervisor.process.send_signal(signal.SIGUSR1)
            await wait_logged(system, "reshard.refused")
            detail = await system.reshard_detail()
            assert detail is not None
            assert (detail["generation"], detail["shards"], detail["state"]) == (0, 4, "idle")
            await system.control("session_start", {"remaining": 1000})

            # 2. 4 -> 8 by SIGUSR1.
            run = await measure_reshard(system, request_by_signal)
            assert_exactly_once(run, 8, 1)
            assert run.resumes == 0
            assert run.max_guild_gap_s <= 2.0

            # 3. 8 -> 16 by 4011, a new worker killed in the shadow: it RESUMEs, nothing identifies twice.
            system.settings = dataclasses.replace(SETTINGS, shards=8, target=16)
            run = await measure_reshard(system, grow_by_4011_and_kill_a_new_worker, extra_timeout_s=30)
            assert_exactly_once(run, 16, 2)
            assert run.resumes >= 1
            assert run.log_events.get("reshard.sharding_required", 0) >= 1

            # 4. 16 -> 2.
            await system.control("min_shard_count", {"count": 0})
            system.settings = dataclasses.replace(SETTINGS, shards=16, target=2)
            run = await measure_reshard(system, request_by_signal)
            assert_exactly_once(run, 2, 3)
