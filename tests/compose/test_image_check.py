"""compose/image-check: the script that builds and runs the image for real runs it as compose.yaml does.

The script itself needs a Docker daemon and runs outside pytest (CI runs it after the tests, compose/README.md
has its output); here its `docker run` is read as text and held to compose.yaml's gateway service, so the two
cannot drift apart: the same hardening, mounts and drain settings, and only variables the gateway reads.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Any, Final

import pytest

from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.settings import KNOWN_VARIABLES

from .deployfiles import COMPOSE_DIR, compose_bytes, compose_duration_s, load_compose

SCRIPT: Final = COMPOSE_DIR / "image-check"


def script_text() -> str:
    return SCRIPT.read_text(encoding="utf-8")


def docker_run_words() -> list[str]:
    """The words of the script's `docker run` command (continuation lines joined, variables left as text)."""
    text = script_text()
    start = text.index('"$docker_cmd" run -d ')
    end = text.index('"$IMAGE"', start)
    return shlex.split(text[start:end].replace("\\\n", " "))


def run_options() -> dict[str, list[str]]:
    """`--name value` and `-e NAME=value` options of that command, by option name."""
    words = docker_run_words()[2:]  # "$docker_cmd" run
    options: dict[str, list[str]] = {}
    index = 0
    while index < len(words):
        word = words[index]
        assert word.startswith("-"), f"unexpected word in docker run: {word!r}"
        flag, sep, value = word.partition("=")
        if sep and flag.startswith("--"):
            options.setdefault(flag, []).append(value)
        elif word in ("-d", "--init", "--read-only"):
            options.setdefault(word, []).append("")
        else:
            options.setdefault(word, []).append(words[index + 1])
            index += 1
        index += 1
    return options


def script_default(name: str) -> str:
    match = re.search(rf"(?m)^{name}=\$\{{{name}:-([^}}]*)\}}$", script_text())
    assert match is not None, f"no `{name}=${{{name}:-default}}` line in image-check"
    return match[1]


def gateway() -> dict[str, Any]:
    service = load_compose({})["services"]["gateway"]
    assert isinstance(service, dict)
    return service


def test_the_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & 0o111, "executable"


def test_it_runs_the_container_hardened_as_compose_does() -> None:
    options, service = run_options(), gateway()
    assert options["--network"] == ["host"], "host networking only: no bridge address is ever used"
    assert "-p" not in options and "--publish" not in options
    assert ("--init" in options) == service["init"] is True
    assert ("--read-only" in options) == service["read_only"] is True
    assert options["--cap-drop"] == service["cap_drop"] == ["ALL"]
    assert options["--security-opt"] == service["security_opt"]
    assert [compose_bytes(value) for value in options["--shm-size"]] == [compose_bytes(service["shm_size"])]
    assert options["--tmpfs"] == service["tmpfs"]


def test_it_drains_with_compose_settings() -> None:
    service = gateway()
    assert compose_duration_s(f"{script_default('GRACE_S')}s") == compose_duration_s(
        service["stop_grace_period"]
    )
    assert script_default("SHUTDOWN_TIMEOUT") == service["environment"]["SHUTDOWN_TIMEOUT"]
    assert 'stop -t "$GRACE_S"' in script_text()


def test_it_sets_only_variables_the_gateway_reads_and_the_token_as_a_file() -> None:
    environment = [value.partition("=")[0] for value in run_options()["-e"]]
    assert len(environment) == len(set(environment))
    assert set(environment) <= KNOWN_VARIABLES | {MULTIPROC_DIR_ENV}
    assert set(environment) <= set(gateway()["environment"]), "each is one compose.yaml sets too"
    assert "DISCORD_TOKEN" not in environment
    token_mounts = [
        value for value in run_options()["-v"] if value.endswith(":/run/secrets/discord_token:ro")
    ]
    assert token_mounts == ["$PWD/compose/bench.token:/run/secrets/discord_token:ro"]


def test_it_builds_on_the_host_network_with_the_base_argument() -> None:
    text = script_text()
    match = re.search(r"build_args=\((.*)\)", text)
    assert match is not None
    words = shlex.split(match[1])
    assert words[:2] == ["--network", "host"]
    assert "--build-arg" in words and words[words.index("--build-arg") + 1] == "PYTHON_IMAGE=$BASE_IMAGE"
    assert "debootstrap --variant=minbase" in text
