"""Running one fault and judging it: inject, wait for recovery, drain, compare with the simulator's ledger.

`run_fault` measures an ordinary fault, `run_fatal` a fatal close code (the supervisor must exit; the system
gets a new one unless it was the last fault), `run_suite` runs a list of faults on one system and stops at
the first that errors (the system may be in any state after it). What the figures mean and when a fault
passes is in the package docstring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.faults.injections import CONSUMER_SLACK_S, EXIT_FATAL, Fault, S
from benchmarks.faults.system import (
    OVERLAP_RULE,
    Observed,
    Settings,
    System,
    Tally,
    drain,
    open_system,
    tally,
    wait_recovered,
)
from benchmarks.harness import BenchmarkError, Progress, wait_sessions_ready

__all__ = ["FaultResult", "broken_rule_reasons", "run_fatal", "run_fault", "run_suite", "start_fault"]

#: Simulator rules a fault may break without failing (see `broken_rule_reasons`).
TOLERATED_RULES: Final = frozenset({"resume_not_on_resume_url"})
#: How long the suite watches for a reconnect after a fatal close.
FATAL_WATCH_S: Final = 3.0


@dataclass(slots=True)
class FaultResult:
    name: str
    anchor: str
    lost: int
    duplicates: int
    identifies: int
    resumes: int
    recover_s: float | None
    bound_s: float
    affected_shards: int
    resumable: bool
    passed: bool
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    #: Times a connection began to serve a shard that another connection still served (bound 0).
    overlaps: int = 0


def broken_rule_reasons(rules_broken: dict[str, int]) -> list[str]:
    """A fault fails on any Discord rule the simulator saw broken, except a RESUME on the base URL after
    the resume URL failed to answer (the fallback anchors gateway.md F3 asks for)."""
    return [
        f"broke {rule} {count} times"
        for rule, count in sorted(rules_broken.items())
        if rule not in TOLERATED_RULES
    ]


async def start_fault(system: Observed, fault: Fault[Any]) -> Tally:
    """The tally at a quiet moment, then the firehose running for a second; the fault is injected next."""
    before = await drain(system)
    await system.sim.set_event_rate(system.settings.event_rate)
    await trio.sleep(1.0)
    system.progress.say(f"{fault.name}: injecting ({fault.anchor})")
    return before


async def run_fault(system: S, fault: Fault[S]) -> FaultResult:
    system.notes.clear()
    before = await start_fault(system, fault)
    fault_at = time.time()
    affected = await fault.inject(system)
    bound_s = fault.bound_s + (system.settings.outage_s if fault.after_outage else 0.0)
    recover_s = await wait_recovered(system, before, affected, fault_at, bound_s)
    if fault.finish is not None:
        await fault.finish(system)
    await trio.sleep(system.settings.settle_s)
    after = await drain(system)
    lost = after.lost - before.lost
    identifies = after.identifies - before.identifies
    overlaps = after.overlaps - before.overlaps
    reasons = []
    if lost > 0:
        reasons.append(f"{lost} lost")
    if fault.resumable and identifies > 0:
        reasons.append(f"{identifies} identifies where a resume was possible")
    if not fault.resumable and identifies > affected:
        reasons.append(f"{identifies} identifies for {affected} shards")
    if overlaps > 0:
        reasons.append(f"{overlaps} times two connections served one shard")
    reasons.extend(system.notes.get("failures", []))
    rules_broken = after.rules_broken_since(before)
    # The overlap rule is judged as `overlaps` above.
    reasons.extend(broken_rule_reasons({k: v for k, v in rules_broken.items() if k != OVERLAP_RULE}))
    if recover_s is None:
        reasons.append("did not recover")
    elif recover_s > bound_s:
        reasons.append(f"recovered in {recover_s:.1f} s > {bound_s:g} s")
    result = FaultResult(
        fault.name,
        fault.anchor,
        lost=max(0, lost),
        duplicates=after.duplicates - before.duplicates,
        identifies=identifies,
        resumes=after.resumes - before.resumes,
        recover_s=None if recover_s is None else round(recover_s, 2),
        bound_s=bound_s,
        affected_shards=affected,
        resumable=fault.resumable,
        passed=not reasons,
        reasons=reasons,
        detail={
            "missing_by_session": {k: v for k, v in after.missing.items() if k not in before.missing},
            "rules_broken": rules_broken,
            **system.notes.get("figures", {}),
        },
        overlaps=overlaps,
    )
    verdict = "PASS" if result.passed else "FAIL " + "; ".join(reasons)
    system.progress.say(
        f"  {fault.name}: lost {result.lost}, duplicates {result.duplicates}, identifies {identifies}, "
        f"resumes {result.resumes}, overlaps {overlaps}, recover {result.recover_s} s: {verdict}"
    )
    return result


async def run_fatal(system: System, fault: Fault[System], *, restart: bool) -> FaultResult:
    """A fatal close code on every shard: the supervisor exits with EXIT_FATAL (3) within the bound, no
    shard identifies or resumes afterwards, and nothing read before the close is lost (every session has
    ended, so only holes count). `recover_s` is the time to the supervisor's exit. With `restart`, a new
    supervisor is started afterwards (outside the measurement) and every shard is READY again."""
    before = await start_fault(system, fault)
    supervisor = system.supervisor.running()
    fault_at = time.time()
    await fault.inject(system)
    exited_s: float | None = None
    with trio.move_on_after(3 * fault.bound_s):
        await supervisor.process.wait()
        exited_s = time.time() - fault_at
    await trio.sleep(FATAL_WATCH_S)
    await system.sim.set_event_rate(0)
    await trio.sleep(CONSUMER_SLACK_S)
    after = tally(await system.sim.gateway_ledger(), system.consumed())
    lost = after.lost - before.lost
    identifies = after.identifies - before.identifies
    resumes = after.resumes - before.resumes
    code = supervisor.process.returncode
    reasons = []
    if code != EXIT_FATAL:
        reasons.append(f"supervisor exit status {code}, not {EXIT_FATAL}")
    if exited_s is not None and exited_s > fault.bound_s:
        reasons.append(f"exited after {exited_s:.1f} s > {fault.bound_s:g} s")
    if lost > 0:
        reasons.append(f"{lost} lost")
    if identifies or resumes:
        reasons.append(f"{identifies} identifies and {resumes} resumes after a fatal close")
    rules_broken = after.rules_broken_since(before)
    reasons.extend(broken_rule_reasons(rules_broken))
    result = FaultResult(
        fault.name,
        fault.anchor,
        lost=max(0, lost),
        duplicates=after.duplicates - before.duplicates,
        identifies=identifies,
        resumes=resumes,
        recover_s=None if exited_s is None else round(exited_s, 2),
        bound_s=fault.bound_s,
        affected_shards=system.settings.shards,
        resumable=False,
        passed=not reasons,
        reasons=reasons,
        detail={"supervisor_exit_status": code, "rules_broken": rules_broken},
        overlaps=after.overlaps - before.overlaps,
    )
    verdict = "PASS" if result.passed else "FAIL " + "; ".join(reasons)
    system.progress.say(
        f"  {fault.name}: supervisor exit {code} after {result.recover_s} s, lost {result.lost}, "
        f"identifies {identifies}, resumes {resumes}: {verdict}"
    )
    if restart:
        await system.restart_supervisor()
        await wait_sessions_ready(
            system.sim,
            system.settings.shards,
            min_sent=2,
            within_s=60.0,
            watch=[system.supervisor.running(), system.consumer],
        )
    return result


async def run_suite(
    settings: Settings, faults: list[Fault[System]], log_dir: Path, progress: Progress, amqp_url: str
) -> tuple[list[FaultResult], dict[str, str]]:
    results: list[FaultResult] = []
    errors: dict[str, str] = {}
    async with open_system(settings, log_dir, progress, amqp_url) as system:
        for index, fault in enumerate(faults):
            try:
                if fault.fatal:
                    last = index == len(faults) - 1
                    results.append(await run_fatal(system, fault, restart=not last))
                else:
                    results.append(await run_fault(system, fault))
            except (BenchmarkError, OSError, httpx.HTTPError) as exc:
                errors[fault.name] = f"{exc.__class__.__name__}: {exc}"
                progress.say(f"  {fault.name}: ERROR {str(exc).splitlines()[0] if str(exc) else exc!r}")
                # The system may be in any state: the faults after it would measure that, not themselves.
                break
    return results, errors
