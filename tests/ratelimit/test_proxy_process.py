"""`python -m workers` with the REST proxy on: one request through each front (AMQP RPC, HTTP) reaches the
simulator under the limits shared through the bot's shm segment (made here as the supervisor makes it), and
SIGTERM stops the worker cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import orjson
import trio

from benchmarks.children import free_port, stop_process, worker_env
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, RestConfig, SimulatorConfig, open_simulator
from ratelimit.configured import engine_config, shm_segment_name
from ratelimit.shm import ShmBackend
from tests.ratelimit.proxy_helpers import AMQP_URL, open_rpc_client, unique_group
from tests.simulator.rest_helpers import AUTH
from workers.amqp_bridge import open_amqp


async def test_worker_serves_the_proxy_over_amqp_and_http(tmp_path: Path) -> None:
    rest_group, gateway_group = unique_group(), unique_group()
    port = free_port()
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=1, max_concurrency=1, event_rate=0, guilds_per_shard=1),
        rest=RestConfig(bucket_time_scale=0.2),
    )
    with trio.fail_after(40):
        async with (
            open_simulator(config) as sim,
            # The supervisor's part: create the bot's segment (in a directory of this test's own).
            ShmBackend.open(
                shm_segment_name(DEFAULT_TOKEN),
                engine_config(50),
                create=True,
                directory=tmp_path,
                unlink_on_close=True,
            ) as segment,
        ):
            env = worker_env(
                sim.addresses.rest_url,
                BROKER_TYPE="amqp",
                BROKER_GROUP=gateway_group,
                AMQP_URL=AMQP_URL,
                AMQP_GROUP=rest_group,
                PROXY_HTTP_ADDRESS=f"127.0.0.1:{port}",
                RATELIMIT_BACKEND="shm",
                RATELIMIT_SHM_DIR=str(tmp_path),
                DISCORD_GLOBAL_LIMIT="50",
                TIMEOUT="10s",
            )
            log_path = tmp_path / "worker.log"
            with open(log_path, "wb") as log:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-ids", "0", "--shard-count", "1"],
                    env=env,
                    stderr=log,
                )
                try:
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v10") as client:
                        while True:  # the RPC front is subscribed before the HTTP front listens
                            try:
                                me = await client.get("/users/@me", headers=AUTH)
                                break
                            except httpx.ConnectError:
                                assert process.returncode is None, log_path.read_text()
                                await trio.sleep(0.1)
                        assert me.status_code == 200
                        assert me.json()["username"] == "simulator-bot"
                    async with open_rpc_client(rest_group) as rpc:
                        reply = await rpc.call(
                            {
                                "method": "POST",
                                "path": "/channels/1/messages",
                                "body": {"content": "via amqp"},
                            }
                        )
                    assert reply["status"] == 0, reply
                    assert reply["body"]["status"] == 200
                    assert orjson.loads(reply["body"]["body"])["content"] == "via amqp"
                finally:
                    await stop_process(process, grace_s=15)
                    async with open_amqp(AMQP_URL) as amqp:
                        for queue in (f"{rest_group}:REQUEST", f"{gateway_group}:SEND", f"{gateway_group}:0"):
                            await amqp.delete_queue(queue)
            ledger = sim.rest.ledger.snapshot()
            # The worker joined the segment (it did not make one of its own): its records are in ours.
            assert segment.statistics().slots_used > 0
    text = log_path.read_text()
    assert process.returncode == 0, text
    assert DEFAULT_TOKEN not in text
    assert '"proxy.amqp_ready"' in text and '"proxy.http_ready"' in text
    assert ledger["by_status"] == {"200": 3}  # GET /gateway/bot, then one request through each front
