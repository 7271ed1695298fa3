"""The fault suite's command line: `python -m benchmarks faults` options, the run, the table and the JSON.

See the package docstring (the suite's `--help`) for the faults and their figures.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.faults.cluster import ClusterSystem, cluster_faults_for, run_cluster_suite
from benchmarks.faults.injections import Fault, faults_for, in_running_order
from benchmarks.faults.runner import FaultResult, run_suite
from benchmarks.faults.system import SETTINGS, Settings, System
from benchmarks.harness import ROOT, Progress, add_amqp_url_argument, machine_info, write_results

__all__ = ["DESCRIPTION", "add_arguments", "format_table", "run"]

DESCRIPTION: Final = "events lost, duplicates, identifies and recovery under injected faults"


def format_table(results: list[FaultResult], errors: dict[str, str]) -> str:
    width = max([23, *(len(name) for name in (*(r.name for r in results), *errors))])
    lines = [
        f"{'fault':<{width}} {'anchor':<11} {'lost':>5} {'dups':>6} {'ident':>5} {'resum':>5} {'ovl':>3} "
        f"{'recover_s':>9} {'bound':>6}  verdict"
    ]
    for r in results:
        recover = "-" if r.recover_s is None else f"{r.recover_s:.2f}"
        verdict = "PASS" if r.passed else "FAIL (" + "; ".join(r.reasons) + ")"
        lines.append(
            f"{r.name:<{width}} {r.anchor:<11} {r.lost:>5} {r.duplicates:>6} {r.identifies:>5} "
            f"{r.resumes:>5} {r.overlaps:>3} {recover:>9} {r.bound_s:>6g}  {verdict}"
        )
    for name, message in errors.items():
        lines.append(f"{name:<{width}} ERROR {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)


def chosen_faults(
    settings: Settings, only: str | None
) -> tuple[list[Fault[System]], list[Fault[ClusterSystem]]]:
    """The faults of the single-supervisor system and of the cluster phase that this run injects: `--only`
    (in its order, fatal faults last), else the settings' (every fault, or the smoke ones)."""
    cluster = cluster_faults_for(settings)
    if not only:
        single = faults_for(settings)
        if settings.faults is not None:
            cluster = [fault for fault in cluster if fault.name in settings.faults]
        return in_running_order(single), cluster
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    known = {fault.name: fault for fault in faults_for(SETTINGS["full"])}
    known_cluster = {fault.name: fault for fault in cluster}
    unknown = [name for name in wanted if name not in known and name not in known_cluster]
    if unknown:
        raise SystemExit(
            f"--only: unknown faults {', '.join(unknown)} (known: {', '.join([*known, *known_cluster])})"
        )
    single = in_running_order([known[name] for name in wanted if name in known])
    return single, [known_cluster[name] for name in wanted if name in known_cluster]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every fault, short windows (under 20 minutes)")
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
    # Imported here: benchmarks.reshard, which the phase runs on, imports this package.
    from benchmarks.faults.reshard import reshard_selection, run_reshard_suite

    reshard, others = reshard_selection(settings, args.only)
    single, cluster = chosen_faults(settings, others) if others != "" else ([], [])
    json_path: Path = args.json
    log_dir: Path = args.logs or json_path.parent / "faults-logs"
    progress = Progress()
    machine = machine_info()
    progress.say(
        f"fault suite ({settings.name}): {len(single)} faults, then {len(cluster)} on a cluster, "
        f"{len(reshard)} resharding; "
        f"logs in {log_dir}"
    )
    results: list[FaultResult] = []
    errors: dict[str, str] = {}
    if single:
        results, errors = trio.run(run_suite, settings, single, log_dir, progress, args.amqp_url)
    if cluster:
        progress.say(f"cluster phase: {', '.join(fault.name for fault in cluster)}")
        more, more_errors = trio.run(run_cluster_suite, settings, cluster, log_dir, progress, args.amqp_url)
        results += more
        errors.update(more_errors)
    if reshard:
        progress.say(f"reshard phase: {', '.join(fault.name for fault in reshard)}")
        more, more_errors = trio.run(run_reshard_suite, settings, reshard, log_dir, progress, args.amqp_url)
        results += more
        errors.update(more_errors)
    passed = sum(1 for r in results if r.passed)
    total = len(single) + len(cluster) + len(reshard)
    figures: dict[str, Any] = {
        r.name: {
            "lost": r.lost,
            "duplicates": r.duplicates,
            "identifies": r.identifies,
            "resumes": r.resumes,
            "recover_s": r.recover_s,
            "overlaps": r.overlaps,
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
