"""`python -m benchmarks faults --smoke` end to end, and the suite's loss accounting on its own.

The smoke run starts the simulator, the suite's own redis-server, the shared RabbitMQ's consumer and a
supervisor with 2 workers, and injects three faults (kill -9 of a worker, op 7 on every shard, corrupt
compressed frames). It is a correctness suite: every fault must lose nothing and spend no IDENTIFY.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.faults.system import SETTINGS, tally
from benchmarks.harness import ROOT

TIMEOUT_S = 150


def test_smoke_run_passes_every_fault_with_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    argv = [sys.executable, "-m", "benchmarks", "faults", "--smoke", "--json", str(out)]
    argv += ["--logs", str(tmp_path / "logs")]
    process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert process.returncode == 0, process.stdout + process.stderr[-6000:]
    results: dict[str, Any] = json.loads(out.read_text())
    faults = results["faults"]
    expected = SETTINGS["smoke"].faults
    assert expected is not None
    assert faults["total"] == len(expected) and faults["passed"] == len(expected)
    for name in expected:
        figures = faults[name]
        assert set(figures) >= {"lost", "duplicates", "identifies", "recover_s"}, name
        assert figures["lost"] == 0 and figures["identifies"] == 0, (name, figures)
        assert isinstance(figures["recover_s"], float) and figures["recover_s"] > 0, (name, figures)
    assert "PASS" in process.stdout and "FAIL" not in process.stdout


def ledger_session(shard: int, last_seq: int, state: str) -> dict[str, Any]:
    return {"shard": shard, "last_seq": last_seq, "state": state}


def test_tally_counts_every_seq_of_current_sessions_and_only_holes_of_ended_ones() -> None:
    ledger = {
        "counters": {"identifies_accepted": 3, "resumes_ok": 5},
        "sessions": {
            "old": ledger_session(0, 90, "ended"),  # invalidated: what it queued after dying is not owed
            "new": ledger_session(0, 40, "attached"),
            "other": ledger_session(1, 10, "detached"),  # resumable: every seq is owed
        },
    }
    consumed = {
        "duplicates": 2,
        "sessions": {
            "old": {"shard": 0, "distinct": 48, "highest": 50},  # 2 holes below 50; 51-90 never sent
            "new": {"shard": 0, "distinct": 40, "highest": 40},
            "other": {"shard": 1, "distinct": 7, "highest": 7},
        },
    }
    result = tally(ledger, consumed)
    assert result.lost == 2 + 3
    assert result.missing == {"old": 2, "other": 3}
    assert (result.duplicates, result.identifies, result.resumes) == (2, 3, 5)


def test_a_shard_superseded_by_a_new_identify_owes_only_its_holes() -> None:
    ledger = {
        "counters": {},
        "sessions": {
            "given-up": ledger_session(2, 500, "detached"),  # 4003: the client identified anew
            "current": ledger_session(2, 20, "attached"),
        },
    }
    consumed = {
        "sessions": {
            "given-up": {"shard": 2, "distinct": 100, "highest": 100},
            "current": {"shard": 2, "distinct": 20, "highest": 20},
        }
    }
    assert tally(ledger, consumed).lost == 0
