"""Soak: `python -m benchmarks faults --soak MINUTES [--json PATH]` (or `python -m benchmarks.faults.soak`).

The fault suite's system (`open_system`, quick size: 4 shards, 2 workers) under a steady load and no
faults: the firehose at SOAK_EVENT_RATE dispatches per second per shard, and SOAK_REST_RATE requests per
second (`GET /users/@me` with the bot token) through the HTTP REST proxy on one keep-alive client, so the
proxy is soaked too. Every sample interval (SAMPLE_INTERVAL_S, shorter for a short soak so that it still
takes MIN_SAMPLES) the suite reads, for every process, its RSS (`/proc/<pid>/status`) and its open file
descriptors (`/proc/<pid>/fd`). Roles: `supervisor`, `worker-<n>` (by position in the supervisor's
`/healthz`), `redis-server`, `simulator`, `consumer`. Afterwards the firehose stops, the consumer drains and
the suite's tally gives `lost` and `duplicates`.

Figures per process, over the samples after a warm-up (allocator arenas, connection pools and buffers fill
first): the least-squares slopes of RSS (KiB per minute) and of the fd count (per minute), and the first,
last and highest RSS and fd count. The warm-up is WARMUP_FRACTION of the soak, and at least WARMUP_MIN_S
when that still leaves half of the soak (a soak of a minute or more).

Pass (each failure has its own reason):
- 0 lost; no worker restarted (its pid changed); every REST request answered 200 (a proxy that starts
  failing under a steady load is not soaking).
- RSS of the system under test (supervisor, workers, redis-server): the slope projected over an hour is at
  most max(RSS_GROWTH_FRACTION_PER_HOUR of the mean RSS after warm-up, RSS_STEP_KIB over the window or over
  an hour, whichever is shorter). In an hour's window that is 5% or 2 MiB per hour: a leak of a few bytes
  per event (400 events/s are 1.4 million an hour) breaks it, while noise (a GC generation, an arena
  trimmed) averages out over hundreds of samples. A shorter window cannot tell a bounded step (the proxy's
  pool opening one more connection, a new pymalloc arena) from a leak, so it allows one 2 MiB step within
  it: a 5-minute soak catches only leaks faster than about 30 MiB per hour. The simulator's and the
  consumer's RSS is reported, not judged: both grow by design (the simulator keeps 100,000 dispatches per
  session for RESUME and the last 10,000 REST requests, about 20 MiB a minute at the soak's rate until
  full; the consumer keeps a byte per seq received) and neither is the system under test.
- Fds of every process: the slope projected over an hour at most FD_GROWTH_LIMIT over the window or over an
  hour, whichever is shorter (2 per hour in an hour's window), and the last count at most FD_GROWTH_LIMIT
  above the first after warm-up. A process under a steady load holds a fixed set; one more per reconnect
  or request ends in EMFILE, so the allowance is a couple (a pool connection replaced, a transient socket).
- Slopes are judged once the window after warm-up spans MIN_JUDGED_WINDOW_S; a shorter one (the tests'
  0.4-minute soak) reports them only, since it would project seconds of warm-up over an hour. Such a run
  checks the machinery, loss, restarts, REST answers and fd counts, not flatness: for that, soak for 30
  minutes or more.

JSON (`write_results`): `soak.{minutes, event_rate, rest_rate, sample_interval_s, warmup_s}`,
`soak.processes.<role>.{pid, samples, fit_samples, window_s, rss_slope_kib_per_min, fd_slope_per_min,
rss_first_kib, rss_last_kib, rss_max_kib, rss_mean_kib, fds_first, fds_last, fds_max, rss_judged,
slopes_judged, rss_allowance_kib_per_hour, fd_allowance_per_hour, reasons, passed, series}` (first, last
and max after warm-up; `series` is every sample as `[seconds, pid, rss_kib, fds]`), `soak.{lost,
duplicates, events, event_rate_achieved, rest_requests, rest_errors, rest_statuses, worker_restarts,
slopes_judged, reasons, passed}`, `machine`. Exit status 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.faults.system import SETTINGS, Settings, System, drain, open_system
from benchmarks.harness import (
    ROOT,
    BenchmarkError,
    Progress,
    add_amqp_url_argument,
    machine_info,
    process_usage,
    write_results,
)
from benchmarks.simulator.config import DEFAULT_TOKEN

#: Dispatches per second per shard while the soak runs (the quick fault suite's rate).
SOAK_EVENT_RATE: Final = 100.0
#: `GET /users/@me` per second through the proxy: well under the simulator's global 50/s per token.
SOAK_REST_RATE: Final = 20.0
REST_TIMEOUT_S: Final = 10.0
#: How often a progress line reports the events, the REST requests and every process's RSS.
PROGRESS_INTERVAL_S: Final = 60.0
#: How often a long soak samples every process.
SAMPLE_INTERVAL_S: Final = 5.0
#: A short soak samples more often, so that it still has this many samples.
MIN_SAMPLES: Final = 20
#: The share of the soak dropped before the slopes are fitted, and its floor for soaks of a minute or more.
WARMUP_FRACTION: Final = 0.2
WARMUP_MIN_S: Final = 30.0
#: Fewer samples after warm-up than this cannot be fitted: the process fails with its own reason.
MIN_FIT_SAMPLES: Final = 3
#: RSS growth allowed per hour: this share of the mean RSS after warm-up, or RSS_STEP_KIB over the window
#: (an hour at most): a couple of pymalloc arenas (1 MiB each) or a pool connection's buffers.
RSS_GROWTH_FRACTION_PER_HOUR: Final = 0.05
RSS_STEP_KIB: Final = 2048.0
#: Fds a process may gain over the window (an hour at most), by the slope and by last minus first.
FD_GROWTH_LIMIT: Final = 2
#: A shorter window (after warm-up) reports its slopes without judging them: seconds of noise, projected.
MIN_JUDGED_WINDOW_S: Final = 60.0
#: Roles whose RSS is judged: the system under test. The simulator and the consumer grow by design.
INSTRUMENT_ROLES: Final = frozenset({"simulator", "consumer"})
DEFAULT_JSON: Final = ROOT / "results" / "soak.json"
FAULTS_DEFAULT_JSON: Final = ROOT / "results" / "faults.json"


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one process: seconds since the soak began, its pid, RSS and open fds."""

    at_s: float
    pid: int
    rss_kib: int
    fds: int


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    """A process's figures over the samples after warm-up, and why it failed (empty: it passed)."""

    role: str
    pid: int
    samples: int
    fit_samples: int
    #: Seconds between the first and the last sample fitted.
    window_s: float
    rss_slope_kib_per_min: float | None
    fd_slope_per_min: float | None
    rss_first_kib: int
    rss_last_kib: int
    rss_max_kib: int
    rss_mean_kib: float
    fds_first: int
    fds_last: int
    fds_max: int
    rss_judged: bool
    #: False when the window is shorter than MIN_JUDGED_WINDOW_S: the slopes are reported only.
    slopes_judged: bool
    rss_allowance_kib_per_hour: float
    fd_allowance_per_hour: float
    reasons: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.reasons


@dataclass(slots=True)
class RestCounts:
    """What the REST driver got back: answers by status (or exception name)."""

    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return self.requests - self.statuses["200"]


@dataclass(slots=True)
class SoakRun:
    """What a soak measured, before judging."""

    samples: dict[str, list[Sample]]
    restarts: list[str]
    rest: RestCounts
    lost: int
    duplicates: int
    events: int
    #: Seconds from the firehose's start to the last sample (the REST load ran as long), and the dispatches
    #: produced by then.
    elapsed_s: float
    events_by_last_sample: int


# -- pure figures and verdicts -----------------------------------------------------------------


def slope(points: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of y over x. ValueError with fewer than 2 points or all x equal."""
    if len(points) < 2:
        raise ValueError(f"a slope needs 2 points, not {len(points)}")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        raise ValueError("a slope needs 2 distinct x")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def warmup_s(duration_s: float) -> float:
    """Seconds dropped before fitting: WARMUP_FRACTION of the soak, at least WARMUP_MIN_S when that leaves
    half of the soak."""
    fraction = WARMUP_FRACTION * duration_s
    if duration_s >= 2 * WARMUP_MIN_S:
        return max(fraction, WARMUP_MIN_S)
    return fraction


def sample_interval_s(duration_s: float) -> float:
    """SAMPLE_INTERVAL_S, or shorter so that a short soak still takes MIN_SAMPLES samples."""
    return min(SAMPLE_INTERVAL_S, duration_s / MIN_SAMPLES)


def rss_allowance_kib_per_hour(mean_rss_kib: float, window_s: float) -> float:
    """RSS growth per hour allowed: RSS_GROWTH_FRACTION_PER_HOUR of the mean, or RSS_STEP_KIB over the
    window or over an hour, whichever is shorter (a window shorter than an hour cannot tell a bounded step
    from a leak, so it allows the step within it)."""
    return max(RSS_GROWTH_FRACTION_PER_HOUR * mean_rss_kib, RSS_STEP_KIB / min(1.0, window_s / 3600))


def fd_allowance_per_hour(window_s: float) -> float:
    """Fd growth per hour allowed: FD_GROWTH_LIMIT over the window or over an hour, whichever is shorter."""
    return FD_GROWTH_LIMIT / min(1.0, window_s / 3600)


def process_figures(role: str, samples: Sequence[Sample], warmup: float) -> ProcessFigures:
    """Fit and judge one process. Only the samples of its latest pid count (a restart is judged apart)."""
    if not samples:
        raise ValueError(f"{role}: no samples")
    pid = samples[-1].pid
    own = [s for s in samples if s.pid == pid]
    window = [s for s in own if s.at_s >= warmup] or own[-1:]
    first, last = window[0], window[-1]
    window_s = last.at_s - first.at_s
    mean_rss = sum(s.rss_kib for s in window) / len(window)
    rss_slope = fd_slope = None
    if len(window) >= MIN_FIT_SAMPLES:
        rss_slope = slope([(s.at_s / 60, s.rss_kib) for s in window])
        fd_slope = slope([(s.at_s / 60, s.fds) for s in window])
    figures = ProcessFigures(
        role=role,
        pid=pid,
        samples=len(samples),
        fit_samples=len(window),
        window_s=round(window_s, 1),
        rss_slope_kib_per_min=None if rss_slope is None else round(rss_slope, 2),
        fd_slope_per_min=None if fd_slope is None else round(fd_slope, 4),
        rss_first_kib=first.rss_kib,
        rss_last_kib=last.rss_kib,
        rss_max_kib=max(s.rss_kib for s in window),
        rss_mean_kib=round(mean_rss, 1),
        fds_first=first.fds,
        fds_last=last.fds,
        fds_max=max(s.fds for s in window),
        rss_judged=role not in INSTRUMENT_ROLES,
        slopes_judged=window_s >= MIN_JUDGED_WINDOW_S,
        rss_allowance_kib_per_hour=round(rss_allowance_kib_per_hour(mean_rss, window_s), 1),
        fd_allowance_per_hour=round(fd_allowance_per_hour(window_s), 2),
        reasons=(),
    )
    return dataclasses.replace(figures, reasons=tuple(growth_reasons(figures, rss_slope, fd_slope)))


def growth_reasons(figures: ProcessFigures, rss_slope: float | None, fd_slope: float | None) -> list[str]:
    """Why `figures` shows a leak (empty: flat enough), judged on the unrounded slopes (per minute)."""
    role = figures.role
    if rss_slope is None or fd_slope is None:
        return [f"{role}: {figures.fit_samples} samples after warm-up, fewer than {MIN_FIT_SAMPLES}"]
    reasons = []
    if figures.slopes_judged and figures.rss_judged and rss_slope * 60 > figures.rss_allowance_kib_per_hour:
        reasons.append(
            f"{role}: RSS grows {rss_slope:.1f} KiB/min, {rss_slope * 60:,.0f} KiB/h > "
            f"{figures.rss_allowance_kib_per_hour:,.0f} KiB/h allowed"
        )
    if figures.slopes_judged and fd_slope * 60 > figures.fd_allowance_per_hour:
        reasons.append(
            f"{role}: fds grow {fd_slope:.3f}/min, {fd_slope * 60:.1f}/h > "
            f"{figures.fd_allowance_per_hour:g}/h allowed"
        )
    if figures.fds_last - figures.fds_first > FD_GROWTH_LIMIT:
        reasons.append(
            f"{role}: fds {figures.fds_first} -> {figures.fds_last} after warm-up "
            f"(+{figures.fds_last - figures.fds_first} > {FD_GROWTH_LIMIT})"
        )
    return reasons


def soak_reasons(
    processes: Sequence[ProcessFigures], *, lost: int, restarts: Sequence[str], rest_errors: int
) -> list[str]:
    """Every reason the soak fails (empty: it passed)."""
    reasons = []
    if lost > 0:
        reasons.append(f"{lost} lost")
    reasons.extend(f"restart: {restart}" for restart in restarts)
    if rest_errors:
        reasons.append(f"{rest_errors} REST requests through the proxy not answered 200")
    for figures in processes:
        reasons.extend(figures.reasons)
    return reasons


# -- the run -----------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise BenchmarkError(f"process {pid}: cannot list its fds ({exc.strerror})") from exc


async def system_pids(system: System) -> dict[str, int]:
    """Role -> pid for every process of the system (the workers from the supervisor's `/healthz`)."""
    pids = {"supervisor": system.supervisor.running().pid}
    for n, pid in enumerate(await system.worker_pids()):
        pids[f"worker-{n}"] = pid
    pids["redis-server"] = system.redis.running().pid
    pids["simulator"] = system.sim.child.pid
    pids["consumer"] = system.consumer.pid
    return pids


async def drive_rest(system: System, rate: float, counts: RestCounts) -> None:
    """`GET /users/@me` through the proxy at `rate` per second until cancelled, on one keep-alive client.
    Requests start on a fixed schedule, so a slow answer does not lower the rate; each has a deadline."""
    headers = {"Authorization": f"Bot {DEFAULT_TOKEN}"}
    url = system.proxy_url + "/users/@me"

    async def request(client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(url, headers=headers)
            counts.statuses[str(response.status_code)] += 1
        except httpx.HTTPError as exc:
            counts.statuses[exc.__class__.__name__] += 1

    async with httpx.AsyncClient(timeout=REST_TIMEOUT_S) as client, trio.open_nursery() as nursery:
        next_at = trio.current_time()
        while True:
            await trio.sleep_until(next_at)
            nursery.start_soon(request, client)
            next_at += 1 / rate


def produced(ledger: dict[str, Any]) -> int:
    """Dispatches the simulator produced, over every session (seqs are dense from 1), from its ledger or its
    `/_sim/state`."""
    return sum(int(session["last_seq"]) for session in ledger["sessions"].values())


async def produced_now(system: System) -> int:
    """`produced` from the simulator's `/_sim/state`, which stays small (the ledger carries every record)."""
    response = await system.sim.http.get(f"{system.sim.control_url}/state")
    response.raise_for_status()
    return produced(response.json())


async def sample_processes(
    system: System, at_s: float, samples: dict[str, list[Sample]], restarts: list[str]
) -> None:
    """Append one sample of every process to `samples`; a role whose pid changed is a restart."""
    for role, pid in (await system_pids(system)).items():
        series = samples.setdefault(role, [])
        if series and series[-1].pid != pid:
            restarts.append(f"{role} pid {series[-1].pid} -> {pid} at {at_s:.1f} s")
            system.progress.say(f"  {role} restarted: pid {series[-1].pid} -> {pid}")
        series.append(Sample(at_s, pid, process_usage(pid).rss_kib, open_fds(pid)))


async def soak(system: System, duration_s: float) -> SoakRun:
    """Run the firehose and the REST load for `duration_s`, sampling every process on a fixed schedule;
    then stop the firehose and drain the consumer."""
    interval = sample_interval_s(duration_s)
    samples: dict[str, list[Sample]] = {}
    restarts: list[str] = []
    rest = RestCounts()
    produced_before = await produced_now(system)
    await system.sim.set_event_rate(SOAK_EVENT_RATE)
    started = last_report = trio.current_time()
    events = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive_rest, system, SOAK_REST_RATE, rest)
        tick = 0
        while tick * interval <= duration_s:
            await trio.sleep_until(started + tick * interval)
            tick += 1
            system.check_alive()
            at_s = trio.current_time() - started
            await sample_processes(system, at_s, samples, restarts)
            events = await produced_now(system) - produced_before
            if trio.current_time() - last_report >= PROGRESS_INTERVAL_S:
                last_report = trio.current_time()
                rss = ", ".join(f"{role} {series[-1].rss_kib:,}" for role, series in samples.items())
                system.progress.say(
                    f"  {at_s / 60:.1f} min: {events:,} events, {rest.requests:,} REST; RSS KiB {rss}"
                )
        nursery.cancel_scope.cancel()
    elapsed_s = trio.current_time() - started
    system.progress.say(f"soak done: {rest.requests} REST requests ({rest.errors} errors); draining")
    after = await drain(system)
    total = await produced_now(system) - produced_before
    return SoakRun(samples, restarts, rest, after.lost, after.duplicates, total, elapsed_s, events)


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions in `group` and the groups nested in it."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def format_table(processes: Sequence[ProcessFigures]) -> str:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{'role':<13} {'pid':>7} {'samples':>7} {'rss_first':>10} {'rss_last':>10} {'rss_KiB/min':>11} "
        f"{'fds':>9} {'fds/min':>8}  verdict"
    ]
    for p in processes:
        verdict = "PASS" if p.passed else "FAIL (" + "; ".join(p.reasons) + ")"
        if not p.slopes_judged:
            verdict += " (slopes not judged: window too short)"
        elif not p.rss_judged:
            verdict += " (RSS not judged)"
        fds = f"{p.fds_first}->{p.fds_last}"
        lines.append(
            f"{p.role:<13} {p.pid:>7} {p.samples:>7} {p.rss_first_kib:>10,} {p.rss_last_kib:>10,} "
            f"{number(p.rss_slope_kib_per_min, 1):>11} {fds:>9} {number(p.fd_slope_per_min, 3):>8}  {verdict}"
        )
    return "\n".join(lines)


def soak_json_path(args: argparse.Namespace) -> Path:
    """`--json`, except the fault suite's default, which becomes results/soak.json."""
    path: Path = args.json
    return DEFAULT_JSON if path == FAULTS_DEFAULT_JSON else path


async def run_system(
    settings: Settings, duration_s: float, log_dir: Path, progress: Progress, amqp_url: str
) -> SoakRun:
    async with open_system(settings, log_dir, progress, amqp_url) as system:
        progress.say(
            f"soaking {duration_s / 60:g} min: {SOAK_EVENT_RATE:g} events/s per shard, "
            f"{SOAK_REST_RATE:g} REST requests/s, a sample every {sample_interval_s(duration_s):g} s"
        )
        return await soak(system, duration_s)


def run_soak(args: argparse.Namespace, settings: Settings) -> int:
    """Soak `settings`' system (its shards and workers; the rates are the soak's) for `args.soak` minutes;
    print the table, write the JSON; 0 on pass, 1 on fail or error."""
    minutes = float(args.soak)
    if not minutes > 0 or not math.isfinite(minutes):
        raise SystemExit(f"--soak: a positive number of minutes, not {args.soak}")
    duration_s = minutes * 60
    json_path = soak_json_path(args)
    log_dir: Path = args.logs or json_path.parent / "soak-logs"
    progress = Progress()
    machine = machine_info()
    progress.say(f"soak ({settings.shards} shards, {settings.workers} workers): logs in {log_dir}")
    warmup = warmup_s(duration_s)
    figures: dict[str, Any] = {
        "minutes": minutes,
        "event_rate": SOAK_EVENT_RATE,
        "rest_rate": SOAK_REST_RATE,
        "sample_interval_s": round(sample_interval_s(duration_s), 3),
        "warmup_s": round(warmup, 1),
    }
    error: str | None = None
    processes: list[ProcessFigures] = []
    run: SoakRun | None = None
    try:
        run = trio.run(run_system, settings, duration_s, log_dir, progress, args.amqp_url)
    except* (BenchmarkError, OSError, httpx.HTTPError, trio.TooSlowError) as group:
        # The sampler and the REST driver share a nursery, so a failure arrives in an exception group.
        # TooSlowError: the supervisor's `/healthz` did not list every worker within its deadline.
        error = "; ".join(f"{exc.__class__.__name__}: {exc}" for exc in leaves(group))
    if run is None:
        reasons = [f"error: {error.splitlines()[0] if error else ''}"]
    else:
        processes = [process_figures(role, series, warmup) for role, series in run.samples.items()]
        reasons = soak_reasons(processes, lost=run.lost, restarts=run.restarts, rest_errors=run.rest.errors)
        figures.update(
            processes={
                p.role: {key: value for key, value in dataclasses.asdict(p).items() if key != "role"}
                | {
                    "passed": p.passed,
                    "series": [[s.at_s, s.pid, s.rss_kib, s.fds] for s in run.samples[p.role]],
                }
                for p in processes
            },
            lost=run.lost,
            duplicates=run.duplicates,
            events=run.events,
            event_rate_achieved=round(run.events_by_last_sample / run.elapsed_s / settings.shards, 1),
            rest_requests=run.rest.requests,
            rest_errors=run.rest.errors,
            rest_statuses=dict(run.rest.statuses),
            worker_restarts=run.restarts,
            slopes_judged=all(p.slopes_judged for p in processes),
        )
    passed = not reasons
    figures.update(reasons=reasons, passed=passed)
    output: dict[str, Any] = {
        "suite": "faults-soak",
        "settings": dataclasses.asdict(settings),
        "soak": figures,
        "error": error,
        "elapsed_s": round(progress.elapsed_s(), 1),
        "machine": machine,
    }
    write_results(json_path, output)
    if processes:
        print(format_table(processes))
        print(
            f"\nlost {figures['lost']}, duplicates {figures['duplicates']}, events {figures['events']}, "
            f"REST {figures['rest_requests']} ({figures['rest_errors']} errors)"
        )
    print("PASS" if passed else "FAIL: " + "; ".join(reasons))
    print(f"wrote {json_path} in {output['elapsed_s']:.0f} s", file=sys.stderr)
    return 0 if passed else 1


def add_soak_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="MINUTES",
        help="no faults: a steady firehose and REST load for MINUTES, RSS and open fds sampled per process; "
        "they must stay flat (writes results/soak.json unless --json)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults.soak", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_soak_argument(parser)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (default: %(default)s)")
    parser.add_argument(
        "--logs", type=Path, default=None, help="child logs (default: soak-logs next to --json)"
    )
    add_amqp_url_argument(parser, "for the workers and the consumer")
    args = parser.parse_args(argv)
    if args.soak is None:
        parser.error("--soak MINUTES is required")
    return run_soak(args, SETTINGS["quick"])


if __name__ == "__main__":
    sys.exit(main())
