"""`python -m benchmarks ratelimit`: the suite runs end to end, and its figures mean what its docstring says.

The smoke size runs two client processes per backend for a couple of seconds per workload, so its figures
mean little: the end-to-end test checks that every promised key is there with a sane value and that the
run cleaned up after itself, never a performance target. The figure arithmetic (workload split,
utilization, percentiles) and the workload plans are checked on their own, on made-up ledgers.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks.harness import ROOT
from benchmarks.ratelimit import TARGETS, figures
from benchmarks.ratelimit.workloads import (
    HOT_CHANNEL,
    STORM_KINDS,
    HotPlan,
    Plan,
    StormPlan,
    ZipfPlan,
    ZipfSampler,
    interaction_token,
    phases,
    storm_channel,
    timeline,
    zipf_channel,
)

TIMEOUT_S = 120
#: Keys the issue names, plus the extras the brief asks for.
ENGINE_KEYS = (
    "avoidable_429_per_10k",
    "first_contact_429",
    "global_utilization",
    "hot_bucket_utilization",
    "interaction_wait_p99_ms",
    "acquire_p50_us",
    "acquire_p99_us",
    "grants_per_s",
)
PEER_KEYS = ("avoidable_429_per_10k", "first_contact_429", "global_utilization", "hot_bucket_utilization")


async def run_suite(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "ratelimit.json"
    argv = [sys.executable, "-m", "benchmarks", "ratelimit", "--smoke", "--json", str(out)]
    argv += ["--logs", str(tmp_path / "logs"), *flags]
    with trio.fail_after(TIMEOUT_S):
        process = await trio.run_process(
            argv, cwd=str(ROOT), capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = process.stderr.decode(errors="replace")
    assert process.returncode == 0, stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    return results, process.stdout.decode()


def check_http_figures(section: dict[str, Any]) -> None:
    assert section["requests"] > 0
    assert section["avoidable_429_per_10k"] >= 0
    assert isinstance(section["first_contact_429"], int) and section["first_contact_429"] >= 0
    assert 0 < section["global_utilization"] <= 1.1, section
    assert 0 < section["hot_bucket_utilization"] <= 1.1, section


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the suite runs its own redis-server")
async def test_smoke_run_writes_every_figure_and_cleans_up(tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    results, table = await run_suite(tmp_path, "--peers", "none", "--shm-dir", str(shm_dir))
    for backend in ("shm", "redis"):
        section = results[backend]
        for key in ENGINE_KEYS:
            assert key in section, (backend, key)
        check_http_figures(section)
        assert 0 <= section["interaction_wait_p50_ms"] <= section["interaction_wait_p99_ms"]
        assert 0 < section["acquire_p50_us"] <= section["acquire_p99_us"]
        assert section["grants_per_s"] > 0
        # Our engine shares one state: the storm's three new counters never see more than one first request.
        storm = results["runs"][backend]["workloads"]["storm"]["ledger"]
        assert storm["requests"] > 0
        assert results["runs"][f"capacity-{backend}"]["grants"] > 0
    assert set(results["verdicts"]) <= set(TARGETS)
    assert set(results["verdicts"].values()) <= {"PASS", "FAIL"}
    assert results["machine"]["python"] and results["machine"]["cpu_count"]
    assert "avoidable_429_per_10k" in table and "429s by ledger category" in table
    assert list(shm_dir.iterdir()) == [], "the shm segment was left behind"


@pytest.mark.peer
async def test_smoke_run_of_the_peers(tmp_path: Path) -> None:
    results, _ = await run_suite(tmp_path, "--backends", "none", "--no-capacity")
    for peer in ("discordpy", "hikari"):
        section = results["peer"][peer]
        for key in PEER_KEYS:
            assert key in section, (peer, key)
        check_http_figures(section)
        assert section["interaction_latency_p99_ms"] > 0


# --- figures --------------------------------------------------------------------------------------


def record(
    arrival: float, label: str, major: int | str, status: int = 200, category: str | None = None
) -> dict[str, Any]:
    return {
        "arrival": arrival,
        "template": label,
        "major": str(major),
        "status": status,
        "category": category,
    }


def test_records_are_split_by_the_ids_each_workload_uses() -> None:
    message = figures.MESSAGE_ROUTE
    records = [
        record(0.0, message, HOT_CHANNEL),
        record(0.0, message, zipf_channel(1)),
        record(0.0, message, zipf_channel(10_000)),
        record(0.0, figures.INTERACTION_ROUTE, 1_240_000_000_000_000_007),
        record(0.0, "POST /channels/{channel_id}/typing", storm_channel(0, 1)),
        record(0.0, "PUT /guilds/{guild_id}/members/{user_id}/roles/{role_id}", storm_channel(3, 2)),
        record(0.0, "GET /users/@me", ""),
        {"arrival": 0.0, "template": None, "major": None, "status": 429, "category": "ban"},
    ]
    assert [figures.workload_of(r) for r in records] == [
        "hot",
        "zipf",
        "zipf",
        "interactions",
        "storm",
        "storm",
        "other",
        "banned",
    ]


def test_bucket_utilization_is_one_for_a_client_that_keeps_the_counter_saturated() -> None:
    limit, window_s = 5, 2.5
    interval = window_s / limit
    # A full bucket's burst at 10.0, then one success per slot (GCRA) for 20 s.
    arrivals = [10.0] * limit + [10.0 + k * interval for k in range(1, 41)]
    records = [record(at, figures.MESSAGE_ROUTE, HOT_CHANNEL) for at in arrivals]
    records.append(record(11.0, figures.MESSAGE_ROUTE, HOT_CHANNEL, status=429, category="avoidable"))
    assert figures.bucket_utilization(records, limit, window_s) == pytest.approx(1.0)


def test_bucket_utilization_of_bursts_each_a_round_trip_late() -> None:
    # A limiter that waits for the whole window, plus 100 ms of answer latency, then sends all 5 again.
    limit, window_s, late_s = 5, 2.5, 0.1
    arrivals = [cycle * (window_s + late_s) for cycle in range(6) for _ in range(limit)]
    records = [record(at, figures.MESSAGE_ROUTE, HOT_CHANNEL) for at in arrivals]
    expected = window_s / (window_s + late_s)
    assert figures.bucket_utilization(records, limit, window_s) == pytest.approx(expected, rel=1e-3)
    assert figures.bucket_utilization(records[:limit], limit, window_s) is None


def test_global_utilization_counts_successes_but_not_interactions() -> None:
    records = [record(k / 50, figures.MESSAGE_ROUTE, zipf_channel(1)) for k in range(100)]  # 50/s for 2 s
    records += [record(k / 50, figures.MESSAGE_ROUTE, zipf_channel(2), 429, "global") for k in range(100)]
    records += [record(k / 50, figures.INTERACTION_ROUTE, 1_240_000_000_000_000_001) for k in range(100)]
    assert figures.global_utilization(records, 50, 0.5, 1.5) == pytest.approx(1.0)
    assert figures.global_utilization(records, 100, 0.5, 1.5) == pytest.approx(0.5)
    assert figures.global_gaps(records, 0.5, 1.5) == pytest.approx([0.02] * 49)


def test_window_headroom_is_the_tightest_span_of_rate_plus_one_counted_arrivals() -> None:
    # 50/s exactly, 0.02 s apart: 51 arrivals span 1.0 s, no headroom; one of them 3 ms late leaves 3 ms less.
    at = [k / 50 for k in range(120)]
    records = [record(t, figures.MESSAGE_ROUTE, zipf_channel(1)) for t in at]
    records += [record(0.5, figures.MESSAGE_ROUTE, zipf_channel(2), 429, "global")]  # not counted
    records += [record(0.5, figures.INTERACTION_ROUTE, 1_240_000_000_000_000_001)]  # exempt
    records += [record(0.5, figures.MESSAGE_ROUTE, zipf_channel(3), 429, "avoidable")]  # counted
    assert figures.window_headroom(records[:120], 50, 1.0) == pytest.approx(0.0, abs=1e-9)
    assert figures.window_headroom(records, 50, 1.0) == pytest.approx(-0.02, abs=1e-9)
    spaced = [record(t * 1.01, figures.MESSAGE_ROUTE, zipf_channel(1)) for t in at]
    assert figures.window_headroom(spaced, 50, 1.0) == pytest.approx(0.01, abs=1e-9)
    assert figures.window_headroom(spaced[:50], 50, 1.0) is None


def test_ledger_counts_and_rates() -> None:
    records = [
        record(0.0, figures.MESSAGE_ROUTE, HOT_CHANNEL),
        record(0.1, figures.MESSAGE_ROUTE, HOT_CHANNEL, 429, "avoidable"),
        record(0.2, figures.MESSAGE_ROUTE, HOT_CHANNEL, 429, "first-contact"),
    ]
    counts = figures.ledger_counts(records)
    assert counts["requests"] == 3 and counts["successes"] == 1
    assert counts["statuses"] == {"200": 1, "429": 2}
    assert counts["429_by_category"]["avoidable"] == 1
    assert counts["429_by_category"]["first-contact"] == 1
    assert figures.per_10k(1, 3) == pytest.approx(3333.33)
    assert figures.per_10k(0, 0) is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert figures.percentile(values, 0.5) == 50.0
    assert figures.percentile(values, 0.99) == 99.0
    assert figures.percentile(values[:1], 0.99) == 1.0
    assert figures.percentile([], 0.5) is None


# --- workloads ------------------------------------------------------------------------------------


def plan(processes: int = 4) -> Plan:
    return Plan(
        rest_url="http://127.0.0.1:1/api/v10",
        processes=processes,
        seed=7,
        hot=HotPlan(0.5, 10.0, 20.0, 32),
        zipf=ZipfPlan(11.5, 10.0, 10_000, 1.0, 200.0, 32, 16.0),
        storm=StormPlan(22.5, 2, 3.0, 2),
    )


def test_timeline_is_reproducible_and_offers_the_planned_rates() -> None:
    the_plan = plan()
    assert timeline(the_plan, 1) == timeline(the_plan, 1)
    assert timeline(the_plan, 1) != timeline(the_plan, 2)
    counts: Counter[str] = Counter()
    for index in range(the_plan.processes):
        items = timeline(the_plan, index)
        assert [item.at_s for item in items] == sorted(item.at_s for item in items)
        counts.update(item.workload for item in items)
    # Poisson counts: within 5 standard deviations of the planned totals.
    for workload, expected in (("hot", 20.0 * 10), ("zipf", 200.0 * 10), ("interactions", 16.0 * 10)):
        assert abs(counts[workload] - expected) < 5 * math.sqrt(expected), (workload, counts[workload])
    assert counts["storm"] == the_plan.processes * 2 * len(STORM_KINDS) * 2


def test_storm_rounds_hit_fresh_resources_all_at_once() -> None:
    the_plan = plan()
    storm = [item for item in timeline(the_plan, 0) if item.workload == "storm"]
    by_round = Counter(item.at_s for item in storm)
    assert by_round == {22.5: 6, 25.5: 6}
    assert {item.call.channel for item in storm} == {
        storm_channel(round_index, kind) for round_index in range(2) for kind in range(len(STORM_KINDS))
    }


def test_interactions_are_new_each_time_and_phases_follow_the_windows() -> None:
    the_plan = plan()
    ids = [item.call.interaction for index in range(4) for item in timeline(the_plan, index)]
    ids = [value for value in ids if value]
    assert len(ids) == len(set(ids))
    assert interaction_token(ids[0]) != interaction_token(ids[1])
    split = phases(the_plan, 0)
    assert [phase.name for phase in split] == ["hot", "zipf", "storm"]
    assert sum(len(phase.items) for phase in split) == len(timeline(the_plan, 0))
    assert {item.workload for item in split[1].items} == {"zipf", "interactions"}
    assert the_plan.end_s == 28.5


def test_zipf_sampler_follows_the_distribution() -> None:
    sampler = ZipfSampler(10_000, 1.0)
    harmonic = sum(1 / k for k in range(1, 10_001))
    assert sampler.share(1) == pytest.approx(1 / harmonic)
    assert sampler.share(10) == pytest.approx(0.1 / harmonic)
    rng = random.Random(3)
    draws = Counter(sampler.rank(rng) for _ in range(20_000))
    assert abs(draws[1] / 20_000 - sampler.share(1)) < 0.01
    assert max(draws) <= 10_000 and min(draws) >= 1


def test_plan_survives_its_json_file(tmp_path: Path) -> None:
    the_plan = plan()
    path = tmp_path / "plan.json"
    the_plan.write(path)
    assert Plan.read(path) == the_plan
