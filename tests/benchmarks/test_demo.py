"""Ctrl-C on `python -m benchmarks.demo`: SIGINT to the whole process group, as a terminal sends it, stops
the supervisor and its workers cleanly and prints the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from benchmarks.children import inherited_environment

TIMEOUT_S = 120


async def test_sigint_to_the_process_group_stops_everything_cleanly(tmp_path: Path) -> None:
    stderr_path = tmp_path / "demo.err"
    env = {**inherited_environment(), "LOG_FORMAT": "json"}
    with open(stderr_path, "wb") as stderr, trio.fail_after(TIMEOUT_S):
        demo = await trio.lowlevel.open_process(
            [sys.executable, "-m", "benchmarks.demo", "--shards", "2", "--seconds", "0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group, like a shell job
        )
        try:
            while '"supervisor.ready"' not in stderr_path.read_text():
                assert demo.poll() is None, stderr_path.read_text()[-3000:]
                await trio.sleep(0.2)
            os.killpg(demo.pid, signal.SIGINT)
            await demo.wait()
        finally:
            if demo.returncode is None:
                os.killpg(demo.pid, signal.SIGKILL)
                await demo.wait()
    text = stderr_path.read_text()
    assert demo.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    [summary] = [line for line in text.splitlines() if line.startswith("demo summary: ")]
    assert json.loads(summary.removeprefix("demo summary: "))["supervisor_exit"] == 0
    # One format for the whole demo: every log line, the simulator's too, is a JSON object.
    logs = [line for line in text.splitlines() if line.strip() and line != summary]
    events = [json.loads(line) for line in logs]
    assert any(e["logger"] == "benchmarks.simulator" for e in events)
    exits = [e for e in events if e["event"] == "worker.exited"]
    assert exits and all(e["code"] == 0 and e["level"] == "info" for e in exits), exits
    assert [e["event"] for e in events if e["logger"] == "supervisor"][-1] == "supervisor.stopped"
