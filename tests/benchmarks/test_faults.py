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

import pytest

from benchmarks.faults.cluster import CLUSTER_FAULTS, failover_s
from benchmarks.faults.soak import (
    MIN_JUDGED_WINDOW_S,
    Sample,
    fd_allowance_per_hour,
    process_figures,
    rss_allowance_kib_per_hour,
    sample_interval_s,
    slope,
    soak_reasons,
    warmup_s,
)
from benchmarks.faults.suite import chosen_faults
from benchmarks.faults.system import SETTINGS, tally
from benchmarks.harness import ROOT

TIMEOUT_S = 150
SOAK_TIMEOUT_S = 90


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


def test_a_given_up_session_stays_superseded_when_the_newest_one_ends() -> None:
    """A worker gave up `given-up` (Redis down, so it identified anew), then a fatal close ended `newest`:
    the shard owes the holes of both and nothing `given-up` queued afterwards."""
    ledger = {
        "counters": {},
        "sessions": {
            "given-up": ledger_session(0, 7000, "detached"),
            "newest": ledger_session(0, 300, "ended"),
        },
    }
    consumed = {
        "sessions": {
            "given-up": {"shard": 0, "distinct": 99, "highest": 100},
            "newest": {"shard": 0, "distinct": 250, "highest": 250},
        }
    }
    result = tally(ledger, consumed)
    assert result.missing == {"given-up": 1}
    assert result.lost == 1


def test_overlaps_come_from_the_counter_or_else_the_violations() -> None:
    ledger: dict[str, Any] = {"counters": {"shard_overlaps": 2}, "sessions": {}, "rules_broken": {}}
    assert tally(ledger, {"sessions": {}}).overlaps == 2
    ledger = {"counters": {}, "sessions": {}, "rules_broken": {"shard_served_twice": 3}}
    assert tally(ledger, {"sessions": {}}).overlaps == 3
    ledger = {"counters": {}, "sessions": {}}
    assert tally(ledger, {"sessions": {}}).overlaps == 0


def close_record(at: float, shard: int, by: str = "client") -> dict[str, Any]:
    return {"at": at, "shard": shard, "code": None, "by": by}


def resume_record(at: float, shard: int, ok: bool = True) -> dict[str, Any]:
    return {"at": at, "shard": shard, "ok": ok}


def test_failover_runs_from_the_first_close_to_the_last_shards_first_resume() -> None:
    ledger = {
        "closes": [close_record(1.0, 2), close_record(10.0, 2), close_record(10.01, 3), close_record(11, 0)],
        "resumes": [
            resume_record(2.0, 2),  # before the marks: an earlier fault's
            resume_record(13.0, 2, ok=False),
            resume_record(14.0, 2),
            resume_record(15.5, 3),
            resume_record(16.0, 2),  # shard 2 again (a hand-over later): its first RESUME counts
            resume_record(17.0, 0),  # not the node's shard
        ],
    }
    assert failover_s(ledger, (2, 3), (1, 1)) == 5.5
    # A shard not resumed yet, or no close seen: no figure.
    assert failover_s(ledger, (2, 3, 4), (1, 1)) is None
    assert failover_s({"closes": [], "resumes": ledger["resumes"]}, (2, 3), (0, 1)) is None


def test_only_picks_faults_from_both_phases_and_smoke_runs_no_cluster_fault() -> None:
    single, cluster = chosen_faults(SETTINGS["quick"], "node_kill9,close_4010_fatal,worker_kill9")
    assert [f.name for f in single] == ["worker_kill9", "close_4010_fatal"]  # fatal faults last
    assert [f.name for f in cluster] == ["node_kill9"]
    single, cluster = chosen_faults(SETTINGS["smoke"], None)
    assert cluster == [] and len(single) == len(SETTINGS["smoke"].faults or ())
    _, cluster = chosen_faults(SETTINGS["full"], None)
    assert tuple(f.name for f in cluster) == CLUSTER_FAULTS
    with pytest.raises(SystemExit, match="unknown faults node_kill8"):
        chosen_faults(SETTINGS["quick"], "node_kill8")


# -- soak: the pure figures and verdicts, and a short run end to end --------------------------------------
#: 75 minutes sampled every 5 s: the warm-up is 15 minutes (n < 180), the window exactly an hour.
HOUR_SOAK_SAMPLES = 901
HOUR_SOAK_WARMUP_S = 900.0


def flat_series(count: int, interval_s: float, rss: int, fds: int, pid: int = 100) -> list[Sample]:
    """Samples every `interval_s` with RSS noise of +-300 KiB and an fd that comes and goes."""
    return [
        Sample(n * interval_s, pid, rss + (300 if n % 2 else -300), fds + (1 if n % 7 == 1 else 0))
        for n in range(count)
    ]


def test_slope_is_the_least_squares_fit() -> None:
    assert slope([(0.0, 10.0), (1.0, 12.0), (2.0, 14.0), (3.0, 16.0)]) == 2.0
    assert slope([(0.0, 5.0), (2.0, 5.0)]) == 0.0
    # The fit through (0, 0), (1, 1), (2, 0): level on average.
    assert slope([(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)]) == 0.0
    # (0, 0), (1, 3), (2, 3), (3, 6): Sxy / Sxx = 9 / 5.
    assert slope([(0.0, 0.0), (1.0, 3.0), (2.0, 3.0), (3.0, 6.0)]) == pytest.approx(1.8, abs=1e-12)
    with pytest.raises(ValueError, match="2 points"):
        slope([(1.0, 1.0)])
    with pytest.raises(ValueError, match="distinct"):
        slope([(1.0, 1.0), (1.0, 2.0)])


def test_soak_warmup_sample_interval_and_allowances_scale_with_the_duration() -> None:
    assert warmup_s(24.0) == pytest.approx(4.8)  # a short soak: 20%
    assert warmup_s(60.0) == 30.0  # 30 s once that leaves half of the soak
    assert warmup_s(4500.0) == HOUR_SOAK_WARMUP_S
    assert sample_interval_s(24.0) == pytest.approx(1.2)  # still MIN_SAMPLES samples
    assert sample_interval_s(3600.0) == 5.0
    # An hour's window or more: 5% of the mean RSS or 2 MiB per hour, 2 fds per hour.
    assert rss_allowance_kib_per_hour(100_000, 3600.0) == 5000.0
    assert rss_allowance_kib_per_hour(20_000, 7200.0) == 2048.0
    assert fd_allowance_per_hour(7200.0) == 2.0
    # A 10-minute window allows one 2 MiB step, or 2 fds, within it.
    assert rss_allowance_kib_per_hour(20_000, 600.0) == 6 * 2048.0
    assert fd_allowance_per_hour(600.0) == 12.0


def test_soak_passes_a_flat_noisy_process_with_its_figures() -> None:
    samples = flat_series(HOUR_SOAK_SAMPLES, 5.0, rss=50_000, fds=30)
    figures = process_figures("worker-0", samples, HOUR_SOAK_WARMUP_S)
    assert figures.reasons == () and figures.passed and figures.slopes_judged
    assert (figures.samples, figures.fit_samples, figures.window_s) == (901, 721, 3600.0)
    assert abs(figures.rss_slope_kib_per_min or 0) < 1 and abs(figures.fd_slope_per_min or 0) < 0.001
    assert (figures.rss_first_kib, figures.rss_last_kib, figures.rss_max_kib) == (49_700, 49_700, 50_300)
    assert (figures.fds_first, figures.fds_last, figures.fds_max) == (30, 30, 31)
    assert figures.rss_allowance_kib_per_hour == 2500.0 and figures.fd_allowance_per_hour == 2.0


def test_soak_fails_a_leaking_process_with_one_reason_per_leak() -> None:
    # 10 KiB per 5 s sample is 120 KiB/min, 7,200 KiB/h, over 5% of the window's mean 55,400 KiB; one fd more
    # every 10 minutes is 6 an hour, and 6 more by the end of the window.
    samples = [Sample(n * 5.0, 7, 50_000 + 10 * n, 30 + n // 120) for n in range(HOUR_SOAK_SAMPLES)]
    figures = process_figures("worker-1", samples, HOUR_SOAK_WARMUP_S)
    assert figures.rss_slope_kib_per_min == pytest.approx(120.0)
    assert figures.fd_slope_per_min == pytest.approx(0.1, abs=0.005)  # a staircase
    assert len(figures.reasons) == 3, figures.reasons
    rss, fd_rate, fd_growth = figures.reasons
    assert rss == "worker-1: RSS grows 120.0 KiB/min, 7,200 KiB/h > 2,770 KiB/h allowed"
    assert fd_rate.startswith("worker-1: fds grow 0.1") and fd_rate.endswith("/h > 2/h allowed")
    assert fd_growth == "worker-1: fds 31 -> 37 after warm-up (+6 > 2)"
    assert soak_reasons([figures], lost=0, restarts=[], rest_errors=0) == list(figures.reasons)


def test_soak_allows_bounded_steps_in_a_short_window_but_not_a_trend() -> None:
    # 12.5 minutes: 150 s of warm-up, a 10-minute window, one more pooled connection halfway (1 MiB, 1 fd).
    stepped = [Sample(n * 5.0, 3, 50_000 + (1024 if n > 90 else 0), 30 + (n > 90)) for n in range(151)]
    figures = process_figures("worker-0", stepped, warmup_s(750.0))
    assert figures.window_s == 600.0 and figures.slopes_judged and figures.passed, figures.reasons
    # The same window with an fd more every 3 minutes: a trend, over the allowance both ways.
    trend = [Sample(n * 5.0, 3, 50_000, 30 + n // 36) for n in range(151)]
    rate, growth = process_figures("worker-0", trend, warmup_s(750.0)).reasons
    assert rate.startswith("worker-0: fds grow 0.3") and rate.endswith("/h > 12/h allowed")
    assert growth == "worker-0: fds 30 -> 34 after warm-up (+4 > 2)"


def test_soak_allowances_the_floor_the_warmup_and_the_instruments() -> None:
    # 30 KiB/min (1,800 KiB/h) of a 4 MiB redis-server: over 5% of it, within the 2 MiB floor.
    small = [Sample(n * 5.0, 9, 4_000 + 5 * n // 2, 12) for n in range(HOUR_SOAK_SAMPLES)]
    redis = process_figures("redis-server", small, HOUR_SOAK_WARMUP_S)
    assert redis.rss_slope_kib_per_min == pytest.approx(30.0, abs=0.01) and redis.passed
    # A steep ramp during the warm-up only (pools and arenas filling) is not a leak.
    ramp = [Sample(n * 5.0, 9, 40_000 + min(n, 150) * 200, 20 + min(n, 150) // 30) for n in range(901)]
    assert process_figures("supervisor", ramp, HOUR_SOAK_WARMUP_S).passed
    # The simulator's RSS grows by design (its replay buffer): reported, not judged; its fds are.
    growing = [Sample(n * 5.0, 9, 40_000 + n * 100, 17) for n in range(HOUR_SOAK_SAMPLES)]
    simulator = process_figures("simulator", growing, HOUR_SOAK_WARMUP_S)
    assert simulator.passed and not simulator.rss_judged and (simulator.rss_slope_kib_per_min or 0) > 1000
    assert not process_figures("worker-0", growing, HOUR_SOAK_WARMUP_S).passed


def test_soak_reports_but_does_not_judge_the_slopes_of_a_window_under_a_minute() -> None:
    # The tests' 0.4-minute soak: 21 samples 1.2 s apart, 4.8 s of warm-up, a window of under 20 s.
    fast = [Sample(n * 1.2, 5, 50_000 + 1000 * n, 30) for n in range(21)]
    figures = process_figures("worker-0", fast, warmup_s(24.0))
    assert figures.window_s < MIN_JUDGED_WINDOW_S and not figures.slopes_judged
    assert figures.rss_slope_kib_per_min == pytest.approx(50_000.0) and figures.passed
    # Fd counts are still compared: 3 more is over the limit at any length.
    opened = [Sample(n * 1.2, 5, 50_000, 30 + (3 if n > 10 else 0)) for n in range(21)]
    assert process_figures("worker-0", opened, warmup_s(24.0)).reasons == (
        "worker-0: fds 30 -> 33 after warm-up (+3 > 2)",
    )


def test_soak_fails_on_loss_restarts_rest_errors_and_too_few_samples() -> None:
    # A restarted worker: only its new pid's samples are fitted, and those are flat.
    restarted = (
        flat_series(361, 5.0, 50_000, 30, pid=1)[:100] + flat_series(361, 5.0, 50_000, 30, pid=2)[100:]
    )
    worker = process_figures("worker-0", restarted, warmup=360.0)
    assert worker.pid == 2 and worker.fit_samples == 261 and worker.passed
    short = process_figures("consumer", flat_series(7, 1.0, rss=40_000, fds=6), warmup=5.0)
    assert short.reasons == ("consumer: 2 samples after warm-up, fewer than 3",)
    reasons = soak_reasons(
        [worker, short], lost=4, restarts=["worker-0 pid 1 -> 2 at 500.0 s"], rest_errors=3
    )
    assert reasons == [
        "4 lost",
        "restart: worker-0 pid 1 -> 2 at 500.0 s",
        "3 REST requests through the proxy not answered 200",
        "consumer: 2 samples after warm-up, fewer than 3",
    ]


def test_soak_short_run_samples_every_process_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "benchmarks", "faults", "--soak", "0.25", "--json", str(out)]
    argv += ["--logs", str(tmp_path / "logs")]
    process = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S, check=False
    )
    assert process.returncode == 0, process.stdout + process.stderr[-6000:]
    results: dict[str, Any] = json.loads(out.read_text())
    soak = results["soak"]
    roles = {"supervisor", "worker-0", "worker-1", "redis-server", "simulator", "consumer"}
    assert set(soak["processes"]) == roles
    for role, figures in soak["processes"].items():
        assert figures["samples"] >= 5, (role, figures)
        assert figures["rss_first_kib"] > 0 and figures["fds_first"] > 0, (role, figures)
        assert isinstance(figures["rss_slope_kib_per_min"], float), (role, figures)
        assert isinstance(figures["fd_slope_per_min"], float), (role, figures)
    assert soak["lost"] == 0 and soak["passed"] is True
    # A 12 s window after warm-up: the slopes are reported, not judged (see the soak module's docstring).
    assert soak["slopes_judged"] is False
    assert soak["events"] > 0 and soak["rest_requests"] > 0 and soak["rest_errors"] == 0
    assert "machine" in results and "PASS" in process.stdout
