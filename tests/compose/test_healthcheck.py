"""The image's HEALTHCHECK command, run as Docker runs it, against a real health endpoint: it passes on a
live supervisor whether `PROMETHEUS_ADDRESS` names a host or only a port, fails when nothing listens, and
passes idle when metrics are turned off from compose's `.env` (`PROMETHEUS_ADDRESS=off`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from benchmarks.children import free_port, inherited_environment
from supervisor.config import load_settings
from supervisor.metrics import HealthState, serve_metrics

from .deployfiles import Instruction, load_compose, parse_dockerfile, service_environment

TIMEOUT_S = 30


def healthcheck_argv() -> list[str]:
    check = parse_dockerfile()[-1].last("HEALTHCHECK")
    assert check is not None
    _, rest = check.flags()
    argv = Instruction("CMD", rest.partition(" ")[2]).exec_form()
    assert argv is not None and argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def run_check(address: str | None) -> int:
    env = inherited_environment()
    if address is not None:
        env["PROMETHEUS_ADDRESS"] = address
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(healthcheck_argv(), env=env, check=False, capture_stderr=True)
    return result.returncode


@pytest.mark.parametrize("written", ["0.0.0.0:{port}", "127.0.0.1:{port}", ":{port}", "{port}"])
async def test_the_healthcheck_asks_a_live_endpoint(written: str, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    "127.0.0.1:0",
                    "/metrics",
                    lambda: HealthState(live=True, ready=False),
                    directory=metrics_dir,
                    task_status=task_status,
                )
            )
            assert await run_check(written.format(port=port)) == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("address", ["off", "OFF", ""])
async def test_metrics_turned_off_passes_idle(address: str) -> None:
    assert await run_check(address) == 0


async def test_nothing_listening_fails() -> None:
    assert await run_check(f":{free_port()}") != 0


def test_metrics_turn_off_from_compose_env() -> None:
    """`PROMETHEUS_ADDRESS=off` in compose/.env reaches the gateway as `off` (compose.yaml's `${...:-default}`
    would replace an empty value by the default), and the gateway then serves no metrics."""
    env = service_environment(load_compose({"PROMETHEUS_ADDRESS": "off"})["services"]["gateway"])
    assert env["PROMETHEUS_ADDRESS"] == "off"
    assert (
        load_settings([], {"PROMETHEUS_ADDRESS": env["PROMETHEUS_ADDRESS"]}).settings.prometheus_address
        is None
    )
    default = service_environment(load_compose({})["services"]["gateway"])
    assert default["PROMETHEUS_ADDRESS"] == "0.0.0.0:9090"
