"""compose/Dockerfile: its instructions as Docker reads them, and the install it makes, run from a fresh venv.

No Docker engine runs here: `image_venv` (conftest.py, imagevenv.py) rebuilds the builder stage's install
from the files its COPY lines name, and these tests run the image's entry point from it with the image's
ENV and compose.yaml's environment, as the container would.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Final

import pytest

from supervisor.config import load_settings
from workers.exit_status import ExitStatus

from ..locks import SERVICE_LOCK, supported_pythons
from .deployfiles import (
    COMPOSE_DIR,
    DOCKERFILE,
    EXAMPLE_ENV,
    Stage,
    load_compose,
    parse_dockerfile,
    parse_env_file,
    service_environment,
)
from .imagevenv import ImageVenv, builder_stage, install_constraints, stage_build_context

VENV: Final = "/opt/trio-shard-gateway/venv"
SECRET_TARGET: Final = "/run/secrets/discord_token"


def final_stage() -> Stage:
    return parse_dockerfile()[-1]


def image_environment() -> dict[str, str]:
    """The final stage's ENV less PATH (the venv's bin comes first in `ImageVenv.environment` instead)."""
    env = final_stage().environment()
    assert env.pop("PATH").startswith(f"{VENV}/bin:"), "`python` is the venv's"
    return env


def container_environment(image: ImageVenv, token_file: Path, **overrides: str) -> dict[str, str]:
    """The gateway container's environment: the image's ENV, then compose.yaml's (with example.env), with
    the venv and the secret at their places on this machine."""
    env = image_environment()
    env.update(service_environment(load_compose(parse_env_file(EXAMPLE_ENV))["services"]["gateway"]))
    assert env["DISCORD_TOKEN_FILE"] == SECRET_TARGET
    env["DISCORD_TOKEN_FILE"] = str(token_file)
    env.update(overrides)
    return image.environment(env)


def run_entry_point(
    image: ImageVenv, env: dict[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    entry = final_stage().last("ENTRYPOINT")
    assert entry is not None
    argv = entry.exec_form()
    assert argv is not None and argv[0] == "python"
    return subprocess.run(
        [str(image.python), *argv[1:], *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "discord_token"
    path.write_text("MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.not-a-real-token\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def test_both_stages_use_a_python_we_test() -> None:
    stages = parse_dockerfile()
    builder, final = builder_stage(stages), stages[-1]
    assert builder.base == final.base, "the venv's interpreter link needs the same base image in both stages"
    match = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?", final.base)
    assert match is not None, f"expected a python:X.Y-slim base, got {final.base}"
    # requirements/service.txt pins for the Pythons .ci/run tests, and image_venv stands for the image on
    # each of them (with that Python's pins).
    assert match[1] in supported_pythons()


def test_the_image_installs_the_service_lock(tmp_path: Path) -> None:
    builder = builder_stage(parse_dockerfile())
    stage_build_context(builder, tmp_path)
    constraints = install_constraints(builder, tmp_path)
    assert constraints.read_bytes() == SERVICE_LOCK.read_bytes()
    assert (tmp_path / "LICENSE").read_bytes() == (SERVICE_LOCK.parents[1] / "LICENSE").read_bytes()


def test_the_base_image_is_a_build_argument_and_no_frontend_is_pulled() -> None:
    """compose/image-check builds without a registry: it passes its own base as PYTHON_IMAGE, and BuildKit
    must not fetch a Dockerfile frontend image (a `# syntax=` directive) either."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"(?m)^#\s*syntax\s*=", text), "a syntax directive makes BuildKit pull its frontend"
    from_lines = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert from_lines and set(from_lines) == {"${PYTHON_IMAGE}"}, "every stage starts from the argument"
    script = (COMPOSE_DIR / "image-check").read_text(encoding="utf-8")
    assert '--build-arg "PYTHON_IMAGE=$BASE_IMAGE"' in script, "image-check passes the same argument"
    assert "-f compose/Dockerfile" in script


def test_the_pip_cert_secret_is_optional_and_stays_out_of_the_layers() -> None:
    """The index's CA bundle (a TLS-intercepting proxy's) is a build secret: mounted for the pip install
    only, used only if given, never copied or set in ENV."""
    builder = builder_stage(parse_dockerfile())
    (install,) = [item for item in builder.all("RUN") if "pip install" in item.text]
    assert "--mount=type=secret,id=pip_cert" in install.text
    assert "required=true" not in install.text
    assert "if [ -f /run/secrets/pip_cert ]" in install.text
    for stage in parse_dockerfile():
        assert "PIP_CERT" not in stage.environment()
        assert not any("pip_cert" in item.text for item in stage.all("COPY"))


def test_the_final_stage_is_the_builders_venv_run_by_a_non_root_user() -> None:
    stages = parse_dockerfile()
    builder, final = builder_stage(stages), stages[-1]
    # python3: Debian's python3 package (the base compose/image-check builds) has no `python` command.
    assert any(f"python3 -m venv {VENV}" in item.text for item in builder.all("RUN"))
    copies = [item.flags() for item in final.all("COPY")]
    assert copies == [({"from": builder.name or ""}, f"{VENV} {VENV}")]
    user = final.last("USER")
    assert user is not None
    uid = user.text.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit(), "a numeric non-root uid (Kubernetes runAsNonRoot)"
    assert any(f"--uid {uid}" in item.text for item in final.all("RUN")), "the uid exists in /etc/passwd"
    assert final.instructions.index(user) > max(final.instructions.index(item) for item in final.all("RUN"))


def test_the_entry_point_is_python_m_supervisor_in_exec_form() -> None:
    final = final_stage()
    entry = final.last("ENTRYPOINT")
    assert entry is not None and entry.exec_form() == ["python", "-m", "supervisor"]
    image_environment()  # PATH: `python` is the venv's
    # Flags outrank the environment (DESIGN 3.1): a default CMD such as `--shards auto` would silently
    # override DISCORD_SHARD_COUNT.
    assert final.last("CMD") is None


def test_sigterm_stops_it() -> None:
    signal = final_stage().last("STOPSIGNAL")
    assert signal is not None and signal.text == "SIGTERM"


def test_the_healthcheck_asks_healthz_with_python_not_curl() -> None:
    final = final_stage()
    check = final.last("HEALTHCHECK")
    assert check is not None
    options, rest = check.flags()
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    keyword, _, command = rest.partition(" ")
    assert keyword == "CMD"
    argv = check.__class__("CMD", command).exec_form()
    assert argv is not None and argv[:2] == ["python", "-c"], "exec form, the image's own Python"
    assert not any(tool in " ".join(argv) for tool in ("curl", "wget"))
    assert "/healthz" in argv[2] and "PROMETHEUS_ADDRESS" in argv[2]
    address = final.environment()["PROMETHEUS_ADDRESS"]
    assert load_settings([], {"PROMETHEUS_ADDRESS": address}).settings.prometheus_address == address


def test_the_image_install_runs_from_its_own_site_packages(image_venv: ImageVenv, tmp_path: Path) -> None:
    probe = "import benchmarks, ratelimit, supervisor, workers; print(supervisor.__file__)"
    env = image_venv.environment(image_environment())
    completed = subprocess.run(
        [str(image_venv.python), "-c", probe],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(completed.stdout.strip()).is_relative_to(image_venv.site_packages)
    # The dev tools are not there, as in the image: a runtime import of one would fail here too.
    missing = subprocess.run([str(image_venv.python), "-c", "import pytest"], env=env, capture_output=True)
    assert missing.returncode != 0


def test_the_console_script_is_the_supervisor(
    image_venv: ImageVenv, token_file: Path, tmp_path: Path
) -> None:
    """`trio-shard-gateway` (pyproject's [project.scripts]) as a fresh install puts it on PATH."""
    script = image_venv.python.parent / "trio-shard-gateway"
    env = container_environment(image_venv, token_file)
    completed = subprocess.run(
        [str(script), "--check-config"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "configuration OK\n", "")
    usage = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: trio-shard-gateway "), usage.stderr


def test_check_config_accepts_the_compose_configuration(
    image_venv: ImageVenv, token_file: Path, tmp_path: Path
) -> None:
    completed = run_entry_point(
        image_venv, container_environment(image_venv, token_file), tmp_path, "--check-config"
    )
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "configuration OK\n", "")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"BROKER_TYPE": "kafka"}, "BROKER_TYPE"),
        ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT"),
        ({"DISCORD_TOKEN_FILE": "/run/secrets/missing"}, "DISCORD_TOKEN_FILE"),
    ],
)
def test_check_config_refuses_a_bad_value_with_status_2(
    image_venv: ImageVenv, token_file: Path, tmp_path: Path, overrides: dict[str, str], key: str
) -> None:
    env = container_environment(image_venv, token_file, **overrides)
    completed = run_entry_point(image_venv, env, tmp_path, "--check-config")
    assert completed.returncode == ExitStatus.CONFIG
    assert completed.stderr.startswith(f"configuration error: {key}")


def test_the_simulator_runs_from_the_image_install(image_venv: ImageVenv, tmp_path: Path) -> None:
    """The bench profile runs `python -m benchmarks.simulator` from the same image."""
    env = image_venv.environment(image_environment())
    completed = subprocess.run(
        [str(image_venv.python), "-m", "benchmarks.simulator", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--accept-any-token" in completed.stdout
