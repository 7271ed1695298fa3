"""Fuzz the config loaders: `supervisor.config.load_settings` (environment and TOML file) and
`workers.config.standalone_config`.

Contract (DESIGN 3.1, exit status 2): any value of any key gives settings or a `ConfigError` whose `key` is
the name the user wrote (the variable, the TOML key or `--config`); never another exception, never a hang;
and neither the token nor a URL password appears in the message, since it goes to stderr and to logs.

The failures this found in `workers/config.py` (now fixed) are kept as regression tests at the end, listed in
`KNOWN_WORKER_CONFIG_BUGS`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor.cli import format_config
from supervisor.config import load_settings
from workers.config import WorkerConfig, standalone_config
from workers.errors import ConfigError
from workers.settings import KNOWN_VARIABLES, LoadedSettings

from .strategies import FUZZ

pytestmark = pytest.mark.timeout(60)

#: Never shown in an error message or `--print-config`; every generated secret contains it.
MARK: Final = "Sekr3tMark"
VARIABLES: Final = sorted(KNOWN_VARIABLES)
#: Text with the characters that break parsers: digits of other scripts (`int("²")` fails), separators,
#: brackets, NUL, and long runs of digits (`int()` refuses more than 4300).
TEXT: Final = (
    st.text(max_size=24)
    | st.text(alphabet="0123456789²٣-,:.[]@/ \t\x00auto", max_size=16)
    | st.sampled_from(["", " ", "auto", "0", "-1", "1" * 5000, "0-1048576", "1e999", "nan", "inf", "1_000"])
    | st.integers().map(str)
    | st.floats().map(str)
)
#: Characters a password may hold, URL delimiters included (written unescaped, as users do).
PASSWORD_CHARS: Final = st.text(alphabet="abcXYZ019-_.~%/?#@:[]! ", max_size=6)


def secret(draw: Callable[[st.SearchStrategy[str]], str]) -> str:
    return draw(PASSWORD_CHARS) + MARK + draw(PASSWORD_CHARS)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env = draw(st.dictionaries(st.sampled_from(VARIABLES), TEXT, max_size=6))
    if draw(st.booleans()):
        env["DISCORD_TOKEN"] = secret(draw)
    for name, scheme in (("AMQP_URL", "amqp"), ("REDIS_URL", "redis")):
        if draw(st.booleans()):
            scheme = draw(st.sampled_from([scheme, scheme + "s", "http", "unix", ""]))
            host = draw(st.sampled_from(["host", "host:5672", "[::1]:1", "h:x", ""]))
            env[name] = f"{scheme}://{draw(st.sampled_from(['user', '', 'u:v']))}:{secret(draw)}@{host}/"
    return env


def check_error(exc: ConfigError, names: set[str], secrets: list[str]) -> None:
    assert exc.key in names, f"{exc.key!r} names none of {sorted(names)}"
    assert MARK not in str(exc), f"a secret in {exc}"
    for value in secrets:
        assert value not in str(exc)


def secrets_of(env: dict[str, str]) -> list[str]:
    return [env[name] for name in ("DISCORD_TOKEN", "AMQP_URL", "REDIS_URL") if MARK in env.get(name, "")]


def check_settings(loaded: LoadedSettings) -> None:
    """Whatever was accepted can be shown, and is shown without its secrets."""
    text = format_config(loaded)
    assert MARK not in text, text


# -- supervisor: environment -----------------------------------------------------------------------------


@FUZZ
@given(environments())
@example({"DISCORD_SHARD_IDS": "1" * 5000})
@example({"PROMETHEUS_ADDRESS": "h:²"})
@example({"PROXY_HTTP_ADDRESS": "h:" + "1" * 5000})
@example({"AMQP_URL": f"amqp://user:{MARK}/x@host/"})  # the "port" urlsplit reads is the password's start
@example({"AMQP_URL": f"amqp://user:12/{MARK}@host/"})  # accepted, and shown by --print-config
@example({"REDIS_URL": f"http://user:12/{MARK}@host/"})
def test_supervisor_environment(env: dict[str, str]) -> None:
    try:
        loaded = load_settings([], env)
    except ConfigError as exc:
        check_error(exc, set(env), secrets_of(env))
        return
    check_settings(loaded)


# -- supervisor: TOML file -------------------------------------------------------------------------------

TOML_VALUES: Final = (
    TEXT.map(
        lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "\\u0000") + '"'
    )
    | st.integers(min_value=-(2**70), max_value=2**70).map(str)
    | st.sampled_from(
        [
            "true",
            "nan",
            "-inf",
            "1.5",
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "[]",
            "[1, 2]",
            '["GUILDS", "x,y"]',
            "[1, [2]]",
            "{}",
            '{status = "online"}',
            "{since = 99999999999999999999}",  # a table value beyond 64 bits
            "{a = {b = 1}}",
            "1" * 5000,  # an integer tomllib cannot convert
            '"""multi\nline"""',
        ]
    )
)
TOML_KEYS: Final = st.sampled_from([name.lower() for name in VARIABLES]) | st.sampled_from(
    ["DISCORD_TOKEN", "unknown_key", "workers.x"]
)


@contextmanager
def config_file(content: bytes) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "gateway.toml"
        path.write_bytes(content)
        yield str(path)


def load_file(content: bytes, env: dict[str, str] | None = None) -> None:
    with config_file(content) as path:
        try:
            loaded = load_settings(["--config", path], env or {})
        except ConfigError as exc:
            lines = content.decode(errors="replace").splitlines()
            keys = {line.split("=")[0].strip() for line in lines}
            names = {"--config"} | keys | {key.split(".")[0] for key in keys}  # a dotted key is a table
            check_error(exc, names | set(env or {}), [])
            return
    check_settings(loaded)


@FUZZ
@given(st.lists(st.tuples(TOML_KEYS, TOML_VALUES), max_size=5))
@example([("discord_presence", "{since = 99999999999999999999}")])
@example([("redis_pool_size", "1" * 5000)])
@example([("discord_token_file", '"a\\u0000b"')])
def test_supervisor_toml_documents(entries: list[tuple[str, str]]) -> None:
    load_file("".join(f"{key} = {value}\n" for key, value in entries).encode())


@FUZZ
@given(st.binary(max_size=128) | st.text(max_size=64).map(str.encode))
@example(b"\xff\xfe = 1")
@example(b"[" * 10_000)
@example(b"a = " + b"[" * 10_000)
def test_supervisor_toml_arbitrary_bytes(content: bytes) -> None:
    load_file(content)


# -- worker ----------------------------------------------------------------------------------------------

WORKER_VARIABLES: Final = sorted(KNOWN_VARIABLES | {"DISCORD_GATEWAY_URL", "DISCORD_MAX_CONCURRENCY"})


@FUZZ
@given(
    env=st.dictionaries(st.sampled_from(WORKER_VARIABLES), TEXT, max_size=6),
    count=st.sampled_from(["1", "4", "auto", ""]),
    token=st.booleans(),
)
def test_worker_environment(env: dict[str, str], count: str, token: bool) -> None:
    env.setdefault("DISCORD_SHARD_COUNT", count)
    if token:
        env.setdefault("DISCORD_TOKEN", "x" * 20 + MARK)
    try:
        config = standalone_config(env)
    except ConfigError as exc:
        check_error(exc, set(env) | {"DISCORD_TOKEN", "DISCORD_SHARD_COUNT"}, [])
        return
    assert isinstance(config, WorkerConfig)
    assert MARK not in repr(config)


# -- the bugs this found in workers/config.py, fixed: regression tests -------------------------------------

KNOWN_WORKER_CONFIG_BUGS: Final[list[tuple[str, dict[str, str]]]] = [
    ("parse_address: int() of a non-ASCII digit", {"PROXY_HTTP_ADDRESS": "127.0.0.1:²"}),
    ("parse_address: int() of > 4300 digits", {"PROXY_HTTP_ADDRESS": "127.0.0.1:" + "1" * 5000}),
    ("parse_shard_ids: int() of > 4300 digits", {"DISCORD_SHARD_IDS": "1" * 5000}),
    ("read_token: a token file that is not UTF-8", {"DISCORD_TOKEN_FILE": "NOT_UTF8"}),
    ("read_token: a NUL in the token file's path", {"DISCORD_TOKEN_FILE": "/tmp/a\x00b"}),
]


def _with_files(env: dict[str, str], directory: Path) -> dict[str, str]:
    if env.get("DISCORD_TOKEN_FILE") == "NOT_UTF8":
        (directory / "token").write_bytes(b"\xff\xfe" + MARK.encode())
        env = {**env, "DISCORD_TOKEN_FILE": str(directory / "token")}
    return env


@pytest.mark.parametrize(
    ("bug", "env"), KNOWN_WORKER_CONFIG_BUGS, ids=[bug for bug, _ in KNOWN_WORKER_CONFIG_BUGS]
)
def test_known_worker_config_bug(bug: str, env: dict[str, str], tmp_path: Path) -> None:
    env = _with_files({"DISCORD_TOKEN": "x" * 30, "DISCORD_SHARD_COUNT": "2", **env}, tmp_path)
    if "DISCORD_TOKEN_FILE" in env:
        del env["DISCORD_TOKEN"]
    with pytest.raises(ConfigError):
        standalone_config(env)


#: The supervisor guards shard ids itself (MAX_SHARD_ID), so only these reach it.
SUPERVISOR_BUGS: Final = [(bug, env) for bug, env in KNOWN_WORKER_CONFIG_BUGS if "shard_ids" not in bug]


@pytest.mark.parametrize(("bug", "env"), SUPERVISOR_BUGS, ids=[bug for bug, _ in SUPERVISOR_BUGS])
def test_known_worker_config_bug_through_the_supervisor(
    bug: str, env: dict[str, str], tmp_path: Path
) -> None:
    env = _with_files(env, tmp_path)
    with pytest.raises(ConfigError):
        load_settings([], env)


def test_known_worker_config_bug_a_huge_shard_count_is_expanded_into_memory() -> None:
    """Without shard ids the worker builds `tuple(range(DISCORD_SHARD_COUNT))`: 10**12 fails at once with
    MemoryError, 10**8 takes seconds and gigabytes. The supervisor caps shard ids at 2**20; so should this."""
    with pytest.raises(ConfigError):
        standalone_config({"DISCORD_TOKEN": "x" * 30, "DISCORD_SHARD_COUNT": str(10**12)})
