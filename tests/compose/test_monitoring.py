"""The Prometheus alert rules (compose/prometheus/alerts.yaml) and the Grafana dashboard
(compose/grafana/trio-shard-gateway.json): well formed, checked by `promtool check rules` where promtool is
installed (Debian's `prometheus` package ships it; `PROMTOOL` may name it), and every metric they use is one
a running supervisor serves on /metrics (a real supervisor, two workers, the REST proxy and the simulator).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Final

import httpx
import orjson
import pytest
import trio
import yaml

from benchmarks.children import free_port, worker_env
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, SimulatorConfig, open_simulator
from tests.supervisor_process import running_supervisor, stop_gracefully, wait_ready

ROOT: Final = Path(__file__).resolve().parents[2]
RULES: Final = ROOT / "compose" / "prometheus" / "alerts.yaml"
DASHBOARD: Final = ROOT / "compose" / "grafana" / "trio-shard-gateway.json"
SEVERITIES: Final = {"warning", "critical"}
DURATION: Final = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
METRIC: Final = re.compile(r"\b(discord_[a-z0-9_]+)")
TIMEOUT_S: Final = 90


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict) and set(document) == {"groups"}
    found = []
    for group in document["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["name"] and group["rules"]
        found += group["rules"]
    return found


def dashboard_exprs() -> list[str]:
    document = orjson.loads(DASHBOARD.read_bytes())
    exprs = []
    for panel in document["panels"]:
        assert panel["targets"], panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The `discord_*` series an expression selects (PromQL functions and labels never start so)."""
    return set(METRIC.findall(expr))


def test_the_alert_rules_are_well_formed() -> None:
    alerts = rules()
    names = Counter(rule["alert"] for rule in alerts)
    assert not [name for name, count in names.items() if count > 1], names
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        assert _balanced(rule["expr"]), rule["alert"]
        assert metric_names(rule["expr"]) or "up{" in rule["expr"], rule["alert"]


def test_the_alerts_cover_what_an_operator_must_know() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert {
        "discord_shard_state",  # shards not ready
        "discord_worker_restarts_total",  # crash loop
        "discord_identify_budget_remaining",  # identify budget low
        "discord_publish_confirm_lag_seconds_bucket",  # publish confirm lag
        "discord_events_published_total",  # the broker down (nothing confirmed)
        "discord_rest_ratelimit_fallback",  # Redis down
        "discord_rest_outcomes_total",  # 429s
    } <= used


def test_the_dashboard_is_well_formed() -> None:
    document = orjson.loads(DASHBOARD.read_bytes())
    assert document["uid"] and document["title"] and document["schemaVersion"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in document["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        for target in panel["targets"]:
            assert _balanced(target["expr"]) and metric_names(target["expr"]), panel["title"]


def test_promtool_checks_the_rules() -> None:
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian: the prometheus package; or set PROMTOOL)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


async def test_every_metric_they_use_is_served_by_a_running_supervisor(tmp_path: Path) -> None:
    used = set().union(
        *(metric_names(rule["expr"]) for rule in rules()), *map(metric_names, dashboard_exprs())
    )
    config = SimulatorConfig(
        gateway=GatewayConfig(
            shard_count=2, max_concurrency=2, guilds_per_shard=1, event_rate=20, heartbeat_interval_ms=500
        )
    )
    log = tmp_path / "supervisor.log"
    port, proxy_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with trio.fail_after(TIMEOUT_S), open(log, "wb") as log_file:
        async with open_simulator(config) as sim:
            env = worker_env(
                sim.addresses.rest_url,
                BROKER_TYPE="stdio",
                PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
                PROXY_HTTP_ADDRESS=f"127.0.0.1:{proxy_port}",
                RATELIMIT_SHM_DIR=str(tmp_path),
            )
            async with running_supervisor(env, "--workers", "2", log=log_file) as process:
                await wait_ready(base)
                headers = {"Authorization": f"Bot {DEFAULT_TOKEN}"}
                proxy = f"http://127.0.0.1:{proxy_port}/api/v10"
                async with httpx.AsyncClient(base_url=proxy, headers=headers, timeout=20) as client:
                    assert (await client.get("/users/@me")).status_code == 200  # REST metrics get labels
                missing = used
                with trio.move_on_after(30):  # workers feed their figures once a second
                    while missing:
                        async with httpx.AsyncClient() as http:
                            served = _sample_names((await http.get(base + "/metrics")).text)
                        missing = used - served
                        await trio.sleep(0.2)
                assert not missing, f"not on /metrics: {sorted(missing)}"
                await stop_gracefully(process)
    assert process.returncode == 0, log.read_text()[-3000:]


def _sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


def _balanced(expr: str) -> bool:
    depth: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    quoted = False
    for char in expr:
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([{":
            depth.append(char)
        elif char in pairs and (not depth or depth.pop() != pairs[char]):
            return False
    return not depth and not quoted
