"""`python -m workers` with the REST proxy on: one request through each front (AMQP RPC, HTTP) reaches the
simulator under the limits shared through the bot's shm segment (made here as the supervisor makes it), and
SIGTERM stops the worker cleanly."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, RestConfig, SimulatorConfig, open_simulator
from ratelimit.configured import engine_config, shm_segment_name
from ratelimit.shm import ShmBackend
from tests.ratelimit.proxy_helpers import (
    AMQP_URL,
    open_rpc_client,
    running_worker,
    unique_group,
    wait_for_http_front,
)
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
            try:
                async with running_worker(env, log_path) as process:
                    # The RPC front is subscribed before the HTTP front listens.
                    me = await wait_for_http_front(f"http://127.0.0.1:{port}/api/v10", process, log_path)
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
