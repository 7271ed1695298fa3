"""Fault suite: `python -m benchmarks faults [--quick] [--smoke] [--json PATH] [--only NAMES]`.

The whole system under a steady firehose: the simulator (a process), a redis-server of the suite's own
(`SHARD_STORE_TYPE=redis`, so a killed supervisor's successor can RESUME), the supervisor with 2 workers
publishing to RabbitMQ (`BROKER_TYPE=amqp`, an exchange of its own per run) and serving the REST proxy on
`PROXY_HTTP_ADDRESS`, and a consumer process (`benchmarks.faults.consumer`, aio-pika) bound to every
dispatch, deduplicating on `(shard_id, session_id, seq)`. Faults are injected one at a time (anchors
gateway.md 6.3, F1-F16; ratelimit.md 5.3); for each the suite waits for recovery, lets the firehose run a
little longer, stops it, waits for the consumer to drain, and compares what the consumer holds with the
simulator's ledger.

Faults: worker_kill9 (F1), rolling_restart (SIGHUP, F2), op7_storm (F3), op9_resumable and
op9_not_resumable (F4), corrupt (zlib, F7), corrupt_zstd (a restart onto zstd-stream, then corrupt bytes;
F8, the faults after it run on zstd-stream), close_1000, close_1001, close_4000..4009 and drop (F5),
blackhole (B6), expire_sessions (F6), loop_stall_5s (SIGSTOP for 5 s, F15), worker_stall (SIGSTOP past
the supervisor's heartbeat timeout, F15), supervisor_kill9 (F16), ratelimit_holder_kill9 (ratelimit
5.3-6), rest_invalid_mix (5.3-7), identify_budget_low and identify_budget_exhausted (F13),
oversized_command (F10), send_limiter (1000 queued commands, F9), timeout_hello and timeout_ready (F14),
redis_outage and redis_outage_worker_kill (F12), rabbitmq_outage (`rabbitmqctl stop_app`/`start_app`,
F11; both outages last 30 s, 5 s in the smoke settings), and last the fatal codes close_4004_fatal ..
close_4014_fatal (the supervisor must exit 3; the suite starts a new one after each but the last).
`--smoke` runs worker_kill9, op7_storm, corrupt, oversized_command and close_4010_fatal. `--soak MINUTES`
is a different run: see `benchmarks.faults.soak`.

Figures per fault (`faults.<name>.*`):
- `lost`: dispatches the simulator produced that the consumer never received. For the session a shard is
  on at the end (the one it resumed or identified last), every seq 1..last_seq counts; for a session that
  ended or was given up (op 9 false, 4003-4009, expiry) only the holes below the highest seq received
  count, since what the gateway queued after the session died is not deliverable by design (E3, F).
- `duplicates`: deliveries of a `(shard, session, seq)` the consumer already had (at least once is the
  contract; reported, not judged).
- `identifies`: IDENTIFYs the simulator accepted during the fault, beyond the initial ones.
- `resumes`: successful RESUMEs during the fault.
- `recover_s`: wall seconds from the injection until the simulator saw every affected shard come back
  (RESUMED or READY, counted from its ledger) *and* the consumer had received a new event from every shard
  after that. For the outages it counts from the start of the outage; for the fatal code it is the time
  to the supervisor's exit; for the permit holder it includes the wait for the bucket.
- rest_invalid_mix adds `invalid_peak`, `invalid_limit`, `invalid_peak_fraction`, `bans`, `429s` (by
  the simulator's category), `simulator_by_status` and `proxy_answers`.

Pass: 0 lost; 0 identifies where a resume was possible (at most one per affected shard where it was not);
`recover_s` within the fault's bound (F1: 3 s for the resume plus 1 s for the consumer; the others are in
`faults_for`); plus the REST and fatal criteria above. `faults.passed` / `faults.total`; the exit status
is 1 on any FAIL. The RabbitMQ outage stops the machine's shared broker: do not run it beside other users.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.faults.injections import (
    CONSUMER_SLACK_S,
    EXIT_FATAL,
    Fault,
    faults_for,
    in_running_order,
)
from benchmarks.faults.system import (
    SETTINGS,
    Settings,
    System,
    Tally,
    drain,
    open_system,
    tally,
    wait_recovered,
)
from benchmarks.harness import (
    ROOT,
    BenchmarkError,
    Progress,
    add_amqp_url_argument,
    machine_info,
    wait_sessions_ready,
    write_results,
)

DESCRIPTION: Final = "events lost, duplicates, identifies and recovery under injected faults"
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


def broken_rule_reasons(rules_broken: dict[str, int]) -> list[str]:
    """A fault fails on any Discord rule the simulator saw broken, except a RESUME on the base URL after
    the resume URL failed to answer (the fallback anchors gateway.md F3 asks for)."""
    return [
        f"broke {rule} {count} times"
        for rule, count in sorted(rules_broken.items())
        if rule not in TOLERATED_RULES
    ]


async def start_fault(system: System, fault: Fault) -> Tally:
    """The tally at a quiet moment, then the firehose running for a second; the fault is injected next."""
    before = await drain(system)
    await system.sim.set_event_rate(system.settings.event_rate)
    await trio.sleep(1.0)
    system.progress.say(f"{fault.name}: injecting ({fault.anchor})")
    return before


async def run_fault(system: System, fault: Fault) -> FaultResult:
    system.notes.clear()
    before = await start_fault(system, fault)
    fault_at = time.time()
    affected = await fault.inject(system)
    bound_s = fault.bound_s + (system.settings.outage_s if fault.after_outage else 0.0)
    recover_s = await wait_recovered(system, before, affected, fault_at, bound_s)
    await trio.sleep(system.settings.settle_s)
    after = await drain(system)
    lost = after.lost - before.lost
    identifies = after.identifies - before.identifies
    reasons = []
    if lost > 0:
        reasons.append(f"{lost} lost")
    if fault.resumable and identifies > 0:
        reasons.append(f"{identifies} identifies where a resume was possible")
    if not fault.resumable and identifies > affected:
        reasons.append(f"{identifies} identifies for {affected} shards")
    reasons.extend(system.notes.get("failures", []))
    rules_broken = after.rules_broken_since(before)
    reasons.extend(broken_rule_reasons(rules_broken))
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
    )
    verdict = "PASS" if result.passed else "FAIL " + "; ".join(reasons)
    system.progress.say(
        f"  {fault.name}: lost {result.lost}, duplicates {result.duplicates}, identifies {identifies}, "
        f"resumes {result.resumes}, recover {result.recover_s} s: {verdict}"
    )
    return result


async def run_fatal(system: System, fault: Fault, *, restart: bool) -> FaultResult:
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
    settings: Settings, faults: list[Fault], log_dir: Path, progress: Progress, amqp_url: str
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


def format_table(results: list[FaultResult], errors: dict[str, str]) -> str:
    lines = [
        f"{'fault':<23} {'anchor':<10} {'lost':>5} {'dups':>6} {'ident':>5} {'resum':>5} "
        f"{'recover_s':>9} {'bound':>6}  verdict"
    ]
    for r in results:
        recover = "-" if r.recover_s is None else f"{r.recover_s:.2f}"
        verdict = "PASS" if r.passed else "FAIL (" + "; ".join(r.reasons) + ")"
        lines.append(
            f"{r.name:<23} {r.anchor:<10} {r.lost:>5} {r.duplicates:>6} {r.identifies:>5} {r.resumes:>5} "
            f"{recover:>9} {r.bound_s:>6g}  {verdict}"
        )
    for name, message in errors.items():
        lines.append(f"{name:<23} ERROR {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every fault, short windows (under 15 minutes)")
    size.add_argument("--smoke", action="store_true", help="five cheap faults, for tests (under a minute)")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "results" / "faults.json",
        help="results file (default: %(default)s)",
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="child logs (default: faults-logs next to --json)"
    )
    parser.add_argument("--only", default=None, metavar="NAMES", help="comma-separated fault names to run")
    add_amqp_url_argument(parser, "for the workers and the consumer")
    from benchmarks.faults.soak import add_soak_argument  # the module also runs on its own (-m)

    add_soak_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.soak is not None:
        from benchmarks.faults.soak import run_soak

        return run_soak(args, SETTINGS["quick"])
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    faults = faults_for(settings)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        known = {fault.name: fault for fault in faults_for(SETTINGS["full"])}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(f"--only: unknown faults {', '.join(unknown)} (known: {', '.join(known)})")
        faults = [known[name] for name in wanted]
    json_path: Path = args.json
    log_dir: Path = args.logs or json_path.parent / "faults-logs"
    progress = Progress()
    machine = machine_info()
    progress.say(f"fault suite ({settings.name}): {len(faults)} faults; logs in {log_dir}")
    faults = in_running_order(faults)
    results, errors = trio.run(run_suite, settings, faults, log_dir, progress, args.amqp_url)
    passed = sum(1 for r in results if r.passed)
    total = len(faults)
    figures: dict[str, Any] = {
        r.name: {
            "lost": r.lost,
            "duplicates": r.duplicates,
            "identifies": r.identifies,
            "resumes": r.resumes,
            "recover_s": r.recover_s,
            "passed": r.passed,
            **{key: value for key, value in r.detail.items() if key != "missing_by_session"},
        }
        for r in results
    }
    output: dict[str, Any] = {
        "suite": "faults",
        "settings": asdict(settings),
        "faults": {**figures, "passed": passed, "total": total},
        "results": [asdict(r) for r in results],
        "errors": errors,
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, output)
    print(format_table(results, errors))
    print(
        f"\n{passed}/{total} faults passed; wrote {json_path} in {output['elapsed_s']:.0f} s", file=sys.stderr
    )
    return 0 if passed == total and not errors else 1
