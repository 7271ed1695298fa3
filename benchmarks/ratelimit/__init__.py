"""Ratelimit benchmark (anchors/ratelimit.md 5, issue 5 item 6): `python -m benchmarks ratelimit [--quick]`.

Setup. For each variant a fresh simulator in its own process (Discord's rules; a lognormal answer latency,
median `latency_ms`, sigma `latency_sigma`; bucket windows scaled by `bucket_time_scale`; `global_rate`
requests per second per token) and `processes` client processes that share one limiter:

- `shm`, `redis`: our engine, `ratelimit.RatelimitedTransport` over httpx (benchmarks/ratelimit/client.py).
  The suite creates the shm segment (its owner; the clients open it by name) and removes it at the end.
  Redis is a redis-server the suite starts on a free port (`--redis-url` to use another); each variant
  gets its own key prefix, deleted at the end.
- `peer.discordpy`, `peer.hikari`: each library's own REST client (benchmarks/peers/rest_bench.py), one
  per process, each process limiting itself (neither library shares limits between processes).

Every variant runs the same seeded plan (benchmarks/ratelimit/workloads.py: the same calls at the same
offsets after one start signal, open-loop Poisson arrivals, at most `max_outstanding` calls per workload
per process, the rest shed), one workload window after another, each on a client of its own:

- (a) hot bucket: every process posts to one channel (`POST /channels/{id}/messages`); together they offer
  `hot_factor` times the rate that counter allows;
- (b) Zipf: message creates over `zipf_channels` channels (exponent `zipf_exponent`) offered at
  `zipf_factor` times the global rate, so the global limit binds;
- (d) interaction callbacks (`POST /interactions/{id}/{token}/callback`, global-exempt, a new interaction
  each) at `interaction_rate` per second during (b);
- (c) first-contact storm: `storm_rounds` times, every process sends `storm_per_route` requests at once to
  each of three routes (limits 1, 5 and 10) on resources nobody has touched (round 0: routes never seen).

Capacity (our engine only; no HTTP, no simulator): the processes acquire and release as fast as they can
over buckets of their own (limits too large to run out, global rate `capacity_global_rate`) with
`capacity_tasks` tasks each, then one process alone times sequential acquires; a second run repeats the
first part with `capacity_concurrent_tasks` tasks per process.

Figures (per variant: `shm.*`, `redis.*`, `peer.discordpy.*`, `peer.hikari.*`):

- `avoidable_429_per_10k`: the simulator ledger's `avoidable` 429s per 10,000 requests it answered in the
  variant's run (a 429 on a counter whose state the token had already been told). `first_contact_429`,
  `global_429`, `shared_429`, `sublimit_429`, `ban_429`: counts of the other categories; `requests`.
  `bans`: Cloudflare-style bans of the client's IP (10,000 invalid requests, 401/403/non-shared 429, in
  10 minutes). A ban is lifted after the workload window it happened in, so the next one is measured.
- `global_utilization`: successful global-counted requests (every route but interaction callbacks)
  arriving during the steady part of workload (b) (from `global_warmup_s` after its first request to
  `global_cooldown_s` before its end), per second, divided by the configured global rate. The details
  add the gaps between those arrivals and, for our engine, its pacing interval and the utilization that
  interval allows (its ceiling).
- `hot_bucket_utilization`: for workload (a)'s successes, with the simulator's shape of that counter
  (`L` requests per `W` seconds, scaled): `((N - L) / (t_N - t_1)) / (L / W)`, where `t_1`, `t_N` are
  the arrivals of the first and last success. A counter starts full (`L` at once), then admits at most
  `L / W` per second, so this is the sustained fraction of the allowed rate, 1.0 at best, independent
  of where the run's start and end fall in a window.
- `interaction_wait_p50_ms`, `interaction_wait_p99_ms` (our engine): the `acquire` of each interaction
  callback during (b), timed inside the client; `interaction_latency_p50_ms`/`_p99_ms` (every variant):
  the call from start to answer (the simulator's latency included). `fallback_grants` (our engine):
  grants made by the conservative local limits while the shared backend did not answer (each process
  then keeps `1 / processes` of the global rate).
- `acquire_p50_us`, `acquire_p99_us`: one process alone, sequential `Ratelimiter.acquire` calls on known
  buckets with capacity available (no waiting: the latency the engine adds to every request);
  `loaded_acquire_p50_us`/`_p99_us`: the same timing during the capacity run. `grants_per_s`: grants of
  all processes of the capacity run per second (each grant also released). `concurrent_*`: the same with
  `capacity_concurrent_tasks` tasks per process.

Per variant, `runs` holds each workload's ledger counts, the clients' own counts (scheduled, shed,
completed, cancelled at the window's end), the cores the clients and the simulator used, and our engine's
wait and backend counters. Targets (issue 5; informational: the exit status is 0 unless every figure
failed): 0 avoidable and 0 first-contact 429s, global and hot-bucket utilization >= 0.95, interaction
wait p99 <= 1 ms (anchors 5.5), shm acquire p50 <= 50 us, Redis acquire p50 <= 1 ms, >= 20,000 grants/s
on shm and >= 5,000/s on Redis. Other work on the machine moves every timing figure: the load average is
in `machine`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.harness import (
    BenchmarkError,
    Progress,
    add_common_arguments,
    machine_info,
    open_simulator_process,
    run_or_error,
    write_results,
)
from benchmarks.ratelimit import figures
from benchmarks.ratelimit.figures import VariantRun, analyse_http, merge_counters
from benchmarks.ratelimit.processes import run_clients
from benchmarks.ratelimit.settings import (
    BACKENDS,
    PEERS,
    SETTINGS,
    SIMULATOR_SEED,
    TARGETS,
    Backend,
    Peer,
    Settings,
    message_shape,
)
from benchmarks.ratelimit.state import open_engine_state, open_redis_server
from benchmarks.ratelimit.table import format_table
from benchmarks.ratelimit.workloads import (
    REDIS_URL_ENV,
    TOKEN_ENV,
    CapacityPlan,
    EngineSpec,
    HotPlan,
    Plan,
    StormPlan,
    ZipfPlan,
)
from benchmarks.simulator.config import DEFAULT_TOKEN
from benchmarks.targets import nest, verdicts

__all__ = ["DESCRIPTION", "SETTINGS", "TARGETS", "add_arguments", "run"]

DESCRIPTION: Final = (
    "429s, utilization and acquire latency of our engine (shm, Redis) against discord.py and hikari"
)
WORKLOAD_CHOICES: Final = ("hot", "zipf", "storm")


@dataclass(slots=True)
class Bench:
    """One invocation's context: settings, what to run, where logs go, what failed."""

    settings: Settings
    log_dir: Path
    progress: Progress
    backends: tuple[Backend, ...]
    peers: tuple[Peer, ...]
    workloads: tuple[str, ...]
    capacity: bool
    #: None: the suite runs a redis-server of its own (`open_redis_server`).
    redis_url: str | None
    shm_dir: str
    errors: dict[str, str] = field(default_factory=dict)
    redis_version: str | None = None

    def client_env(self) -> dict[str, str]:
        """The clients' environment: ours, plus the secrets the plan file must not hold."""
        env = {**os.environ, TOKEN_ENV: DEFAULT_TOKEN}
        if self.redis_url is not None:
            env[REDIS_URL_ENV] = self.redis_url
        return env


# --- plans -----------------------------------------------------------------------------------------


def http_plan(bench: Bench, rest_url: str, engine: EngineSpec | None) -> Plan:
    """The workloads one after another, `gap_s` apart, from 0.5 s after the start signal."""
    settings = bench.settings
    at = 0.5
    hot = zipf = storm = None
    if "hot" in bench.workloads:
        limit, window_s = message_shape(settings)
        rate = settings.hot_factor * limit / window_s
        hot = HotPlan(at, settings.hot_s, rate, settings.max_outstanding)
        at += settings.hot_s + settings.gap_s
    if "zipf" in bench.workloads:
        zipf = ZipfPlan(
            start_s=at,
            duration_s=settings.zipf_s,
            channels=settings.zipf_channels,
            exponent=settings.zipf_exponent,
            rate_total=settings.zipf_factor * settings.global_rate,
            max_outstanding=settings.max_outstanding,
            interaction_rate_total=settings.interaction_rate,
        )
        at += settings.zipf_s + settings.gap_s
    if "storm" in bench.workloads:
        storm = StormPlan(at, settings.storm_rounds, settings.storm_round_s, settings.storm_per_route)
    return Plan(
        rest_url=rest_url,
        processes=settings.processes,
        seed=settings.seed,
        engine=engine,
        hot=hot,
        zipf=zipf,
        storm=storm,
    )


def simulator_args(settings: Settings) -> list[str]:
    return [
        *("--seed", str(SIMULATOR_SEED)),
        *("--latency-ms", str(settings.latency_ms), "--latency-sigma", str(settings.latency_sigma)),
        *("--bucket-time-scale", str(settings.bucket_time_scale)),
        *("--global-limit", str(settings.global_rate)),
        *("--ledger-records", "1000000"),
    ]


# --- measurements ----------------------------------------------------------------------------------


async def measure_http(bench: Bench, variant: str) -> VariantRun:
    """One variant (a backend or a peer) through every selected workload against a fresh simulator."""
    settings = bench.settings
    label = variant
    bench.progress.say(f"{label}: {settings.processes} processes, workloads {', '.join(bench.workloads)}")
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator_process(simulator_args(settings), log_dir=bench.log_dir, name=f"{label}-sim")
        )
        engine = None
        if variant in BACKENDS:
            engine = await stack.enter_async_context(
                open_engine_state(
                    variant, label, settings.global_rate, shm_dir=bench.shm_dir, redis_url=bench.redis_url
                )
            )
        plan = http_plan(bench, sim.rest_url, engine)
        lifted: dict[str, int] = {}

        async def lift_bans(window: str) -> None:
            # A client banned for its invalid requests (the ledger keeps the ban) starts the next
            # workload unbanned, so that workload is measured too.
            response = await sim.http.post(f"{sim.control_url}/rest/unban", json={})
            response.raise_for_status()
            lifted[window] = int(response.json()["lifted"])

        reports, cpu = await run_clients(
            plan,
            label=label,
            variant=variant,
            log_dir=bench.log_dir,
            env=bench.client_env(),
            ready_timeout_s=settings.ready_timeout_s,
            run_s=plan.end_s,
            simulator=sim.child,
            after_window=lift_bans,
        )
        sim.child.check_alive()
        response = await sim.http.get(f"{sim.control_url}/ledger")
        response.raise_for_status()
        ledger = response.json()["rest"]
    run = analyse_http(settings, plan, ledger, reports)
    run.figures["bans"] = len(ledger["bans"])
    run.details["bans"] = {"records": ledger["bans"], "lifted_after_window": lifted}
    for name, usage in cpu.items():
        run.details["workloads"].setdefault(name, {})["cpu"] = usage
    shown = ", ".join(f"{key} {value}" for key, value in run.figures.items() if value is not None)
    bench.progress.say(f"  {shown}")
    return run


async def measure_capacity(bench: Bench, backend: Backend, tasks: int, latency_samples: int) -> VariantRun:
    """Grants per second of every process at once (`tasks` tasks each), then, with `latency_samples`,
    one process's acquire latency alone (no HTTP, no simulator)."""
    settings = bench.settings
    label = f"capacity-{backend}-{tasks}-tasks"
    bench.progress.say(f"{label}: {settings.processes} processes x {tasks} tasks, acquire + release")
    capacity = CapacityPlan(
        latency_samples=latency_samples,
        keys_per_process=settings.capacity_keys,
        tasks_per_process=tasks,
        duration_s=settings.capacity_s,
    )
    async with open_engine_state(
        backend, label, settings.capacity_global_rate, shm_dir=bench.shm_dir, redis_url=bench.redis_url
    ) as engine:
        plan = Plan(
            rest_url="",
            processes=settings.processes,
            seed=settings.seed,
            engine=engine,
            capacity=capacity,
        )
        reports, _ = await run_clients(
            plan,
            label=label,
            variant=label,
            log_dir=bench.log_dir,
            env=bench.client_env(),
            ready_timeout_s=settings.ready_timeout_s,
            run_s=settings.capacity_s,
        )
    grants = sum(int(report["grants"]) for report in reports)
    elapsed = max(float(report["elapsed_s"]) for report in reports)
    latency = [float(value) for report in reports for value in report["acquire_s"]]
    loaded = [float(value) for report in reports for value in report["loaded_acquire_s"]]
    out: dict[str, float | None] = {
        "grants_per_s": round(grants / elapsed) if elapsed > 0 else None,
        "loaded_acquire_p50_us": figures.scaled(figures.percentile(loaded, 0.5), 1e6, 1),
        "loaded_acquire_p99_us": figures.scaled(figures.percentile(loaded, 0.99), 1e6, 1),
    }
    if latency_samples:
        out["acquire_p50_us"] = figures.scaled(figures.percentile(latency, 0.5), 1e6, 1)
        out["acquire_p99_us"] = figures.scaled(figures.percentile(latency, 0.99), 1e6, 1)
    cpu_s = sum(float(report["cpu_s"]) for report in reports)
    details = {
        "processes": settings.processes,
        "tasks_per_process": tasks,
        "grants": grants,
        "elapsed_s": elapsed,
        "clients_cores": round(cpu_s / elapsed, 3) if elapsed > 0 else None,
        "latency_samples": len(latency),
        "engine": merge_counters([report["engine"] for report in reports]),
    }
    bench.progress.say("  " + ", ".join(f"{key} {value}" for key, value in out.items()))
    return VariantRun(out, details)


async def run_suite(bench: Bench) -> dict[str, Any]:
    """Every measurement; a failed one leaves its figures out and a message in `bench.errors`."""
    async with AsyncExitStack() as stack:
        if "redis" in bench.backends and bench.redis_url is None:
            try:
                bench.redis_url, bench.redis_version = await stack.enter_async_context(
                    open_redis_server(bench.log_dir)
                )
            except BenchmarkError as exc:
                bench.errors["redis"] = str(exc)
                bench.backends = tuple(backend for backend in bench.backends if backend != "redis")
        return await run_measurements(bench)


async def run_measurements(bench: Bench) -> dict[str, Any]:
    flat: dict[str, float | None] = {}
    runs: dict[str, Any] = {}

    async def record(prefix: str, label: str, result: VariantRun | None) -> None:
        if result is None:
            return
        flat.update({f"{prefix}.{key}": value for key, value in result.figures.items()})
        runs[label] = result.details

    for backend in bench.backends:
        if bench.workloads:
            result = await run_or_error(backend, bench.errors, bench.progress, measure_http, bench, backend)
            await record(backend, backend, result)
        if bench.capacity:
            settings = bench.settings
            label = f"capacity-{backend}"
            result = await run_or_error(
                label,
                bench.errors,
                bench.progress,
                measure_capacity,
                bench,
                backend,
                settings.capacity_tasks,
                settings.latency_samples,
            )
            await record(backend, label, result)
            if settings.capacity_concurrent_tasks:
                label = f"capacity-{backend}-concurrent"
                result = await run_or_error(
                    label,
                    bench.errors,
                    bench.progress,
                    measure_capacity,
                    bench,
                    backend,
                    settings.capacity_concurrent_tasks,
                    0,
                )
                if result is not None:
                    result.figures = {f"concurrent_{key}": value for key, value in result.figures.items()}
                await record(backend, label, result)
    for peer in bench.peers:
        if bench.workloads:
            label = f"peer.{peer}"
            result = await run_or_error(label, bench.errors, bench.progress, measure_http, bench, peer)
            await record(label, label, result)
    return {"figures": flat, "runs": runs}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "ratelimit", "the short run (about 3 minutes)")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="our engine's backends to run, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="peer clients to run, comma-separated, or none (default: %(default)s)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_CHOICES),
        help="HTTP workloads, comma-separated (zipf includes the interaction callbacks), or none "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-capacity", action="store_true", help="skip the engine capacity and latency run")
    parser.add_argument("--processes", type=int, default=None, help="client processes (default: the size's)")
    parser.add_argument(
        "--redis-url",
        default=None,
        help="Redis for the redis backend (default: a redis-server of the suite's own on a free port)",
    )
    parser.add_argument(
        "--shm-dir", default="/dev/shm", help="folder of the shm segment (default: %(default)s)"
    )


def _choices(value: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    chosen = tuple(item.strip() for item in value.split(",") if item.strip() and item.strip() != "none")
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.processes is not None:
        settings = dataclasses.replace(settings, processes=args.processes)
    json_path: Path = args.json
    progress = Progress()
    bench = Bench(
        settings=settings,
        log_dir=args.logs or json_path.parent / "ratelimit-logs",
        progress=progress,
        backends=_choices(args.backends, BACKENDS, "--backends"),  # type: ignore[arg-type]
        peers=_choices(args.peers, PEERS, "--peers"),  # type: ignore[arg-type]
        workloads=_choices(args.workloads, WORKLOAD_CHOICES, "--workloads"),
        capacity=not args.no_capacity,
        redis_url=args.redis_url,
        shm_dir=args.shm_dir,
    )
    machine = machine_info()
    progress.say(f"ratelimit benchmark ({settings.name}); logs in {bench.log_dir}")
    outcome = trio.run(run_suite, bench)
    flat: dict[str, float | None] = outcome["figures"]
    results: dict[str, Any] = {
        "suite": "ratelimit",
        "settings": asdict(settings),
        **nest(flat),
        "targets": {key: str(target) for key, target in TARGETS.items()},
        "verdicts": verdicts(flat, TARGETS),
        "errors": bench.errors,
        "runs": outcome["runs"],
        "notes": {
            "variants": {
                "shm": "our engine, shared-memory backend, one segment for all processes",
                "redis": "our engine, Redis backend: "
                + (
                    f"the suite's own redis-server {bench.redis_version}"
                    if bench.redis_version
                    else str(args.redis_url).rsplit("@", 1)[-1]
                ),
                "peer.discordpy": "discord.py's HTTPClient, one per process (limits not shared)",
                "peer.hikari": "hikari's RESTClientImpl, one per process (limits not shared)",
            },
            "message_bucket": dict(zip(("limit", "window_s"), message_shape(settings), strict=True)),
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": {**machine, "load_average_at_end": [round(load, 2) for load in os.getloadavg()]},
    }
    write_results(json_path, results)
    print(format_table(flat, results))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    return 0 if any(value is not None for value in flat.values()) else 1
