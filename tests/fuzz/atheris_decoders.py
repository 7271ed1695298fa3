"""Coverage-guided fuzzing of the decoders with atheris (libFuzzer), run by hand; CI runs the Hypothesis
tests beside this file instead.

    .venv/bin/pip install atheris            # a wheel for CPython 3.11 on Linux x86-64; not a dependency
    .venv/bin/python tests/fuzz/atheris_decoders.py TARGET [libFuzzer flags]

TARGET is one of `payload` (workers.protocol.decode_payload and the shard core), `zlib` and `zstd`
(workers.decompress.Decompressor, the input cut into frames), `command` (workers.commands.decode_command in
every encoding) or `rpc` (ratelimit.proxy.rpc.decode_request and decode_cancel). Useful flags:
`-runs=100000`, `-max_total_time=300`, `-max_len=65536`, `-rss_limit_mb=2048`, and a corpus directory
(`payload` without one starts from PAYLOAD_SEEDS, written to a temporary directory).
Each target raises only the module's own error for bad input (ProtocolError, TransportError,
CommandRejected, ProxyError); anything else is a crash that libFuzzer reports with the input that caused it
(saved as `crash-*`; replay it by passing the file instead of a directory).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

atheris: Any = importlib.import_module("atheris")

with atheris.instrument_imports():
    from ratelimit.proxy import ProxyError
    from ratelimit.proxy.rpc import decode_cancel, decode_request
    from workers.commands import decode_command
    from workers.decompress import Decompressor
    from workers.errors import CommandRejected, ProtocolError, TransportError
    from workers.protocol import ShardProtocol, decode_payload


def fuzz_payload(data: bytes) -> None:
    try:
        payload = decode_payload(data)
    except ProtocolError:
        return
    core = ShardProtocol(shard_id=0, shard_count=1, token="t", intents=0, gateway_url="wss://gw")
    core.on_connected(0.0)
    try:
        core.receive(payload, 0.0)
    except ProtocolError:
        return
    core.poll(1.0)


def decompressor_target(compression: str) -> Callable[[bytes], None]:
    def fuzz(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        decompressor = Decompressor(compression)  # type: ignore[arg-type]
        try:
            while provider.remaining_bytes():
                decompressor.feed(provider.ConsumeBytes(provider.ConsumeIntInRange(1, 4096)))
        except TransportError:
            pass

    return fuzz


def fuzz_command(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    encoding = provider.PickValueInList(["spectacles", "msgpack", "json"])
    routing_key = provider.PickValueInList(["SEND", "0", "1", "3"])
    with contextlib.suppress(CommandRejected):
        decode_command(routing_key, provider.ConsumeBytes(provider.remaining_bytes()), encoding, 4)


def fuzz_rpc(data: bytes) -> None:
    decode_cancel(data)
    with contextlib.suppress(ProxyError):
        decode_request(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "payload": fuzz_payload,
    "zlib": decompressor_target("zlib-stream"),
    "zstd": decompressor_target("zstd-stream"),
    "command": fuzz_command,
    "rpc": fuzz_rpc,
}


#: Valid gateway payloads to start `payload` from when no corpus is given: random bytes seldom form JSON
#: with an `op`, so without seeds the fuzzer spends its time in the decoder's first check.
PAYLOAD_SEEDS: Final = (
    b'{"op":10,"d":{"heartbeat_interval":41250}}',
    b'{"op":11,"d":null}',
    b'{"op":1,"d":null}',
    b'{"op":7,"d":null}',
    b'{"op":9,"d":false}',
    b'{"op":9,"d":true}',
    b'{"op":0,"s":1,"t":"READY","d":{"session_id":"s","resume_gateway_url":"wss://r","v":10}}',
    b'{"op":0,"s":2,"t":"RESUMED","d":null}',
    b'{"op":0,"s":3,"t":"MESSAGE_CREATE","d":{"id":"1","guild_id":"2"}}',
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    name = sys.argv.pop(1)
    argv = list(sys.argv)
    if name == "payload" and not any(not arg.startswith("-") for arg in argv[1:]):
        seeds = Path(tempfile.mkdtemp(prefix="fuzz-payload-"))
        for number, seed in enumerate(PAYLOAD_SEEDS):
            (seeds / f"seed-{number}").write_bytes(seed)
        argv.append(str(seeds))
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
