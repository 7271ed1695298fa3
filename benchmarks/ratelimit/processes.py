"""Running the ratelimit benchmark's client processes: start them, wait until each is ready, start them
all with one signal, collect their reports, and read their CPU from /proc meanwhile."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from benchmarks.harness import BenchmarkError, ChildProcess, open_child, read_line
from benchmarks.ratelimit.settings import BACKENDS
from benchmarks.ratelimit.workloads import Plan

#: A report must come this long after the plan's end (the clients close their connections and exit).
REPORT_GRACE_S: Final = 30.0
#: `after_window` runs this long after a window's end: its last calls have been cancelled by then.
AFTER_WINDOW_DELAY_S: Final = 0.1


@dataclass(slots=True)
class Client:
    """A client process and what it printed so far."""

    child: ChildProcess
    buffer: bytearray = field(default_factory=bytearray)

    async def json_line(self, within_s: float) -> dict[str, Any]:
        """The next line the client prints, as a JSON object; BenchmarkError (quoting its log) if none
        comes within `within_s` or it is not one."""
        stdout = self.child.process.stdout
        assert stdout is not None
        line = b""
        with trio.move_on_after(within_s):
            line = await read_line(stdout, self.buffer)
        if line:
            value = orjson.loads(line)
            if isinstance(value, dict):
                return value
        await trio.sleep(0.2)  # let a crashing client finish its traceback before the log is quoted
        self.child.check_alive()
        raise BenchmarkError(
            f"{self.child.name} printed no report within {within_s:g} s:\n{self.child.log_tail()}"
        )


def client_argv(variant: str, plan_path: Path, index: int) -> list[str]:
    if variant in BACKENDS or variant.startswith("capacity"):
        return [
            sys.executable,
            "-m",
            "benchmarks.ratelimit.client",
            "--plan",
            str(plan_path),
            "--index",
            str(index),
        ]
    return [
        *(sys.executable, "-m", "benchmarks.peers.rest_bench", "--client", variant),
        *("--plan", str(plan_path), "--index", str(index)),
    ]


async def run_clients(
    plan: Plan,
    *,
    label: str,
    variant: str,
    log_dir: Path,
    env: Mapping[str, str],
    ready_timeout_s: float,
    run_s: float,
    simulator: ChildProcess | None = None,
    after_window: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Start the plan's processes, wait for every `ready`, signal them all, collect every report.

    Also returns, per workload window of the plan, the cores the client processes (and the simulator)
    used on average, read from /proc at the window's start and end. `after_window(name)` runs just after
    each window ends (in the gap before the next)."""
    plan_path = log_dir / f"{label}-plan.json"
    plan.write(plan_path)
    cpu: dict[str, dict[str, float]] = {}
    async with AsyncExitStack() as stack:
        clients: list[Client] = []
        for index in range(plan.processes):
            child = await stack.enter_async_context(
                open_child(
                    f"{label}-client-{index}",
                    client_argv(variant, plan_path, index),
                    log_dir=log_dir,
                    env=env,
                    capture_stdout=True,
                )
            )
            clients.append(Client(child))
        for client in clients:
            ready = await client.json_line(ready_timeout_s)
            if not ready.get("ready"):
                raise BenchmarkError(f"{client.child.name} said {ready} instead of ready")
        for client in clients:
            client.child.process.send_signal(signal.SIGUSR1)
        start = trio.current_time()
        deadline = start + run_s + REPORT_GRACE_S
        watched = [client.child for client in clients]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_cpu, start, plan.windows(), watched, simulator, cpu)
            if after_window is not None:
                nursery.start_soon(call_after_windows, start, plan.windows(), after_window)
            reports = [await client.json_line(max(0.0, deadline - trio.current_time())) for client in clients]
    return reports, cpu


async def call_after_windows(
    start: float, windows: dict[str, tuple[float, float]], hook: Callable[[str], Awaitable[None]]
) -> None:
    for name, (_, end) in windows.items():
        await trio.sleep_until(start + end + AFTER_WINDOW_DELAY_S)
        await hook(name)


async def sample_cpu(
    start: float,
    windows: dict[str, tuple[float, float]],
    clients: Sequence[ChildProcess],
    simulator: ChildProcess | None,
    into: dict[str, dict[str, float]],
) -> None:
    """Fill `into[workload]` with the average cores the clients and the simulator used in its window."""
    for name, (begin, end) in windows.items():
        await trio.sleep_until(start + begin)
        try:
            clients_0 = sum(child.usage().cpu_s for child in clients)
            simulator_0 = simulator.usage().cpu_s if simulator is not None else 0.0
            await trio.sleep_until(start + end)
            clients_1 = sum(child.usage().cpu_s for child in clients)
            simulator_1 = simulator.usage().cpu_s if simulator is not None else 0.0
        except BenchmarkError:
            return  # a client exited early: its report says why
        span = end - begin
        into[name] = {
            "clients_cores": round((clients_1 - clients_0) / span, 3),
            "simulator_cores": round((simulator_1 - simulator_0) / span, 3),
        }
