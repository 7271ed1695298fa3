"""The gateway benchmark's ceiling loop (benchmarks/ceiling.py) and the window-only profiler wrapper
(benchmarks/profiled.py), on tiny inputs: the loop must count every dispatch of the simulator's stream
however the bytes are cut, and the wrapper must write a profile of what ran between its two signals."""

from __future__ import annotations

import os
import pstats
import signal
import struct
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks import ceiling, profiled
from benchmarks.simulator.compression import TransportCompressor
from benchmarks.simulator.events import dispatch_bytes
from benchmarks.simulator.wsserver import encode_frame

EVENTS = 96


def test_the_loop_counts_every_dispatch_of_the_simulators_stream() -> None:
    stream = ceiling.firehose_stream(1, 2, EVENTS)
    last_seq = ceiling.FIRST_FIREHOSE_SEQ + EVENTS - 1
    assert ceiling.decode_zlib_stream(stream) == (EVENTS, last_seq)
    # Frame headers and messages cut across reads, messages split across frames: the same count.
    split = ceiling.firehose_stream(1, 2, EVENTS, zlib_split_bytes=64)
    assert len(split) > len(stream)
    for read_size in (1, 7, 1000):
        assert ceiling.decode_zlib_stream(split, read_size) == (EVENTS, last_seq)


def test_the_loop_reads_long_frames_and_skips_control_frames() -> None:
    compressor = TransportCompressor("zlib-stream")

    def frames_of(payload: bytes) -> list[bytes]:
        return [encode_frame(data, binary=True) for data, _ in compressor.encode(payload)]

    big = orjson.dumps({"content": os.urandom(60_000).hex()})  # incompressible: a 64-bit length
    frames = frames_of(dispatch_bytes(b"X", 1, big))
    frames.append(bytes((0x89, 2)) + b"hi")  # a ping between two messages
    frames += frames_of(b'{"op":11,"d":null}') + frames_of(dispatch_bytes(b"Y", 2, b"{}"))
    data = b"".join(frames)
    assert struct.unpack_from("!BB", data)[1] == 127
    assert ceiling.decode_zlib_stream(data, 4096) == (2, 2)  # the ACK is no dispatch


def test_the_loop_refuses_a_masked_frame() -> None:
    with pytest.raises(ValueError, match="masked"):
        ceiling.decode_zlib_stream(bytes((0x82, 0x80 | 4)) + b"mask" + b"data")


def test_measure_reports_events_per_cpu_second() -> None:
    report = ceiling.measure([ceiling.firehose_stream(0, 1, EVENTS)], cpu_s=0.02)
    assert report["events"] == report["passes"] * EVENTS == report["passes"] * report["events_per_pass"]
    assert report["cpu_s"] >= 0.02 and report["events_per_cpu_s"] > 0


def test_profiled_writes_the_window_between_its_signals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "window.prof"
    target = tmp_path / "profiled_target.py"
    target.write_text(
        "import os, signal\n"
        "def before(): return sum(range(1000))\n"
        "def inside(): return sum(range(1000))\n"
        "before()\n"
        f"os.kill(os.getpid(), signal.{profiled.START_SIGNAL.name})\n"
        "inside()\n"
        f"os.kill(os.getpid(), signal.{profiled.STOP_SIGNAL.name})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    handlers = {signum: signal.getsignal(signum) for signum in (profiled.START_SIGNAL, profiled.STOP_SIGNAL)}
    try:
        assert profiled.main([str(out), "-m", "profiled_target"]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.modules.pop("profiled_target", None)
    functions = {name for _, _, name in pstats.Stats(str(out)).stats}
    assert "inside" in functions and "before" not in functions
