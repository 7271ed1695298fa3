"""Metrics in multi-process mode and the health endpoint, over real sockets and real processes.

Values are written by separate Python processes, as workers do; this pytest process only serves them, with
`MultiProcessCollector(path=...)`, so it never depends on when prometheus_client was first imported here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from supervisor.metrics import (
    HealthState,
    mark_worker_dead,
    parse_listen_address,
    prepare_multiprocess_dir,
    serve_metrics,
)
from workers.metric_labels import MULTIPROC_DIR_ENV, reconnect_reason_label

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0

# A worker's part: count, then exit (its files stay, as a crashed worker's would). argv: received, ready.
WRITER = """
import os, sys
from workers import metric_defs as m
m.EVENTS_RECEIVED.inc(int(sys.argv[1]))
m.EVENTS_PUBLISHED.inc(int(sys.argv[1]))
m.SHARDS.labels(state="ready").set(int(sys.argv[2]))
m.SHARDS.labels(state="connecting").set(1)
m.count_reconnect("close-4000")
m.count_reconnect("zombie", 2)
m.count_reconnect("close-4242")
m.PUBLISH_CONFIRM_LAG.observe(0.003)
m.HEARTBEAT_LATENCY.observe(0.04)
m.IDENTIFIES.inc(2)
m.RESUMES.inc()
print(os.getpid())
"""


@pytest.fixture
def isolated_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_multiprocess_dir exports the variable; give it back as it was after the test."""
    monkeypatch.setenv(MULTIPROC_DIR_ENV, "placeholder")
    monkeypatch.delenv(MULTIPROC_DIR_ENV)


def child_env(metrics_dir: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != MULTIPROC_DIR_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if metrics_dir is not None:
        env[MULTIPROC_DIR_ENV] = str(metrics_dir)
    return env


async def run_python(code: str, *args: str, metrics_dir: Path | None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT_S):
        return await trio.run_process(
            [sys.executable, "-c", code, *args],
            env=child_env(metrics_dir),
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def write_values(metrics_dir: Path, received: int, ready: int) -> int:
    result = await run_python(WRITER, str(received), str(ready), metrics_dir=metrics_dir)
    assert result.returncode == 0, result.stderr.decode()
    return int(result.stdout)


@dataclass
class Health:
    state: HealthState


@asynccontextmanager
async def endpoint(metrics_dir: Path, health: Health) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_metrics(
                "127.0.0.1:0",
                "/metrics",
                lambda: health.state,
                directory=metrics_dir,
                task_status=task_status,
            )
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
        nursery.cancel_scope.cancel()


def sample(text: str, name: str) -> float:
    """The value of the one sample line that starts with `name ` (name includes its labels)."""
    values = [float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, text)
    return values[0]


async def test_values_from_separate_processes_are_merged_on_each_scrape(
    tmp_path: Path, isolated_environ: None
) -> None:
    metrics_dir = prepare_multiprocess_dir(tmp_path / "metrics")
    health = Health(HealthState(live=True, ready=True))
    with trio.fail_after(TIMEOUT_S):
        first = await write_values(metrics_dir, received=3, ready=2)
        second = await write_values(metrics_dir, received=4, ready=3)
        async with endpoint(metrics_dir, health) as client:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = response.text
            assert sample(text, "discord_events_received_total") == 7.0
            assert sample(text, "discord_events_published_total") == 7.0
            assert sample(text, 'discord_shards{state="ready"}') == 5.0
            assert sample(text, 'discord_shards{state="connecting"}') == 2.0
            assert sample(text, 'discord_shards{state="fatal"}') == 0.0
            assert sample(text, 'discord_reconnects_total{reason="close-4000"}') == 2.0
            assert sample(text, 'discord_reconnects_total{reason="zombie"}') == 4.0
            assert sample(text, 'discord_reconnects_total{reason="other"}') == 2.0
            assert sample(text, "discord_identifies_total") == 4.0
            assert sample(text, "discord_resumes_total") == 2.0
            assert sample(text, "discord_publish_confirm_lag_seconds_count") == 2.0
            assert sample(text, 'discord_publish_confirm_lag_seconds_bucket{le="0.0025"}') == 0.0
            assert sample(text, 'discord_publish_confirm_lag_seconds_bucket{le="0.005"}') == 2.0
            assert sample(text, 'discord_heartbeat_latency_seconds_bucket{le="0.05"}') == 2.0
            assert sample(text, 'discord_worker_restarts_total{cause="crash"}') == 0.0
            assert sample(text, "discord_workers") == 0.0

            # The first worker is reaped: its shards stop counting, its counters stay.
            mark_worker_dead(first)
            text = (await client.get("/metrics")).text
            assert sample(text, 'discord_shards{state="ready"}') == 3.0
            assert sample(text, "discord_events_received_total") == 7.0
            mark_worker_dead(second, metrics_dir)
            assert 'discord_shards{state="ready"}' not in (await client.get("/metrics")).text

            response = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
            assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
            assert response.text.endswith("# EOF\n")


async def test_healthz_and_readyz_follow_the_supervisors_verdicts(tmp_path: Path) -> None:
    detail = {"shards": 4, "ready_shards": 1, "workers": [{"index": 0, "pid": 123}]}
    health = Health(HealthState(live=True, ready=False, detail=detail))
    with trio.fail_after(TIMEOUT_S):
        async with endpoint(tmp_path, health) as client:
            healthz, readyz = await client.get("/healthz"), await client.get("/readyz")
            assert (healthz.status_code, readyz.status_code) == (200, 503)
            assert healthz.json() == readyz.json() == {"live": True, "ready": False, "detail": detail}
            assert healthz.headers["content-type"] == "application/json"

            health.state = HealthState(live=True, ready=True, detail={"shards": 4, "ready_shards": 4})
            readyz = await client.get("/readyz")
            assert readyz.status_code == 200
            assert readyz.json()["detail"] == {"shards": 4, "ready_shards": 4}

            health.state = HealthState(live=False, ready=True, detail={"crash_loop": True})
            assert (await client.get("/healthz")).status_code == 503

            assert (await client.get("/nothing")).status_code == 404
            rejected = await client.post("/metrics")
            assert (rejected.status_code, rejected.headers["allow"]) == (405, "GET")
            # An empty directory (no process has counted yet) is an empty scrape, not an error.
            assert (await client.get("/metrics")).text == ""


async def test_serving_refuses_bad_settings_before_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)

    def healthy() -> HealthState:
        return HealthState(live=True, ready=True)

    with pytest.raises(ValueError, match="no metrics directory"):
        await serve_metrics("127.0.0.1:0", "/metrics", healthy)
    with pytest.raises(ValueError, match="does not exist"):
        await serve_metrics("127.0.0.1:0", "/metrics", healthy, directory=tmp_path / "missing")
    with pytest.raises(ValueError, match="metrics endpoint"):
        await serve_metrics("127.0.0.1:0", "/healthz", healthy, directory=tmp_path)
    with pytest.raises(ValueError, match="metrics endpoint"):
        await serve_metrics("127.0.0.1:0", "metrics", healthy, directory=tmp_path)


async def test_metric_defs_refuse_a_prometheus_client_imported_too_early(tmp_path: Path) -> None:
    code = f"""
import os
import prometheus_client
os.environ[{MULTIPROC_DIR_ENV!r}] = {str(tmp_path)!r}
import workers.metric_defs
"""
    result = await run_python(code, metrics_dir=None)
    assert result.returncode == 1
    assert b"RuntimeError: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR" in result.stderr


async def test_importing_the_serving_side_leaves_prometheus_client_unimported() -> None:
    code = "import sys, supervisor.metrics; assert 'prometheus_client' not in sys.modules"
    result = await run_python(code, metrics_dir=None)
    assert result.returncode == 0, result.stderr.decode()


# -- the directory -----------------------------------------------------------------------------------------


def test_a_named_directory_is_created_or_emptied_of_metric_files(
    tmp_path: Path, isolated_environ: None
) -> None:
    created = prepare_multiprocess_dir(tmp_path / "new" / "metrics")
    assert created.is_dir() and os.environ[MULTIPROC_DIR_ENV] == str(created)

    (created / "counter_123.db").write_bytes(b"stale")
    (created / "gauge_livesum_123.db").write_bytes(b"stale")
    (created / "README").write_text("not ours")
    assert prepare_multiprocess_dir(str(created)) == created
    assert sorted(path.name for path in created.iterdir()) == ["README"]


@pytest.fixture
def fresh_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def test_the_default_directory_is_private_and_under_runtime_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_environ: None, fresh_dirs: list[Path]
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path}:/elsewhere")
    first, second = prepare_multiprocess_dir(), prepare_multiprocess_dir()
    fresh_dirs += [first, second]
    assert first.parent == second.parent == tmp_path and first != second
    assert stat.S_IMODE(first.stat().st_mode) == 0o700
    assert os.environ[MULTIPROC_DIR_ENV] == str(second)

    monkeypatch.delenv("RUNTIME_DIRECTORY")
    default = prepare_multiprocess_dir()
    fresh_dirs.append(default)
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        assert default.parent == Path("/dev/shm")


async def test_preparing_after_prometheus_client_was_imported_warns(tmp_path: Path) -> None:
    code = f"""
import logging
import prometheus_client
from supervisor.metrics import prepare_multiprocess_dir
logging.basicConfig(format="%(message)s")
prepare_multiprocess_dir({str(tmp_path)!r})
"""
    result = await run_python(code, metrics_dir=None)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"metrics.imported_too_early\n"
    assert (await run_python(code.replace("import prometheus_client", ""), metrics_dir=None)).stderr == b""


def test_marking_a_worker_dead_without_metrics_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    mark_worker_dead(12345)


# -- addresses and labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("0.0.0.0:9090", ("0.0.0.0", 9090)),
        ("[::1]:0", ("::1", 0)),
        (":9090", ("127.0.0.1", 9090)),
        ("9090", ("127.0.0.1", 9090)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_listen_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize("address", ["::1:9090", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536", ""])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="metrics address"):
        parse_listen_address(address)


def test_reconnect_reasons_stay_bounded() -> None:
    assert reconnect_reason_label("zombie") == "zombie"
    assert reconnect_reason_label("close-4009") == "close-4009"
    assert reconnect_reason_label("close-1006") == "close-1006"
    assert reconnect_reason_label("close-4999") == "other"
    assert reconnect_reason_label("close-") == "other"
    assert reconnect_reason_label("something new") == "other"


def test_shard_states_match_the_protocol() -> None:
    from workers.metric_labels import SHARD_STATES
    from workers.protocol import ShardState

    assert tuple(state.value for state in ShardState) == SHARD_STATES


async def test_a_killed_supervisors_directory_is_removed_by_the_next_start(tmp_path: Path) -> None:
    """SIGKILL leaves the default metrics directory behind (no `finally` runs); the next supervisor on the
    host removes it at start, since its pid is gone, and leaves a live one's alone."""
    from benchmarks.children import free_port, stop_process, worker_env
    from benchmarks.simulator import GatewayConfig, SimulatorConfig, open_simulator

    runtime = tmp_path / "run"
    runtime.mkdir()
    other_user_like = runtime / "discord-gateway-metrics-1-keep"  # pid 1 is alive: never removed
    other_user_like.mkdir()
    older_version = runtime / "discord-gateway-metrics-abcdefgh"  # no pid in the name: left alone
    older_version.mkdir()

    async def start(log: Path) -> tuple[trio.Process, Path]:
        port = free_port()
        env = worker_env(
            sim.addresses.rest_url,
            BROKER_TYPE="null",
            RUNTIME_DIRECTORY=str(runtime),
            PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        )
        env.pop(MULTIPROC_DIR_ENV, None)
        with open(log, "wb") as log_file:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "supervisor"], env=env, stdin=subprocess.DEVNULL, stderr=log_file
            )
        async with httpx.AsyncClient() as http:  # ready: its signal handlers are in place
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                await trio.sleep(0.1)
        (mine,) = runtime.glob(f"discord-gateway-metrics-{process.pid}-*")
        return process, mine

    config = SimulatorConfig(gateway=GatewayConfig(shard_count=1, max_concurrency=1, guilds_per_shard=1))
    with trio.fail_after(60):
        async with open_simulator(config) as sim:
            first, first_dir = await start(tmp_path / "first.log")
            first.kill()
            await first.wait()
            assert first_dir.is_dir()
            second, second_dir = await start(tmp_path / "second.log")
            try:
                assert not first_dir.exists()
                assert other_user_like.is_dir() and older_version.is_dir()
            finally:
                with trio.CancelScope(shield=True):
                    await stop_process(second, grace_s=20)
            assert second.returncode == 0, (tmp_path / "second.log").read_text()[-2000:]
            assert not second_dir.exists()  # removed by its owner at a clean exit
