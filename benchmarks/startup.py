"""Start-up benchmark: `python -m benchmarks startup [--quick] [--json PATH]`.

How fast the whole service gets every shard READY, and how close its IDENTIFYs come to Discord's limit.
For each configuration (N shards, `max_concurrency` M, W workers) a fresh simulator recommends N shards
with that `max_concurrency`, then `python -m supervisor --shards N --workers W` (null broker, its own
ratelimit segment folder, `/readyz` on a loopback port) starts against it.

- `ready_s`: from just before the supervisor process is spawned (wall clock) to the last shard's first
  `shard.ready` log line (each worker stamps it when READY arrives). It includes Python's start, `GET
  /gateway/bot`, the workers' start, the identify waits and the READY of the last shard. `overhead_s` is
  `ready_s - identify_spread_s`: the time not spent waiting for identify windows.
- `readyz_s`: the same start to the first `/readyz` 200, polled every POLL_S: what an orchestrator sees.
  It trails `ready_s` by up to a worker heartbeat, since the supervisor learns shard states from them.
- `identify_spread_s`: from the first to the last accepted IDENTIFY in the simulator's gateway ledger
  (its own clock). Discord admits one IDENTIFY per `shard_id % M` key per 5 s, so N shards need at least
  `ceil(N / M) - 1` windows after the first: `bound_s = (ceil(N / M) - 1) * 5`. `spread_over_bound` is
  the ratio (1.0 is Discord's limit; ours waits IDENTIFY_MARGIN_S more per window to absorb clock and
  network jitter, so about 1.03 is expected; None when the bound is 0).
- `identifies`: IDENTIFYs the simulator received (target: exactly N, no refusals, no retries);
  `rules_broken`: the simulator's rule violations (target 0: no window was ever overrun).

Results: `startup.<config>.{ready_s, identify_spread_s, bound_s, spread_over_bound, identifies,
rules_broken, overhead_s, readyz_s, workers, shards, max_concurrency}` with `<config>` =
`shards<N>_mc<M>`, plus `targets`, `verdicts`, `errors`, per-run details under `runs` and the machine.
A configuration that failed has every figure None (its targets ERROR). `target_keys(size)` lists the
targets of a size's configurations without running them. Targets are informational: the exit status is 0
unless every configuration failed (with `--strict`, 3 when a verdict is FAIL or ERROR).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.harness import (
    BenchmarkError,
    ChildProcess,
    Progress,
    SimulatorProcess,
    add_common_arguments,
    machine_info,
    open_child,
    open_simulator_process,
    run_or_error,
    write_results,
)
from benchmarks.simulator.config import IDENTIFY_INTERVAL_S
from benchmarks.targets import Target, format_figures, nest, strict_status, verdict_summary, verdicts

DESCRIPTION: Final = "time to all shards READY and the identify spread against Discord's bound"
#: How often `/readyz` is polled; the resolution of `ready_s`.
POLL_S: Final = 0.05
#: Beyond the bound, how long a configuration may take to get ready before it fails.
READY_SLACK_S: Final = 60.0
#: An identify spread this far over the bound means time was lost between windows.
MAX_SPREAD_OVER_BOUND: Final = 1.1
#: The figures of one configuration, in table order.
FIGURE_NAMES: Final = (
    "ready_s",
    "identify_spread_s",
    "bound_s",
    "spread_over_bound",
    "identifies",
    "rules_broken",
    "overhead_s",
    "readyz_s",
    "workers",
    "shards",
    "max_concurrency",
)


@dataclass(frozen=True, slots=True)
class StartupConfig:
    shards: int
    max_concurrency: int
    #: Worker processes, or None for the supervisor's default (one per core, never more than shards).
    workers: int | None = None

    @property
    def label(self) -> str:
        return f"shards{self.shards}_mc{self.max_concurrency}"

    @property
    def bound_s(self) -> float:
        """The shortest possible first-to-last accepted IDENTIFY under Discord's rule."""
        return (math.ceil(self.shards / self.max_concurrency) - 1) * IDENTIFY_INTERVAL_S


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    configs: tuple[StartupConfig, ...]


SETTINGS: Final = {
    "smoke": Settings("smoke", (StartupConfig(4, 2, 2),)),
    "quick": Settings("quick", (StartupConfig(16, 4), StartupConfig(4, 1))),
    "full": Settings("full", (StartupConfig(64, 16), StartupConfig(16, 1))),
}


@dataclass(frozen=True, slots=True)
class StartupRun:
    shards: int
    max_concurrency: int
    workers: int
    ready_s: float
    readyz_s: float
    identify_spread_s: float
    bound_s: float
    identifies: int
    identifies_refused: int
    rules_broken: dict[str, int]
    #: Each accepted IDENTIFY, seconds after the first (simulator clock), in order.
    identify_offsets_s: list[float] = field(default_factory=list)

    @property
    def spread_over_bound(self) -> float | None:
        return round(self.identify_spread_s / self.bound_s, 3) if self.bound_s > 0 else None

    def figures(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {
            "spread_over_bound": self.spread_over_bound,
            "rules_broken": sum(self.rules_broken.values()),
            "overhead_s": round(self.ready_s - self.identify_spread_s, 3),
        }
        return {name: values[name] if name in values else getattr(self, name) for name in FIGURE_NAMES}


@dataclass(slots=True)
class Bench:
    settings: Settings
    log_dir: Path
    progress: Progress
    errors: dict[str, str] = field(default_factory=dict)


def simulator_args(config: StartupConfig) -> list[str]:
    return [
        *("--shard-count", str(config.shards), "--max-concurrency", str(config.max_concurrency)),
        *("--session-start-total", "100000", "--session-start-remaining", "100000"),
        *("--guilds-per-shard", "1", "--event-rate", "0", "--heartbeat-interval-ms", "41250"),
    ]


def supervisor_env(sim: SimulatorProcess, metrics_port: int, shm_dir: str) -> dict[str, str]:
    return worker_env(
        sim.rest_url,
        BROKER_TYPE="null",
        SHARD_STORE_TYPE="memory",
        PROMETHEUS_ADDRESS=f"127.0.0.1:{metrics_port}",
        RATELIMIT_SHM_DIR=shm_dir,
        SHUTDOWN_TIMEOUT="10s",
        LOG_LEVEL="info",
    )


async def wait_ready(
    http: httpx.AsyncClient, base: str, supervisor: ChildProcess, sim: SimulatorProcess, within_s: float
) -> float:
    """Poll `/readyz` until it answers 200; returns the trio time it did. BenchmarkError after `within_s`
    or if the supervisor or the simulator exits."""
    last_detail = ""
    with trio.move_on_after(within_s):
        while True:
            supervisor.check_alive()
            sim.child.check_alive()
            try:
                response = await http.get(base + "/readyz")
            except httpx.TransportError:
                pass  # not listening yet
            else:
                if response.status_code == 200:
                    return trio.current_time()
                last_detail = response.text[:300]
            await trio.sleep(POLL_S)
    raise BenchmarkError(
        f"not ready after {within_s:g} s ({last_detail}); supervisor log:\n{supervisor.log_tail()}"
    )


def shard_ready_times(log_path: Path) -> dict[int, float]:
    """Each shard's first `shard.ready` time (wall clock, the log's `ts`) in a JSON-lines log."""
    times: dict[int, float] = {}
    with open(log_path, "rb") as log:
        for line in log:
            if b'"shard.ready"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "shard.ready" and "shard" in record:
                times.setdefault(int(record["shard"]), float(record["ts"]))
    return times


async def count_workers(http: httpx.AsyncClient, base: str) -> int:
    response = await http.get(base + "/healthz")
    detail: dict[str, Any] = response.json().get("detail", {})
    return len(detail.get("workers", []))


async def measure_startup(bench: Bench, config: StartupConfig) -> StartupRun:
    label = config.label
    workers = "auto" if config.workers is None else str(config.workers)
    bench.progress.say(
        f"{label}: {config.shards} shards, max_concurrency {config.max_concurrency}, workers {workers}, "
        f"bound {config.bound_s:g} s"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "supervisor", "--shards", str(config.shards), "--workers", workers]
    with tempfile.TemporaryDirectory(prefix="bench-startup-shm-") as shm_dir:
        async with (
            open_simulator_process(simulator_args(config), log_dir=bench.log_dir, name=f"{label}-sim") as sim,
            httpx.AsyncClient(timeout=5.0) as http,
        ):
            env = supervisor_env(sim, port, shm_dir)
            started, started_wall = trio.current_time(), time.time()
            async with open_child(f"{label}-supervisor", argv, log_dir=bench.log_dir, env=env) as supervisor:
                ready_at = await wait_ready(http, base, supervisor, sim, config.bound_s + READY_SLACK_S)
                worker_count = await count_workers(http, base)
                ledger = await sim.gateway_ledger()
                shard_ready = shard_ready_times(supervisor.log_path)
    if len(shard_ready) < config.shards:
        raise BenchmarkError(
            f"{label}: /readyz said ready but the logs hold shard.ready for {len(shard_ready)} of "
            f"{config.shards} shards"
        )
    accepted = sorted(record["at"] for record in ledger["identifies"] if record["accepted"])
    if not accepted:
        raise BenchmarkError(f"{label}: ready, but the simulator saw no accepted IDENTIFY")
    counters = ledger["counters"]
    run = StartupRun(
        shards=config.shards,
        max_concurrency=config.max_concurrency,
        workers=worker_count,
        ready_s=round(max(shard_ready.values()) - started_wall, 3),
        readyz_s=round(ready_at - started, 3),
        identify_spread_s=round(accepted[-1] - accepted[0], 3),
        bound_s=config.bound_s,
        identifies=int(counters.get("identifies", 0)),
        identifies_refused=int(counters.get("identifies_refused", 0)),
        rules_broken={str(k): int(v) for k, v in ledger["rules_broken"].items()},
        identify_offsets_s=[round(at - accepted[0], 3) for at in accepted],
    )
    ratio = "-" if run.spread_over_bound is None else f"{run.spread_over_bound:.3f}"
    bench.progress.say(
        f"  ready after {run.ready_s:.2f} s (/readyz {run.readyz_s:.2f} s) with {run.workers} workers; "
        f"identify spread {run.identify_spread_s:.2f} s (bound {run.bound_s:g} s, ratio {ratio}); "
        f"{run.identifies} identifies, rules broken {run.rules_broken or 'none'}"
    )
    return run


async def run_suite(bench: Bench) -> dict[str, StartupRun]:
    runs: dict[str, StartupRun] = {}
    for config in bench.settings.configs:
        run = await run_or_error(config.label, bench.errors, bench.progress, measure_startup, bench, config)
        if run is not None:
            runs[config.label] = run
    return runs


def targets_for(settings: Settings) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for config in settings.configs:
        prefix = f"startup.{config.label}"
        targets[f"{prefix}.rules_broken"] = Target("==", 0)
        targets[f"{prefix}.identifies"] = Target("==", config.shards)
        if config.bound_s > 0:
            targets[f"{prefix}.spread_over_bound"] = Target("<=", MAX_SPREAD_OVER_BOUND)
    return targets


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` (its default configurations), without running it."""
    return tuple(targets_for(SETTINGS[size]))


def figures_of(settings: Settings, runs: dict[str, StartupRun]) -> dict[str, float | None]:
    """Every configuration's figures, None for those that failed (so a failure shows in the table)."""
    figures: dict[str, float | None] = {}
    for config in settings.configs:
        run = runs.get(config.label)
        values = run.figures() if run is not None else dict.fromkeys(FIGURE_NAMES)
        figures.update({f"startup.{config.label}.{name}": value for name, value in values.items()})
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "startup", "16 shards at mc 4 and 4 at mc 1 (under a minute)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="N:M[:W]",
        help="measure N shards at max_concurrency M (with W workers) instead of the defaults (repeatable)",
    )


def parse_config(text: str) -> StartupConfig:
    parts = text.split(":")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config: N:M[:W] of integers, got {text!r}") from None
    if len(numbers) not in (2, 3) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"--config: N:M[:W] of positive integers, got {text!r}")
    return StartupConfig(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None)


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.config:
        settings = Settings("custom", tuple(parse_config(text) for text in args.config))
    json_path: Path = args.json
    progress = Progress()
    bench = Bench(settings, args.logs or json_path.parent / "startup-logs", progress)
    machine = machine_info()
    progress.say(f"startup benchmark ({settings.name}); logs in {bench.log_dir}")
    runs = trio.run(run_suite, bench)
    figures = figures_of(settings, runs)
    targets = targets_for(settings)
    judged = verdicts(figures, targets)
    results: dict[str, Any] = {
        "suite": "startup",
        "settings": {"name": settings.name, "configs": [asdict(c) for c in settings.configs]},
        **nest(figures),
        "targets": {key: str(target) for key, target in targets.items()},
        "verdicts": judged,
        "errors": bench.errors,
        "runs": {
            label: {**asdict(run), "spread_over_bound": run.spread_over_bound} for label, run in runs.items()
        },
        "notes": {
            "bound": "(ceil(shards / max_concurrency) - 1) * 5 s, first to last accepted IDENTIFY",
            "ready_s": "supervisor spawn to the last shard's first shard.ready log line (wall clock)",
            "readyz_s": "supervisor spawn to the first /readyz 200, polled every 50 ms",
            "broker": "null",
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, results)
    print(format_figures(figures, targets, bench.errors))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if runs else 1, judged, args.strict)
