"""No token or password reaches a log line, a metric, an error reply or `--print-config` (issue 7 item 4).

Besides these targeted tests, every run of the suite is scanned as a whole (`leakscan.py`, hooked in
`tests/conftest.py`): the captured output and logs of every test and each file the suite's processes wrote
under the base temporary directory. The shared-memory segment's owner-only mode (0o600) is tested where
it is made: `tests/ratelimit/test_shm.py` (and end to end in `tests/supervisor/test_supervisor.py`).
"""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from benchmarks.children import free_port, inherited_environment, stop_process, worker_env
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, Simulator, SimulatorConfig, open_simulator
from workers import logs

from . import leakscan

TIMEOUT_S: Final = 60
TOKEN: Final = leakscan.KNOWN_SECRETS["tests/security token"]
AMQP_PASSWORD: Final = leakscan.KNOWN_SECRETS["AMQP password (tests/security)"]
REDIS_PASSWORD: Final = leakscan.KNOWN_SECRETS["Redis password (tests/security)"]
AMQP_URL: Final = f"amqp://gateway:{AMQP_PASSWORD}@127.0.0.1:5672/vhost"
REDIS_URL: Final = f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
ROOT: Final = Path(__file__).resolve().parents[2]


def clean_environ(**values: str) -> dict[str, str]:
    """This process's environment without any of our settings, plus `values`."""
    return {**inherited_environment(), **values}


def assert_no_secret(text: str, where: str, *extra: str) -> None:
    hits = leakscan.scan_text(text, where)
    assert not hits, "\n".join(map(str, hits))
    for secret in extra:
        assert secret not in text, f"{where}: a secret in the output"


# -- the scanner itself --------------------------------------------------------------------------------


def test_every_token_in_the_tests_is_scanned_for() -> None:
    """A token-shaped literal anywhere in tests/ must be in KNOWN_SECRETS, or the session scan misses it."""
    known = set(leakscan.KNOWN_SECRETS.values())
    assert DEFAULT_TOKEN in known
    for path in (ROOT / "tests").rglob("*.py"):
        for token in leakscan.TOKEN_SHAPE.findall(path.read_text(encoding="utf-8")):
            assert token in known, f"{path.relative_to(ROOT)}: add {token[:8]}... to leakscan.KNOWN_SECRETS"


def test_the_scanner_finds_a_planted_secret_and_skips_inputs(tmp_path: Path) -> None:
    planted = {"planted": "planted-" + "q" * 24}  # not a known secret, so the session scan ignores it
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "worker.log").write_text('{"event": "x", "token": "' + planted["planted"] + '"}\n')
    (tmp_path / "token").write_text(planted["planted"])  # an input a test wrote on purpose
    (tmp_path / "gw.toml").write_text(f'discord_token = "{planted["planted"]}"\n')
    (tmp_path / "link.log").symlink_to(tmp_path / "token")
    hits = leakscan.scan_tree(tmp_path, planted)
    assert [Path(hit.where).name for hit in hits] == ["worker.log"]
    assert planted["planted"] not in str(hits[0]) and "<planted>" in hits[0].excerpt
    assert leakscan.scan_text("a " + planted["planted"], "where", planted)[0].secret_name == "planted"
    assert leakscan.scan_text("nothing here", "where", planted) == []
    plan = leakscan.Hit("/tmp/x/test_smoke0/logs/shm-plan.json", "simulator DEFAULT_TOKEN", "")
    assert leakscan.known_leak(plan) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(leakscan.KNOWN_LEAKS, "*/logs/*-plan.json", "a plan file")
        assert leakscan.known_leak(plan) == "a plan file"


# -- --print-config and configuration errors -------------------------------------------------------------


def run_supervisor_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("amqp_url", "redis_url"),
    [
        (AMQP_URL, REDIS_URL),
        (f"amqp://gateway:{AMQP_PASSWORD}%40x@rabbit/", f"rediss://user:{REDIS_PASSWORD}@redis:6380/1"),
        # A password with an unescaped `/` ends urlsplit's netloc early; it must be hidden all the same.
        (f"amqp://gateway:12/{AMQP_PASSWORD}@rabbit/", f"redis://:12#{REDIS_PASSWORD}@redis:6379/0"),
    ],
    ids=["plain", "encoded", "unescaped"],
)
def test_print_config_shows_no_secret(amqp_url: str, redis_url: str, tmp_path: Path) -> None:
    env = clean_environ(DISCORD_TOKEN=TOKEN, AMQP_URL=amqp_url, REDIS_URL=redis_url)
    result = run_supervisor_cli("--print-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "DISCORD_TOKEN = [redacted]" in result.stdout
    assert_no_secret(result.stdout + result.stderr, "--print-config")
    # The same from a TOML file, and the token from a token file.
    token_file = tmp_path / "token"
    token_file.write_text(f"Bot {TOKEN}\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'amqp_url = "{amqp_url}"\nredis_url = "{redis_url}"\n')
    env = clean_environ(DISCORD_TOKEN_FILE=str(token_file))
    result = run_supervisor_cli("--print-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr, "--print-config --config")


@pytest.mark.parametrize(
    "env",
    [
        {"AMQP_URL": f"http://gateway:{AMQP_PASSWORD}@rabbit/"},  # wrong scheme: the URL is shown, redacted
        {"AMQP_URL": f"amqp://gateway:{AMQP_PASSWORD}/x@rabbit/"},  # urlsplit's "port" is the password
        {"REDIS_URL": f"redis://:{REDIS_PASSWORD}@[::1/0"},
        {"DISCORD_TOKEN": TOKEN + " two words"},
        {"DISCORD_TOKEN": TOKEN, "DISCORD_TOKEN_FILE": "/nonexistent"},
    ],
    ids=["scheme", "port", "bracket", "token-spaces", "token-twice"],
)
def test_configuration_errors_show_no_secret(env: dict[str, str]) -> None:
    result = run_supervisor_cli("--check-config", env=clean_environ(**env))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("configuration error: ")
    assert_no_secret(result.stdout + result.stderr, "--check-config")


# -- redaction of URL passwords in log lines -------------------------------------------------------------


@contextmanager
def redacting_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with the production handler set-up (redaction filter, JSON lines) writing to a buffer. It is
    outside the logger tree (no parent), so the secrets it is fed never reach pytest's capture (and the
    session scan)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.RedactionFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.Logger("tests.security.redaction", logging.DEBUG)
    logger.addHandler(handler)
    yield logger, buffer


@pytest.mark.parametrize(
    ("url", "forms"),
    [
        (AMQP_URL, [AMQP_PASSWORD]),
        (REDIS_URL, [REDIS_PASSWORD]),
        # Percent-encoded in the URL: the decoded form is what the client sends, and its errors may show.
        (f"amqp://gateway:{AMQP_PASSWORD}%40x@rabbit/", [f"{AMQP_PASSWORD}%40x", f"{AMQP_PASSWORD}@x"]),
        (f"redis://:{REDIS_PASSWORD}/x@redis:6379/0", [f"{REDIS_PASSWORD}/x"]),  # an unescaped `/`
    ],
    ids=["amqp", "redis", "percent-encoded", "unescaped"],
)
def test_url_passwords_are_redacted_in_log_lines(url: str, forms: list[str]) -> None:
    logs.SECRETS.add_url(url)
    with redacting_logger() as (logger, buffer):
        logger.info("connecting to %s", url, extra={"url": url, "password": forms[-1]})
        logger.warning("broker.error", extra={"error": f"login refused for password {forms[-1]!r}"})
        try:
            raise ConnectionError(f"cannot connect to {url} with {forms[-1]}")
        except ConnectionError:
            logger.exception("broker.failed")
    text = buffer.getvalue()
    assert text.count(logs.REDACTED) >= 5, text
    for form in forms:
        assert form not in text, text
    assert [json.loads(line)["event"] for line in text.splitlines()][1:] == ["broker.error", "broker.failed"]


def test_redact_url_hides_the_password_and_keeps_the_rest() -> None:
    assert logs.redact_url(AMQP_URL) == f"amqp://gateway:{logs.REDACTED}@127.0.0.1:5672/vhost"
    assert logs.redact_url(REDIS_URL) == f"redis://:{logs.REDACTED}@127.0.0.1:6379/0"
    assert logs.redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert logs.redact_url(f"amqp://u:12/{AMQP_PASSWORD}@h/") == f"amqp://u:{logs.REDACTED}@h/"


# -- processes: a worker at debug level, a running supervisor's endpoints and logs -----------------------


def worker_environ(sim: Simulator, **values: str) -> dict[str, str]:
    return worker_env(sim.addresses.rest_url, LOG_LEVEL="debug", **values)


def one_shard() -> SimulatorConfig:
    return SimulatorConfig(gateway=GatewayConfig(shard_count=1, max_concurrency=1, event_rate=5))


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def test_a_workers_debug_log_during_identify_holds_no_token(tmp_path: Path) -> None:
    """The Spectacles gateway printed IDENTIFY, token included, at debug level (anchors/spectacles.md 1.9)."""
    log = tmp_path / "worker-debug.log"
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(one_shard()) as sim:
            env = worker_environ(sim, BROKER_TYPE="stdio", AMQP_URL=AMQP_URL, REDIS_URL=REDIS_URL)
            with open(log, "wb") as stderr:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "workers", "--shard-count", "1"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=env,
                )
                try:
                    assert process.stdout is not None
                    events = await read_until(process.stdout, b'"READY"')
                    assert sim.gateway.ledger.counters["identifies"] == 1
                finally:
                    await stop_process(process, grace_s=15)
    text = log.read_text()
    assert '"level": "debug"' in text and "shard.connecting" in text and "shard.ready" in text, text[-2000:]
    assert_no_secret(text, str(log), AMQP_PASSWORD, REDIS_PASSWORD)
    assert_no_secret(events.decode(), "worker stdout")


async def test_a_worker_that_cannot_reach_rabbitmq_names_no_password(tmp_path: Path) -> None:
    """The error (a traceback on stderr, outside the JSON logger) must not carry the URL's password."""
    closed = free_port()
    env = clean_environ(
        DISCORD_TOKEN=TOKEN,
        DISCORD_API_URL="http://127.0.0.1:9/api/v10",
        DISCORD_GATEWAY_URL="ws://127.0.0.1:9",
        DISCORD_MAX_CONCURRENCY="1",
        BROKER_TYPE="amqp",
        AMQP_URL=f"amqp://gateway:{AMQP_PASSWORD}@127.0.0.1:{closed}/",
        LOG_FORMAT="json",
        LOG_LEVEL="debug",
    )
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "workers", "--shard-count", "1"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    text = result.stderr.decode()
    assert result.returncode != 0 and "127.0.0.1" in text, text[-2000:]
    assert_no_secret(text + result.stdout.decode(), "worker stderr")


@asynccontextmanager
async def running_supervisor(sim: Simulator, log: Path, **values: str) -> AsyncIterator[str]:
    port = free_port()
    env = worker_environ(
        sim,
        BROKER_TYPE="null",
        PROMETHEUS_ADDRESS=f"127.0.0.1:{port}",
        SHUTDOWN_TIMEOUT="10s",
        AMQP_URL=AMQP_URL,
        REDIS_URL=REDIS_URL,
        **values,
    )
    with open(log, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "supervisor", "--workers", "1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield f"http://127.0.0.1:{port}"
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on TCP `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.rpartition(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


async def test_a_running_supervisors_endpoints_and_logs_hold_no_secret(tmp_path: Path) -> None:
    log = tmp_path / "supervisor-debug.log"
    with trio.fail_after(TIMEOUT_S):
        async with open_simulator(one_shard()) as sim, running_supervisor(sim, log) as base:
            async with httpx.AsyncClient(base_url=base) as http:
                with trio.fail_after(30):
                    while True:
                        try:
                            if (await http.get("/readyz")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await trio.sleep(0.1)
                pages = {path: (await http.get(path)).text for path in ("/metrics", "/healthz", "/readyz")}
                [worker] = (await http.get("/healthz")).json()["detail"]["workers"]
            # The token and the URLs reach the worker over its control channel, not its environment, which
            # any process of the same user can read in /proc.
            environ = await trio.Path(f"/proc/{worker['pid']}/environ").read_bytes()
            assert b"DISCORD_TOKEN=" not in environ and b"AMQP_URL=" not in environ
            assert_no_secret(
                environ.decode(errors="replace"), "the worker's environment", AMQP_PASSWORD, REDIS_PASSWORD
            )
            assert sim.gateway.ledger.counters["identifies"] == 1
            assert "discord_" in pages["/metrics"]
            for path, page in pages.items():
                assert_no_secret(page, path, AMQP_PASSWORD, REDIS_PASSWORD)
            # Metrics bind where PROMETHEUS_ADDRESS says, loopback here, and nowhere else.
            assert listening_addresses(int(base.rsplit(":", 1)[1])) == {"0100007F"}
    text = log.read_text()
    assert "shard.ready" in text and '"level": "debug"' in text, text[-2000:]
    assert_no_secret(text, str(log), AMQP_PASSWORD, REDIS_PASSWORD)
