"""The REST proxy (`python -m workers`, PROXY_HTTP_ADDRESS) on RATELIMIT_BACKEND=redis over rediss:// with
`ssl_ca_certs` and an ACL user, driven by several client processes at once against one bucket: every request
is answered, and the simulator's ledger shows no avoidable and no global 429."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import GatewayConfig, RestConfig, SimulatorConfig, open_simulator
from ratelimit.redis_client import open_redis_client
from tests.ratelimit.proxy_helpers import running_worker, wait_for_http_front
from tests.redis_servers import needs_redis_server, open_tls_redis
from tests.simulator.rest_helpers import AUTH

pytestmark = needs_redis_server

CLIENTS: Final = 3
MESSAGES_PER_CLIENT: Final = 6
# One client process: posts to the same channel, one request at a time; prints the statuses.
CLIENT_SCRIPT: Final = """
import sys, httpx
base, count, authorization = sys.argv[1], int(sys.argv[2]), sys.stdin.read().strip()
with httpx.Client(base_url=base, timeout=30) as client:
    for i in range(count):
        headers = {"Authorization": authorization}
        r = client.post("/channels/1/messages", json={"content": str(i)}, headers=headers)
        print(r.status_code, flush=True)
"""


async def test_proxy_on_redis_over_tls_draws_no_avoidable_or_global_429(tmp_path: Path) -> None:
    port = free_port()
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=1, max_concurrency=1, event_rate=0, guilds_per_shard=1),
        rest=RestConfig(bucket_time_scale=0.2),
    )
    (tmp_path / "redis").mkdir()
    with open_tls_redis(tmp_path / "redis") as redis:
        with trio.fail_after(40):
            async with open_simulator(config) as sim:
                env = worker_env(
                    sim.addresses.rest_url,
                    BROKER_TYPE="null",
                    PROXY_HTTP_ADDRESS=f"127.0.0.1:{port}",
                    RATELIMIT_BACKEND="redis",
                    REDIS_URL=redis.url(),
                    DISCORD_GLOBAL_LIMIT="50",
                    TIMEOUT="10s",
                )
                log_path = tmp_path / "worker.log"
                async with running_worker(env, log_path) as process:
                    base = f"http://127.0.0.1:{port}/api/v10"
                    await wait_for_http_front(base, process, log_path)
                    statuses = await run_clients(base)
                ledger = sim.rest.ledger.snapshot()
            async with open_redis_client(redis.url(), timeout_s=5.0) as client:
                shared_state = await client.execute("KEYS", "{ratelimit}:*")
    text = log_path.read_text()
    assert process.returncode == 0, text
    assert statuses == ["200"] * (CLIENTS * MESSAGES_PER_CLIENT)
    assert shared_state, "the limits were not kept in the TLS Redis"
    assert ledger["by_category"].get("avoidable", 0) == 0 and ledger["by_category"].get("global", 0) == 0
    # Besides the messages: the worker's GET /gateway/bot and the readiness probe's GET /users/@me.
    assert ledger["by_status"].get("200") == CLIENTS * MESSAGES_PER_CLIENT + 2


async def run_clients(base: str) -> list[str]:
    """`CLIENTS` processes at once; every status they printed."""
    outputs: list[bytes] = []

    async def client() -> None:
        done = await trio.run_process(
            [sys.executable, "-c", CLIENT_SCRIPT, base, str(MESSAGES_PER_CLIENT)],
            stdin=AUTH["Authorization"].encode(),
            capture_stdout=True,
        )
        outputs.append(done.stdout)

    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(client)
    return sorted(status for output in outputs for status in output.decode().split())
