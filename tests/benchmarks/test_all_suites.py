"""`python -m benchmarks all` and the startup, proxy and scaling suites, end to end at their smoke size.

One `all --smoke` run over startup, proxy and scaling (the module fixture, about 40 s) feeds most tests:
each suite's own keys in `results.json`, the report's tables and the PNGs. The figures of a smoke run mean
nothing, so nothing here checks a timing; only that each figure was measured. The report and the plots
of the suites too slow for this module (gateway, ratelimit) are drawn from canned results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import plots, report
from benchmarks.harness import ROOT
from benchmarks.targets import lookup

TIMEOUT_S = 240
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_all(out: Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "benchmarks", "all", "--smoke", "--out", str(out), *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("all")
    process = run_all(out, "--suites", "startup,proxy,scaling")
    assert process.returncode == 0, process.stderr[-6000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return out, results


def measured(results: dict[str, Any], key: str) -> float:
    value = lookup(results, key)
    assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    return float(value)


def test_results_hold_the_machine_every_suite_and_their_keys(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = smoke_run
    machine = results["machine"]
    for key in (
        "cpu_model",
        "cpu_count",
        "memory_mib",
        "kernel",
        "python",
        "git_commit",
        "git_dirty",
        "date",
    ):
        assert key in machine, key
    assert {name: s["status"] for name, s in results["suites"].items()} == dict.fromkeys(
        ("startup", "proxy", "scaling"), "ok"
    )
    for name in ("startup", "proxy", "scaling"):
        assert (out / f"{name}.json").is_file()
        assert (out / f"{name}.log").read_text().strip()
        assert results[name]["errors"] == {}, results[name]["errors"]
    # Every suite's verdicts, under full names.
    assert "proxy.http.added_p50_ms" in results["verdicts"]
    assert "startup.shards4_mc2.rules_broken" in results["verdicts"]
    # The smoke size measures 1 and 2 workers: too few to judge scaling on any machine, so SKIP, not PASS.
    assert results["verdicts"]["scaling.efficiency_unshared"] == "SKIP"
    assert results["verdict_notes"]["scaling.efficiency_unshared"]


def test_startup_measures_ready_time_and_the_identify_spread(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke_run
    config = "startup.shards4_mc2"
    assert measured(results, f"{config}.ready_s") > 0
    assert measured(results, f"{config}.readyz_s") > 0
    assert measured(results, f"{config}.bound_s") == 5.0  # 4 shards, max_concurrency 2: one window
    assert measured(results, f"{config}.identify_spread_s") >= 5.0  # the simulator enforces the window
    assert measured(results, f"{config}.spread_over_bound") >= 1.0
    assert measured(results, f"{config}.identifies") == 4
    assert measured(results, f"{config}.workers") == 2
    run = results["startup"]["runs"]["shards4_mc2"]
    assert len(run["identify_offsets_s"]) == 4
    assert "identify_rate" not in run["rules_broken"]


def test_proxy_measures_both_fronts_against_the_direct_path(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke_run
    for path in ("http", "amqp"):
        measured(results, f"proxy.{path}.added_p50_ms")
        measured(results, f"proxy.{path}.added_p99_ms")
    for path in ("direct", "http", "amqp"):
        assert measured(results, f"proxy.{path}.p50_ms") > 0
        assert measured(results, f"proxy.{path}.requests_per_s") > 0
        assert results["proxy"]["runs"]["throughput"][path]["errors"] == 0
        distribution = results["proxy"]["runs"]["latency_distribution_ms"][path]
        assert distribution["n"] == 50  # the smoke size's timed rounds
        assert distribution["p1"] <= distribution["p50"] <= distribution["p99.9"]
    assert measured(results, "proxy.http.worker_cpu_share") > 0


def test_scaling_measures_each_worker_count(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke_run
    counts = results["scaling"]["settings"]["counts"]
    assert counts[0] == 1 and len(counts) <= 2
    for count in counts:
        assert measured(results, f"scaling.events_per_s.w{count}") > 0
        assert measured(results, f"scaling.events_per_worker_cpu_s.w{count}") > 0
    assert measured(results, "scaling.max_workers") == counts[-1]
    measured(results, "scaling.efficiency_at_max")
    measured(results, "scaling.cpu_efficiency_at_max")
    assert measured(results, "scaling.largest_unshared_workers") >= 1


def test_report_has_a_table_per_suite_and_embeds_the_plots(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = smoke_run
    text = (out / "report.md").read_text()
    for header in (
        "| suite | status |",
        "| configuration | shards |",
        "| path | p50 ms |",
        "| workers | events/s |",
    ):
        assert header in text, header
    assert "| shards4_mc2 | 4 | 2 | 2 |" in text
    assert set(results["plots"]) == {"startup.png", "proxy_latency.png", "scaling.png"}
    for name in results["plots"]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in text
    # The suites not run are named with the reason their plots are missing.
    assert results["plots_skipped"]["gateway_throughput.png"] == "no gateway results"


def test_a_suite_that_fails_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    process = run_all(tmp_path, "--suites", "startup", "--timeout", "2", timeout=60)
    assert process.returncode == 1
    results = json.loads((tmp_path / "results.json").read_text())
    status = results["suites"]["startup"]
    assert status["status"] == "failed" and "timed out" in status["error"]
    assert results["startup"] is None
    # Its targets are counted as ERROR, not left out.
    assert results["verdicts"] == dict.fromkeys(
        (
            "startup.shards4_mc2.rules_broken",
            "startup.shards4_mc2.identifies",
            "startup.shards4_mc2.spread_over_bound",
        ),
        "ERROR",
    )
    text = (tmp_path / "report.md").read_text()
    assert "| startup | failed |" in text
    assert "0 pass, 0 fail, 3 error, 0 skip" in text
    assert "**This suite failed**: timed out after 2 s" in text


CANNED_GATEWAY: dict[str, Any] = {
    "events_per_cpu_s": {"zlib": {"null": 44000, "amqp": 15000}, "zstd": {"null": 60000}},
    "rss_kib_per_idle_shard": {"zlib": 48.0, "zstd": 75.0},
    "peer": {
        "discordpy": {"events_per_cpu_s": {"zlib": 9000}, "rss_kib_per_idle_shard": {"zlib": 60.0}},
        "discordpy_raw": {"events_per_cpu_s": {"zlib": 88000}},
    },
    "ceiling": {"events_per_cpu_s": {"zlib": 220000}},
    "ours_over_discordpy_raw": {"events_per_cpu_s": {"zlib": 0.5, "zstd": None}},
    "ours_fraction_of_ceiling": {"events_per_cpu_s": {"zlib": 0.2}},
    "targets": {
        "events_per_cpu_s.zlib.null": ">= 25000",
        "ours_over_discordpy_raw.events_per_cpu_s.zlib": ">= 1.25",
        "ours_over_discordpy_raw.events_per_cpu_s.zstd": ">= 1.25",
        "ours_fraction_of_ceiling.events_per_cpu_s.zlib": ">= 0.7",
    },
    "verdicts": {
        "events_per_cpu_s.zlib.null": "PASS",
        "ours_over_discordpy_raw.events_per_cpu_s.zlib": "FAIL",
        "ours_over_discordpy_raw.events_per_cpu_s.zstd": "ERROR",
        "ours_fraction_of_ceiling.events_per_cpu_s.zlib": "FAIL",
    },
    "errors": {},
    "runs": {
        "idle": [
            {"client": client, "compression": "zlib", "shards": shards, "rss_kib": rss, "ready_after_s": 1.0}
            for client, shards, rss in (
                ("worker", 100, 60_000),
                ("worker", 1000, 103_000),
                ("discordpy", 100, 70_000),
                ("discordpy", 1000, 124_000),
            )
        ]
    },
}


def _variant(avoidable: float, utilization: float) -> dict[str, Any]:
    return {
        "avoidable_429_per_10k": avoidable,
        "first_contact_429": 0,
        "global_utilization": utilization,
        "hot_bucket_utilization": utilization,
    }


def _workloads(avoidable: int) -> dict[str, Any]:
    ledger = {
        "requests": 100,
        "successes": 90,
        "429_by_category": {"avoidable": avoidable, "first-contact": 0},
    }
    return {"workloads": {name: {"ledger": ledger} for name in ("hot", "zipf", "storm")}}


CANNED_RATELIMIT: dict[str, Any] = {
    "shm": {
        **_variant(0, 0.99),
        "acquire_p50_us": 12.0,
        "acquire_p99_us": 40.0,
        "loaded_acquire_p50_us": 30.0,
    },
    "redis": {**_variant(0, 0.98), "acquire_p50_us": 300.0, "acquire_p99_us": 900.0},
    "peer": {"discordpy": _variant(1068.0, 0.98), "hikari": _variant(330.0, 0.98)},
    "targets": {"shm.avoidable_429_per_10k": "<= 0"},
    "verdicts": {"shm.avoidable_429_per_10k": "PASS"},
    "errors": {},
    "runs": {"shm": _workloads(0), "peer.discordpy": _workloads(445), "peer.hikari": _workloads(163)},
}


def test_report_and_plots_of_the_peer_suites_from_canned_results(tmp_path: Path) -> None:
    results: dict[str, Any] = {
        "machine": {"cpu_model": "test", "cpu_count": 2},
        "settings": {"size": "quick"},
        "suites": {
            "gateway": {"status": "ok", "elapsed_s": 1.0, "error": None},
            "ratelimit": {"status": "ok", "elapsed_s": 1.0, "error": None},
        },
        "gateway": CANNED_GATEWAY,
        "ratelimit": CANNED_RATELIMIT,
    }
    drawn, skipped = plots.draw_all(results, tmp_path)
    names = {name for name, _ in drawn}
    assert {
        "gateway_throughput.png",
        "gateway_rss.png",
        "ratelimit_429s.png",
        "ratelimit_acquire.png",
    } <= names
    assert set(skipped) == {"startup.png", "proxy_latency.png", "scaling.png"}
    for name in names:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    text = report.render(results, drawn)
    rows = (
        "| events per CPU-second, zlib-stream, null sink (discord.py with models: what a bot pays) | 44,000 "
        "| 9,000 | 4.89 | >= 25000: PASS |",
        "| events per CPU-second, zlib-stream, null sink (discord.py on equal work) | 44,000 | 88,000 | 0.50 "
        "| >= 1.25: FAIL |",
        "| events per CPU-second, zstd-stream, null sink (discord.py on equal work) | 60,000 | - | - "
        "| >= 1.25: ERROR |",
        "220,000 events per CPU-second; ours is 0.2 of it (>= 0.7: FAIL).",
    )
    for row in rows:
        assert row in text
    assert "| figure | ours (shm) | ours (Redis) | discord.py | hikari | target |" in text
    assert "| avoidable_429_per_10k | 0 | 0 | 1,068 | 330 | <= 0 |" in text
    assert "| discord.py | hot | 100 | 90 | 445 | 0 | - | - |" in text
