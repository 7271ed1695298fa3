"""The ratelimit suite's command line: `python -m benchmarks ratelimit` options, the run, the table and the
JSON. See the package docstring (the suite's `--help`) for the variants, workloads and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.harness import Progress, add_common_arguments, machine_info, write_results
from benchmarks.ratelimit.measure import Bench, run_suite
from benchmarks.ratelimit.settings import (
    BACKENDS,
    PEERS,
    SETTINGS,
    TARGETS,
    attempted_figures,
    message_shape,
)
from benchmarks.ratelimit.table import format_table
from benchmarks.targets import nest, strict_status, verdict_summary, verdicts, with_missing

__all__ = ["DESCRIPTION", "WORKLOAD_CHOICES", "add_arguments", "run", "target_keys"]

DESCRIPTION: Final = (
    "429s, utilization and acquire latency of our engine (shm, Redis) against discord.py and hikari"
)
WORKLOAD_CHOICES: Final = ("hot", "zipf", "storm")


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


def target_keys(size: str) -> tuple[str, ...]:
    """The figures this suite judges at `size` with its default options (every variant, workload and the
    capacity run), without running it."""
    attempted = attempted_figures(SETTINGS[size], BACKENDS, PEERS, WORKLOAD_CHOICES, capacity=True)
    return tuple(key for key in attempted if key in TARGETS)


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
    attempted = attempted_figures(settings, bench.backends, bench.peers, bench.workloads, bench.capacity)
    machine = machine_info()
    progress.say(f"ratelimit benchmark ({settings.name}); logs in {bench.log_dir}")
    outcome = trio.run(run_suite, bench)
    flat = with_missing(outcome["figures"], attempted)
    judged = verdicts(flat, TARGETS)
    results: dict[str, Any] = {
        "suite": "ratelimit",
        "settings": asdict(settings),
        **nest(flat),
        "targets": {key: str(target) for key, target in TARGETS.items()},
        "verdicts": judged,
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
    print(verdict_summary(judged), file=sys.stderr)
    return strict_status(0 if any(value is not None for value in flat.values()) else 1, judged, args.strict)
