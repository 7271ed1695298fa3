"""An unreachable Discord API stops the supervisor with status 1 and a log line naming the URL and why."""

from __future__ import annotations

import subprocess
import sys

import trio

from benchmarks.children import free_port, worker_env
from workers.exit_status import ExitStatus

TIMEOUT_S = 60


async def test_an_unreachable_api_names_the_url_and_the_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v10"  # nothing listens there
    env = worker_env(url, BROKER_TYPE="null")
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "supervisor"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    log = result.stderr.decode()
    assert result.returncode == ExitStatus.ERROR, log[-2000:]
    assert f"cannot reach {url}/gateway/bot: connection refused" in log, log[-2000:]
