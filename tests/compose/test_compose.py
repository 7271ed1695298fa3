"""compose/compose.yaml: valid Compose, and wired to what the gateway reads.

No Docker engine runs here, so the file is checked the way Compose would load it: interpolated with each env
file we ship (none, example.env, bench.env), then validated against the Compose Specification's JSON schema,
vendored beside this file as `compose-spec.schema.json` (compose-spec/compose-spec `schema/compose-spec.json`
at commit 170098b, June 2026, Apache License 2.0; the same file as ../shared/data/compose-spec.schema.json,
copied so that the test runs from a clean checkout). test_bench_profile.py runs the configuration itself.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest

from benchmarks.simulator.app import SimulatorAddresses
from benchmarks.simulator.cli import build_parser as simulator_parser
from benchmarks.simulator.cli import config_from_args
from supervisor.config import load_settings
from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.settings import KNOWN_VARIABLES

from .deployfiles import (
    BENCH_ENV,
    COMPOSE_DIR,
    EXAMPLE_ENV,
    ROOT,
    compose_duration_s,
    dockerignore_patterns,
    dockerignored,
    load_compose,
    parse_dockerfile,
    parse_env_file,
    service_environment,
)

SCHEMA: Final = Path(__file__).with_name("compose-spec.schema.json")
#: The env files a user passes to Compose (`--env-file`), by name; "defaults" is none at all.
SCENARIOS: Final[dict[str, dict[str, str]]] = {
    "defaults": {},
    "example.env": parse_env_file(EXAMPLE_ENV),
    "bench.env": parse_env_file(BENCH_ENV),
}
#: The service variables of the Spectacles compose file (spectacles/gateway and spectacles/proxy, as in
#: anchors/spectacles.md and the guide's naval-base file) that we read too. Its DISCORD_TOKEN arrives here as
#: DISCORD_TOKEN_FILE; RUST_LOG is the Rust proxy's own and has no meaning to us.
SPECTACLES_VARIABLES: Final = frozenset(
    {
        "DISCORD_EVENTS",
        "BROKER_TYPE",
        "BROKER_GROUP",
        "BROKER_MESSAGE_TIMEOUT",
        "PROMETHEUS_ADDRESS",
        "PROMETHEUS_ENDPOINT",
        "AMQP_URL",
        "SHARD_STORE_TYPE",
        "SHARD_STORE_PREFIX",
        "REDIS_URL",
        "REDIS_POOL_SIZE",
        "TIMEOUT",
        "AMQP_GROUP",
        "AMQP_EVENT",
    }
)
#: Read by the service outside its settings table: prometheus_client's directory (supervisor/app.py).
READ_OUTSIDE_SETTINGS: Final = frozenset({MULTIPROC_DIR_ENV})
SECRET_TARGET: Final = "/run/secrets/discord_token"


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    # The schema says draft-07 (with a `$schema` URL jsonschema does not recognise, so name the class).
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(document: Mapping[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator().iter_errors(document)
    ]


def gateway_environment(env: Mapping[str, str]) -> dict[str, str]:
    return service_environment(load_compose(env)["services"]["gateway"])


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = SCENARIOS[request.param]
    return env


def test_compose_file_validates_against_the_compose_spec(scenario: dict[str, str]) -> None:
    assert schema_errors(load_compose(scenario)) == []


def test_the_schema_check_sees_mistakes() -> None:
    document = load_compose({})
    broken = copy.deepcopy(document)
    broken["services"]["gateway"]["stop_grace_periode"] = "40s"
    broken["services"]["redis"]["healthcheck"]["interval"] = ["10s"]
    errors = schema_errors(broken)
    assert any("stop_grace_periode" in error for error in errors)
    assert any(error.startswith("services/redis/healthcheck/interval") for error in errors)


def test_no_obsolete_version_key() -> None:
    assert "version" not in load_compose(None)


def test_every_variable_given_to_the_gateway_is_one_it_reads(scenario: dict[str, str]) -> None:
    given = set(gateway_environment(scenario))
    image = {name for name in parse_dockerfile()[-1].environment() if not name.startswith(("PATH", "PYTHON"))}
    assert given | image, "no environment at all"
    assert (given | image) - KNOWN_VARIABLES - READ_OUTSIDE_SETTINGS == set()


def test_every_env_file_variable_is_used_by_compose_yaml() -> None:
    """A name in example.env or bench.env that compose.yaml never interpolates would be silently ignored."""
    text = (COMPOSE_DIR / "compose.yaml").read_text(encoding="utf-8")
    for path in (EXAMPLE_ENV, BENCH_ENV):
        commented = [
            line.lstrip("# ").split("=", 1)[0] for line in path.read_text().splitlines() if "=" in line
        ]
        names = set(parse_env_file(path)) | {
            name for name in commented if name.isupper() and name.isidentifier()
        }
        unused = sorted(
            name for name in names if "${" + name + ":-" not in text and "${" + name + "}" not in text
        )
        assert unused == [], f"{path.name} sets variables compose.yaml does not use"


def test_the_spectacles_variable_names_carry_over() -> None:
    assert SPECTACLES_VARIABLES - set(gateway_environment({})) == set()


def test_the_configured_values_load(scenario: dict[str, str]) -> None:
    """Every value compose.yaml hands over parses (the token is checked in test_dockerfile.py)."""
    env = gateway_environment(scenario)
    loaded = load_settings([], {key: value for key, value in env.items() if key != "DISCORD_TOKEN_FILE"})
    assert loaded.settings.broker_type == "amqp"
    assert loaded.settings.shard_store_type == "redis"


def test_the_token_comes_from_a_compose_secret(scenario: dict[str, str]) -> None:
    document = load_compose(scenario)
    gateway = document["services"]["gateway"]
    env = service_environment(gateway)
    assert "DISCORD_TOKEN" not in env, "the token must not be in the container's environment"
    # Short syntax: the secret is mounted at /run/secrets/<name>.
    assert gateway["secrets"] == ["discord_token"]
    assert env["DISCORD_TOKEN_FILE"] == SECRET_TARGET
    source = COMPOSE_DIR / document["secrets"]["discord_token"]["file"]
    if "TOKEN_SECRET_FILE" in scenario:
        assert source.read_text().strip(), "the bench token file is empty"
    else:
        assert source.resolve() == (COMPOSE_DIR / "secrets" / "discord_token").resolve()


def test_real_tokens_stay_out_of_git_and_the_image() -> None:
    token = (COMPOSE_DIR / "secrets" / "discord_token").relative_to(ROOT)
    assert dockerignored(token, dockerignore_patterns(ROOT))
    assert dockerignored(Path("compose/.env"), dockerignore_patterns(ROOT))
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (token, Path("compose/.env")):
        ignored = subprocess.run([git, "-C", str(ROOT), "check-ignore", "--quiet", str(path)], check=False)
        assert ignored.returncode == 0, f"git does not ignore {path}"


def test_the_gateway_waits_for_healthy_brokers_it_is_pointed_at() -> None:
    document = load_compose({})
    services = document["services"]
    assert services["gateway"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    for name in ("rabbitmq", "redis"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    env = gateway_environment({})
    amqp, redis = urllib.parse.urlsplit(env["AMQP_URL"]), urllib.parse.urlsplit(env["REDIS_URL"])
    assert (amqp.hostname, amqp.port or 5672) == ("rabbitmq", 5672)
    assert (redis.hostname, redis.port or 6379) == ("redis", 6379)


def test_stop_grace_period_outlasts_the_drain_deadline(scenario: dict[str, str]) -> None:
    document = load_compose(scenario)
    grace_s = compose_duration_s(document["services"]["gateway"]["stop_grace_period"])
    env = gateway_environment(scenario)
    drain_s = load_settings([], {"SHUTDOWN_TIMEOUT": env["SHUTDOWN_TIMEOUT"]}).settings.shutdown_timeout_s
    # Room for the workers' SIGKILL after the deadline and for the supervisor's own exit.
    assert grace_s >= drain_s + 10


def test_the_metrics_directory_is_on_a_tmpfs() -> None:
    gateway = load_compose({})["services"]["gateway"]
    mounts = [entry.split(":", 1)[0] for entry in gateway["tmpfs"]]
    directory = Path(service_environment(gateway)[MULTIPROC_DIR_ENV])
    assert any(directory.is_relative_to(mount) for mount in mounts)
    # The root filesystem is read-only, so everything the service writes needs a mount of its own.
    assert gateway["read_only"] is True
    assert "/tmp" in mounts


def test_the_bench_profile_adds_the_simulator_the_bench_env_points_at() -> None:
    document = load_compose(SCENARIOS["bench.env"])
    services = document["services"]
    simulator, gateway = services["simulator"], services["gateway"]
    assert simulator["profiles"] == ["bench"]
    assert all("profiles" not in services[name] for name in ("gateway", "rabbitmq", "redis"))
    assert (simulator["image"], simulator["build"]) == (gateway["image"], gateway["build"])
    assert simulator["entrypoint"] == ["python", "-m", "benchmarks.simulator"]
    config = config_from_args(simulator_parser().parse_args(simulator["command"]))
    # It advertises ws://<host>:<port>, so the host must be the name the gateway container resolves.
    assert config.host == simulator["hostname"] == "simulator"
    assert config.accept_any_token is True
    addresses = SimulatorAddresses(config.host, config.rest_port, config.gateway_port, config.resume_port)
    assert service_environment(gateway)["DISCORD_API_URL"] == addresses.rest_url
