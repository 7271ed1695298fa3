"""Honest verdicts: a target whose figure was attempted but not measured is ERROR, a deliberate subset run
judges only what it tried, a suite that failed outright counts an ERROR per target in `benchmarks all`,
`--strict` turns FAIL and ERROR into exit status 3, and the scaling target is SKIP (not PASS) where it
cannot mean anything. Pure: no suite runs here (the `all --strict` CLI runs on canned suite results).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import all as bench_all
from benchmarks import cluster, gateway, proxy, ratelimit, report, scaling, startup
from benchmarks.__main__ import main
from benchmarks.ratelimit import figures as rl_figures
from benchmarks.ratelimit.settings import SETTINGS as RL_SETTINGS
from benchmarks.ratelimit.settings import TARGETS as RL_TARGETS
from benchmarks.ratelimit.settings import attempted_figures
from benchmarks.ratelimit.suite import WORKLOAD_CHOICES
from benchmarks.ratelimit.workloads import (
    HOT_CHANNEL,
    INTERACTION_FIRST_ID,
    ZIPF_FIRST_CHANNEL,
    EngineSpec,
    HotPlan,
    Plan,
    ZipfPlan,
)
from benchmarks.targets import (
    STRICT_EXIT_STATUS,
    Target,
    count_verdicts,
    format_figures,
    strict_status,
    verdict_summary,
    verdicts,
    with_missing,
)

# --- a missing attempted figure is ERROR; a subset run judges only what it tried ------------------


def test_a_failed_variant_is_an_error_for_each_of_its_targets() -> None:
    settings = RL_SETTINGS["smoke"]
    attempted = attempted_figures(settings, ("shm", "redis"), (), WORKLOAD_CHOICES, capacity=True)
    # The redis variant's runs raised: only shm's figures came back.
    came_back: dict[str, float | None] = {key: 0.0 for key in attempted if key.startswith("shm.")}
    judged = verdicts(with_missing(came_back, attempted), RL_TARGETS)
    redis_targets = {key for key in RL_TARGETS if key.startswith("redis.")}
    assert redis_targets and {key: judged[key] for key in redis_targets} == dict.fromkeys(
        redis_targets, "ERROR"
    )
    assert {key for key in judged if key.startswith("shm.")} == {
        key for key in RL_TARGETS if key.startswith("shm.")
    }
    # Without the attempted keys the failure would vanish from the count: the bug this guards against.
    assert not any(key.startswith("redis.") for key in verdicts(came_back, RL_TARGETS))


def test_a_subset_run_has_no_verdict_on_what_it_did_not_try() -> None:
    settings = RL_SETTINGS["smoke"]
    attempted = attempted_figures(settings, ("shm",), (), ("hot",), capacity=False)
    judged = verdicts(with_missing({}, attempted), RL_TARGETS)
    assert judged == {
        "shm.avoidable_429_per_10k": "ERROR",
        "shm.first_contact_429": "ERROR",
        "shm.hot_bucket_utilization": "ERROR",
    }


def test_ratelimit_default_options_attempt_every_target() -> None:
    for size in ("smoke", "quick", "full"):
        assert set(ratelimit.target_keys(size)) == set(RL_TARGETS)


def _tally(latency_s: float) -> dict[str, Any]:
    return {
        "scheduled": 1,
        "shed": 0,
        "completed": 1,
        "cancelled": 0,
        "statuses": {"200": 1},
        "errors": {},
        "latencies_s": [latency_s],
    }


def test_attempted_http_figures_are_what_analyse_http_produces() -> None:
    """The names `attempted_figures` lists for an engine variant's HTTP workloads are the ones the analysis
    writes (plus `bans`, added by measure_http), so a successful run never shows a phantom ERROR."""
    settings = RL_SETTINGS["smoke"]
    plan = Plan(
        rest_url="",
        processes=1,
        seed=1,
        engine=EngineSpec("shm", settings.global_rate),
        hot=HotPlan(0.5, settings.hot_s, 10.0, 4),
        zipf=ZipfPlan(3.0, settings.zipf_s, 100, 1.0, 20.0, 4, 2.0),
    )
    message = rl_figures.MESSAGE_ROUTE
    records = [
        {
            "arrival": 1.0 + i / 10,
            "template": message,
            "major": str(HOT_CHANNEL),
            "status": 200,
            "category": None,
        }
        for i in range(5)
    ]
    records += [
        {"arrival": 3.0 + i / 10, "template": message, "major": str(ZIPF_FIRST_CHANNEL + 1), "status": 200}
        for i in range(20)
    ]
    records.append(
        {
            "arrival": 3.5,
            "template": rl_figures.INTERACTION_ROUTE,
            "major": str(INTERACTION_FIRST_ID),
            "status": 204,
        }
    )
    report_ = {
        "workloads": {name: _tally(0.01) for name in ("hot", "zipf", "interactions", "storm")},
        "interaction_waits_s": [0.0001],
        "engine": {"fallback_grants": 0},
    }
    run = rl_figures.analyse_http(settings, plan, {"requests": records, "requests_dropped": 0}, [report_])
    produced = {f"shm.{key}" for key in [*run.figures, "bans"]}
    assert produced == set(
        attempted_figures(settings, ("shm",), (), ("hot", "zipf", "storm"), capacity=False)
    )


def test_gateway_attempts_the_ratio_only_with_both_sides() -> None:
    assert gateway.RATIO_KEY in gateway.attempted_keys(())
    only_ours = gateway.attempted_keys(("events_per_cpu_s",))
    assert gateway.RATIO_KEY not in only_ours and "rss_kib_per_idle_shard.zlib" not in only_ours
    # The peer was chosen but its run failed: the ratio is attempted and unmeasured, so ERROR.
    only = ("events_per_cpu_s.zlib.null", "peer.discordpy.events_per_cpu_s")
    figures = gateway.with_ratios(
        {"events_per_cpu_s.zlib.null": 30_000.0, "peer.discordpy.events_per_cpu_s.zlib": None}
    )
    judged = verdicts(with_missing(figures, gateway.attempted_keys(only)), gateway.TARGETS)
    assert judged == {"events_per_cpu_s.zlib.null": "PASS", gateway.RATIO_KEY: "ERROR"}
    # A throughput run that never returned (no key at all) is ERROR too.
    judged = verdicts(
        with_missing({}, gateway.attempted_keys(("events_per_cpu_s.zlib.amqp",))), gateway.TARGETS
    )
    assert judged == {"events_per_cpu_s.zlib.amqp": "ERROR"}


def test_gateway_judges_equal_work_and_the_ceiling_and_errors_what_is_missing() -> None:
    raw_zlib, raw_zstd = gateway.RAW_RATIO_KEYS["zlib"], gateway.RAW_RATIO_KEYS["zstd"]
    new_targets = {raw_zlib: ">= 1.25", raw_zstd: ">= 1.25", gateway.CEILING_FRACTION_KEY: ">= 0.7"}
    assert {key: str(gateway.TARGETS[key]) for key in new_targets} == new_targets
    assert set(new_targets) <= set(gateway.target_keys("quick"))
    measured = {
        "events_per_cpu_s.zlib.null": 50_000.0,
        "events_per_cpu_s.zstd.null": 45_000.0,
        "peer.discordpy_raw.events_per_cpu_s.zlib": 40_000.0,
        "peer.discordpy_raw.events_per_cpu_s.zstd": 50_000.0,
        gateway.CEILING_KEY: 100_000.0,
    }
    figures = gateway.with_ratios(measured)
    assert (figures[raw_zlib], figures[raw_zstd], figures[gateway.CEILING_FRACTION_KEY]) == (1.25, 0.9, 0.5)
    judged = verdicts(figures, gateway.TARGETS)
    assert (judged[raw_zlib], judged[raw_zstd], judged[gateway.CEILING_FRACTION_KEY]) == (
        "PASS",
        "FAIL",
        "FAIL",
    )
    # The zstd peer run and the ceiling failed (no key came back): their figures and ratios are ERROR.
    failed = dict(measured)
    del failed["peer.discordpy_raw.events_per_cpu_s.zstd"], failed[gateway.CEILING_KEY]
    judged = verdicts(with_missing(gateway.with_ratios(failed), gateway.attempted_keys(())), gateway.TARGETS)
    assert judged[raw_zlib] == "PASS"
    assert judged[raw_zstd] == judged[gateway.CEILING_FRACTION_KEY] == "ERROR"
    # A subset without our side attempts no ratio.
    assert gateway.attempted_keys(("peer.discordpy_raw", "ceiling")) == [
        "peer.discordpy_raw.events_per_cpu_s.zlib",
        "peer.discordpy_raw.events_per_cpu_s.zstd",
        gateway.CEILING_KEY,
    ]


def test_proxy_judges_every_chosen_path_and_only_those() -> None:
    assert verdicts(proxy.figures_of(None, amqp=True), proxy.TARGETS) == dict.fromkeys(proxy.TARGETS, "ERROR")
    figures = proxy.figures_of(None, amqp=False)
    assert verdicts(figures, proxy.TARGETS) == {"proxy.http.added_p50_ms": "ERROR"}
    assert "proxy.http.worker_cpu_share" in figures and figures["proxy.http.worker_cpu_share"] is None
    assert not any(key.startswith("proxy.amqp.") for key in figures)


def test_startup_targets_are_computable_and_a_failed_configuration_is_an_error() -> None:
    for size, settings in startup.SETTINGS.items():
        assert startup.target_keys(size) == tuple(startup.targets_for(settings))
    settings = startup.SETTINGS["quick"]
    judged = verdicts(startup.figures_of(settings, {}), startup.targets_for(settings))
    assert judged == dict.fromkeys(startup.target_keys("quick"), "ERROR")
    assert "startup.shards16_mc4.spread_over_bound" in judged


def test_cluster_judges_every_target_even_without_a_sample() -> None:
    judged = verdicts(cluster.figures_of(cluster.SETTINGS["smoke"], [], None), cluster.targets_for())
    assert judged == dict.fromkeys(cluster.target_keys("smoke"), "ERROR")


# --- benchmarks all: a failed suite counts an ERROR per target --------------------------------------


def _outcome(name: str, status: str = "ok", error: str | None = None) -> bench_all.SuiteOutcome:
    return bench_all.SuiteOutcome(name, status, 0 if status == "ok" else None, 1.0, error)


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps({"suite": name, "machine": {}, **data}))


PROXY_RESULTS: dict[str, Any] = {
    "proxy": {"http": {"added_p50_ms": 0.5}, "amqp": {"added_p50_ms": 4.0}},
    "targets": {"proxy.http.added_p50_ms": "<= 1", "proxy.amqp.added_p50_ms": "<= 3"},
    "verdicts": {"proxy.http.added_p50_ms": "PASS", "proxy.amqp.added_p50_ms": "FAIL"},
    "errors": {},
}


def test_a_failed_suite_contributes_an_error_for_each_of_its_targets(tmp_path: Path) -> None:
    _write(tmp_path, "proxy", PROXY_RESULTS)
    outcomes = [
        _outcome("proxy"),
        _outcome("cluster", "failed", "timed out after 2 s"),  # no cluster.json
        _outcome("startup"),  # exited 0 but its results file is missing
    ]
    results = bench_all.build_results(tmp_path, outcomes, {"cpu_count": 2}, "quick", 3.0)
    judged = results["verdicts"]
    assert judged["proxy.http.added_p50_ms"] == "PASS" and judged["proxy.amqp.added_p50_ms"] == "FAIL"
    for key in cluster.target_keys("quick"):
        assert judged[key] == "ERROR"
        assert results["verdict_notes"][key] == "the cluster suite failed: timed out after 2 s"
    assert results["suites"]["startup"]["status"] == "failed"
    startup_keys = startup.target_keys("quick")
    assert len(startup_keys) == 6 and all(judged[key] == "ERROR" for key in startup_keys)
    assert count_verdicts(judged) == {"PASS": 1, "FAIL": 1, "ERROR": 9, "SKIP": 0}
    text = report.render(results, [])
    assert "| cluster | failed | 1 | 0 pass, 0 fail, 3 error, 0 skip |" in text
    assert "| proxy | ok | 1 | 1 pass, 1 fail, 0 error, 0 skip |" in text
    assert "- `cluster.failover_s`: ERROR (the cluster suite failed: timed out after 2 s)" in text


def test_a_suite_missing_one_of_its_targets_is_an_error_for_that_one(tmp_path: Path) -> None:
    partial = {**PROXY_RESULTS, "verdicts": {"proxy.http.added_p50_ms": "PASS"}}
    _write(tmp_path, "proxy", partial)
    results = bench_all.build_results(tmp_path, [_outcome("proxy")], {}, "smoke", 1.0)
    assert results["verdicts"] == {"proxy.http.added_p50_ms": "PASS", "proxy.amqp.added_p50_ms": "ERROR"}
    assert "no verdict" in results["verdict_notes"]["proxy.amqp.added_p50_ms"]


# --- --strict -------------------------------------------------------------------------------------


def test_strict_status_fails_on_fail_or_error_only() -> None:
    assert strict_status(0, {"a": "PASS", "b": "PASS"}, strict=True) == 0
    assert strict_status(0, {"a": "PASS", "b": "SKIP"}, strict=True) == 0
    assert strict_status(0, {"a": "PASS", "b": "FAIL"}, strict=True) == STRICT_EXIT_STATUS == 3
    assert strict_status(0, {"a": "ERROR"}, strict=True) == 3
    assert strict_status(0, {"a": "FAIL", "b": "ERROR"}, strict=False) == 0
    assert strict_status(1, {"a": "FAIL"}, strict=True) == 1  # the run itself failed: that stays 1
    assert strict_status(1, {"a": "PASS"}, strict=False) == 1


def test_all_exit_status_and_summary() -> None:
    ok = {"suites": {"proxy": {"status": "ok"}}, "verdicts": {"proxy.a": "PASS", "scaling.b": "SKIP"}}
    assert bench_all.exit_status(ok, strict=True) == 0
    failing = {**ok, "verdicts": {"proxy.a": "FAIL", "proxy.b": "ERROR", "proxy.c": "PASS"}}
    assert bench_all.exit_status(failing, strict=True) == 3
    assert bench_all.exit_status(failing, strict=False) == 0
    crashed = {"suites": {"proxy": {"status": "failed"}}, "verdicts": {"proxy.a": "ERROR"}}
    assert bench_all.exit_status(crashed, strict=True) == bench_all.exit_status(crashed, strict=False) == 1
    assert verdict_summary(failing["verdicts"]) == (
        "targets: 1 PASS, 1 FAIL, 1 ERROR, 0 SKIP; FAIL: proxy.a; ERROR: proxy.b"
    )


def _fake_run_all(verdicts_by_key: dict[str, str]) -> Any:
    async def fake(names: list[str], size: str, out_dir: Path, timeout_s: float, progress: Any) -> Any:
        assert names == ["proxy"]
        _write(out_dir, "proxy", {**PROXY_RESULTS, "verdicts": verdicts_by_key})
        return [_outcome("proxy")]

    return fake


@pytest.mark.parametrize(
    ("amqp_verdict", "strict", "expected"),
    [("FAIL", True, 3), ("ERROR", True, 3), ("PASS", True, 0), ("FAIL", False, 0)],
)
def test_all_strict_cli_on_a_fake_suite(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    amqp_verdict: str,
    strict: bool,
    expected: int,
) -> None:
    fake_verdicts = {"proxy.http.added_p50_ms": "PASS", "proxy.amqp.added_p50_ms": amqp_verdict}
    monkeypatch.setattr(bench_all, "run_all", _fake_run_all(fake_verdicts))
    monkeypatch.setattr("benchmarks.plots.draw_all", lambda results, out_dir: ([], {}))
    argv = ["all", "--smoke", "--suites", "proxy", "--out", str(tmp_path), *(["--strict"] if strict else [])]
    assert main(argv) == expected
    summary = f"targets: {2 if amqp_verdict == 'PASS' else 1} PASS"
    assert summary in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdicts"] == fake_verdicts


def test_strict_is_in_every_suites_help(capsys: pytest.CaptureFixture[str]) -> None:
    for suite in ("all", "gateway", "startup", "ratelimit", "proxy", "scaling", "cluster"):
        with pytest.raises(SystemExit):
            main([suite, "--help"])
        text = capsys.readouterr().out
        assert "--strict" in text and "exit with status 3" in text, suite


# --- scaling: judged only where it can fail --------------------------------------------------------


def _scaling_figures(efficiency: float | None, largest: int | None) -> dict[str, float | None]:
    return {"scaling.efficiency_unshared": efficiency, "scaling.largest_unshared_workers": largest}


def test_scaling_on_two_cpus_is_skipped_not_passed() -> None:
    counts = scaling.worker_counts(2)
    judged, notes = scaling.judge(_scaling_figures(1.0, 1), cpus=2, counts=counts)
    assert judged == {"scaling.efficiency_unshared": "SKIP"}
    assert notes["scaling.efficiency_unshared"] == "judged only on a machine with >= 4 CPUs; this one has 2"
    assert count_verdicts(judged)["PASS"] == 0
    assert strict_status(0, judged, strict=True) == 0
    table = format_figures(_scaling_figures(1.0, 1), scaling.TARGETS, {}, judged, notes)
    assert "SKIP scaling.efficiency_unshared: judged only on a machine with >= 4 CPUs" in table


def test_scaling_on_sixteen_cpus_is_judged() -> None:
    counts = scaling.worker_counts(16)
    assert counts == [1, 2, 4, 8, 16]
    assert scaling.judge(_scaling_figures(0.9, 8), 16, counts) == (
        {"scaling.efficiency_unshared": "PASS"},
        {},
    )
    assert scaling.judge(_scaling_figures(0.5, 8), 16, counts) == (
        {"scaling.efficiency_unshared": "FAIL"},
        {},
    )
    assert scaling.judge(_scaling_figures(None, None), 16, counts)[0] == {
        "scaling.efficiency_unshared": "ERROR"
    }
    # Only the 1-worker point came back: its 1.0 says nothing, so ERROR, not PASS.
    judged, notes = scaling.judge(_scaling_figures(1.0, 1), 16, counts)
    assert (
        judged == {"scaling.efficiency_unshared": "ERROR"}
        and "2 or more workers" in notes["scaling.efficiency_unshared"]
    )


def test_scaling_with_too_few_worker_counts_is_skipped() -> None:
    judged, notes = scaling.judge(_scaling_figures(0.95, 2), 16, scaling.worker_counts(2))  # the smoke size
    assert judged == {"scaling.efficiency_unshared": "SKIP"}
    assert "worker counts above 1" in notes["scaling.efficiency_unshared"]
    assert scaling.judge(_scaling_figures(0.9, 2), 4, scaling.worker_counts(4))[0] == {
        "scaling.efficiency_unshared": "PASS"
    }


def test_report_says_why_scaling_was_not_judged() -> None:
    suite = {
        "events_per_s": {"w1": 1000, "w2": 1900},
        "max_workers": 2,
        "efficiency_unshared": 1.0,
        "largest_unshared_workers": 1,
        "targets": {"scaling.efficiency_unshared": str(Target(">=", 0.8))},
        "verdicts": {"scaling.efficiency_unshared": "SKIP"},
        "verdict_notes": {
            "scaling.efficiency_unshared": "judged only on a machine with >= 4 CPUs; this one has 2"
        },
    }
    results = {
        "suites": {"scaling": {"status": "ok", "elapsed_s": 1.0}},
        "scaling": suite,
        "verdicts": {"scaling.efficiency_unshared": "SKIP"},
        "verdict_notes": suite["verdict_notes"],
    }
    text = report.render(results, [])
    assert "| scaling | ok | 1 | 0 pass, 0 fail, 0 error, 1 skip |" in text
    assert (
        "- `scaling.efficiency_unshared`: SKIP (judged only on a machine with >= 4 CPUs; this one has 2)"
        in text
    )
    assert "Target `efficiency_unshared` >= 0.8: SKIP (judged only on a machine with >= 4 CPUs" in text
