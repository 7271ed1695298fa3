"""What every benchmark suite shares: child processes, their CPU and memory, the simulator, results files.

Suites run the real programs as subprocesses (the simulator, `python -m workers`, peer clients) and measure
them from outside through `/proc`, so a figure is the process's own CPU time and resident memory and the
simulator or RabbitMQ sharing the machine does not distort it. Every child's stderr goes to a log file
under the run's log folder; a failure quotes the tail of the log of the child that failed.

Waits on children have deadlines: a child that never gets ready fails the run with `BenchmarkError` instead
of hanging it, and leaving an `open_*` context always stops the child (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar

import httpx
import trio

from benchmarks.children import stop_process
from benchmarks.targets import add_strict_argument

#: The repository root: children run here so `-m benchmarks.simulator` and `-m workers` import.
ROOT: Final = Path(__file__).resolve().parent.parent
CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
SIMULATOR_START_TIMEOUT_S: Final = 30.0
CONTROL_TIMEOUT_S: Final = 30.0
LOG_TAIL_CHARS: Final = 3000
POLL_INTERVAL_S: Final = 0.25
T = TypeVar("T")


class BenchmarkError(Exception):
    """A run could not produce its figure (a child failed, a deadline passed); the message says why."""


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """A process's CPU time (user + system, all threads) and resident memory at one moment."""

    cpu_s: float
    rss_kib: int


def process_usage(pid: int) -> ProcessUsage:
    """Read `/proc/<pid>/stat` (utime, stime) and `/proc/<pid>/status` (VmRSS). Raises BenchmarkError
    if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchmarkError(f"process {pid} is gone ({exc.strerror})") from exc
    # The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss_kib = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
            break
    return ProcessUsage(cpu_s=(utime + stime) / CLOCK_TICKS_PER_S, rss_kib=rss_kib)


def cpu_sets() -> tuple[frozenset[int], frozenset[int]] | None:
    """Two disjoint CPU sets (the simulator's and the measured client's), or None on fewer than 2 CPUs.

    With 2 CPUs each side gets one; with more, the client gets one and the simulator the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return frozenset(cpus[:-1]), frozenset(cpus[-1:])


class Progress:
    """Progress lines on stderr, each stamped with the seconds since the run began."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.started = time.monotonic()
        self.quiet = quiet

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed_s():6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class ChildProcess:
    """A running child and the file its stderr goes to."""

    name: str
    process: trio.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def usage(self) -> ProcessUsage:
        return process_usage(self.pid)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def check_alive(self) -> None:
        """Raise BenchmarkError, quoting the log, if the child has exited."""
        if self.process.poll() is not None:
            raise BenchmarkError(
                f"{self.name} exited with status {self.process.returncode}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )


@contextlib.asynccontextmanager
async def open_child(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cpus: frozenset[int] | None = None,
    capture_stdout: bool = False,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> AsyncIterator[ChildProcess]:
    """Start `argv` in the repository root with stderr to `log_dir/<name>.log`, pinned to `cpus` if given.

    On exit the child gets `stop_signal`, then SIGKILL if it has not exited within
    `children.STOP_GRACE_S`; the stop is shielded, so a cancelled run still stops its children."""
    log_path = log_dir / f"{name}.log"
    with _create_log(log_path) as log:
        process = await trio.lowlevel.open_process(
            list(argv),
            cwd=str(ROOT),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=log,
        )
    child = ChildProcess(name, process, log_path)
    try:
        if cpus:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(process.pid, cpus)
        yield child
    finally:
        with trio.CancelScope(shield=True):
            await stop_child(child, stop_signal)


def _create_log(path: Path) -> BinaryIO:
    # A local file opened once per child, before it starts: not worth a thread.
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


async def stop_child(child: ChildProcess, stop_signal: signal.Signals = signal.SIGTERM) -> int | None:
    """Signal the child and wait for it (`children.stop_process`); returns its exit status."""
    status = await stop_process(child.process, stop_signal)
    if child.process.stdout is not None:
        await child.process.stdout.aclose()
    return status


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    """The next line of `stream` (without its newline); b"" at end of stream. `buffer` keeps what follows."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            line = bytes(buffer)
            buffer.clear()
            return line
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def read_json_line(child: ChildProcess, within_s: float) -> dict[str, Any]:
    """The first line `child` prints on stdout, as a JSON object; BenchmarkError if none comes within
    `within_s` (the message quotes the child's log, which is why this is not left to the caller)."""
    assert child.process.stdout is not None
    with trio.move_on_after(within_s):
        line = await read_line(child.process.stdout, bytearray())
        if line:
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    await trio.sleep(0.2)  # let a crashing child finish its traceback before the log is quoted
    child.check_alive()
    raise BenchmarkError(f"{child.name} printed no JSON line within {within_s:g} s:\n{child.log_tail()}")


@dataclass(slots=True)
class SimulatorProcess:
    """A simulator subprocess, its addresses, and a client for its control endpoint."""

    child: ChildProcess
    urls: dict[str, str]
    http: httpx.AsyncClient

    @property
    def rest_url(self) -> str:
        return self.urls["rest_url"]

    @property
    def gateway_url(self) -> str:
        return self.urls["gateway_url"]

    @property
    def control_url(self) -> str:
        return self.urls["control_url"]

    async def ledger(self) -> dict[str, Any]:
        """The whole `GET /_sim/ledger`: `gateway`, `rest` and `guilds`."""
        response = await self.http.get(f"{self.control_url}/ledger")
        response.raise_for_status()
        ledger: dict[str, Any] = response.json()
        return ledger

    async def gateway_ledger(self) -> dict[str, Any]:
        """The gateway half of `GET /_sim/ledger`."""
        gateway: dict[str, Any] = (await self.ledger())["gateway"]
        return gateway

    async def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """`POST /_sim/gateway/<action>` (benchmarks/simulator/gateway_control.py); its JSON answer."""
        response = await self.http.post(f"{self.control_url}/gateway/{action}", json=body or {})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def set_event_rate(self, rate: float) -> None:
        """Dispatches per second per session, from now on."""
        await self.control("event_rate", {"rate": rate})


@contextlib.asynccontextmanager
async def open_simulator_process(
    args: Sequence[str], *, log_dir: Path, cpus: frozenset[int] | None = None, name: str = "simulator"
) -> AsyncIterator[SimulatorProcess]:
    """Run `python -m benchmarks.simulator ARGS` until the context exits; yields once it printed its URLs."""
    argv = [sys.executable, "-m", "benchmarks.simulator", "--log-level", "warning", *args]
    async with open_child(name, argv, log_dir=log_dir, cpus=cpus, capture_stdout=True) as child:
        urls = await read_json_line(child, SIMULATOR_START_TIMEOUT_S)
        async with httpx.AsyncClient(timeout=CONTROL_TIMEOUT_S) as http:
            yield SimulatorProcess(child, {str(k): str(v) for k, v in urls.items()}, http)


def sessions_sent(ledger: Mapping[str, Any]) -> int:
    """Dispatches the simulator has written to sockets, summed over every session in the ledger."""
    return sum(int(session["sent"]) for session in ledger["sessions"].values())


async def wait_sessions_ready(
    sim: SimulatorProcess,
    shards: int,
    *,
    min_sent: int,
    within_s: float,
    watch: Sequence[ChildProcess] = (),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Poll the ledger until `shards` sessions are attached and each has sent at least `min_sent`
    dispatches (READY and the GUILD_CREATEs); returns that ledger. Fails early if a watched child exits,
    and after `within_s` with how far it got and the watched children's logs."""
    ready = 0
    counters: dict[str, Any] = {}
    last_report = trio.current_time()
    # Polling: the ledger has no change notification. Large ledgers (1,000 sessions) are polled less often.
    interval = max(POLL_INTERVAL_S, shards / 2000)
    with trio.move_on_after(within_s):
        while True:
            for child in (sim.child, *watch):
                child.check_alive()
            ledger = await sim.gateway_ledger()
            counters = ledger["counters"]
            ready = sum(
                1
                for session in ledger["sessions"].values()
                if session["state"] == "attached" and session["sent"] >= min_sent
            )
            if ready >= shards:
                return ledger
            if progress is not None and trio.current_time() - last_report >= 5.0:
                progress.say(f"  {ready}/{shards} shards ready")
                last_report = trio.current_time()
            await trio.sleep(interval)
    logs = "\n".join(f"--- {c.name}:\n{c.log_tail(1500)}" for c in watch)
    raise BenchmarkError(
        f"{ready} of {shards} shards ready after {within_s:g} s (counters {counters}):\n{logs}"
    )


async def run_or_error(
    label: str,
    errors: dict[str, str],
    progress: Progress,
    measure: Callable[..., Awaitable[T]],
    *args: Any,
) -> T | None:
    """Await `measure(*args)`; on BenchmarkError (or an OS/HTTP error) record it under `label` and return
    None, so one failed configuration does not stop the suite's others."""
    try:
        return await measure(*args)
    except (BenchmarkError, OSError, httpx.HTTPError, ValueError) as exc:
        message = f"{exc.__class__.__name__}: {exc}"
        errors[label] = message
        progress.say(f"  FAILED {label}: {message.splitlines()[0] if message else ''}")
        return None


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and on what a result was measured: CPU, cores, Python, the git commit, the date (UTC)."""
    commit = _git("rev-parse", "HEAD")
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # Other work on the machine shows here; per-CPU-second figures still move with it (caches, SMT).
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def add_common_arguments(parser: argparse.ArgumentParser, suite: str, quick_help: str) -> None:
    """The options every suite has: `--quick` or `--smoke` (sizes), `--json PATH`, `--logs DIR` and
    `--strict` (exit status 3 on a FAIL or ERROR verdict, `targets.strict_status`)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick_help)
    size.add_argument(
        "--smoke", action="store_true", help="a seconds-long run for tests (figures mean little)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "results" / f"{suite}.json",
        help="results file (default: %(default)s)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help=f"folder for child logs (default: {suite}-logs next to --json)",
    )
    add_strict_argument(parser)


#: The machine's RabbitMQ (README), when neither `--amqp-url` nor `$AMQP_URL` names one.
DEFAULT_AMQP_URL: Final = "amqp://guest:guest@127.0.0.1/"


def add_amqp_url_argument(parser: argparse.ArgumentParser, purpose: str) -> None:
    """`--amqp-url`, defaulting to `$AMQP_URL`, else DEFAULT_AMQP_URL. The help does not print the default:
    a URL may carry a password."""
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", DEFAULT_AMQP_URL),
        help=f"RabbitMQ {purpose} (default: $AMQP_URL or guest@127.0.0.1)",
    )


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write `results` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
