"""The ratelimit suite's measurements: one variant through the HTTP workloads against a fresh simulator
(`measure_http`), the engine's capacity and acquire latency (`measure_capacity`), and every selected one in
turn (`run_suite`). What they measure is in the package docstring (the suite's `--help`).
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchmarkError, Progress, open_simulator_process, run_or_error
from benchmarks.ratelimit import figures
from benchmarks.ratelimit.figures import VariantRun, analyse_http, merge_counters
from benchmarks.ratelimit.processes import run_clients
from benchmarks.ratelimit.settings import BACKENDS, SIMULATOR_SEED, Backend, Peer, Settings, message_shape
from benchmarks.ratelimit.state import open_engine_state, open_redis_server
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

__all__ = ["Bench", "http_plan", "measure_capacity", "measure_http", "run_suite", "simulator_args"]


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
