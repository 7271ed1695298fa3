"""`python -m benchmarks reshard --smoke` end to end, and the pieces of its audit on their own.

The smoke run starts the simulator in guild-stream mode (4 shards recommended), the reshard consumer on the
shared RabbitMQ and `python -m supervisor --shards auto --workers 2` (RESHARD=auto), then grows it to 8
shards by SIGUSR1 under a stream of guild events: nothing may be lost, and each new shard identifies once.
The timings of a smoke run mean little; only their presence is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import report
from benchmarks.faults.reshard import RESHARD_FAULTS, reshard_selection
from benchmarks.faults.system import SETTINGS as FAULT_SETTINGS
from benchmarks.harness import ROOT, BenchmarkError
from benchmarks.reshard import SETTINGS, guild_ledger_of, identifies_by_count, target_keys
from benchmarks.reshard_consumer import parse_events
from benchmarks.simulator.guild_ledger import FIRST_EVENT_ID, GuildLedger, audit_guild_events
from benchmarks.targets import lookup

TIMEOUT_S = 150


def guild_snapshot(ledger: GuildLedger) -> dict[str, Any]:
    """The ledger as `GET /_sim/ledger` serves it (JSON: tuples become lists)."""
    snapshot: dict[str, Any] = orjson.loads(orjson.dumps(ledger.snapshot()))
    return snapshot


def filled_ledger(events: int) -> GuildLedger:
    ledger = GuildLedger(1000)
    for n in range(events):
        # Guild n % 3; every third event reached no session; the rest went to both generations.
        delivered = [] if n % 3 == 2 else [(n % 4, 4), (n % 8, 8)]
        ledger.record(ledger.next_key(), (n % 3) << 22, float(n), delivered)
    return ledger


def test_the_guild_ledger_rebuilt_from_its_snapshot_audits_as_the_original() -> None:
    original = filled_ledger(30)
    rebuilt = guild_ledger_of(guild_snapshot(original))
    published = [(str(FIRST_EVENT_ID + n), n * 0.1) for n in range(30) if n not in (4, 7)]
    published.append((str(FIRST_EVENT_ID + 1), 9.0))  # a duplicate
    published.append(("123", 9.5))  # never generated
    expected = audit_guild_events(original, published)
    audit = audit_guild_events(rebuilt, published)
    assert audit == expected
    assert audit.lost == (str(FIRST_EVENT_ID + 4), str(FIRST_EVENT_ID + 7))
    assert audit.duplicates == {str(FIRST_EVENT_ID + 1): 1} and audit.unknown == ("123",)
    assert audit.deliveries_by_shard_count == {4: 20, 8: 20}


def test_the_rebuild_refuses_a_capped_or_reset_ledger() -> None:
    capped = GuildLedger(5)
    for n in range(8):
        capped.record(capped.next_key(), 1 << 22, float(n), [(0, 4)])
    with pytest.raises(BenchmarkError, match="kept 5 of 8 events"):
        guild_ledger_of(guild_snapshot(capped))
    reset = filled_ledger(3)
    reset.reset()
    with pytest.raises(BenchmarkError, match="reset"):
        guild_ledger_of(guild_snapshot(reset))


def test_identifies_are_counted_by_shard_count_after_the_mark() -> None:
    def identify(shard_count: int, accepted: bool = True) -> dict[str, Any]:
        return {"shard": 0, "shard_count": shard_count, "accepted": accepted}

    records = [identify(4), identify(4), identify(8), identify(8, accepted=False), identify(4)]
    gateway = {"identifies": records}
    assert identifies_by_count(gateway, 2) == {8: 1, 4: 1}
    assert identifies_by_count(gateway, 0) == {4: 3, 8: 1}


def test_the_events_file_is_read_up_to_its_last_whole_line() -> None:
    text = "1001\t1.5\t0\n1002\t1.75\t3\n1003\t2.0\tNone\n1004\t2."
    assert parse_events(text) == [("1001", 1.5, 0), ("1002", 1.75, 3), ("1003", 2.0, None)]
    assert parse_events("") == []


def test_reshard_faults_run_outside_smoke_or_when_named() -> None:
    faults, others = reshard_selection(FAULT_SETTINGS["quick"], None)
    assert tuple(f.name for f in faults) == RESHARD_FAULTS and others is None
    faults, others = reshard_selection(FAULT_SETTINGS["smoke"], None)
    assert faults == [] and others is None
    faults, others = reshard_selection(FAULT_SETTINGS["smoke"], "reshard_4011,worker_kill9")
    assert [f.name for f in faults] == ["reshard_4011"] and others == "worker_kill9"
    faults, others = reshard_selection(FAULT_SETTINGS["quick"], "reshard_grow")
    assert [f.name for f in faults] == ["reshard_grow"] and others == ""
    # The kill's bound allows the killed worker's restart on top of the others'.
    bounds = {f.name: f.bound_s for f in reshard_selection(FAULT_SETTINGS["quick"], None)[0]}
    assert bounds["reshard_worker_kill"] > bounds["reshard_grow"] == bounds["reshard_4011"]


def test_targets_and_the_identify_bound() -> None:
    assert SETTINGS["quick"].identify_bound_s == 5.0  # 8 shards, max_concurrency 16: one window
    assert set(target_keys("smoke")) == {
        "reshard.lost",
        "reshard.duplicates",
        "reshard.max_guild_gap_s",
        "reshard.identifies",
        "reshard.overlaps",
        "reshard.duration_over_bound",
    }


def test_the_report_has_a_reshard_table_from_canned_results() -> None:
    suite: dict[str, Any] = {
        "settings": {"shards": 4, "target": 8, "workers": 2, "max_concurrency": 16, "guild_count": 64},
        "lost": 0,
        "duplicates": 0,
        "max_guild_gap_s": 0.9,
        "duration_s": 4.2,
        "identify_bound_s": 5.0,
        "identifies": 8,
        "targets": {"reshard.lost": "== 0"},
        "verdicts": {"reshard.lost": "PASS"},
        "errors": {},
    }
    results = {"suites": {"reshard": {"status": "ok", "elapsed_s": 40.0, "error": None}}, "reshard": suite}
    text = report.render(results, [])
    assert "## Live resharding" in text
    assert "| guild events lost | 0 | == 0: PASS |" in text
    assert "| reshard s (start to the new generation live) | 4.2 |  |" in text
    assert "4 -> 8 shards on 2 workers, max_concurrency 16, 64 guilds" in text
    assert report.reshard_section({"errors": {"reshard": "x"}}) == "_not measured_"


def test_smoke_run_grows_4_to_8_shards_with_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "reshard.json"
    argv = [sys.executable, "-m", "benchmarks", "reshard", "--smoke", "--json", str(out)]
    argv += ["--logs", str(tmp_path / "logs")]
    process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert process.returncode == 0, process.stdout + process.stderr[-6000:]
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    for key in (
        "lost",
        "duplicates",
        "max_guild_gap_s",
        "duration_s",
        "identify_bound_s",
        "duration_over_bound",
        "identifies",
        "events",
        "published",
    ):
        value = lookup(results, f"reshard.{key}")
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert results["reshard"]["lost"] == 0, results["runs"]["grow"]
    assert results["reshard"]["events"] > 0 and results["reshard"]["published"] > 0
    assert results["runs"]["grow"]["generation"] >= 1
    assert set(results["verdicts"]) == set(target_keys("smoke"))
