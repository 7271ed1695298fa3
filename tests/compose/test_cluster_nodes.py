"""`docker compose -f compose/cluster.yaml up`, without Docker: two nodes share the shards and fail over.

cluster.yaml's two containers run here as processes from `image_venv` (the Dockerfile's install), with the
environment the file gives them, against the simulator from the same venv. Host networking needs no swap of
addresses: REDIS_URL already names this machine's Redis. What is swapped, each after a check of the value it
replaces: the token file (bench.token, as with compose.yaml's bench profile) and DISCORD_API_URL (the
simulator), the metrics ports (free ones), the tmpfs and /dev/shm (directories under tmp_path), the lease
TTL (the shortest allowed, for a short test), the broker (`null`: test_bench_profile.py runs the broker;
this test is about the cluster) and the Redis prefix (one of this run's own, deleted after it).

Then: each node holds shards and together they hold all of them, the image's HEALTHCHECK passes on each;
node-a dies with its workers (SIGKILL to its process group, what killing a container does); node-b holds
every shard within the lease TTL and a few seconds, by RESUME (the simulator saw no IDENTIFY but the first
ones); and node-b, alone, exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

from benchmarks.children import free_port
from ratelimit.redis_client import open_redis_client
from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.settings import MIN_LEASE_TTL_S

from .deployfiles import (
    BENCH_ENV,
    CLUSTER_FILE,
    COMPOSE_DIR,
    compose_duration_s,
    load_compose,
    parse_dockerfile,
    parse_env_file,
    service_environment,
)
from .imagevenv import ImageVenv
from .test_bench_profile import first_line, get, healthcheck, running

TIMEOUT_S: Final = 120
SHARDS: Final = 4
#: After the lease TTL: a sync period to notice, a worker's start and its RESUMEs.
FAILOVER_MARGIN_S: Final = 15.0


@asynccontextmanager
async def node_process(
    argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path
) -> AsyncIterator[trio.Process]:
    """A node in a process group of its own (as in a container), killed with its workers if left running."""
    with open(log, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


async def cluster_shards(base: str) -> list[int] | None:
    """The shards a node holds (`detail.cluster.shards` of its /healthz) when it is ready (every shard it
    holds READY, in the same answer), else None."""
    health = await get(base + "/healthz")
    if health is None or not health.json()["ready"]:
        return None
    shards: list[int] = health.json()["detail"]["cluster"]["shards"]
    return shards


async def split_between(a: str, b: str, everything: list[int]) -> bool:
    """Whether the nodes at `a` and `b` are both ready, each holding shards, together holding all of them."""
    held_a, held_b = await cluster_shards(a), await cluster_shards(b)
    return bool(held_a and held_b) and sorted([*(held_a or []), *(held_b or [])]) == everything


async def delete_prefix(redis_url: str, prefix: str) -> None:
    async with open_redis_client(redis_url) as client:
        cursor = b"0"
        while True:
            reply = await client.execute("SCAN", cursor, "MATCH", f"{{{prefix}}}:*", "COUNT", 1000)
            assert isinstance(reply, list)
            next_cursor, keys = reply
            assert isinstance(next_cursor, bytes) and isinstance(keys, list)
            cursor = next_cursor
            if keys:
                await client.execute("DEL", *[key for key in keys if isinstance(key, bytes)])
            if cursor == b"0":
                return


def node_environments(image_env: dict[str, str], rest_url: str, tmp_path: Path) -> dict[str, dict[str, str]]:
    """Each node's environment from cluster.yaml (no env file), swapped as the module note says."""
    token_file = parse_env_file(BENCH_ENV)["TOKEN_SECRET_FILE"]
    compose = load_compose({"TOKEN_SECRET_FILE": token_file}, CLUSTER_FILE)
    prefix = f"test-cluster-{secrets.token_hex(4)}"
    envs = {}
    for name, service in compose["services"].items():
        env = image_env | service_environment(service)
        assert env["DISCORD_TOKEN_FILE"] == "/run/secrets/discord_token"
        assert env["DISCORD_API_URL"] == "https://discord.com/api/v10"
        assert env["REDIS_URL"].startswith("redis://127.0.0.1:")
        assert env["PROMETHEUS_ADDRESS"].startswith("127.0.0.1:")
        assert env["BROKER_TYPE"] == "amqp"
        assert float(env["CLUSTER_LEASE_TTL"].removesuffix("s")) > MIN_LEASE_TTL_S
        assert env.get("RATELIMIT_SHM_DIR", "/dev/shm") == "/dev/shm"
        metrics_dir = Path(env[MULTIPROC_DIR_ENV])
        assert metrics_dir.is_relative_to("/run")
        shm_dir = tmp_path / name / "dev-shm"
        shm_dir.mkdir(parents=True)
        env.update(
            {
                "DISCORD_TOKEN_FILE": str(COMPOSE_DIR / compose["secrets"]["discord_token"]["file"]),
                "DISCORD_API_URL": rest_url,
                "PROMETHEUS_ADDRESS": f"127.0.0.1:{free_port()}",
                MULTIPROC_DIR_ENV: str(tmp_path / name / "run" / metrics_dir.relative_to("/run")),
                "RATELIMIT_SHM_DIR": str(shm_dir),
                "CLUSTER_LEASE_TTL": f"{MIN_LEASE_TTL_S:g}s",
                "BROKER_TYPE": "null",
                "SHARD_STORE_PREFIX": prefix,
            }
        )
        envs[name] = env
    return envs


async def ledger_counters(control_url: str) -> dict[str, int]:
    ledger = await get(control_url + "/ledger")
    assert ledger is not None
    gateway = ledger.json()["gateway"]
    # heartbeat_no_jitter flags a first beat within 1% of the interval, which a correct uniform jitter also
    # draws now and then (see test_bench_profile.py): not a rule broken.
    assert set(gateway["rules_broken"]) <= {"heartbeat_no_jitter"}
    counters: dict[str, int] = gateway["counters"]
    return counters


async def test_two_nodes_share_the_shards_and_fail_over(image_venv: ImageVenv, tmp_path: Path) -> None:
    image_env = parse_dockerfile()[-1].environment()
    del image_env["PATH"]  # the venv's bin comes first in image_venv.environment
    grace_s = compose_duration_s(load_compose({}, CLUSTER_FILE)["services"]["node-b"]["stop_grace_period"])
    simulator_argv = [
        *(str(image_venv.python), "-m", "benchmarks.simulator", "--accept-any-token", "--log-level=warning"),
        *(f"--shard-count={SHARDS}", f"--max-concurrency={SHARDS}"),
    ]
    everything = list(range(SHARDS))
    envs: dict[str, dict[str, str]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("node-a", "node-b", "simulator")}
    try:
        with trio.fail_after(TIMEOUT_S):
            async with running(
                simulator_argv, image_venv.environment(image_env), tmp_path, logs["simulator"]
            ) as simulator:
                addresses = json.loads(await first_line(simulator))
                envs = node_environments(image_env, addresses["rest_url"], tmp_path)
                a, b = (f"http://{envs[name]['PROMETHEUS_ADDRESS']}" for name in ("node-a", "node-b"))
                argv = [str(image_venv.python), "-m", "supervisor"]
                async with (
                    node_process(
                        argv, image_venv.environment(envs["node-a"]), tmp_path, logs["node-a"]
                    ) as node_a,
                    node_process(
                        argv, image_venv.environment(envs["node-b"]), tmp_path, logs["node-b"]
                    ) as node_b,
                ):
                    # Both ready, each holding some of the shards and together all of them.
                    while not await split_between(a, b, everything):
                        assert node_a.poll() is None, logs["node-a"].read_text()
                        assert node_b.poll() is None, logs["node-b"].read_text()
                        await trio.sleep(0.2)
                    for name, env in envs.items():
                        assert await healthcheck(image_venv, image_venv.environment(env), tmp_path) == 0, name
                    assert (await ledger_counters(addresses["control_url"]))["identifies_accepted"] == SHARDS

                    # node-a dies with its workers; node-b takes its shards by RESUME.
                    os.killpg(node_a.pid, signal.SIGKILL)
                    await node_a.wait()
                    with trio.fail_after(MIN_LEASE_TTL_S + FAILOVER_MARGIN_S):
                        while await cluster_shards(b) != everything:
                            await trio.sleep(0.2)
                    counters = await ledger_counters(addresses["control_url"])
                    assert counters["identifies_accepted"] == SHARDS, "the failover must not IDENTIFY"
                    assert counters.get("resumes_ok", 0) >= 1, (counters, logs["node-b"].read_text())
                    metrics = await get(b + envs["node-b"]["PROMETHEUS_ENDPOINT"])
                    assert metrics is not None
                    assert f"discord_cluster_shards_owned {float(SHARDS)}" in metrics.text
                    assert "discord_cluster_nodes 1.0" in metrics.text

                    node_b.send_signal(signal.SIGTERM)
                    with trio.fail_after(grace_s):
                        await node_b.wait()
                    assert node_b.returncode == 0, logs["node-b"].read_text()
                simulator.send_signal(signal.SIGINT)
                await simulator.wait()
    finally:
        if envs:
            await delete_prefix(envs["node-a"]["REDIS_URL"], envs["node-a"]["SHARD_STORE_PREFIX"])
