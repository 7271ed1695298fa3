"""`docker compose --env-file compose/bench.env --profile bench up`, without Docker.

The bench profile's two containers run here as processes from `image_venv` (the Dockerfile's install), with
the commands and environment compose.yaml gives them after interpolation with bench.env. Only what a
container network provides is swapped for its equivalent on this host, and each swap first checks the value
it replaces: the service names `rabbitmq`, `redis` and `simulator` become 127.0.0.1 (this machine's RabbitMQ
and Redis, the suite's usual services), fixed ports become free ones, the tmpfs and /dev/shm become
directories under tmp_path, and the exchanges and the Redis prefix get names of their own so that the run
cannot meet another test's state. Then the whole system must come up: every shard READY, the image's
HEALTHCHECK command passing against the real /healthz, no Discord rule broken (but see the note on
heartbeat_no_jitter), and a clean drain on SIGTERM.

Where the kernel has PR_SET_MDWE (Linux 6.3+), the supervisor and its workers run with it, the same policy
as the systemd unit's MemoryDenyWriteExecute=yes: no mapping may be writable and executable.
"""

from __future__ import annotations

import ctypes
import json
import secrets
import signal
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from benchmarks.children import free_port, stop_process
from workers.amqp_bridge import open_amqp
from workers.metric_labels import MULTIPROC_DIR_ENV

from .deployfiles import (
    BENCH_ENV,
    COMPOSE_DIR,
    compose_bytes,
    compose_duration_s,
    load_compose,
    parse_dockerfile,
    parse_env_file,
    service_environment,
)
from .imagevenv import ImageVenv

TIMEOUT_S: Final = 90
PR_SET_MDWE: Final = 65
PR_GET_MDWE: Final = 66
PR_MDWE_REFUSE_EXEC_GAIN: Final = 1
#: Runs the rest of its command line (`-m supervisor`) with PR_SET_MDWE, which children inherit.
MDWE_LAUNCHER: Final = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
    f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, 'PR_SET_MDWE'; "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def kernel_has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0


def on_this_host(url: str, service: str, port: int | None = None) -> str:
    """`url`, which must name the compose service `service`, pointed at 127.0.0.1 (and `port`)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == service, f"{url} should point at the {service} service"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"127.0.0.1:{port or parts.port}"
    return parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc).geturl()


def simulator_argv(image: ImageVenv, service: dict[str, Any]) -> list[str]:
    """The simulator service's entrypoint and command, listening on 127.0.0.1 and free ports."""
    replaced = {"--host": "127.0.0.1", "--rest-port": "0", "--gateway-port": "0", "--resume-port": "0"}
    command = []
    for argument in service["command"]:
        name, sep, _ = argument.partition("=")
        if sep and name in replaced:
            command.append(f"{name}={replaced.pop(name)}")
        else:
            command.append(argument)
    assert not replaced, f"compose.yaml's simulator command no longer sets {sorted(replaced)}"
    entrypoint = service["entrypoint"]
    assert entrypoint[0] == "python"
    return [str(image.python), *entrypoint[1:], *command]


@asynccontextmanager
async def running(
    argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path
) -> AsyncIterator[trio.Process]:
    with open(log, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def first_line(process: trio.Process) -> bytes:
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the process exited before printing its first line"
        line += chunk
    return line


async def get(url: str) -> httpx.Response | None:
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            return await http.get(url)
    except httpx.HTTPError:
        return None


async def healthcheck(image: ImageVenv, env: dict[str, str], cwd: Path) -> int:
    """The exit status of the image's HEALTHCHECK command (exec form) run in the container's environment."""
    check = parse_dockerfile()[-1].last("HEALTHCHECK")
    assert check is not None
    argv = json.loads(check.flags()[1].removeprefix("CMD").strip())
    assert argv[0] == "python"
    completed = await trio.run_process(
        [str(image.python), *argv[1:]],
        env=env,
        cwd=cwd,
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    return completed.returncode


async def test_the_bench_profile_runs_the_whole_system(image_venv: ImageVenv, tmp_path: Path) -> None:
    compose = load_compose(parse_env_file(BENCH_ENV))
    services = compose["services"]
    gateway = services["gateway"]
    image_env = parse_dockerfile()[-1].environment()
    del image_env["PATH"]  # the venv's bin comes first in image_venv.environment

    with trio.fail_after(TIMEOUT_S):
        sim_log = tmp_path / "simulator.log"
        async with running(
            simulator_argv(image_venv, services["simulator"]),
            image_venv.environment(image_env),
            tmp_path,
            sim_log,
        ) as simulator:
            addresses = json.loads(await first_line(simulator))

            env = image_env | service_environment(gateway)
            metrics_port = free_port()
            assert env["PROMETHEUS_ADDRESS"].startswith("0.0.0.0:")
            run_dir, shm_dir = tmp_path / "run", tmp_path / "dev-shm"
            shm_dir.mkdir()
            assert env.get("RATELIMIT_SHM_DIR", "/dev/shm") == "/dev/shm"
            metrics_dir = Path(env[MULTIPROC_DIR_ENV])
            assert metrics_dir.is_relative_to("/run")
            env.update(
                {
                    "DISCORD_TOKEN_FILE": str(COMPOSE_DIR / compose["secrets"]["discord_token"]["file"]),
                    "DISCORD_API_URL": on_this_host(
                        env["DISCORD_API_URL"], "simulator", urllib.parse.urlsplit(addresses["rest_url"]).port
                    ),
                    "AMQP_URL": on_this_host(env["AMQP_URL"], "rabbitmq"),
                    "REDIS_URL": on_this_host(env["REDIS_URL"], "redis"),
                    "PROMETHEUS_ADDRESS": f"0.0.0.0:{metrics_port}",
                    MULTIPROC_DIR_ENV: str(run_dir / metrics_dir.relative_to("/run")),
                    "RATELIMIT_SHM_DIR": str(shm_dir),
                    "BROKER_GROUP": f"test-compose-{secrets.token_hex(4)}",
                    "AMQP_GROUP": f"test-compose-rest-{secrets.token_hex(4)}",
                    "SHARD_STORE_PREFIX": f"test-compose-{secrets.token_hex(4)}",
                }
            )
            env = image_venv.environment(env)
            launcher = ["-c", MDWE_LAUNCHER] if kernel_has_mdwe() else []
            if launcher:
                probe = await trio.run_process(
                    [str(image_venv.python), *launcher, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                    check=False,
                    capture_stderr=True,
                )
                assert b"PermissionError" in probe.stderr, "W+X mappings should be refused under PR_SET_MDWE"

            base = f"http://127.0.0.1:{metrics_port}"
            log = tmp_path / "supervisor.log"
            async with running(
                [str(image_venv.python), *launcher, "-m", "supervisor"], env, tmp_path, log
            ) as supervisor:
                while (response := await get(base + "/readyz")) is None or response.status_code != 200:
                    assert supervisor.returncode is None, log.read_text()
                    await trio.sleep(0.2)

                assert await healthcheck(image_venv, env, tmp_path) == 0
                metrics = await get(base + env["PROMETHEUS_ENDPOINT"])
                assert metrics is not None and 'discord_shards{state="ready"}' in metrics.text
                # The ratelimit segment, and a replacement built beside it, fit in the container's /dev/shm.
                (segment,) = shm_dir.iterdir()
                assert 2 * segment.stat().st_size <= compose_bytes(gateway["shm_size"])
                ledger = await get(addresses["control_url"] + "/ledger")
                assert ledger is not None
                counters = ledger.json()["gateway"]["counters"]
                shards = int(
                    next(a for a in services["simulator"]["command"] if a.startswith("--shard-count=")).split(
                        "="
                    )[1]
                )
                assert counters["identifies_accepted"] == shards
                # heartbeat_no_jitter flags a first beat within 1% of the interval, which a correct uniform
                # jitter also draws, on 1 connection in 100 (15% of runs with 16 shards): not a rule broken.
                assert set(ledger.json()["gateway"]["rules_broken"]) <= {"heartbeat_no_jitter"}

                supervisor.send_signal(signal.SIGTERM)
                with trio.fail_after(compose_duration_s(gateway["stop_grace_period"])):
                    await supervisor.wait()
                assert supervisor.returncode == 0, log.read_text()

            # The durable queues the workers declared on the shared broker go with the run.
            async with open_amqp(env["AMQP_URL"]) as amqp:
                for queue in (
                    f"{env['AMQP_GROUP']}:{env.get('AMQP_EVENT') or 'REQUEST'}",
                    f"{env['BROKER_GROUP']}:SEND",
                    *(f"{env['BROKER_GROUP']}:{shard}" for shard in range(shards)),
                ):
                    await amqp.delete_queue(queue)
            assert await healthcheck(image_venv, env, tmp_path) != 0, "nothing answers: the check must fail"
            assert list(shm_dir.iterdir()) == [], "the supervisor removes its segment when it stops"
            await stop_process(simulator, signal.SIGINT, grace_s=5)
