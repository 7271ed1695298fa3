"""The fault suite's reshard phase: live resharding (`RESHARD=auto`) with a fault in its way.

Each fault runs on a system of its own (`benchmarks.reshard.open_reshard_system`: the simulator in
guild-stream mode, recommending 4 shards; the reshard consumer on an exchange of the run's own; `python -m
supervisor --shards auto --workers 2`), since a reshard leaves the system at 8 shards and the next fault
starts from 4. `benchmarks.reshard.measure_reshard` runs the guild stream, injects, waits until /healthz shows
the new generation live and idle, drains and audits the consumer against the simulator's guild ledger.

- reshard_grow: the simulator recommends 8 shards, then SIGUSR1 (the supervisor asks /gateway/bot at once).
- reshard_4011: the simulator recommends 8 shards and refuses IDENTIFYs of fewer (`min_shard_count` 8); one
  shard of the running 4 gets op 9 false (not resumable), so it must IDENTIFY and is closed with 4011: the
  worker stops only that shard and reports ShardingRequired, and the supervisor reshards. That shard's
  guilds have no publisher from the invalidation until the new generation goes live: the supervisor tells
  the shadow generation (Uncovered), which keeps those guilds' events past its 5 s buffer and publishes
  them at the cut-over (late, not lost); events from before the new sessions existed reached no session
  and are not owed.
- reshard_worker_kill: as reshard_grow, with one new shard's READY withheld (so the new generation stays in
  its start until that shard's READY timeout reconnects it), and one worker of the new generation (found by
  its `worker.started` log line: a worker index the first generation did not have) SIGKILLed once its own
  shards are READY (its `shard.ready` log lines) and `SESSION_SETTLE_S` has passed, before the cut-over: a
  shadow saves its session at READY, so the supervisor restarts it in its role and it RESUMEs its
  sessions: still one IDENTIFY per new shard.

Figures (`faults.<name>.*`), as the other faults: `lost` (guild events delivered to a session and never
published: the audit), `duplicates` (publications of an event beyond its first; reported), `identifies`
(IDENTIFYs of the new shard count the simulator accepted from the trigger on), `resumes`, `overlaps`,
`recover_s` (the trigger to the new generation live, as /healthz shows it); and `reshard_duration_s`,
`reshard_ready_s`, `max_guild_gap_s`, `identifies_other`, `events`, `published`, `log_events`.
Pass: 0 lost, identifies == the new shard count, 0 overlaps, no Discord rule broken, the new generation
live within the bound (the identify bound plus `RESHARD_BOUND_SLACK_S`, plus `RESTART_SLACK_S` when a worker
is killed); reshard_grow also needs 0 duplicates and `max_guild_gap_s` <= 2 s. The simulator's
`client_close_kills_session` (a close with 1000) is expected once per retired old shard and judged only
beyond that.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.faults.runner import FaultResult, broken_rule_reasons
from benchmarks.faults.system import POLL_S
from benchmarks.faults.system import Settings as FaultSettings
from benchmarks.harness import BenchmarkError, Progress
from benchmarks.reshard import (
    MAX_GUILD_GAP_S,
    SETTINGS,
    ReshardRun,
    ReshardSystem,
    Settings,
    measure_reshard,
    open_reshard_system,
    request_by_signal,
)

__all__ = [
    "RESHARD_FAULTS",
    "ReshardFault",
    "reshard_faults_for",
    "reshard_selection",
    "run_reshard_suite",
]

#: The faults of this phase, in their running order.
RESHARD_FAULTS: Final = ("reshard_grow", "reshard_4011", "reshard_worker_kill")
#: Beyond the identify bound: worker processes started, READY, the guilds, the cut-over, the consumer.
RESHARD_BOUND_SLACK_S: Final = 15.0
#: The withheld READY's timeout (15 s) and reconnect, a killed worker's restart and its RESUMEs.
RESTART_SLACK_S: Final = 25.0
#: The simulator's rule for a client close with 1000/1001: how a retiring generation ends its sessions.
RETIRE_CLOSE_RULE: Final = "client_close_kills_session"
#: After a shadow worker's shards are READY, how long their sessions (saved at READY) take to reach the
#: supervisor before the worker is killed.
SESSION_SETTLE_S: Final = 0.5
#: How long the suite waits for the new generation's workers to start and their shards to be READY.
NEW_WORKER_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class ReshardFault:
    """One fault of this phase: what it does to the system and the bound on the new generation going live."""

    name: str
    inject: Callable[[ReshardSystem], Awaitable[None]]
    bound_s: float
    anchor: str
    #: More time for the new generation (a killed worker's restart).
    extra_timeout_s: float = 0.0


def _figures(system: ReshardSystem, **values: Any) -> None:
    system.notes.setdefault("figures", {}).update(values)


async def grow(system: ReshardSystem) -> None:
    await request_by_signal(system)


async def sharding_required(system: ReshardSystem) -> None:
    """Recommend 8, refuse IDENTIFYs below 8, then end one running shard's session (op 9 false)."""
    settings = system.settings
    await system.control("recommended_shards", {"shards": settings.target})
    await system.control("min_shard_count", {"count": settings.target})
    body = {"shards": [0], "shard_count": settings.shards, "resumable": False}
    touched = await system.control("invalidate", body)
    system.progress.say(f"  min_shard_count {settings.target}; op 9 false to shard 0 of {settings.shards}")
    if touched.get("connections") != 1:
        raise BenchmarkError(f"op 9 reached {touched} connections, not shard 0's one")


async def new_workers(system: ReshardSystem, old_workers: set[int]) -> dict[int, tuple[int, int]]:
    """The new generation's workers, once they have started: index -> (pid, its shard count), from the
    supervisor's `worker.started` lines (worker indexes the first generation did not have)."""
    with trio.move_on_after(NEW_WORKER_TIMEOUT_S):
        while True:
            system.check_alive()
            started = {
                int(r["worker"]): (int(r["pid"]), int(r["shards"]))
                for r in system.log_records("worker.started")
                if int(r["worker"]) not in old_workers
            }
            if len(started) >= system.settings.workers:
                return started
            await trio.sleep(POLL_S)
    raise BenchmarkError(f"the new generation's workers did not start within {NEW_WORKER_TIMEOUT_S:g} s")


def ready_shards_of(system: ReshardSystem, pid: int) -> set[int]:
    """The shards the worker `pid` logged READY (`shard.ready`, its own pid on the line)."""
    records = system.log_records("shard.ready")
    return {int(r["shard"]) for r in records if r.get("pid") == pid and "shard" in r}


async def kill_new_worker(system: ReshardSystem) -> None:
    """Hold one new shard's READY back (`withhold_ready` 1: the new generation cannot be complete until that
    shard's READY timeout reconnects it), trigger the reshard, and SIGKILL a new worker whose shards are all
    READY once `SESSION_SETTLE_S` has passed: a shadow saves its session at READY, so its shards RESUME."""
    old_workers = {int(r["worker"]) for r in system.log_records("worker.started")}
    await system.control("withhold_ready", {"count": 1})
    await request_by_signal(system)
    workers = await new_workers(system, old_workers)
    victim: tuple[int, int, int] | None = None
    with trio.move_on_after(NEW_WORKER_TIMEOUT_S):
        while victim is None:
            system.check_alive()
            for index, (pid, shards) in sorted(workers.items()):
                if len(ready_shards_of(system, pid)) >= shards:
                    victim = index, pid, shards
                    break
            await trio.sleep(0.05)
    if victim is None:
        raise BenchmarkError(f"no worker of the new generation had all its shards READY: {workers}")
    index, pid, shards = victim
    await trio.sleep(SESSION_SETTLE_S)
    detail = await system.reshard_detail()
    switched = bool(system.log_records("reshard.switching"))
    os.kill(pid, signal.SIGKILL)
    system.progress.say(
        f"  SIGKILL to new worker {index} (pid {pid}, {shards} shards READY); reshard {detail}"
    )
    _figures(
        system,
        killed_worker=index,
        killed_pid=pid,
        killed_worker_shards=shards,
        killed_after_switch_began=switched,
        killed_at=round(time.time(), 3),
    )
    if switched or (detail or {}).get("state") != "starting":
        system.notes.setdefault("failures", []).append(
            f"the worker was killed after the new generation's start (reshard {detail})"
        )


def reshard_faults_for(settings: FaultSettings) -> list[ReshardFault]:
    """Every reshard fault with its bound (the identify bound of the reshard's settings plus slack)."""
    bound = reshard_settings(settings).identify_bound_s + RESHARD_BOUND_SLACK_S
    return [
        ReshardFault("reshard_grow", grow, bound, "reshard"),
        ReshardFault("reshard_4011", sharding_required, bound, "reshard F5"),
        ReshardFault(
            "reshard_worker_kill", kill_new_worker, bound + RESTART_SLACK_S, "reshard F1", RESTART_SLACK_S
        ),
    ]


def reshard_settings(settings: FaultSettings) -> Settings:
    return SETTINGS[settings.name if settings.name in SETTINGS else "full"]


def reshard_selection(settings: FaultSettings, only: str | None) -> tuple[list[ReshardFault], str | None]:
    """This phase's faults for `--only` (or, without it, all of them unless the settings pick their own
    faults, as `--smoke` does), and what `--only` leaves for the other phases: None without `--only`, ""
    when it named only reshard faults."""
    faults = reshard_faults_for(settings)
    if not only:
        if settings.faults is not None:
            return [fault for fault in faults if fault.name in settings.faults], None
        return faults, None
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    chosen = [fault for name in wanted for fault in faults if fault.name == name]
    return chosen, ",".join(name for name in wanted if name not in RESHARD_FAULTS)


def judge(fault: ReshardFault, system: ReshardSystem, run: ReshardRun) -> FaultResult:
    settings = system.settings
    reasons: list[str] = []
    if run.lost:
        reasons.append(f"{run.lost} lost")
    if run.identifies != settings.target:
        reasons.append(f"{run.identifies} identifies for {settings.target} new shards")
    if run.overlaps:
        reasons.append(f"{run.overlaps} times two connections served one shard")
    if fault.name == "reshard_grow":
        if run.duplicates:
            reasons.append(f"{run.duplicates} duplicates")
        if run.max_guild_gap_s > MAX_GUILD_GAP_S:
            reasons.append(f"a guild went {run.max_guild_gap_s:.2f} s without events > {MAX_GUILD_GAP_S:g} s")
    reasons.extend(system.notes.get("failures", []))
    rules = dict(run.rules_broken)
    # The retiring generation ends its sessions with 1000 by design: one per old shard is not a fault.
    retire_closes = rules.pop(RETIRE_CLOSE_RULE, 0)
    if retire_closes > settings.shards:
        rules[RETIRE_CLOSE_RULE] = retire_closes
    reasons.extend(broken_rule_reasons(rules))
    if run.observed_s > fault.bound_s:
        reasons.append(f"the new generation went live after {run.observed_s:.1f} s > {fault.bound_s:g} s")
    detail = asdict(run)
    return FaultResult(
        fault.name,
        fault.anchor,
        lost=run.lost,
        duplicates=run.duplicates,
        identifies=run.identifies,
        resumes=run.resumes,
        recover_s=round(run.observed_s, 2),
        bound_s=fault.bound_s,
        affected_shards=settings.target,
        resumable=False,
        passed=not reasons,
        reasons=reasons,
        detail={
            "reshard_duration_s": detail.pop("duration_s"),
            "reshard_ready_s": detail.pop("ready_s"),
            **{key: value for key, value in detail.items() if key not in ("lost", "duplicates", "resumes")},
            **system.notes.get("figures", {}),
        },
        overlaps=run.overlaps,
    )


async def run_reshard_suite(
    settings: FaultSettings,
    faults: list[ReshardFault],
    log_dir: Path,
    progress: Progress,
    amqp_url: str,
) -> tuple[list[FaultResult], dict[str, str]]:
    """The reshard phase: each fault on a fresh system (see the module docstring). A fault that errors is
    recorded and the next one still runs: nothing carries over between systems."""
    results: list[FaultResult] = []
    errors: dict[str, str] = {}
    reshard = reshard_settings(settings)
    for fault in faults:
        try:
            async with open_reshard_system(reshard, log_dir, progress, amqp_url, name=fault.name) as system:
                progress.say(f"{fault.name}: injecting ({fault.anchor})")
                run = await measure_reshard(system, fault.inject, extra_timeout_s=fault.extra_timeout_s)
                result = judge(fault, system, run)
        except (BenchmarkError, OSError, httpx.HTTPError) as exc:
            errors[fault.name] = f"{exc.__class__.__name__}: {exc}"
            progress.say(f"  {fault.name}: ERROR {str(exc).splitlines()[0] if str(exc) else exc!r}")
            continue
        results.append(result)
        verdict = "PASS" if result.passed else "FAIL " + "; ".join(result.reasons)
        progress.say(
            f"  {fault.name}: lost {result.lost}, duplicates {result.duplicates}, identifies "
            f"{result.identifies}, resumes {result.resumes}, overlaps {result.overlaps}, live after "
            f"{result.recover_s} s: {verdict}"
        )
    return results, errors
