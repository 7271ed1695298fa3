"""REST proxy overhead: `python -m benchmarks proxy [--quick] [--json PATH]`.

What a request pays for going through our REST proxy instead of straight to Discord. A simulator (no
added latency, global limit GLOBAL_LIMIT so no limit ever binds) and one `python -m workers` process
running the proxy as deployed: the HTTP front on `PROXY_HTTP_ADDRESS` and the AMQP RPC front (the worker's
broker is RabbitMQ), under the configured ratelimit backend (shm by default: a worker started without a
supervisor owns its segment, here in a folder of this run's own), with one idle shard. The proxy's global
limit is raised to GLOBAL_LIMIT too. If RabbitMQ cannot be reached, the HTTP proxy is still measured and
the AMQP figures are reported as errors.

One client process (benchmarks/proxy_client.py, asyncio on uvloop, httpx and aio-pika) times three paths
to `GET /users/@me` (a route with no per-route bucket): `direct` (httpx to the simulator), `http` (httpx to
the HTTP proxy) and `amqp` (an RPC like `@spectacles/brokers`' call). It interleaves them one request at a
time in a shuffled order per round, so drift in the machine touches every path alike and the direct
baseline comes from the same process and runtime as the proxied calls.

Figures:
- `proxy.<path>.added_p50_ms`, `added_p99_ms`: the path's p50 (p99) minus the direct path's p50 (p99),
  for `http` and `amqp` (a difference of percentiles, not a percentile of differences: each request is
  timed once). Targets: HTTP added p50 <= 1 ms, AMQP added p50 <= 3 ms.
- `proxy.<path>.p50_ms`, `p99_ms` for `direct`, `http` and `amqp`.
- `proxy.<path>.requests_per_s`: requests per second with `concurrency` callers in the one client process
  for `throughput_s`, path by path, and `proxy.<path>.worker_cpu_share` (the proxy worker's share of one
  core during it) and `client_cpu_share`; a client near 1.0 means the client, not the proxy, set the
  rate (then the proxy's capacity is at least that rate divided by its CPU share).
  `worker_cpu_ms_per_request`: the worker's CPU time per proxied request, the cost that bounds one
  worker's capacity (1000 / it = requests per second per core).

Placement: on a machine with at least 4 CPUs the client gets one, the simulator one and the worker one
(RabbitMQ floats); with fewer, nothing is pinned (one request in flight at a time leaves the CPUs mostly
idle during the latency phase, and pinning three processes onto two CPUs would add wake-up delays that
are not the proxy's). Results also hold every path's percentiles, the settings and the machine. Every
figure of a path the options chose (`--no-amqp` leaves the AMQP path out) that was not measured is None,
so its target is ERROR. Targets are informational: the exit status is 0 unless the run failed (with
`--strict`, 3 when a verdict is FAIL or ERROR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from benchmarks import children
from benchmarks.harness import (
    BenchmarkError,
    ChildProcess,
    Progress,
    SimulatorProcess,
    add_amqp_url_argument,
    add_common_arguments,
    machine_info,
    open_child,
    open_simulator_process,
    read_line,
    write_results,
)
from benchmarks.simulator.config import DEFAULT_TOKEN
from benchmarks.targets import Target, format_figures, nest, strict_status, verdict_summary, verdicts

DESCRIPTION: Final = "latency the HTTP and AMQP REST proxy add over a direct call, and HTTP requests/s"
GLOBAL_LIMIT: Final = 1_000_000
#: Fixed names (not per run) so an interrupted run leaves nothing that a later one does not reuse.
REST_GROUP: Final = "bench-proxy-rest"
GATEWAY_GROUP: Final = "bench-proxy-gateway"
REST_EVENT: Final = "REQUEST"
#: Queues the worker declares on those groups (the RPC queue; the gateway command queues of shard 0).
QUEUES: Final = (f"{REST_GROUP}:{REST_EVENT}", f"{GATEWAY_GROUP}:SEND", f"{GATEWAY_GROUP}:0")
PATHS: Final = ("direct", "http", "amqp")
PROXIED: Final = PATHS[1:]
TARGETS: Final = {
    "proxy.http.added_p50_ms": Target("<=", 1.0),
    "proxy.amqp.added_p50_ms": Target("<=", 3.0),
}
CLIENT_MODULE: Final = "benchmarks.proxy_client"
READY_TIMEOUT_S: Final = 30.0
TMPFS: Final = "/dev/shm"
TMPFS_EXISTS: Final = os.path.isdir(TMPFS)


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    requests: int
    warmup: int
    concurrency: int
    throughput_s: float


SETTINGS: Final = {
    "smoke": Settings("smoke", 50, 10, 4, 0.5),
    "quick": Settings("quick", 1000, 100, 16, 3.0),
    "full": Settings("full", 5000, 300, 16, 10.0),
}


@dataclass(slots=True)
class Bench:
    settings: Settings
    log_dir: Path
    progress: Progress
    amqp_url: str
    backend: str
    amqp: bool = True
    errors: dict[str, str] = field(default_factory=dict)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of sorted samples, interpolated linearly between the closest ranks."""
    if not ordered:
        raise ValueError("no samples")
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def placement() -> dict[str, frozenset[int] | None]:
    """CPUs for the client, the simulator and the worker (see the module docstring)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 4:
        return {"client": None, "simulator": None, "worker": None}
    return {
        "client": frozenset(cpus[-1:]),
        "simulator": frozenset(cpus[-2:-1]),
        "worker": frozenset(cpus[:-2]),
    }


def worker_env(bench: Bench, sim: SimulatorProcess, http_port: int, shm_dir: str) -> dict[str, str]:
    return children.worker_env(
        sim.rest_url,
        DISCORD_GLOBAL_LIMIT=str(GLOBAL_LIMIT),
        BROKER_TYPE="amqp" if bench.amqp else "null",
        BROKER_GROUP=GATEWAY_GROUP,
        AMQP_URL=bench.amqp_url,
        AMQP_GROUP=REST_GROUP,
        AMQP_EVENT=REST_EVENT,
        PROXY_HTTP_ADDRESS=f"127.0.0.1:{http_port}",
        RATELIMIT_BACKEND=bench.backend,
        RATELIMIT_SHM_DIR=shm_dir,
        SHARD_STORE_TYPE="memory",
        LOG_LEVEL="warning",
    )


def simulator_args() -> list[str]:
    return [
        *("--shard-count", "1", "--max-concurrency", "1", "--event-rate", "0", "--guilds-per-shard", "1"),
        *("--global-limit", str(GLOBAL_LIMIT), "--latency-ms", "0"),
    ]


@contextlib.asynccontextmanager
async def private_directory(prefix: str) -> AsyncIterator[str]:
    """A temporary folder (tmpfs when /dev/shm exists), removed on exit."""
    parent = TMPFS if TMPFS_EXISTS else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as path:
        yield path


async def _check_broker(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


async def broker_reachable(url: str) -> str | None:
    """None if RabbitMQ answers at `url`, else why not (without the credentials)."""
    try:
        await trio.to_thread.run_sync(lambda: asyncio.run(_check_broker(url)))
    except Exception as exc:
        return f"RabbitMQ at {url.rsplit('@', 1)[-1]} unreachable ({exc.__class__.__name__}: {exc})"
    return None


async def _delete_queues(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        for name in QUEUES:
            channel = await connection.channel()
            with contextlib.suppress(Exception):  # a queue that was never declared closes the channel
                await channel.queue_delete(name)


@contextlib.asynccontextmanager
async def cleaned_queues(bench: Bench) -> AsyncIterator[None]:
    """Delete the worker's queues after the run (aio-pika on a thread of its own), so the durable RPC
    queue does not keep requests of an interrupted run."""
    try:
        yield
    finally:
        if bench.amqp:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception), trio.move_on_after(15):
                await trio.to_thread.run_sync(lambda: asyncio.run(_delete_queues(bench.amqp_url)))


async def next_message(client: ChildProcess, buffer: bytearray, within_s: float) -> dict[str, Any]:
    """The client's next JSON line; BenchmarkError (quoting its log) if none comes in time."""
    assert client.process.stdout is not None
    with trio.move_on_after(within_s):
        line = await read_line(client.process.stdout, buffer)
        if line:
            value = orjson.loads(line)
            if isinstance(value, dict):
                return value
    await trio.sleep(0.2)
    client.check_alive()
    raise BenchmarkError(f"{client.name} said nothing for {within_s:g} s:\n{client.log_tail()}")


def worker_argv(sim: SimulatorProcess) -> list[str]:
    """One worker running shard 0 of 1 (idle: the firehose is off) and the proxy fronts."""
    return [
        *(sys.executable, "-m", "workers", "--shard-ids", "0", "--shard-count", "1"),
        *("--max-concurrency", "1", "--gateway-url", sim.gateway_url),
    ]


def client_argv(bench: Bench, sim: SimulatorProcess, http_port: int) -> list[str]:
    settings = bench.settings
    return [
        *(sys.executable, "-m", CLIENT_MODULE, "--rest-url", sim.rest_url),
        *("--proxy-url", f"http://127.0.0.1:{http_port}/api/v10", "--amqp-url", bench.amqp_url),
        *("--group", REST_GROUP, "--event", REST_EVENT, "--token", DEFAULT_TOKEN),
        *("--requests", str(settings.requests), "--warmup", str(settings.warmup)),
        *("--concurrency", str(settings.concurrency), "--throughput-s", str(settings.throughput_s)),
        *("--ready-timeout", str(READY_TIMEOUT_S)),
        *(() if bench.amqp else ("--no-amqp",)),
    ]


async def throughput_phase(
    bench: Bench, client: ChildProcess, buffer: bytearray, worker: ChildProcess, sim: SimulatorProcess
) -> tuple[str, dict[str, Any]]:
    """One path's throughput phase, from the client's `begin` line to its `end` line, with the CPU time
    each process spent in between."""
    settings = bench.settings
    path = str((await next_message(client, buffer, 30.0))["begin"])
    bench.progress.say(f"  {path}: {settings.concurrency} callers for {settings.throughput_s:g} s")
    processes = {"worker": worker, "client": client, "simulator": sim.child}
    before = {name: child.usage().cpu_s for name, child in processes.items()}
    end = await next_message(client, buffer, settings.throughput_s + 30.0)
    after = {name: child.usage().cpu_s for name, child in processes.items()}
    elapsed = float(end["elapsed_s"])
    run: dict[str, Any] = {
        "requests": int(end["requests"]),
        "errors": int(end["errors"]),
        "elapsed_s": elapsed,
        "requests_per_s": round(int(end["requests"]) / elapsed, 1),
        **{f"{name}_cpu_share": round((after[name] - before[name]) / elapsed, 3) for name in processes},
    }
    bench.progress.say(
        f"  {run['requests_per_s']:,.0f} requests/s, client {run['client_cpu_share']:.0%} of a core, worker "
        f"{run['worker_cpu_share']:.0%}, simulator {run['simulator_cpu_share']:.0%}"
    )
    return path, run


async def measure(bench: Bench) -> dict[str, Any]:
    """Start the simulator, the proxy worker and the client; collect the client's samples and the
    throughput phases. Raises BenchmarkError if a process fails or falls silent."""
    settings, progress = bench.settings, bench.progress
    if bench.amqp:
        problem = await broker_reachable(bench.amqp_url)
        if problem is not None:
            bench.errors["proxy.amqp"] = problem
            progress.say(f"  {problem}: measuring the HTTP proxy only")
            bench.amqp = False
    cpus = placement()
    http_port = children.free_port()
    async with (
        private_directory("bench-proxy-shm-") as shm_dir,
        cleaned_queues(bench),
        open_simulator_process(simulator_args(), log_dir=bench.log_dir, cpus=cpus["simulator"]) as sim,
        open_child(
            "proxy-worker",
            worker_argv(sim),
            log_dir=bench.log_dir,
            env=worker_env(bench, sim, http_port, shm_dir),
            cpus=cpus["worker"],
        ) as worker,
    ):
        progress.say(
            f"timing {settings.requests} rounds of direct, HTTP{' and AMQP' if bench.amqp else ''} "
            f"requests (after {settings.warmup} warm-up rounds)"
        )
        async with open_child(
            "proxy-client",
            client_argv(bench, sim, http_port),
            log_dir=bench.log_dir,
            cpus=cpus["client"],
            capture_stdout=True,
        ) as client:
            buffer = bytearray()
            # A round is one request per path, a few milliseconds each here; allow 20 ms per request.
            latency_within = READY_TIMEOUT_S + (settings.requests + settings.warmup) * len(PATHS) * 0.02
            latency: dict[str, list[float]] = (await next_message(client, buffer, latency_within))[
                "latency_ms"
            ]
            throughput = dict([await throughput_phase(bench, client, buffer, worker, sim) for _ in latency])
            with trio.move_on_after(10):
                await client.process.wait()
            if client.process.returncode not in (0, None):
                raise BenchmarkError(f"the client failed:\n{client.log_tail()}")
        worker.check_alive()
    return {
        "latency_ms": latency,
        "throughput": throughput,
        "placement": {name: sorted(cpu_set or ()) for name, cpu_set in cpus.items()},
    }


def figures_of(outcome: dict[str, Any] | None, amqp: bool) -> dict[str, float | None]:
    """The figures; those of a path that was wanted but not measured (the run failed, RabbitMQ was down)
    are None, so their verdict is ERROR."""
    proxied = PROXIED if amqp else ("http",)
    latency: dict[str, list[float]] = outcome["latency_ms"] if outcome else {}
    throughput: dict[str, dict[str, Any]] = outcome["throughput"] if outcome else {}
    p50 = {path: percentile(sorted(samples), 0.50) for path, samples in latency.items()}
    p99 = {path: percentile(sorted(samples), 0.99) for path, samples in latency.items()}

    def added(table: dict[str, float], path: str) -> float | None:
        return round(table[path] - table["direct"], 3) if path in table and "direct" in table else None

    figures: dict[str, float | None] = {}
    for path in proxied:
        figures[f"proxy.{path}.added_p50_ms"] = added(p50, path)
        figures[f"proxy.{path}.added_p99_ms"] = added(p99, path)
    figures["proxy.http.requests_per_s"] = throughput.get("http", {}).get("requests_per_s")
    for path in ("direct", *proxied):
        figures[f"proxy.{path}.p50_ms"] = round(p50[path], 3) if path in p50 else None
        figures[f"proxy.{path}.p99_ms"] = round(p99[path], 3) if path in p99 else None
    for path in ("direct", *proxied):
        run = throughput.get(path)
        figures[f"proxy.{path}.requests_per_s"] = run["requests_per_s"] if run else None
        figures[f"proxy.{path}.client_cpu_share"] = run["client_cpu_share"] if run else None
        if path != "direct":
            figures[f"proxy.{path}.worker_cpu_share"] = run["worker_cpu_share"] if run else None
            figures[f"proxy.{path}.worker_cpu_ms_per_request"] = (
                round(run["worker_cpu_share"] * 1000 / run["requests_per_s"], 3)
                if run and run["requests_per_s"]
                else None
            )
    return figures


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` with its default options (both fronts), without running."""
    return tuple(TARGETS)


#: The percentiles kept per path for the report's latency plot (a CDF).
DISTRIBUTION_POINTS: Final = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.9)


def distribution(samples: Sequence[float]) -> dict[str, float]:
    """`{"p50": ms, ...}` at DISTRIBUTION_POINTS, plus the sample count under `n`."""
    ordered = sorted(samples)
    out = {f"p{point:g}": round(percentile(ordered, point / 100), 4) for point in DISTRIBUTION_POINTS}
    return {**out, "n": len(ordered)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "proxy", "1,000 rounds and 3 s per throughput phase")
    add_amqp_url_argument(parser, "for the AMQP proxy")
    parser.add_argument("--no-amqp", action="store_true", help="measure the HTTP proxy only (no RabbitMQ)")
    parser.add_argument(
        "--backend",
        choices=("shm", "memory", "redis"),
        default="shm",
        help="the proxy's RATELIMIT_BACKEND (default: %(default)s; redis uses $REDIS_URL)",
    )


def run(args: argparse.Namespace) -> int:
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    json_path: Path = args.json
    progress = Progress()
    bench = Bench(
        settings,
        args.logs or json_path.parent / "proxy-logs",
        progress,
        args.amqp_url,
        args.backend,
        amqp=not args.no_amqp,
    )
    machine = machine_info()
    progress.say(f"proxy benchmark ({settings.name}, {bench.backend} backend); logs in {bench.log_dir}")
    outcome: dict[str, Any] | None = None
    try:
        outcome = trio.run(measure, bench)
    except (BenchmarkError, OSError, ValueError, KeyError) as exc:
        bench.errors["proxy"] = f"{exc.__class__.__name__}: {exc}"
        progress.say(f"  FAILED: {bench.errors['proxy'].splitlines()[0]}")
    figures = figures_of(outcome, not args.no_amqp)
    judged = verdicts(figures, TARGETS)
    results: dict[str, Any] = {
        "suite": "proxy",
        "settings": {**asdict(settings), "backend": bench.backend, "amqp": bench.amqp},
        **nest(figures),
        "targets": {key: str(target) for key, target in TARGETS.items()},
        "verdicts": judged,
        "errors": bench.errors,
        "runs": {
            "throughput": outcome["throughput"] if outcome else {},
            "placement": outcome["placement"] if outcome else {},
            "latency_distribution_ms": (
                {path: distribution(samples) for path, samples in outcome["latency_ms"].items()}
                if outcome
                else {}
            ),
        },
        "notes": {
            "route": "GET /users/@me (no per-route bucket); global limit raised to "
            f"{GLOBAL_LIMIT:,} in the simulator and the proxy",
            "added": "p50 (p99) of the proxied path minus p50 (p99) of the direct path, interleaved rounds",
            "client": "one asyncio (uvloop) process: httpx for direct and HTTP, aio-pika RPC for AMQP",
        },
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, results)
    print(format_figures(figures, TARGETS, bench.errors))
    print(f"\nwrote {json_path} in {results['elapsed_s']:.0f} s", file=sys.stderr)
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if outcome is not None else 1, judged, args.strict)
