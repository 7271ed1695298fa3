"""Wire compatibility: a real ``@spectacles/brokers`` consumer (Node) receives our AMQP events.

What a Spectacles consumer gets (``@spectacles/brokers`` 0.9.3, read in node_modules): ``Base._handleMessage``
runs ``deserialize`` = ``@spectacles/util``'s ``decode`` = ``@msgpack/msgpack``'s ``decode`` on the body and
hands the result to ``broker.on(event, (data, {ack}) => ...)`` as is. Our spectacles body is a MessagePack str
of the JSON text of ``d`` (byte-identical to spectacles/gateway's), so ``data`` is a *string*: the JSON text
of ``d``, exactly as Discord sent it. The broker does not JSON.parse it; the bot does, as it must for the Go
gateway's events.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import trio

from workers.amqp_bridge import open_amqp
from workers.publish import OutboundEvent
from workers.publish.amqp import AmqpPublisher

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/")
GROUP = "test-spectacles"
EVENTS = ("MESSAGE_CREATE", "GUILD_CREATE")

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"
    ),
]


def spectacles_url(url: str) -> str:
    """``@spectacles/brokers`` prefixes ``amqp://`` itself."""
    return url.removeprefix("amqp://").rstrip("/")


async def ensure_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "@spectacles" / "brokers").is_dir():
        return
    with trio.fail_after(240):
        await trio.run_process(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_stdout=True, capture_stderr=True
        )


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError(f"consumer exited; partial output {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


async def test_a_spectacles_consumer_decodes_our_events() -> None:
    await ensure_node_modules()
    d_values = [
        b'{"id":"1","content":"plain"}',
        b'{"id":"2","content":"h\xc3\xa9llo \xe2\x9c\x93 \\u00e9 \\"quoted\\"","embeds":[],"n":1.5e3}',
        orjson.dumps({"id": "3", "members": [{"user": {"id": str(i)}} for i in range(2000)]}),  # > 64 KiB
    ]
    events = [
        OutboundEvent(0, "sess", 1, "MESSAGE_CREATE", d_values[0]),
        OutboundEvent(0, "sess", 2, "MESSAGE_CREATE", d_values[1]),
        OutboundEvent(1, "sess", 3, "GUILD_CREATE", d_values[2]),
        OutboundEvent(1, "sess", 4, "TYPING_START", b"{}"),  # not subscribed
    ]
    with trio.fail_after(30):
        async with open_amqp(URL) as amqp:
            for event in EVENTS:  # leftovers of an interrupted run
                await amqp.delete_queue(f"{GROUP}:{event}")
            process = await trio.lowlevel.open_process(
                ["node", "spectacles_consumer.js", spectacles_url(URL), GROUP, *EVENTS],
                cwd=NODE_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert process.stdin is not None and process.stdout is not None
            try:
                lines = LineReader(process.stdout)
                assert orjson.loads(await lines.readline()) == {"ready": True}
                await AmqpPublisher(amqp, group=GROUP, encoding="spectacles", message_ttl_s=60).publish(
                    events
                )
                got = [orjson.loads(await lines.readline()) for _ in range(3)]
            finally:
                await process.stdin.aclose()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            for event in EVENTS:
                await amqp.delete_queue(f"{GROUP}:{event}")
    got.sort(key=lambda line: d_values.index(line["data"].encode()))
    assert [(line["event"], line["type"]) for line in got] == [
        ("MESSAGE_CREATE", "string"),
        ("MESSAGE_CREATE", "string"),
        ("GUILD_CREATE", "string"),
    ]
    # The JSON text of d, byte for byte; parsing it gives d.
    assert [line["data"].encode() for line in got] == d_values
    assert [orjson.loads(line["data"]) for line in got] == [orjson.loads(d) for d in d_values]
