"""compose/supervisor.service: `systemd-analyze verify` accepts it, and it says what the supervisor needs.

`verify` loads the unit in a test manager (no systemd has to run: it works as root in a container) and
checks that ExecStart= names an executable, so the test verifies a copy whose ExecStart points at this
test's Python instead of /opt/trio-shard-gateway/venv/bin/python. `verify` exits 0 even when it only warns
(an unknown key, a value it cannot parse and ignores), so any output at all fails the test.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from workers.exit_status import ExitStatus
from workers.settings import KNOWN_VARIABLES, Settings

from .deployfiles import UNIT_FILE, parse_unit, unit_environment

INSTALLED_PYTHON: Final = "/opt/trio-shard-gateway/venv/bin/python"
#: The name the unit is installed under (compose/README.md): Debian's supervisord owns supervisor.service.
INSTALLED_NAME: Final = "trio-shard-gateway.service"
#: `systemd-analyze security` exposure, 0-10 (the unit scores about 1.1); --threshold takes tenths.
MAX_EXPOSURE: Final = 2.0
HARDENING: Final = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
}


def service() -> dict[str, list[str]]:
    return parse_unit(UNIT_FILE)["Service"]


def one(key: str) -> str:
    values = service().get(key, [])
    assert len(values) == 1, f"{key}= should be set once, is set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span as used here: a number of seconds, or with an s/min suffix."""
    for suffix, factor in (("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    text = UNIT_FILE.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_PYTHON} " in text
    copy = tmp_path / INSTALLED_NAME
    copy.write_text(text.replace(f"ExecStart={INSTALLED_PYTHON} ", f"ExecStart={sys.executable} "))
    return copy


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def test_systemd_analyze_verify_accepts_the_unit(unit_copy: Path) -> None:
    completed = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=unit_copy.parent,
    )
    assert (completed.returncode, completed.stdout + completed.stderr) == (0, "")


def test_the_hardening_keeps_exposure_low(unit_copy: Path) -> None:
    completed = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(unit_copy),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=unit_copy.parent,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr


def test_it_runs_the_supervisor_and_tells_systemd_when_it_is_ready() -> None:
    assert shlex.split(one("ExecStart")) == [INSTALLED_PYTHON, "-m", "supervisor"]
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    # The supervisor feeds the watchdog at half of WATCHDOG_USEC from its own loop.
    assert seconds(one("WatchdogSec")) >= 10


def test_reload_is_a_sighup_to_the_supervisor() -> None:
    assert shlex.split(one("ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_stop_sends_sigterm_to_the_supervisor_and_outlasts_its_drain() -> None:
    assert one("KillMode") == "mixed"
    assert one("KillSignal") == "SIGTERM"
    drain_s = Settings().shutdown_timeout_s
    env = unit_environment(service())
    assert "SHUTDOWN_TIMEOUT" not in env, "the unit relies on the default drain deadline"
    assert seconds(one("TimeoutStopSec")) >= drain_s + 10


def test_restarts_only_what_a_restart_can_fix() -> None:
    assert one("Restart") == "on-failure"
    assert (
        set(one("RestartPreventExitStatus").split())
        == {str(int(ExitStatus.CONFIG)), str(int(ExitStatus.FATAL))}
        == {"2", "3"}
    )
    unit = parse_unit(UNIT_FILE)["Unit"]
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit


def test_the_token_is_a_credential_and_settings_an_optional_env_file() -> None:
    assert one("EnvironmentFile").startswith("-/etc/")
    name, _, source = one("LoadCredential").partition(":")
    assert source.startswith("/etc/")
    env = unit_environment(service())
    assert env["DISCORD_TOKEN_FILE"] == f"%d/{name}"
    assert "DISCORD_TOKEN" not in env


def test_the_ratelimit_segment_lives_in_the_runtime_directory() -> None:
    runtime = one("RuntimeDirectory")
    assert one("RuntimeDirectoryMode") == "0700"
    assert unit_environment(service())["RATELIMIT_SHM_DIR"] == f"%t/{runtime}"


def test_every_variable_it_sets_is_one_the_service_reads() -> None:
    assert set(unit_environment(service())) - KNOWN_VARIABLES == set()


def test_the_hardening_list() -> None:
    unit = service()
    for key, value in HARDENING.items():
        assert value in unit.get(key, []), f"{key}={value}"
    # /proc/sys/kernel/random/boot_id is read by the shm segment's stale check.
    assert "ProcSubset" not in unit
