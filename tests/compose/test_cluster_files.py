"""compose/cluster.yaml and compose/supervisor@.service: cluster mode's deployment (README, "Several hosts").

Each is checked as its one-node counterpart is (test_compose.py, test_systemd_unit.py), and against it: the
two compose nodes are the gateway service of compose.yaml on the host's network, differing only in their
name and metrics port; the template unit is supervisor.service directive for directive but for what makes
an instance a cluster node. test_cluster_nodes.py runs the two nodes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Final

import pytest

from benchmarks.simulator.app import SimulatorAddresses
from benchmarks.simulator.cli import build_parser as simulator_parser
from benchmarks.simulator.cli import config_from_args
from supervisor.config import load_settings
from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.settings import KNOWN_VARIABLES, MIN_LEASE_TTL_S

from .deployfiles import (
    CLUSTER_FILE,
    EXAMPLE_ENV,
    ROOT,
    TEMPLATE_UNIT_FILE,
    UNIT_FILE,
    compose_duration_s,
    load_compose,
    parse_dockerfile,
    parse_env_file,
    parse_unit,
    service_environment,
    unit_environment,
)
from .test_compose import READ_OUTSIDE_SETTINGS, schema_errors
from .test_systemd_unit import INSTALLED_PYTHON, MAX_EXPOSURE, systemd_analyze

#: The env files a user passes to Compose with cluster.yaml (compose/.env is shared with compose.yaml).
SCENARIOS: Final[dict[str, dict[str, str]]] = {"defaults": {}, "example.env": parse_env_file(EXAMPLE_ENV)}
NODES: Final = ("node-a", "node-b")
#: The variables that make two nodes of one cluster different nodes.
PER_NODE: Final = frozenset({"CLUSTER_NODE_ID", "PROMETHEUS_ADDRESS"})
#: How compose.yaml runs the gateway, which every node runs the same way.
AS_THE_GATEWAY: Final = (
    "image",
    "build",
    "secrets",
    "tmpfs",
    "shm_size",
    "stop_grace_period",
    "init",
    "read_only",
    "cap_drop",
    "security_opt",
    "restart",
)
#: Interpolated in cluster.yaml without being a setting: where the token file is (compose.yaml's too).
COMPOSE_ONLY_NAMES: Final = frozenset({"TOKEN_SECRET_FILE"})
#: The template installed under its own name, as supervisor.service is (compose/README.md).
TEMPLATE_NAME: Final = "trio-shard-gateway@.service"
INSTANCE_NAME: Final = "trio-shard-gateway@1.service"


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = SCENARIOS[request.param]
    return env


def nodes(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_compose(env, CLUSTER_FILE)["services"]
    return services


def node_environment(env: dict[str, str], node: str) -> dict[str, str]:
    return service_environment(nodes(env)[node])


def interpolated_names(value: Any) -> set[str]:
    """The variables named by `${NAME...}` in every string of a loaded (not interpolated) YAML tree."""
    if isinstance(value, dict):
        return set().union(*(interpolated_names(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(interpolated_names(item) for item in value))
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value)) if isinstance(value, str) else set()


def loopback_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1", f"{address}: the host's loopback (host networking publishes every port)"
    return int(port)


# -- compose/cluster.yaml ------------------------------------------------------------------------------------


def test_cluster_file_validates_against_the_compose_spec(scenario: dict[str, str]) -> None:
    assert schema_errors(load_compose(scenario, CLUSTER_FILE)) == []


def test_two_nodes_on_the_host_network_run_as_the_gateway_does() -> None:
    services = nodes({})
    gateway = load_compose({})["services"]["gateway"]
    assert tuple(services) == NODES
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        # Host networking: nothing to publish, no network of Compose's, no service names to wait for.
        assert {"ports", "networks", "depends_on", "hostname", "profiles"}.isdisjoint(service), name
        for key in AS_THE_GATEWAY:
            assert service[key] == gateway[key], f"{name}: {key} differs from compose.yaml's gateway"
    secret_file = load_compose({}, CLUSTER_FILE)["secrets"]["discord_token"]["file"]
    assert secret_file == load_compose({})["secrets"]["discord_token"]["file"]


def test_every_variable_given_to_a_node_is_one_it_reads(scenario: dict[str, str]) -> None:
    image = {name for name in parse_dockerfile()[-1].environment() if not name.startswith(("PATH", "PYTHON"))}
    for node in NODES:
        given = set(node_environment(scenario, node))
        assert (given | image) - KNOWN_VARIABLES - READ_OUTSIDE_SETTINGS == set(), node


def test_every_name_it_interpolates_is_a_setting() -> None:
    """So compose/.env (example.env's names) reaches every node, and nothing there is silently ignored."""
    names = interpolated_names(load_compose(None, CLUSTER_FILE))
    assert names, "cluster.yaml interpolates nothing"
    assert names - KNOWN_VARIABLES - COMPOSE_ONLY_NAMES == set()


def test_the_nodes_differ_only_in_name_and_metrics_port(scenario: dict[str, str]) -> None:
    envs = {node: node_environment(scenario, node) for node in NODES}
    shared = [{key: value for key, value in env.items() if key not in PER_NODE} for env in envs.values()]
    assert all(env == shared[0] for env in shared)
    for key in PER_NODE:
        values = [env[key] for env in envs.values()]
        assert len(set(values)) == len(values), f"{key} must differ between nodes"
    ports = [loopback_port(env["PROMETHEUS_ADDRESS"]) for env in envs.values()]
    assert len(set(ports)) == len(ports)


def test_the_configured_values_make_one_cluster(scenario: dict[str, str]) -> None:
    for node in NODES:
        env = node_environment(scenario, node)
        assert "DISCORD_SHARD_IDS" not in env, "the cluster decides which shards a node runs (exit 2)"
        loaded = load_settings([], {key: value for key, value in env.items() if key != "DISCORD_TOKEN_FILE"})
        settings = loaded.settings
        assert settings.cluster_mode == "redis"
        assert settings.shard_store_type == "redis"
        assert settings.shard_ids is None
        assert settings.cluster_node_id == node
        assert settings.cluster_lease_ttl_s >= MIN_LEASE_TTL_S
        # Several hosts share Discord's REST limits through Redis; shm would be one budget per node.
        assert settings.ratelimit_backend == "redis"


def test_the_nodes_reach_redis_and_rabbitmq_through_the_host() -> None:
    env = node_environment({}, NODES[0])
    for key in ("REDIS_URL", "AMQP_URL"):
        host = urllib.parse.urlsplit(env[key]).hostname
        assert host == "127.0.0.1", f"{key}: no Compose service name resolves on the host network"


def test_stop_grace_period_outlasts_the_hand_over_deadline(scenario: dict[str, str]) -> None:
    for node, service in load_compose(scenario, CLUSTER_FILE)["services"].items():
        grace_s = compose_duration_s(service["stop_grace_period"])
        env = node_environment(scenario, node)
        drain = load_settings([], {"SHUTDOWN_TIMEOUT": env["SHUTDOWN_TIMEOUT"]}).settings.shutdown_timeout_s
        assert grace_s >= drain + 10


def test_the_metrics_directory_is_on_a_tmpfs() -> None:
    for service in nodes({}).values():
        mounts = [entry.split(":", 1)[0] for entry in service["tmpfs"]]
        directory = Path(service_environment(service)[MULTIPROC_DIR_ENV])
        assert any(directory.is_relative_to(mount) for mount in mounts)


# -- compose/supervisor@.service -----------------------------------------------------------------------------


def as_instance_of_the_unit() -> dict[str, dict[str, list[str]]]:
    """supervisor.service with the changes that make it a cluster node's template, and nothing else."""
    unit = parse_unit(UNIT_FILE)
    service = unit["Service"]
    runtime = service["RuntimeDirectory"][0]
    unit["Unit"]["Description"] = [
        value.replace("trio-shard-gateway:", "trio-shard-gateway cluster node %i:")
        for value in unit["Unit"]["Description"]
    ]
    service["Environment"] = [
        value.replace(f"=%t/{runtime}", f"=%t/{runtime}-%i") for value in service["Environment"]
    ] + ["CLUSTER_MODE=redis", "CLUSTER_NODE_ID=%H-%i"]
    service["EnvironmentFile"] = [*service["EnvironmentFile"], "-/etc/trio-shard-gateway/%i.env"]
    service["RuntimeDirectory"] = [f"{runtime}-%i"]
    service["SyslogIdentifier"] = [f"{value}-%i" for value in service["SyslogIdentifier"]]
    return unit


def test_the_template_is_the_unit_but_for_the_instance() -> None:
    """Hardening, restarts, stop and reload, the token: every directive is supervisor.service's."""
    template = parse_unit(TEMPLATE_UNIT_FILE)
    expected = as_instance_of_the_unit()
    assert template.keys() == expected.keys()
    for section, directives in expected.items():
        # Environment= lines may come in another order; the rest is compared in order.
        mine = dict(template[section])
        assert sorted(mine.pop("Environment", [])) == sorted(directives.get("Environment", [])), section
        assert mine == {key: value for key, value in directives.items() if key != "Environment"}, section


def test_an_instance_is_a_cluster_node_with_a_name_of_its_own() -> None:
    service = parse_unit(TEMPLATE_UNIT_FILE)["Service"]
    env = unit_environment(service)
    assert set(env) - KNOWN_VARIABLES == set()
    assert env["CLUSTER_MODE"] == "redis"
    # %H: the host name, %i: the instance; unique across hosts and instances.
    assert "%i" in env["CLUSTER_NODE_ID"] and "%H" in env["CLUSTER_NODE_ID"]
    assert "DISCORD_SHARD_IDS" not in env and "SHARD_STORE_TYPE" not in env
    # The shared settings first, then the instance's own (a later EnvironmentFile= wins; both outrank
    # Environment=, so the instance's file may rename the node); both optional.
    shared, own = service["EnvironmentFile"]
    assert shared == "-/etc/trio-shard-gateway/env" and own == "-/etc/trio-shard-gateway/%i.env"
    # Instances on one host need runtime directories of their own (the metrics, the ratelimit segment).
    (runtime,) = service["RuntimeDirectory"]
    assert "%i" in runtime and env["RATELIMIT_SHM_DIR"] == f"%t/{runtime}"
    node_id = env["CLUSTER_NODE_ID"].replace("%H", "host").replace("%i", "1")
    loaded = load_settings([], {"CLUSTER_MODE": env["CLUSTER_MODE"], "CLUSTER_NODE_ID": node_id})
    assert loaded.settings.cluster_node_id == "host-1"


@pytest.fixture
def template_copy(tmp_path: Path) -> Path:
    text = TEMPLATE_UNIT_FILE.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_PYTHON} " in text
    copy = tmp_path / TEMPLATE_NAME
    copy.write_text(text.replace(f"ExecStart={INSTALLED_PYTHON} ", f"ExecStart={sys.executable} "))
    return copy


def test_systemd_analyze_verify_accepts_an_instance(template_copy: Path) -> None:
    completed = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", f"./{INSTANCE_NAME}"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=template_copy.parent,
    )
    assert (completed.returncode, completed.stdout + completed.stderr) == (0, "")


def test_an_instance_keeps_exposure_low(template_copy: Path) -> None:
    completed = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            f"./{INSTANCE_NAME}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=template_copy.parent,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr


# -- README.md, "Several hosts" ------------------------------------------------------------------------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Several hosts\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_section_names_the_files_and_every_cluster_metric() -> None:
    section = readme_section()
    for path in (CLUSTER_FILE, TEMPLATE_UNIT_FILE):
        assert f"`compose/{path.name}`" in section
    metric_defs = (ROOT / "workers" / "metric_defs.py").read_text(encoding="utf-8")
    names = re.findall(r'"(discord_cluster_[a-z_]+)"', metric_defs)
    assert names, "workers/metric_defs.py defines no cluster metric"
    assert [name for name in names if f"`{name}" not in section] == []


def test_the_readme_demo_starts_a_cluster_against_its_simulator() -> None:
    """The README's "Try it on one machine": the simulator's command parses, and each node's settings load
    as a node of one cluster pointed at that simulator, with its own name and metrics port."""
    blocks = [
        block.replace("\\\n", " ") for block in re.findall(r"```\n(.*?)```", readme_section(), flags=re.S)
    ]
    simulator_line = next(
        line for block in blocks for line in block.splitlines() if "benchmarks.simulator" in line
    )
    words = shlex.split(simulator_line.partition("&")[0])
    assert words[:3] == [".venv/bin/python", "-m", "benchmarks.simulator"]
    config = config_from_args(
        simulator_parser().parse_args([word for word in words[3:] if word != ">/dev/null"])
    )
    assert config.accept_any_token
    rest_url = SimulatorAddresses(config.host, config.rest_port, 0, 0).rest_url
    seen: dict[str, int] = {}
    for block in (block for block in blocks if block.startswith("export ")):
        export, command = block.strip().splitlines()
        env = dict(word.split("=", 1) for word in shlex.split(export)[1:])
        words = shlex.split(command)
        env |= dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))
        argv = words[words.index("supervisor") + 1 :]
        assert set(env) - KNOWN_VARIABLES == set()
        settings = load_settings(argv, env).settings
        assert settings.cluster_mode == "redis" and settings.api_url == rest_url
        assert settings.cluster_node_id is not None and settings.cluster_node_id not in seen
        seen[settings.cluster_node_id] = loopback_port(f"127.0.0.1:{env['PROMETHEUS_ADDRESS']}")
    assert len(seen) == 2 and len(set(seen.values())) == 2
