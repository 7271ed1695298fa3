"""`python -m workers` as a process: stdio events (DESIGN 3.3), stdin commands, signals, exit statuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import trio

from benchmarks.children import free_port, inherited_environment, stop_process, worker_env
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator
from workers.main import GRACEFUL_STOP_S

TIMEOUT_S = 40


def stdio_worker_env(sim: Simulator, **extra: str) -> dict[str, str]:
    """A worker publishing to stdout, against `sim`; `extra` wins."""
    return worker_env(sim.addresses.rest_url, **{"BROKER_TYPE": "stdio", **extra})


async def read_lines(stream: trio.abc.ReceiveStream, lines: list[dict[str, Any]], until: int) -> None:
    buffer = b""
    while len(lines) < until:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        lines.extend(json.loads(line) for line in complete if line)


async def test_stdio_events_stdin_commands_and_sigterm(tmp_path: Any) -> None:
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=2, max_concurrency=2, event_rate=50, guilds_per_shard=1)
    )
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(config) as sim:
            stderr_path = tmp_path / "worker.log"
            with open(stderr_path, "wb") as stderr:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-ids", "0-1", "--shard-count", "2"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=stdio_worker_env(sim),
                )
                try:
                    assert process.stdout is not None and process.stdin is not None
                    lines: list[dict[str, Any]] = []
                    await read_lines(process.stdout, lines, 60)
                    assert {line["shard"] for line in lines} == {0, 1}
                    assert set(lines[0]) == {"t", "s", "shard", "d"}
                    for shard in (0, 1):
                        seqs = [line["s"] for line in lines if line["shard"] == shard]
                        assert seqs == list(range(1, len(seqs) + 1))
                    ready = next(line for line in lines if line["t"] == "READY")
                    assert ready["d"]["session_id"]
                    # A presence update on shard 1, a bad line, then one routed by guild id.
                    guild = ready["d"]["guilds"][0]["id"]
                    commands = [
                        {
                            "t": "1",
                            "d": {
                                "op": 3,
                                "d": {"since": None, "activities": [], "status": "idle", "afk": False},
                            },
                        },
                        "not json",
                        {
                            "t": "SEND",
                            "d": {
                                "guild_id": guild,
                                "packet": {"op": 8, "d": {"guild_id": guild, "query": "", "limit": 0}},
                            },
                        },
                    ]
                    data = b"".join(
                        (c if isinstance(c, str) else json.dumps(c)).encode() + b"\n" for c in commands
                    )
                    await process.stdin.send_all(data)
                    await _wait_for(lambda: sim.gateway.ledger.counters["op3_received"] == 1)
                    await read_lines(process.stdout, lines, len(lines) + 200)
                    assert any(line["t"] == "GUILD_MEMBERS_CHUNK" for line in lines)
                finally:
                    await stop_process(process, grace_s=15)
            log = stderr_path.read_text()
            assert process.returncode == 0, log
            assert DEFAULT_TOKEN not in log
            assert "command.rejected" in log
            assert dict(sim.gateway.ledger.closes_received) == {"4900": 2}


async def _wait_for(predicate: Any) -> None:
    with trio.fail_after(15):
        while not predicate():
            await trio.sleep(0.05)


def test_bad_configuration_exits_2_naming_the_key() -> None:
    env = {**inherited_environment(), "DISCORD_TOKEN": "x" * 30, "BROKER_TYPE": "kafka"}
    result = subprocess.run(
        [sys.executable, "-m", "workers", "--shard-count", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "BROKER_TYPE" in result.stderr and "kafka" in result.stderr
    env.pop("DISCORD_TOKEN")
    result = subprocess.run(
        [sys.executable, "-m", "workers", "--shard-count", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "DISCORD_TOKEN" in result.stderr


async def test_refused_token_exits_3() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(SimulatorConfig()) as sim:
            env = stdio_worker_env(sim, DISCORD_TOKEN="not-the-token-at-all-000000")
            result = await trio.run_process(
                [sys.executable, "-m", "workers", "--shard-count", "1"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 3
            assert b"not-the-token-at-all" not in result.stderr


async def test_sigterm_stops_within_the_grace_period_while_redis_is_down(tmp_path: Any) -> None:
    """The sessions cannot be saved: the worker says so and exits anyway, within GRACEFUL_STOP_S."""
    config = SimulatorConfig(gateway=GatewayConfig(shard_count=1, event_rate=50, guilds_per_shard=1))
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(config) as sim:
            env = stdio_worker_env(
                sim, SHARD_STORE_TYPE="redis", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
            )
            stderr_path = tmp_path / "worker.log"
            with open(stderr_path, "wb") as stderr:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-count", "1"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=env,
                )
                try:
                    assert process.stdout is not None
                    lines: list[dict[str, Any]] = []
                    while not any(line["t"] == "READY" for line in lines):
                        read = len(lines)
                        await read_lines(process.stdout, lines, read + 1)
                        assert len(lines) > read, "the worker closed stdout before READY"
                    process.send_signal(signal.SIGTERM)
                    stopping = trio.current_time()
                    with trio.move_on_after(GRACEFUL_STOP_S + 2.0):
                        async with trio.open_nursery() as nursery:
                            # Keep reading: a full pipe would block the worker.
                            nursery.start_soon(read_lines, process.stdout, [], 1 << 30)
                            await process.wait()
                            nursery.cancel_scope.cancel()
                    stopped_after_s = trio.current_time() - stopping
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            log = stderr_path.read_text()
            assert process.returncode == 0, log
            assert stopped_after_s < GRACEFUL_STOP_S + 2.0, log
            assert "session_store.unwritten_on_close" in log, log


def test_an_error_escaping_the_worker_is_logged_redacted_and_exits_1() -> None:
    """E.g. RabbitMQ unreachable at start: one JSON log line through the redaction filter, not a raw
    traceback; the token and the AMQP password in the exception's message do not reach stderr."""
    password = "Sekr3tPassw0rd"
    crash = (
        "import workers.main as m\n"
        "async def crash(config):\n"
        "    s = config.settings\n"
        "    raise RuntimeError(f'cannot reach {s.amqp_url} with token {s.token}')\n"
        "m.run_worker = crash\n"
        "raise SystemExit(m.main(['--shard-count', '1']))\n"
    )
    env = {
        **inherited_environment(),
        "DISCORD_TOKEN": DEFAULT_TOKEN,
        "AMQP_URL": f"amqp://guest:{password}@127.0.0.1/",
        "LOG_FORMAT": "json",
    }
    result = subprocess.run(
        [sys.executable, "-c", crash], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    assert DEFAULT_TOKEN not in result.stderr and password not in result.stderr, result.stderr
    [line] = [json.loads(line) for line in result.stderr.splitlines()]
    assert line["event"] == "worker.crashed" and line["level"] == "error"
    assert (
        "RuntimeError: cannot reach amqp://guest:[redacted]@127.0.0.1/ with token [redacted]" in line["exc"]
    )
