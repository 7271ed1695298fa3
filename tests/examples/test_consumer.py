"""examples/consumer.py, the README's Python bot, against the real RabbitMQ and a real supervisor with the
simulator: it decodes the default (`spectacles`) encoding, and its command (op 8, SEND by guild) reaches
Discord on the guild's shard, whose answer comes back to it as an event."""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from benchmarks.children import free_port, stop_process, worker_env
from benchmarks.simulator import GatewayConfig, SimulatorConfig, open_simulator
from benchmarks.simulator.events import guild_ids_for_shard
from tests.supervisor_process import read_lines, running_supervisor, stop_gracefully
from workers.amqp_bridge import open_amqp
from workers.commands import decode_command, shard_for_guild
from workers.publish.base import encode_json_text

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = "amqp://guest:guest@127.0.0.1/"
TIMEOUT_S = 90
LINE = re.compile(r"^shard (\d+) seq (\d+) ([A-Z_]+) (.*)$")


async def test_the_python_consumer_example_reads_events_and_sends_a_command(tmp_path: Path) -> None:
    # Not `test-*`: the suite's session-end cleanup (tests/broker_cleanup.py) deletes those queues, and a
    # session running beside this one would delete them under it. This test deletes its own instead.
    group = f"example-{secrets.token_hex(4)}"
    guilds = {guild_ids_for_shard(shard, 2, 1)[0]: shard for shard in (0, 1)}
    config = SimulatorConfig(
        gateway=GatewayConfig(shard_count=2, max_concurrency=2, guilds_per_shard=1, event_rate=5)
    )
    log = tmp_path / "supervisor.log"
    seen: list[tuple[int, str, str]] = []
    with trio.fail_after(TIMEOUT_S), open(log, "wb") as log_file:
        example = await trio.lowlevel.open_process(
            [
                sys.executable,
                str(ROOT / "examples" / "consumer.py"),
                "--group",
                group,
                "--amqp-url",
                AMQP_URL,
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
        assert example.stdout is not None
        lines = read_lines(example.stdout)
        try:
            assert (await anext(lines)).startswith("consuming")  # queues bound before any event is sent
            async with open_simulator(config) as sim:
                env = worker_env(
                    sim.addresses.rest_url,
                    BROKER_TYPE="amqp",
                    BROKER_GROUP=group,
                    AMQP_URL=AMQP_URL,
                    PROMETHEUS_ADDRESS=f"127.0.0.1:{free_port()}",
                )
                async with running_supervisor(env, "--workers", "2", log=log_file) as supervisor:
                    wanted = {f"example-{guild}" for guild in guilds}
                    chunks: dict[str, int] = {}
                    async for line in lines:
                        match = LINE.match(line)
                        assert match, line
                        shard, name, rest = int(match[1]), match[3], match[4]
                        seen.append((shard, name, rest))
                        if name == "GUILD_MEMBERS_CHUNK":
                            chunks[rest.rsplit("nonce ", 1)[1]] = shard
                        if wanted <= set(chunks) and any(n == "MESSAGE_CREATE" for _, n, _ in seen):
                            break
                    # Each guild's member request went out on the guild's own shard and was answered there.
                    assert chunks == {f"example-{guild}": shard for guild, shard in guilds.items()}
                    created = {
                        (shard, rest.split()[1]) for shard, name, rest in seen if name == "GUILD_CREATE"
                    }
                    assert created == {(shard, str(guild)) for guild, shard in guilds.items()}
                    await stop_gracefully(supervisor)
        finally:
            with trio.CancelScope(shield=True):
                await lines.aclose()
                await stop_process(example, signal.SIGINT, grace_s=5)
                await _delete_queues(group)
    assert supervisor.returncode == 0, log.read_text()[-3000:]
    assert example.returncode == 0, log.read_text()[-3000:]


async def _delete_queues(group: str) -> None:
    queues = [
        f"{group}:example:{event}" for event in ("GUILD_CREATE", "MESSAGE_CREATE", "GUILD_MEMBERS_CHUNK")
    ]
    async with open_amqp(AMQP_URL) as amqp:
        for name in [*queues, f"{group}:SEND", f"{group}:0", f"{group}:1"]:
            await amqp.delete_queue(name)


def test_the_readme_snippet_speaks_the_gateways_encoding() -> None:
    """The README's Python block decodes what the gateway publishes and encodes what it accepts."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### A bot in Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    body, _ = encode_json_text(b'{"id":"81384788765712384","name":"g"}', "spectacles")
    assert namespace["decode_event"](body) == {"id": "81384788765712384", "name": "g"}
    packed = namespace["encode_command"](
        "81384788765712384", 8, {"guild_id": "81384788765712384", "limit": 1}
    )
    command = decode_command("SEND", packed, "spectacles", 2)
    assert (command.shard_id, command.op) == (shard_for_guild(81384788765712384, 2), 8)
    assert command.d == {"guild_id": "81384788765712384", "limit": 1}
