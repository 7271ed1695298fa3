"""`python -m benchmarks gateway`: the suite runs end to end and writes every figure it promises.

The smoke size runs each configuration for about a second with a couple of shards, so its figures mean
nothing: these tests check the shape of the results and that each figure was measured (positive), never a
performance target (targets live in the benchmark's own table).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks import gateway
from benchmarks.harness import ROOT, process_usage
from benchmarks.targets import nest, verdicts

pytestmark = pytest.mark.peer  # the suite runs discord.py as its peer

TIMEOUT_S = 180
FIGURES = (
    ("events_per_cpu_s", "zlib", "null"),
    ("events_per_cpu_s", "zstd", "null"),
    ("events_per_cpu_s", "zlib", "amqp"),
    ("rss_kib_per_idle_shard", "zlib"),
    ("rss_kib_per_idle_shard", "zstd"),
    ("peer", "discordpy", "events_per_cpu_s", "zlib"),
    ("peer", "discordpy", "rss_kib_per_idle_shard", "zlib"),
    ("peer", "discordpy_raw", "events_per_cpu_s", "zlib"),
    ("peer", "discordpy_raw", "events_per_cpu_s", "zstd"),
    ("ceiling", "events_per_cpu_s", "zlib"),
    ("ours_over_discordpy_raw", "events_per_cpu_s", "zlib"),
    ("ours_over_discordpy_raw", "events_per_cpu_s", "zstd"),
    ("ours_fraction_of_ceiling", "events_per_cpu_s", "zlib"),
)


def lookup(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = results
    for part in path:
        node = node[part]
    return node


async def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    argv = [sys.executable, "-m", "benchmarks", "gateway", "--smoke", "--json", str(out)]
    with trio.fail_after(TIMEOUT_S):
        process = await trio.run_process(
            [*argv, "--logs", str(tmp_path / "logs")],
            cwd=str(ROOT),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = process.stderr.decode(errors="replace")
    assert process.returncode == 0, stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    for path in FIGURES:
        value = lookup(results, path)
        assert isinstance(value, int | float) and value > 0, (path, value)
    assert results["ours_over_discordpy"]["events_per_cpu_s"]["zlib"] > 0
    assert set(results["verdicts"].values()) <= {"PASS", "FAIL"}
    for entry in results["runs"]["throughput"].values():
        assert len(entry["runs"]) == gateway.SETTINGS["smoke"].repeats
        for run in entry["runs"]:
            assert run["events"] > 0 and run["client_cpu_s"] > 0 and run["wall_s"] > 0
            assert run["counters"]["connections"] == run["shards"], "the client reconnected"
    peer_run = results["runs"]["throughput"]["peer.discordpy.events_per_cpu_s.zlib"]["runs"][0]
    assert peer_run["peer_report"]["messages_received"] > 0
    assert not peer_run["peer_report"]["raw"]
    for compression in ("zlib", "zstd"):
        raw = results["runs"]["throughput"][f"peer.discordpy_raw.events_per_cpu_s.{compression}"]["runs"][0]
        assert raw["peer_report"]["compression"] == f"{compression}-stream"
        assert raw["peer_report"]["raw"] and raw["peer_report"]["parsers_dropped"] > 0
    assert len(results["runs"]["ceiling"]) == gateway.SETTINGS["smoke"].repeats
    assert {run["shards"] for run in results["runs"]["idle"]} == set(gateway.SETTINGS["smoke"].idle_shards)
    machine = results["machine"]
    assert machine["python"] and machine["cpu_count"] and machine["date"]
    assert "events_per_cpu_s.zlib.null" in process.stdout.decode()  # the table


def test_nest_turns_dotted_keys_into_objects() -> None:
    nested = nest({"a.b.c": 1.0, "a.b.d": None, "e": 2.0})
    assert nested == {"a": {"b": {"c": 1.0, "d": None}}, "e": 2.0}


def test_verdicts_compare_against_targets_and_skip_what_was_not_measured() -> None:
    figures = gateway.with_ratios(
        {
            "events_per_cpu_s.zlib.null": 30_000.0,
            "events_per_cpu_s.zlib.amqp": 9_000.0,
            "peer.discordpy.events_per_cpu_s.zlib": 20_000.0,
            "rss_kib_per_idle_shard.zlib": None,
        }
    )
    assert figures[gateway.RATIO_KEY] == 1.5
    assert verdicts(figures, gateway.TARGETS) == {
        "events_per_cpu_s.zlib.null": "PASS",
        "events_per_cpu_s.zlib.amqp": "FAIL",
        gateway.RATIO_KEY: "PASS",
        "rss_kib_per_idle_shard.zlib": "ERROR",
    }


def test_process_usage_reads_this_process() -> None:
    sum(range(200_000))  # some CPU time to read back
    usage = process_usage(os.getpid())
    assert usage.cpu_s > 0
    assert usage.rss_kib > 1024
