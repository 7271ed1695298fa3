"""Commands from RabbitMQ (DESIGN 3.5) reach the right shard across two worker processes; bad ones are
rejected and nothing else stops."""

from __future__ import annotations

import secrets
import subprocess
import sys
from functools import partial
from typing import Any

import msgpack
import orjson
import trio

from benchmarks.children import stop_process, worker_env
from benchmarks.simulator import GatewayConfig, Simulator, SimulatorConfig, open_simulator
from benchmarks.simulator.events import guild_ids_for_shard
from workers.amqp_bridge import open_amqp
from workers.publish.base import encode_json_text

AMQP_URL = "amqp://guest:guest@127.0.0.1/"
TIMEOUT_S = 60


async def start_worker(sim: Simulator, group: str, shard_ids: str, log: Any) -> trio.Process:
    env = worker_env(sim.addresses.rest_url, BROKER_TYPE="amqp", BROKER_GROUP=group, AMQP_URL=AMQP_URL)
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "workers", "--shard-ids", shard_ids, "--shard-count", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def member_request(guild_id: int, nonce: str) -> dict[str, Any]:
    return {"op": 8, "d": {"guild_id": str(guild_id), "query": "a", "limit": 1, "nonce": nonce}}


async def test_send_and_per_shard_commands_reach_their_shard(tmp_path: Any) -> None:
    group = f"test-{secrets.token_hex(4)}"
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=2, max_concurrency=2, guilds_per_shard=1, event_rate=0)
    )
    guild = {shard: guild_ids_for_shard(shard, 2, 1)[0] for shard in (0, 1)}
    chunks: dict[str, int] = {}
    log_path = tmp_path / "workers.log"
    with trio.fail_after(TIMEOUT_S), open(log_path, "wb") as log:
        async with open_simulator(config) as sim, open_amqp(AMQP_URL) as amqp, trio.open_nursery() as nursery:

            async def collect_chunks(task_status: trio.TaskStatus[None]) -> None:
                async with amqp.consume(f"{group}:test-chunks", ["GUILD_MEMBERS_CHUNK"], group) as deliveries:
                    task_status.started()
                    async for delivery in deliveries:
                        data = _decode_spectacles(delivery.body)
                        chunks[data["nonce"]] = int(delivery.headers["shard_id"])
                        await delivery.ack()

            await nursery.start(collect_chunks)
            workers = [await start_worker(sim, group, "0", log), await start_worker(sim, group, "1", log)]
            try:
                with trio.fail_after(30):
                    while sum(v.state == "attached" for v in sim.gateway.ledger.sessions.values()) < 2:
                        await trio.sleep(0.05)
                await trio.sleep(0.5)  # both workers subscribed to their command queues

                async def send(routing_key: str, body: bytes) -> None:
                    await amqp.publish_raw(group, routing_key, body)

                def packed(value: object) -> bytes:
                    return encode_json_text(orjson.dumps(value), "spectacles")[0]

                await send("SEND", b"\xc1 not msgpack")  # malformed: rejected, logged
                await send("SEND", packed({"guild_id": str(guild[1]), "packet": {"op": 3, "d": "x" * 5000}}))
                for index in range(3):
                    for shard in (0, 1):
                        packet = member_request(guild[shard], f"send-{shard}-{index}")
                        await send("SEND", packed({"guild_id": str(guild[shard]), "packet": packet}))
                await send("1", packed(member_request(guild[1], "direct-1")))
                await send("0", packed(member_request(guild[0], "direct-0")))
                expected = {f"send-{s}-{i}": s for s in (0, 1) for i in range(3)} | {
                    "direct-1": 1,
                    "direct-0": 0,
                }
                with trio.fail_after(20):
                    while not all(nonce in chunks for nonce in expected):
                        await trio.sleep(0.05)
                assert {nonce: chunks[nonce] for nonce in expected} == expected
                assert not sim.gateway.ledger.rules_broken().get("payload_too_large")
            finally:
                async with trio.open_nursery() as stopping:
                    for worker in workers:
                        stopping.start_soon(partial(stop_process, worker, grace_s=15))
                nursery.cancel_scope.cancel()
    log_text = log_path.read_text()
    assert all(worker.returncode == 0 for worker in workers), log_text[-3000:]
    assert log_text.count('"command.rejected"') >= 2  # the malformed body and the oversized packet


def _decode_spectacles(body: bytes) -> dict[str, Any]:
    text = msgpack.unpackb(body)
    value = orjson.loads(text)
    assert isinstance(value, dict)
    return value
