"""Multi-core scaling: `python -m benchmarks scaling [--quick] [--json PATH] [--max-workers N]`.

Total events per second against the number of worker processes, 1, 2, 4, ... up to the CPUs this process
may use (or `--max-workers`), plus that maximum itself when it is not a power of two. The supervisor's
job is one worker per core; this suite asks whether W workers really deliver W times one worker's events.

Each point: `ceil(W / workers_per_simulator)` simulator processes, each recommending the shards of its
workers, and W `python -m workers` processes (null broker: every dispatch is decoded, counted and
dropped, so the figure is the gateway's own work) with `shards_per_worker` shards each, all identifying at
once (max_concurrency = shards). Once every session has sent READY and its GUILD_CREATE, each session's
firehose goes to `event_rate`; after a warm-up, a window measures Δ(dispatches the simulators wrote to
sockets, summed over their ledgers) per wall second. A simulator runs at most 4,096 events ahead of a
client (simulator sessions.py), so at steady state what it sends is what the workers consumed.

The offered load must not be the bottleneck: each worker is offered `shards_per_worker * event_rate`
events per second, about twice what one worker consumes on this machine, and one simulator process
serves `workers_per_simulator` workers. The simulators compress at zlib level 1 (their CPU per event is
what limits them; the workers' inflate costs about the same at any level).

Placement (os.sched_setaffinity): worker i on CPU i; the simulators share the CPUs the workers do not
use, if any. When W takes every CPU (W = 2 on a 2-CPU machine, W = 16 on 16), the simulators float over
the workers' CPUs, and that point measures the machine (workers plus the simulators feeding them), not
the workers alone: the results say so (`points[W].overlap`), and report `largest_unshared_workers` and
its efficiency beside the figure at the maximum.

Figures (`scaling.*`):
- `events_per_s.w<W>`: total events per wall second with W workers;
- `events_per_worker_cpu_s.w<W>`: the same events per CPU-second of all workers together;
- `worker_cpu_share.w<W>`: mean share of one core used per worker (near 1.0: saturated);
- `efficiency_at_max`: events_per_s at the most workers / (that many * events_per_s with 1);
- `cpu_efficiency_at_max`: events_per_worker_cpu_s at the most workers / with 1 (below 1.0 means each
  worker does less per CPU-second when more run: shared caches, memory bandwidth, SMT siblings);
- `efficiency_unshared`: `efficiency_at_max` at `largest_unshared_workers`, the largest W whose
  workers and simulators had CPUs of their own.

Target: `efficiency_unshared >= 0.8`, judged only where it can fail. With one worker the efficiency is
1.0 by construction, and the largest unshared count needs CPUs for its workers and its simulators, so the
verdict is SKIP (not a PASS; `verdict_notes` says why; `--strict` does not fail on it) unless the machine
has at least MIN_JUDGED_CPUS (4) usable CPUs and the run's worker counts include at least
MIN_JUDGED_COUNTS (2) above 1 (`judgement_blocker`); the smoke size (1 and 2 workers) is never judged.
Judged, the verdict is ERROR when the figure is missing or no point of 2 or more workers on CPUs of their
own was measured (its 1.0 would say nothing).

Each point runs `repeats` times (the median is kept). The exit status is 0 unless every point failed
(with `--strict`, 3 when the verdict is FAIL or ERROR).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks import children
from benchmarks.harness import (
    CONTROL_TIMEOUT_S,
    SIMULATOR_START_TIMEOUT_S,
    BenchmarkError,
    ChildProcess,
    Progress,
    SimulatorProcess,
    add_common_arguments,
    machine_info,
    open_child,
    read_json_line,
    run_or_error,
    sessions_sent,
    wait_sessions_ready,
    write_results,
)
from benchmarks.targets import (
    Target,
    Verdict,
    format_figures,
    nest,
    strict_status,
    verdict_summary,
    verdicts,
)

DESCRIPTION: Final = "total events per second against the number of worker processes (multi-core scaling)"
#: The worker's default transport compression (DESIGN 3.2).
COMPRESSION: Final = "zlib-stream"
EFFICIENCY_KEY: Final = "scaling.efficiency_unshared"
TARGETS: Final = {EFFICIENCY_KEY: Target(">=", 0.8)}
#: The efficiency target is judged only on a machine with this many usable CPUs ...
MIN_JUDGED_CPUS: Final = 4
#: ... and a run with this many worker counts above 1 (the module docstring says why).
MIN_JUDGED_COUNTS: Final = 2


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    shards_per_worker: int
    #: Dispatches per second per session once the firehose is on.
    event_rate: float
    workers_per_simulator: int
    warmup_s: float
    window_s: float
    repeats: int
    ready_timeout_s: float
    #: The most workers when `--max-workers` is not given (None: every usable CPU).
    default_max_workers: int | None = None


SETTINGS: Final = {
    "smoke": Settings("smoke", 2, 300.0, 2, 0.5, 1.0, 1, 60.0, default_max_workers=2),
    "quick": Settings("quick", 8, 8000.0, 2, 2.0, 4.0, 1, 90.0),
    "full": Settings("full", 16, 6000.0, 2, 4.0, 10.0, 2, 120.0),
}


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CPUs each worker and each simulator may use (None: unpinned)."""

    workers: tuple[frozenset[int] | None, ...]
    simulators: tuple[frozenset[int] | None, ...]
    #: True when the simulators had no CPU to themselves and shared the workers'.
    overlap: bool


def worker_counts(maximum: int) -> list[int]:
    """1, 2, 4, ... below `maximum`, then `maximum`."""
    counts, count = [], 1
    while count < maximum:
        counts.append(count)
        count *= 2
    counts.append(maximum)
    return counts


def plan_layout(workers: int, simulators: int, cpus: Sequence[int]) -> Layout:
    """Worker i on `cpus[i]`; simulators spread over the CPUs left, or unpinned when none is left (or
    there are more workers than CPUs, when nothing is pinned)."""
    if workers > len(cpus):
        return Layout((None,) * workers, (None,) * simulators, overlap=True)
    spare = list(cpus[workers:])
    worker_cpus = tuple(frozenset({cpu}) for cpu in cpus[:workers])
    if not spare:
        return Layout(worker_cpus, (None,) * simulators, overlap=True)
    if len(spare) >= simulators:
        # Disjoint slices, as even as the count allows: simulator j gets spare[j::simulators].
        sim_cpus = tuple(frozenset(spare[j::simulators]) for j in range(simulators))
    else:
        sim_cpus = (frozenset(spare),) * simulators
    return Layout(worker_cpus, sim_cpus, overlap=False)


@dataclass(frozen=True, slots=True)
class PointRun:
    workers: int
    simulators: int
    shards: int
    events: int
    wall_s: float
    worker_cpu_s: float
    simulator_cpu_s: list[float]
    overlap: bool
    #: The simulators' counters summed (more connections than shards: a worker reconnected).
    connections: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    @property
    def events_per_worker_cpu_s(self) -> float:
        return self.events / self.worker_cpu_s if self.worker_cpu_s > 0 else 0.0

    @property
    def worker_cpu_share(self) -> float:
        return self.worker_cpu_s / self.wall_s / self.workers

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "events_per_s": round(self.events_per_s),
            "events_per_worker_cpu_s": round(self.events_per_worker_cpu_s),
            "worker_cpu_share": round(self.worker_cpu_share, 3),
            "simulator_cpu_share_max": round(max(self.simulator_cpu_s) / self.wall_s, 3),
        }


@dataclass(slots=True)
class Bench:
    settings: Settings
    log_dir: Path
    progress: Progress
    cpus: tuple[int, ...]
    errors: dict[str, str] = field(default_factory=dict)


def simulator_args(shards: int) -> list[str]:
    return [
        *("--shard-count", str(shards), "--max-concurrency", str(shards)),
        *("--session-start-total", "100000", "--session-start-remaining", "100000"),
        *("--guilds-per-shard", "1", "--event-rate", "0", "--heartbeat-interval-ms", "41250"),
        *("--zlib-level", "1"),
    ]


def worker_env(sim: SimulatorProcess) -> dict[str, str]:
    return children.worker_env(
        sim.rest_url,
        GATEWAY_COMPRESSION=COMPRESSION,
        BROKER_TYPE="null",
        SHARD_STORE_TYPE="memory",
        LOG_LEVEL="warning",
    )


@contextlib.asynccontextmanager
async def open_point(
    bench: Bench, workers: int, layout: Layout, label: str
) -> AsyncIterator[tuple[list[SimulatorProcess], list[ChildProcess], list[int]]]:
    """The simulators and workers of one point, running; yields them and each simulator's shard count.

    Every simulator is spawned before the first one's addresses are read, so they start in parallel; on
    exit every child gets SIGTERM at once (then each is waited for, as `open_child` does), so stopping 24
    processes takes as long as the slowest, not the sum."""
    per_sim = bench.settings.workers_per_simulator
    spw = bench.settings.shards_per_worker
    total_shards = workers * spw
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=CONTROL_TIMEOUT_S))
        sim_children: list[ChildProcess] = []
        sim_shards: list[int] = []
        for index, cpus in enumerate(layout.simulators):
            argv = [sys.executable, "-m", "benchmarks.simulator", "--log-level", "warning"]
            argv += simulator_args(total_shards)
            child = await stack.enter_async_context(
                open_child(f"{label}-sim{index}", argv, log_dir=bench.log_dir, cpus=cpus, capture_stdout=True)
            )
            sim_children.append(child)
            sim_shards.append(min(per_sim, workers - index * per_sim) * spw)
        sims: list[SimulatorProcess] = []
        for child in sim_children:
            urls = await read_json_line(child, SIMULATOR_START_TIMEOUT_S)
            sims.append(SimulatorProcess(child, {str(k): str(v) for k, v in urls.items()}, http))
        children: list[ChildProcess] = []
        for index, cpus in enumerate(layout.workers):
            sim = sims[index // per_sim]
            first = index * spw
            argv = [sys.executable, "-m", "workers", "--shard-ids", f"{first}-{first + spw - 1}"]
            argv += ["--shard-count", str(total_shards), "--gateway-url", sim.gateway_url]
            argv += ["--max-concurrency", str(total_shards)]
            child = await stack.enter_async_context(
                open_child(
                    f"{label}-worker{index}", argv, log_dir=bench.log_dir, env=worker_env(sim), cpus=cpus
                )
            )
            children.append(child)
        stack.callback(_signal_all, [*children, *sim_children])  # registered last: runs first on exit
        yield sims, children, sim_shards


def _signal_all(children: Sequence[ChildProcess]) -> None:
    for child in children:
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)


async def measure_point(bench: Bench, workers: int, repeat: int) -> PointRun:
    settings = bench.settings
    simulators = math.ceil(workers / settings.workers_per_simulator)
    layout = plan_layout(workers, simulators, bench.cpus)
    label = f"w{workers}-r{repeat}"
    bench.progress.say(
        f"{workers} worker(s) x {settings.shards_per_worker} shards, {simulators} simulator(s)"
        f"{' sharing the workers CPUs' if layout.overlap else ' on CPUs of their own'}"
        f"{f' (repeat {repeat + 1})' if settings.repeats > 1 else ''}"
    )
    async with open_point(bench, workers, layout, label) as (sims, children, sim_shards):
        deadline = trio.current_time() + settings.ready_timeout_s  # for all simulators together
        for sim, shards in zip(sims, sim_shards, strict=True):
            await wait_sessions_ready(
                sim,
                shards,
                min_sent=2,
                within_s=max(1.0, deadline - trio.current_time()),
                watch=children,
                progress=bench.progress,
            )
        for sim in sims:
            await sim.set_event_rate(settings.event_rate)
        await trio.sleep(settings.warmup_s)
        sent_0 = [sessions_sent(await sim.gateway_ledger()) for sim in sims]
        cpu_0 = [child.usage().cpu_s for child in children]
        sim_cpu_0 = [sim.child.usage().cpu_s for sim in sims]
        wall_0 = trio.current_time()
        await trio.sleep(settings.window_s)
        ledgers = [await sim.gateway_ledger() for sim in sims]
        wall_1 = trio.current_time()
        cpu_1 = [child.usage().cpu_s for child in children]
        sim_cpu_1 = [sim.child.usage().cpu_s for sim in sims]
        for child in children:
            child.check_alive()
        for sim in sims:
            await sim.set_event_rate(0)
    run = PointRun(
        workers=workers,
        simulators=simulators,
        shards=workers * settings.shards_per_worker,
        events=sum(sessions_sent(ledger) for ledger in ledgers) - sum(sent_0),
        wall_s=round(wall_1 - wall_0, 3),
        worker_cpu_s=round(sum(cpu_1) - sum(cpu_0), 3),
        simulator_cpu_s=[round(b - a, 3) for a, b in zip(sim_cpu_0, sim_cpu_1, strict=True)],
        overlap=layout.overlap,
        connections=sum(int(ledger["counters"].get("connections", 0)) for ledger in ledgers),
    )
    if run.events <= 0:
        raise BenchmarkError(f"{label}: no events measured ({run})")
    summary = run.to_json()
    bench.progress.say(
        f"  {summary['events_per_s']:,} events/s, {summary['events_per_worker_cpu_s']:,} per worker CPU-s, "
        f"workers at {summary['worker_cpu_share']:.0%} of a core each, busiest simulator at "
        f"{summary['simulator_cpu_share_max']:.0%}"
    )
    return run


async def run_suite(bench: Bench, counts: list[int]) -> dict[int, list[PointRun]]:
    """Every point `repeats` times, round-robin over the counts (drift in the machine spreads over all)."""
    runs: dict[int, list[PointRun]] = {count: [] for count in counts}
    for repeat in range(bench.settings.repeats):
        for count in counts:
            label = f"w{count}"
            if label in bench.errors:
                continue
            run = await run_or_error(label, bench.errors, bench.progress, measure_point, bench, count, repeat)
            if run is not None:
                runs[count].append(run)
    return runs


def median_run(runs: list[PointRun]) -> PointRun:
    return sorted(runs, key=lambda run: run.events_per_s)[(len(runs) - 1) // 2]


def figures_of(counts: list[int], runs: dict[int, list[PointRun]]) -> dict[str, float | None]:
    chosen = {count: median_run(done) for count, done in runs.items() if done}
    figures: dict[str, float | None] = {}
    for count in counts:
        run = chosen.get(count)
        figures[f"scaling.events_per_s.w{count}"] = round(run.events_per_s) if run else None
    for count in counts:
        run = chosen.get(count)
        figures[f"scaling.events_per_worker_cpu_s.w{count}"] = (
            round(run.events_per_worker_cpu_s) if run else None
        )
    for count in counts:
        run = chosen.get(count)
        figures[f"scaling.worker_cpu_share.w{count}"] = round(run.worker_cpu_share, 3) if run else None
    top, one = counts[-1], chosen.get(1)

    def efficiency(count: int) -> float | None:
        run = chosen.get(count)
        if run is None or one is None or one.events_per_s <= 0:
            return None
        return round(run.events_per_s / (count * one.events_per_s), 3)

    figures["scaling.max_workers"] = top
    figures["scaling.efficiency_at_max"] = efficiency(top)
    top_run = chosen.get(top)
    figures["scaling.cpu_efficiency_at_max"] = (
        round(top_run.events_per_worker_cpu_s / one.events_per_worker_cpu_s, 3)
        if top_run and one and one.events_per_worker_cpu_s > 0
        else None
    )
    unshared = [count for count, run in chosen.items() if not run.overlap]
    largest = max(unshared) if unshared else None
    figures["scaling.largest_unshared_workers"] = largest
    figures["scaling.efficiency_unshared"] = efficiency(largest) if largest is not None else None
    return figures


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` (the same at every size), without running it."""
    return tuple(TARGETS)


def judgement_blocker(cpus: int, counts: Sequence[int]) -> str | None:
    """Why the efficiency target cannot mean anything for a run of `counts` workers on `cpus` usable CPUs,
    or None when it can be judged."""
    if cpus < MIN_JUDGED_CPUS:
        return f"judged only on a machine with >= {MIN_JUDGED_CPUS} CPUs; this one has {cpus}"
    above_one = [count for count in counts if count > 1]
    if len(above_one) < MIN_JUDGED_COUNTS:
        return (
            f"judged only with >= {MIN_JUDGED_COUNTS} worker counts above 1; this run had "
            f"{', '.join(map(str, above_one)) or 'none'}"
        )
    return None


def judge(
    figures: dict[str, float | None], cpus: int, counts: Sequence[int]
) -> tuple[dict[str, Verdict], dict[str, str]]:
    """The verdicts and their notes: SKIP where `judgement_blocker` says the target cannot mean anything;
    ERROR where no point of 2 or more workers on CPUs of their own was measured; else PASS or FAIL (ERROR
    for a missing figure)."""
    blocker = judgement_blocker(cpus, counts)
    if blocker is not None:
        return {EFFICIENCY_KEY: "SKIP"}, {EFFICIENCY_KEY: blocker}
    largest = figures.get("scaling.largest_unshared_workers")
    if figures.get(EFFICIENCY_KEY) is not None and (largest is None or largest < 2):
        note = (
            "no point of 2 or more workers on CPUs of their own was measured (1 worker is 1.0 by "
            "construction)"
        )
        return {EFFICIENCY_KEY: "ERROR"}, {EFFICIENCY_KEY: note}
    return verdicts(figures, TARGETS), {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "scaling", "short windows, one run per point")
    parser.add_argument(
        "--max-workers",
        type=int,
        default=None,
        metavar="N",
        help="the most workers to measure (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--workers-per-simulator",
        type=int,
        default=None,
        metavar="N",
        help="workers one simulator process feeds (default: 2)",
    )


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.workers_per_simulator is not None:
        if args.workers_per_simulator < 1:
            raise SystemExit("--workers-per-simulator: at least 1")
        settings = Settings(**{**asdict(settings), "workers_per_simulator": args.workers_per_simulator})
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    maximum = args.max_workers or min(len(cpus), settings.default_max_workers or len(cpus))
    if maximum < 1:
        raise SystemExit("--max-workers: at least 1")
    counts = worker_counts(maximum)
    json_path: Path = args.json
    progress = Progress()
    bench = Bench(settings, args.logs or json_path.parent / "scaling-logs", progress, cpus)
    machine = machine_info()
    progress.say(
        f"scaling benchmark ({settings.name}): workers {', '.join(map(str, counts))} on {len(cpus)} CPUs; "
        f"logs in {bench.log_dir}"
    )
    runs = trio.run(run_suite, bench, counts)
    figures = figures_of(counts, runs)
    judged, notes = judge(figures, len(cpus), counts)
    results: dict[str, Any] = {
        "suite": "scaling",
        "settings": {**asdict(settings), "compression": COMPRESSION, "counts": counts, "cpus": list(cpus)},
        **nest(figures),
        "targets": {key: str(target) for key, target in TARGETS.items()},
        "verdicts": judged,
        "verdict_notes": notes,
        "errors": bench.errors,
        "runs": {f"w{count}": [run.to_json() for run in done] for count, done in runs.items()},
        "notes": {
            "placement": "worker i on CPU i; simulators on the CPUs left, or floating over the workers' when "
            "none is left (overlap)",
            "sink": "BROKER_TYPE=null (events decoded and dropped)",
            "offered": f"{settings.shards_per_worker * settings.event_rate:,.0f} events/s per worker",
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, results)
    print(format_figures(figures, TARGETS, bench.errors, judged, notes))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if any(runs.values()) else 1, judged, args.strict)
