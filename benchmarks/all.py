"""Every benchmark suite and one report: `python -m benchmarks all [--quick] [--out DIR] [--strict]`.

Runs the suites one after another, each as its own process (`python -m benchmarks <suite> --json
DIR/<suite>.json --logs DIR/<suite>-logs [--quick]`), so a crash or a hang in one (killed after its
timeout) leaves the others' figures intact. Each suite's progress lines are shown as they come, prefixed
with its name, and kept with its table in `DIR/<suite>.log`. Then:

- `DIR/results.json`: `machine` (CPU model and count, memory, kernel, Python, the git commit and whether
  the tree was dirty, the date), `suites` (each one's status, exit status, time and, when it failed, why),
  and each suite's own results under its name (without its `machine`; `startup`, `proxy`, `cluster` and
  `scaling`, whose figures already sit under their own name, are lifted one level, so the issue's key
  `proxy.http.added_p50_ms` is the path `proxy` / `http` / `added_p50_ms`), plus `verdicts`: every
  suite's target verdicts under full dotted names, and `verdict_notes`: why a verdict is SKIP or ERROR
  where a suite or `all` says. Every target of every suite run is there: each suite module's
  `target_keys(size)` lists its targets without running it, and a target with no verdict in the suite's
  results (the suite crashed, timed out or wrote no results file) is ERROR, so a failed suite is counted,
  never left out. A SKIP (the scaling target on a machine with too few CPUs to mean anything) is not a
  PASS and not a failure.
- `DIR/report.md`: tables of our figures beside the peers' (`benchmarks.report`) and the plots.
- `DIR/*.png`: the plots (`benchmarks.plots`; matplotlib, the `bench` extra: without it the report keeps
  its tables and says why the plots are missing).

A suite fails when it exits non-zero, writes no results, or runs past its timeout; `all` still writes
everything else, marks it failed in both files, and exits 1. The last lines say the verdict counts and
the keys that FAIL or ERROR. Targets are informational: otherwise the exit status is 0, unless `--strict`
is given, when it is 3 (STRICT_EXIT_STATUS) if any verdict is FAIL or ERROR (SKIP does not count).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import trio

from benchmarks.children import stop_process
from benchmarks.harness import LOG_TAIL_CHARS, ROOT, Progress, machine_info, write_results
from benchmarks.targets import (
    STRICT_EXIT_STATUS,
    add_strict_argument,
    flatten,
    strict_status,
    verdict_summary,
)

DESCRIPTION: Final = "every suite, then results.json, report.md and plots in one folder"
#: In the order they run: the cheap and independent first, the one that loads every CPU last.
SUITE_ORDER: Final = ("gateway", "startup", "ratelimit", "proxy", "cluster", "reshard", "scaling")
#: Suites whose results file holds its figures under the suite's own name.
SELF_NAMED: Final = frozenset({"startup", "proxy", "cluster", "reshard", "scaling"})
#: Seconds each suite may run, by size (quick: each measured at 1-4 minutes on a 2-CPU machine).
TIMEOUT_S: Final = {"smoke": 240.0, "quick": 420.0, "full": 2400.0}
STOP_GRACE_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class SuiteOutcome:
    name: str
    status: str  # "ok" or "failed"
    exit_status: int | None
    elapsed_s: float
    error: str | None

    def to_json(self, out_dir: Path) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_status": self.exit_status,
            "elapsed_s": round(self.elapsed_s, 1),
            "json": f"{self.name}.json",
            "log": f"{self.name}.log",
            "error": self.error,
        }


def suite_argv(name: str, size: str, out_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks", name, "--json", str(out_dir / f"{name}.json")]
    argv += ["--logs", str(out_dir / f"{name}-logs")]
    if size != "full":
        argv.append(f"--{size}")
    return [*argv, *extra]


async def run_suite(
    name: str, argv: Sequence[str], out_dir: Path, timeout_s: float, progress: Progress
) -> SuiteOutcome:
    """Run one suite, echoing its output line by line (prefixed) and keeping it in `<name>.log`."""
    json_path = out_dir / f"{name}.json"
    log_path = out_dir / f"{name}.log"
    json_path.unlink(missing_ok=True)  # a file from an earlier run must not pass for this one's
    started = trio.current_time()
    progress.say(f"{name}: starting ({' '.join(argv[1:])})")
    with _create_log(log_path) as log:
        process = await trio.lowlevel.open_process(
            list(argv),
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            with trio.move_on_after(timeout_s) as scope:
                await _echo(process, name, log)
                await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)
    elapsed = trio.current_time() - started
    status = process.returncode
    error: str | None = None
    if scope.cancelled_caught:
        error = f"timed out after {timeout_s:g} s"
    elif status != 0:
        error = f"exited with status {status}: {_first_error(json_path) or _tail(log_path)}"
    elif not json_path.is_file():
        error = "exited 0 but wrote no results file"
    outcome = SuiteOutcome(name, "ok" if error is None else "failed", status, elapsed, error)
    reason = "" if error is None else f" ({error.splitlines()[0]})"
    progress.say(f"{name}: {outcome.status} in {elapsed:.0f} s{reason}")
    return outcome


def _create_log(path: Path) -> BinaryIO:
    # A local file opened once per suite: not worth a thread.
    return open(path, "wb")


async def _echo(process: trio.Process, name: str, log: BinaryIO) -> None:
    """Copy the suite's output to `log` and, prefixed with its name, to stderr, until it closes."""
    assert process.stdout is not None
    pending = b""
    async with process.stdout:
        while chunk := await process.stdout.receive_some(65536):
            log.write(chunk)
            log.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                print(f"  {name} | {line.decode(errors='replace')}", file=sys.stderr, flush=True)
    if pending:
        print(f"  {name} | {pending.decode(errors='replace')}", file=sys.stderr, flush=True)


async def _stop(process: trio.Process) -> None:
    """SIGINT the suite (trio turns it into a cancellation, so the suite stops its own children), then
    SIGKILL after STOP_GRACE_S."""
    await stop_process(process, signal.SIGINT, grace_s=STOP_GRACE_S)


def _first_error(json_path: Path) -> str | None:
    """The first entry of the `errors` a suite wrote, if it wrote any: a better reason than its log."""
    try:
        errors = json.loads(json_path.read_text()).get("errors") or {}
    except (OSError, ValueError, AttributeError):
        return None
    for key, message in errors.items():
        return f"{key}: {str(message).strip().splitlines()[0] if message else ''}"
    return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def full_machine_info() -> dict[str, Any]:
    """`harness.machine_info` plus memory and the kernel."""
    return {**machine_info(), "memory_mib": memory_mib(), "kernel": platform.release()}


def load_suite(name: str, path: Path) -> dict[str, Any] | None:
    """A suite's results as they go into results.json (see the module docstring), or None if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    data.pop("machine", None)
    data.pop("suite", None)
    if name in SELF_NAMED and isinstance(data.get(name), dict):
        figures = data.pop(name)
        data = {**figures, **data}
    return data


def full_key(name: str, key: str) -> str:
    """A suite's figure key under its full dotted name (`gateway.events_per_cpu_s.zlib.null`)."""
    return key if key.startswith(name + ".") else f"{name}.{key}"


def expected_targets(name: str, size: str) -> list[str]:
    """The full keys of every target suite `name` judges at `size` with the options `all` gives it (its
    module's `target_keys`), known without running it."""
    module = importlib.import_module(f"benchmarks.{name}")
    return [full_key(name, key) for key in module.target_keys(size)]


def merged_verdicts(
    results: dict[str, Any], names: Sequence[str], size: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Every suite's verdicts under full dotted names, and their notes. Each target in
    `expected_targets` with no verdict in the suite's results (no results: it crashed, timed out or wrote
    none) is ERROR, with the reason as its note."""
    out: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in names:
        suite = results.get(name)
        suite = suite if isinstance(suite, dict) else {}
        for key, verdict in flatten(suite.get("verdicts") or {}):
            out[full_key(name, key)] = str(verdict)
        for key, note in flatten(suite.get("verdict_notes") or {}):
            notes[full_key(name, key)] = str(note)
        status = results.get("suites", {}).get(name, {})
        if status.get("status") == "failed":
            error = (status.get("error") or "no reason given").strip()
            reason = f"the {name} suite failed: {error.splitlines()[0] if error else 'no reason given'}"
        else:
            reason = f"the {name} suite's results have no verdict on it"
        for key in expected_targets(name, size):
            if key not in out:
                out[key] = "ERROR"
                notes[key] = reason
    return out, notes


def build_results(
    out_dir: Path, outcomes: Sequence[SuiteOutcome], machine: dict[str, Any], size: str, elapsed_s: float
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "suite": "all",
        "machine": machine,
        "settings": {"size": size, "suites": [o.name for o in outcomes]},
        "suites": {o.name: o.to_json(out_dir) for o in outcomes},
    }
    for outcome in outcomes:
        suite = load_suite(outcome.name, out_dir / f"{outcome.name}.json")
        results[outcome.name] = suite
        if suite is None and outcome.status == "ok":
            results["suites"][outcome.name].update(status="failed", error="its results file is unreadable")
    results["verdicts"], results["verdict_notes"] = merged_verdicts(results, [o.name for o in outcomes], size)
    results["elapsed_s"] = round(elapsed_s, 1)
    return results


def write_report(out_dir: Path, results: dict[str, Any]) -> list[str]:
    """Plots and report.md (results.json gains `plots` and `plots_skipped`); returns the PNG names."""
    from benchmarks import plots, report

    drawn, skipped = plots.draw_all(results, out_dir)
    names = [name for name, _ in drawn]
    results["plots"] = names
    results["plots_skipped"] = skipped
    (out_dir / "report.md").write_text(report.render(results, drawn))
    return names


async def run_all(
    names: Sequence[str], size: str, out_dir: Path, timeout_s: float, progress: Progress
) -> list[SuiteOutcome]:
    outcomes = []
    for index, name in enumerate(names, 1):
        progress.say(f"suite {index}/{len(names)}")
        outcomes.append(await run_suite(name, suite_argv(name, size, out_dir), out_dir, timeout_s, progress))
    return outcomes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="every suite's --quick (under 10 minutes on 2 CPUs)"
    )
    size.add_argument(
        "--smoke", action="store_true", help="every suite's --smoke (tests; figures mean little)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for everything (default: results/all-<UTC date and time>)",
    )
    parser.add_argument(
        "--suites",
        default=",".join(SUITE_ORDER),
        help="the suites to run, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds each suite may run (default: by size)",
    )
    add_strict_argument(parser)


def exit_status(results: dict[str, Any], strict: bool) -> int:
    """1 when a suite failed; else, with `strict`, STRICT_EXIT_STATUS when any verdict is FAIL or ERROR;
    else 0."""
    failed = any(status.get("status") != "ok" for status in results.get("suites", {}).values())
    return strict_status(1 if failed else 0, results.get("verdicts", {}), strict)


def run(args: argparse.Namespace) -> int:
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = [name.strip() for name in args.suites.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITE_ORDER]
    if unknown or not names:
        raise SystemExit(
            f"--suites: unknown {', '.join(unknown) or '(none given)'}; from {', '.join(SUITE_ORDER)}"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir: Path = args.out or ROOT / "results" / f"all-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout_s = args.timeout or TIMEOUT_S[size]
    progress = Progress()
    machine = full_machine_info()
    progress.say(f"benchmarks all ({size}): {', '.join(names)} into {out_dir}")
    outcomes = trio.run(run_all, names, size, out_dir, timeout_s, progress)
    results = build_results(out_dir, outcomes, machine, size, progress.elapsed_s())
    plots = write_report(out_dir, results)
    results["machine"]["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    write_results(out_dir / "results.json", results)
    failed = [name for name, status in results["suites"].items() if status["status"] != "ok"]
    progress.say(
        f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'} and {len(plots)} plots"
        f"{'; FAILED: ' + ', '.join(failed) if failed else ''}"
    )
    progress.say(verdict_summary(results["verdicts"]))
    print(out_dir / "report.md")
    status = exit_status(results, args.strict)
    if status == STRICT_EXIT_STATUS:
        progress.say(f"--strict: exit status {STRICT_EXIT_STATUS} (a target's verdict is FAIL or ERROR)")
    return status
