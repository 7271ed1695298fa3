"""The gateway benchmark's Python ceiling: the bare decode loop on the simulator's stream.

    python -m benchmarks.ceiling [--shards 16] [--events-per-shard 1536] [--cpu-s 6]

What a shard cannot do less of and stay a shard: take the bytes of unmasked WebSocket frames as a socket
hands them over (64 KiB reads), parse each frame header, inflate the zlib-stream (one context per
connection, a message complete when it ends with `00 00 ff ff`), `orjson.loads` the JSON and read `t`, `s`
and `op`. No tasks, no channels, no event objects, no sink: the rate this loop reaches is the most events
per CPU-second any pure-Python gateway client can reach on this machine, and the gateway benchmark reports
our worker's events per CPU-second as a fraction of it (`ours_fraction_of_ceiling.events_per_cpu_s.zlib`).

The stream is built as the simulator builds each session's firehose, with the simulator's own code: the
benchmark's simulator options (`guilds-per-shard 1`, seed 0), `firehose_pool` for the bodies,
`dispatch_bytes` for the envelope, a `TransportCompressor("zlib-stream")` per shard at the simulator's
default level, and `encode_frame` for the framing, so the bytes are the ones the simulator writes to each
shard's socket once its READY and GUILD_CREATE are out (those two are left out: the count is firehose
events; they change only the compressor's first 32 KiB of history).

Run as its own process, the way the gateway benchmark runs it, it builds the stream first, then decodes it
pass after pass (a fresh inflate context per shard and pass) until at least `--cpu-s` of CPU time has gone
into decoding; the CPU time is its own, user + system of all threads read from /proc as the benchmark reads
every client's (`benchmarks.harness.process_usage`), taken around the decode passes only. It prints one
JSON object: `events`, `cpu_s`, `wall_s`, `events_per_cpu_s`, `passes`, `stream_bytes`,
`events_per_pass`.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any, Final

import orjson

from benchmarks.harness import process_usage
from benchmarks.simulator.compression import ZLIB_SUFFIX, TransportCompressor
from benchmarks.simulator.events import dispatch_bytes, firehose_pool, guild_ids_for_shard
from benchmarks.simulator.wsserver import encode_frame

#: Bytes per socket read, as the issue's loop reads them (and the worker's receive buffer size).
READ_SIZE: Final = 65_536
#: 16 whole cycles of the simulator's per-shard pool order (96 events), so each pass ends where it began.
DEFAULT_EVENTS_PER_SHARD: Final = 1536
#: The firehose starts after READY (s 1) and the shard's one GUILD_CREATE (s 2).
FIRST_FIREHOSE_SEQ: Final = 3
#: The simulator's options the stream copies (benchmarks.gateway.simulator_args, config defaults).
GUILDS_PER_SHARD: Final = 1
SEED: Final = 0
ZLIB_LEVEL: Final = 6
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")


def firehose_stream(shard_id: int, shard_count: int, events: int, *, zlib_split_bytes: int = 0) -> bytes:
    """The WebSocket bytes of `events` firehose dispatches on one shard's connection, as the simulator
    writes them (zlib-stream; `zlib_split_bytes` > 0 splits larger messages across frames as the
    simulator's option of that name does)."""
    guild_ids = guild_ids_for_shard(shard_id, shard_count, GUILDS_PER_SHARD)
    pool = firehose_pool(shard_id, guild_ids, SEED)
    compressor = TransportCompressor("zlib-stream", zlib_level=ZLIB_LEVEL, zlib_split_bytes=zlib_split_bytes)
    frames: list[bytes] = []
    for seq in range(FIRST_FIREHOSE_SEQ, FIRST_FIREHOSE_SEQ + events):
        name, body = pool.next()
        for data, binary in compressor.encode(dispatch_bytes(name, seq, body)):
            frames.append(encode_frame(data, binary=binary))
    return b"".join(frames)


def decode_zlib_stream(data: bytes, read_size: int = READ_SIZE) -> tuple[int, int]:
    """Decode one connection's server-to-client bytes: `(dispatches, last seq)`.

    Server frames are unmasked (a masked one is an error); control frames (opcode >= 8) are skipped; the
    payloads of data frames are gathered until one ends with the zlib sync-flush suffix, then inflated
    together and parsed."""
    inflate = zlib.decompressobj()
    loads = orjson.loads
    unpack16, unpack64 = _U16.unpack_from, _U64.unpack_from
    pending: list[bytes] = []
    buffer = b""
    dispatches = 0
    last_seq = 0
    for offset in range(0, len(data), read_size):
        chunk = data[offset : offset + read_size]
        buffer = buffer + chunk if buffer else chunk
        end = len(buffer)
        pos = 0
        while end - pos >= 2:
            second = buffer[pos + 1]
            if second & 0x80:
                raise ValueError("a masked frame from the server")
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = unpack16(buffer, start)[0]
                start += 2
            elif length == 127:
                if end - pos < 10:
                    break
                length = unpack64(buffer, start)[0]
                start += 8
            stop = start + length
            if stop > end:
                break
            opcode = buffer[pos] & 0x0F
            pos = stop
            if opcode >= 8:
                continue
            payload = buffer[start:stop]
            if payload[-4:] != ZLIB_SUFFIX:
                pending.append(payload)
                continue
            if pending:
                pending.append(payload)
                payload = b"".join(pending)
                pending.clear()
            message = loads(inflate.decompress(payload))
            event, seq, op = message.get("t"), message.get("s"), message["op"]
            if op == 0 and event is not None:
                dispatches += 1
                last_seq = seq
        buffer = buffer[pos:]
    return dispatches, last_seq


def measure(streams: Sequence[bytes], cpu_s: float) -> dict[str, Any]:
    """Decode every stream, pass after pass, until `cpu_s` of this process's CPU time has gone by."""
    events = passes = 0
    usage_0 = process_usage(os.getpid())
    wall_0 = time.monotonic()
    while True:
        for stream in streams:
            events += decode_zlib_stream(stream)[0]
        passes += 1
        spent = process_usage(os.getpid()).cpu_s - usage_0.cpu_s
        if spent >= cpu_s:
            break
    return {
        "events": events,
        "cpu_s": round(spent, 3),
        "wall_s": round(time.monotonic() - wall_0, 3),
        "events_per_cpu_s": round(events / spent),
        "passes": passes,
        "events_per_pass": events // passes,
        "stream_bytes": sum(len(stream) for stream in streams),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    parser.add_argument("--shards", type=int, default=16, help="shards, one stream each (default: 16)")
    parser.add_argument("--events-per-shard", type=int, default=DEFAULT_EVENTS_PER_SHARD)
    parser.add_argument("--cpu-s", type=float, default=6.0, help="CPU seconds of decoding (default: 6)")
    args = parser.parse_args(argv)
    streams = [firehose_stream(shard, args.shards, args.events_per_shard) for shard in range(args.shards)]
    print(json.dumps(measure(streams, args.cpu_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
