"""The supervisor's configuration: four layers, every variable, every error naming its key, print/check
output, and the environment handed to workers round-tripping through the worker's own parser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.cli import format_config, main, parse_command_line
from supervisor.config import OWN_PREFIXES, load_settings, split_address
from workers.config import ShardAssignment, WorkerConfig
from workers.control_messages import Configure, decode, encode
from workers.errors import ConfigError
from workers.logs import LogFormat
from workers.setting_formats import DEFAULT_INTENTS
from workers.settings import (
    KNOWN_VARIABLES,
    SETTINGS,
    BrokerType,
    Compression,
    Encoding,
    LogLevel,
    RatelimitBackend,
    Settings,
    StoreType,
    settings_from_wire,
    worker_wire,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.secret-token-value"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- every variable -------------------------------------------------------------------------------------

VALID: list[tuple[str, str, str, Any]] = [
    ("DISCORD_TOKEN", "Bot abc.def", "token", "abc.def"),
    ("DISCORD_API_URL", "http://127.0.0.1:8080/api/v10/", "api_url", "http://127.0.0.1:8080/api/v10"),
    ("DISCORD_SHARD_COUNT", "16", "shards", 16),
    ("DISCORD_SHARD_COUNT", "auto", "shards", None),
    ("DISCORD_SHARD_IDS", "0-3, 8", "shard_ids", (0, 1, 2, 3, 8)),
    ("WORKERS", "4", "workers", 4),
    ("WORKERS", "AUTO", "workers", None),
    ("DISCORD_INTENTS", "guilds, GUILD_MESSAGES", "intents", 513),
    ("DISCORD_RAW_INTENTS", "32767", "intents", 32767),
    (
        "DISCORD_EVENTS",
        "message_create, GUILD_CREATE",
        "events",
        frozenset({"MESSAGE_CREATE", "GUILD_CREATE"}),
    ),
    ("DISCORD_PRESENCE", '{"status": "dnd", "afk": false}', "presence", {"status": "dnd", "afk": False}),
    ("GATEWAY_COMPRESSION", "zstd-stream", "compression", "zstd-stream"),
    ("BROKER_TYPE", "AMQP", "broker_type", "amqp"),
    ("BROKER_GROUP", "events.v2", "broker_group", "events.v2"),
    ("BROKER_ENCODING", "msgpack", "broker_encoding", "msgpack"),
    ("BROKER_MESSAGE_TIMEOUT", "10m", "broker_message_timeout_s", 600.0),
    ("AMQP_URL", "amqps://u:p@rabbit:5671/vhost", "amqp_url", "amqps://u:p@rabbit:5671/vhost"),
    ("SHARD_STORE_TYPE", "redis", "shard_store_type", "redis"),
    ("SHARD_STORE_PREFIX", "bot1", "shard_store_prefix", "bot1"),
    ("REDIS_URL", "rediss://:pw@redis:6380/2", "redis_url", "rediss://:pw@redis:6380/2"),
    ("REDIS_POOL_SIZE", "12", "redis_pool_size", 12),
    ("CLUSTER_MODE", "redis", "cluster_mode", "redis"),
    ("CLUSTER_NODE_ID", "host-a.example", "cluster_node_id", "host-a.example"),
    ("CLUSTER_LEASE_TTL", "15s", "cluster_lease_ttl_s", 15.0),
    ("RESHARD", "off", "reshard", "off"),
    ("RESHARD_CHECK_INTERVAL", "15m", "reshard_check_interval_s", 900.0),
    ("RATELIMIT_BACKEND", "redis", "ratelimit_backend", "redis"),
    ("RATELIMIT_SHM_DIR", "/run/trio-shard-gateway/", "ratelimit_shm_dir", "/run/trio-shard-gateway"),
    ("PROXY_HTTP_SECRET", " 0123456789abcdef-proxy ", "proxy_http_secret", "0123456789abcdef-proxy"),
    ("DISCORD_GLOBAL_LIMIT", "1200", "global_limit", 1200),
    ("AMQP_GROUP", "proxy", "amqp_group", "proxy"),
    ("AMQP_EVENT", "REST", "amqp_event", "REST"),
    ("PROXY_HTTP_ADDRESS", "127.0.0.1:8081", "proxy_http_address", "127.0.0.1:8081"),
    ("PROXY_HTTP_ADDRESS", "[::1]:0", "proxy_http_address", "[::1]:0"),
    ("TIMEOUT", "1m30s", "timeout_s", 90.0),
    ("LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("LOG_FORMAT", "json", "log_format", "json"),
    ("PROMETHEUS_ADDRESS", "0.0.0.0:9100", "prometheus_address", "0.0.0.0:9100"),
    ("PROMETHEUS_ENDPOINT", "/internal/metrics", "prometheus_endpoint", "/internal/metrics"),
    ("SHUTDOWN_TIMEOUT", "40", "shutdown_timeout_s", 40.0),
    ("RESTART_MAX", "0", "restart_max", 0),
    ("RESTART_WINDOW", "5m", "restart_window_s", 300.0),
    ("SESSION_START_RESERVE", "50", "identify_reserve", 50),
]

INVALID: list[tuple[str, str]] = [
    ("DISCORD_TOKEN", "two words"),
    ("DISCORD_TOKEN_FILE", "/nonexistent/token"),
    ("DISCORD_API_URL", "discord.com/api/v10"),
    ("DISCORD_SHARD_COUNT", "0"),
    ("DISCORD_SHARD_COUNT", "sixteen"),
    ("DISCORD_SHARD_IDS", "3-1"),
    ("DISCORD_SHARD_IDS", "0-999999999"),
    ("WORKERS", "0"),
    ("DISCORD_INTENTS", "GUILD"),  # the Spectacles README's own example, silently ignored there
    ("DISCORD_RAW_INTENTS", "-1"),
    ("DISCORD_EVENTS", "MESSAGE CREATE"),
    ("DISCORD_EVENTS", ","),
    ("DISCORD_PRESENCE", "{"),
    ("DISCORD_PRESENCE", "[1]"),
    ("DISCORD_PRESENCE", '{"status": "busy"}'),
    ("DISCORD_PRESENCE", '{"game": {"name": "x"}}'),
    ("GATEWAY_COMPRESSION", "gzip"),
    ("BROKER_TYPE", "redis"),
    ("BROKER_GROUP", "a b"),
    ("BROKER_ENCODING", "etf"),
    ("BROKER_MESSAGE_TIMEOUT", "2 minutes"),
    ("BROKER_MESSAGE_TIMEOUT", "nan"),
    ("AMQP_URL", "http://rabbit/"),
    ("AMQP_URL", "amqp://u:p@rabbit:port/"),
    ("SHARD_STORE_TYPE", "etcd"),
    ("SHARD_STORE_PREFIX", "a b"),
    ("REDIS_URL", "127.0.0.1:6379"),
    ("REDIS_URL", "redis://r/0?ssl_ca_cert=/ca.pem"),
    ("REDIS_URL", "rediss://r/0?ssl_ca_certs=/nonexistent/ca.pem"),
    ("REDIS_POOL_SIZE", "0"),
    ("CLUSTER_MODE", "etcd"),
    ("CLUSTER_NODE_ID", "two words"),
    ("CLUSTER_LEASE_TTL", "0s"),
    ("RESHARD", "yes"),
    ("RESHARD_CHECK_INTERVAL", "5s"),
    ("RATELIMIT_BACKEND", "memory"),
    ("RATELIMIT_SHM_DIR", "relative/dir"),
    ("PROXY_HTTP_SECRET", "short"),
    ("DISCORD_GLOBAL_LIMIT", "0"),
    ("AMQP_GROUP", "a/b"),
    ("AMQP_EVENT", "RE QUEST"),
    ("PROXY_HTTP_ADDRESS", "8081x"),
    ("PROXY_HTTP_ADDRESS", "localhost"),
    ("PROXY_HTTP_ADDRESS", "::1:8081"),
    ("TIMEOUT", "0"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_FORMAT", "xml"),
    ("PROMETHEUS_ADDRESS", ":91000"),
    ("PROMETHEUS_ADDRESS", "127.0.0.1:65536"),
    ("PROMETHEUS_ENDPOINT", "metrics"),
    ("SHUTDOWN_TIMEOUT", "-1s"),
    ("RESTART_MAX", "-1"),
    ("RESTART_WINDOW", "0s"),
    ("SESSION_START_RESERVE", "ten"),
]


def test_the_tables_cover_every_variable() -> None:
    assert {env for env, *_ in VALID} | {"DISCORD_TOKEN_FILE"} == KNOWN_VARIABLES
    assert {env for env, _ in INVALID} == KNOWN_VARIABLES


def test_every_settings_field_has_exactly_one_key() -> None:
    assert sorted(row.field for row in SETTINGS) == sorted(
        f.name for f in fields(Settings) if f.name != "token_file"
    )


@pytest.mark.parametrize(("env", "text", "field", "expected"), VALID)
def test_each_variable_is_honoured(env: str, text: str, field: str, expected: Any) -> None:
    loaded = load_settings([], {env: text})
    assert getattr(loaded.settings, field) == expected
    primary = env.replace("_FILE", "").replace("_RAW", "")
    assert loaded.sources[primary].kind == "env"
    assert loaded.sources[primary].key == env


def test_token_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "token", f"Bot {TOKEN}\n")
    loaded = load_settings([], {"DISCORD_TOKEN_FILE": path})
    assert loaded.settings.token == TOKEN
    assert loaded.settings.token_file == path
    assert loaded.sources["DISCORD_TOKEN"].key == "DISCORD_TOKEN_FILE"


@pytest.mark.parametrize(("env", "text"), INVALID)
def test_each_bad_variable_is_an_error_naming_it(env: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {env: text})
    assert caught.value.key == env
    assert str(caught.value).startswith(f"{env}: expected ")


@pytest.mark.parametrize(("env", "text"), INVALID)
def test_each_bad_toml_value_is_an_error_naming_its_key(env: str, text: str, tmp_path: Path) -> None:
    toml_key = env.lower()
    path = write(tmp_path / "gw.toml", f"{toml_key} = {_toml_string(text)}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(["--config", path], {})
    assert caught.value.key == toml_key


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--shards", "0"),
        ("--shards", "many"),
        ("--shard-ids", "x"),
        ("--workers", "0"),
        ("--log-level", "loud"),
        ("--log-format", "yaml"),
    ],
)
def test_each_bad_flag_is_an_error_naming_it(flag: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([flag, text], {})
    assert caught.value.key == flag


def test_unreadable_token_file_is_an_error_even_for_print(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^DISCORD_TOKEN_FILE: expected a readable file"):
        parse_command_line(["--print-config"], {"DISCORD_TOKEN_FILE": str(tmp_path / "missing")})
    empty = write(tmp_path / "empty", "\n")
    with pytest.raises(ConfigError, match=r"^DISCORD_TOKEN_FILE: expected a file holding a bot token"):
        load_settings([], {"DISCORD_TOKEN_FILE": empty})


def test_token_errors_never_echo_the_token() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {"DISCORD_TOKEN": "secret part"})
    assert "secret" not in str(caught.value)


def test_url_errors_never_echo_the_password() -> None:
    for env, url in [
        ("AMQP_URL", "http://user:hunter2@rabbit/"),
        ("REDIS_URL", "redis://:hunter2@r:x/"),
        ("REDIS_URL", "rediss://:hunter2@r/0?ssl_ca_certs=/nonexistent/ca.pem"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_settings([], {env: url})
        assert "hunter2" not in str(caught.value)


# -- precedence -----------------------------------------------------------------------------------------


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "gw.toml",
        'log_level = "warning"\ndiscord_shard_count = 8\nworkers = 2\nlog_format = "console"\n',
    )
    env = {"LOG_LEVEL": "error", "DISCORD_SHARD_COUNT": "16", "WORKERS": "auto", "LOG_FORMAT": "json"}
    flags = ["--log-level", "debug", "--shards", "32", "--workers", "3", "--log-format", "auto"]

    defaults = load_settings([], {})
    from_file = load_settings(["--config", path], {})
    from_env = load_settings(["--config", path], env)
    from_flags = load_settings(["--config", path, *flags], env)

    fields_ = ("log_level", "shards", "workers", "log_format")
    assert [getattr(defaults.settings, f) for f in fields_] == ["info", None, None, "auto"]
    assert [getattr(from_file.settings, f) for f in fields_] == ["warning", 8, 2, "console"]
    assert [getattr(from_env.settings, f) for f in fields_] == ["error", 16, None, "json"]
    assert [getattr(from_flags.settings, f) for f in fields_] == ["debug", 32, 3, "auto"]
    assert str(defaults.sources["LOG_LEVEL"]) == "default"
    assert str(from_file.sources["LOG_LEVEL"]) == f"file {path}"
    assert str(from_env.sources["LOG_LEVEL"]) == "env"
    assert str(from_flags.sources["LOG_LEVEL"]) == "flag --log-level"
    assert str(from_flags.sources["DISCORD_SHARD_COUNT"]) == "flag --shards"


def test_flags_not_given_do_not_override() -> None:
    loaded = load_settings(["--shards", "4"], {"LOG_LEVEL": "error", "WORKERS": "2"})
    assert (loaded.settings.log_level, loaded.settings.workers) == ("error", 2)


def test_empty_value_is_unset_in_every_layer(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", 'log_level = "warning"\nbroker_group = ""\n')
    loaded = load_settings(["--config", path, "--log-level", ""], {"LOG_LEVEL": " ", "REDIS_POOL_SIZE": ""})
    assert loaded.settings.log_level == "warning"
    assert loaded.settings.broker_group == "gateway"
    assert loaded.settings.redis_pool_size == 5
    assert loaded.sources["BROKER_GROUP"].kind == "default"


def test_two_spellings_in_one_layer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only one of DISCORD_INTENTS and DISCORD_RAW_INTENTS"):
        load_settings([], {"DISCORD_INTENTS": "GUILDS", "DISCORD_RAW_INTENTS": "1"})
    path = write(tmp_path / "gw.toml", 'discord_token = "a.b"\ndiscord_token_file = "/x"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(["--config", path], {})
    assert caught.value.key == "discord_token_file"


def test_the_higher_layer_wins_across_spellings(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", TOKEN)
    path = write(tmp_path / "gw.toml", 'discord_token = "from.file"\ndiscord_raw_intents = 1\n')
    loaded = load_settings(
        ["--config", path], {"DISCORD_TOKEN_FILE": token_file, "DISCORD_INTENTS": "GUILDS,GUILD_MESSAGES"}
    )
    assert loaded.settings.token == TOKEN
    assert loaded.settings.intents == 513
    assert load_settings(["--config", path], {}).settings.intents == 1


# -- the TOML file --------------------------------------------------------------------------------------


def test_toml_accepts_native_types(tmp_path: Path) -> None:
    path = write(
        tmp_path / "gw.toml",
        """
discord_shard_count = "auto"
discord_shard_ids = [0, 1, 2, 5]
workers = 2
discord_events = ["MESSAGE_CREATE", "guild_create"]
discord_intents = ["GUILDS", "GUILD_MESSAGES"]
discord_presence = { status = "idle", afk = false }
broker_message_timeout = 90
timeout = 1.5
shutdown_timeout = "1m"
redis_pool_size = 10
broker_type = "amqp"
""",
    )
    settings = load_settings(["--config", path], {}).settings
    assert settings.shards is None
    assert settings.shard_ids == (0, 1, 2, 5)
    assert settings.workers == 2
    assert settings.events == frozenset({"MESSAGE_CREATE", "GUILD_CREATE"})
    assert settings.intents == 513
    assert settings.presence == {"status": "idle", "afk": False}
    assert (settings.broker_message_timeout_s, settings.timeout_s, settings.shutdown_timeout_s) == (
        90,
        1.5,
        60,
    )
    assert settings.redis_pool_size == 10
    assert settings.broker_type == "amqp"


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('redis_pool_size = "5"', "redis_pool_size", "an integer, got a string"),
        ("discord_shard_count = true", "discord_shard_count", 'an integer or "auto", got a boolean'),
        ("log_level = 1", "log_level", "a string, got an integer"),
        ("broker_message_timeout = [1]", "broker_message_timeout", "a duration string"),
        ("discord_events = []", "discord_events", "a non-empty array of names"),
        ('discord_shard_ids = [0, "1"]', "discord_shard_ids", "a non-empty array of integer ids"),
        ("discord_raw_intents = 1.0", "discord_raw_intents", "an integer, got a float"),
        ("amqp_url = { host = 'x' }", "amqp_url", "a string, got a table"),
        ("timeout = 1979-05-27", "timeout", "got date"),
    ],
)
def test_toml_wrong_types_name_the_key(line: str, key: str, expected: str, tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(["--config", path], {})
    assert caught.value.key == key
    assert expected in caught.value.expected


@pytest.mark.parametrize(
    "text",
    ["shard_count = 4", "[shards]\ncount = 4", "DISCORD_SHARD_COUNT = 4", "discord_gateway_url = 'wss://x'"],
)
def test_toml_unknown_keys_are_errors(text: str, tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", text + "\n")
    with pytest.raises(ConfigError, match="expected a known setting") as caught:
        load_settings(["--config", path], {})
    assert caught.value.key == text.split()[0].strip("[]")


def test_missing_or_broken_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--config: expected a readable TOML file"):
        load_settings(["--config", str(tmp_path / "nope.toml")], {})
    broken = write(tmp_path / "broken.toml", "workers = \n")
    with pytest.raises(ConfigError, match=r"^--config: expected a valid TOML file"):
        load_settings(["--config", broken], {})


# -- cross-checks ---------------------------------------------------------------------------------------


def test_shard_ids_beyond_the_count_name_the_ids_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^DISCORD_SHARD_IDS: expected shard ids below the shard count 4"):
        load_settings([], {"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARD_IDS": "2-4"})
    with pytest.raises(ConfigError, match=r"^--shard-ids: "):
        load_settings(["--shards", "4", "--shard-ids", "4"], {})
    path = write(tmp_path / "gw.toml", "discord_shard_ids = [8]\n")
    with pytest.raises(ConfigError, match=r"^discord_shard_ids: "):
        load_settings(["--config", path, "--shards", "8"], {})


def test_check_shard_count_once_auto_is_resolved() -> None:
    loaded = load_settings(["--shard-ids", "0-9"], {})
    loaded.check_shard_count(10)
    with pytest.raises(ConfigError, match=r"^--shard-ids: expected shard ids below the shard count 5"):
        loaded.check_shard_count(5)


def test_split_address() -> None:
    assert split_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert split_address("[::1]:0") == ("::1", 0)


def test_unknown_variables_with_our_prefixes_are_warned_about() -> None:
    env = {"DISCORD_SHARDCOUNT": "4", "DISCORD_API_VERSION": "9", "DISCORD_GATEWAY_URL": "x", "HOME": "/"}
    warnings = load_settings([], env).warnings
    assert len(warnings) == 3
    assert any("DISCORD_SHARDCOUNT" in w for w in warnings)
    assert any("DISCORD_GATEWAY_URL" in w and "ignored" in w for w in warnings)


# -- command line, print and check -----------------------------------------------------------------------


def test_missing_token_is_only_an_error_when_running_or_checking() -> None:
    loaded, action = parse_command_line(["--print-config"], {})
    assert action == "print"
    assert "DISCORD_TOKEN = (unset)  (default)" in format_config(loaded)
    for argv in ([], ["--check-config"]):
        with pytest.raises(ConfigError, match=r"^DISCORD_TOKEN: expected a bot token"):
            parse_command_line(argv, {})
    assert parse_command_line([], {"DISCORD_TOKEN": TOKEN})[1] == "run"
    assert parse_command_line(["--check-config"], {"DISCORD_TOKEN": TOKEN})[1] == "check"


def test_print_and_check_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_command_line(["--print-config", "--check-config"], {})
    assert exited.value.code == 2
    capsys.readouterr()


def test_print_config_redacts_secrets_and_shows_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "gw.toml", 'amqp_url = "amqp://user:amqp-pass-123@rabbit:5672/"\nworkers = 2\n')
    env = {"DISCORD_TOKEN": TOKEN, "REDIS_URL": "redis://:redis-pass-456@redis:6379/0"}
    assert main(["--print-config", "--config", path, "--shards", "8"], env) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == len(SETTINGS)
    assert all(
        re.fullmatch(r"[A-Z_]+ = .+  \((default|env|flag --[a-z-]+|file .+?)(, [A-Za-z_]+)?\)", line)
        for line in lines
    )
    for secret in (TOKEN, "amqp-pass-123", "redis-pass-456"):
        assert secret not in out
    assert "DISCORD_TOKEN = [redacted]  (env)" in lines
    assert f"AMQP_URL = amqp://user:[redacted]@rabbit:5672/  (file {path})" in lines
    assert "REDIS_URL = redis://:[redacted]@redis:6379/0  (env)" in lines
    assert "DISCORD_SHARD_COUNT = 8  (flag --shards)" in lines
    assert f"WORKERS = 2  (file {path})" in lines
    assert "DISCORD_SHARD_IDS = all  (default)" in lines
    assert "PROMETHEUS_ADDRESS = off  (default)" in lines


def test_print_config_names_the_other_spelling(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", TOKEN)
    loaded = load_settings([], {"DISCORD_TOKEN_FILE": token_file, "DISCORD_RAW_INTENTS": "513"})
    lines = format_config(loaded).splitlines()
    assert f"DISCORD_TOKEN = [redacted] (read from {token_file})  (env, DISCORD_TOKEN_FILE)" in lines
    assert "DISCORD_INTENTS = GUILDS,GUILD_MESSAGES (= 513)  (env, DISCORD_RAW_INTENTS)" in lines
    unnamed = load_settings([], {"DISCORD_RAW_INTENTS": str(1 << 30)})
    assert f"DISCORD_INTENTS = {1 << 30}  (env, DISCORD_RAW_INTENTS)" in format_config(unnamed).splitlines()


def test_main_reports_config_errors_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "0"], {"DISCORD_TOKEN": TOKEN}) == 2
    assert (
        capsys.readouterr().err
        == "configuration error: --workers: expected \"auto\" or an integer of at least 1, got '0'\n"
    )


def test_main_hands_settings_to_the_run_loop() -> None:
    seen: list[Settings] = []

    def run(settings: Settings, environ: Mapping[str, str]) -> int:
        seen.append(settings)
        return 0

    assert main(["--shards", "2"], {"DISCORD_TOKEN": TOKEN}, run=run) == 0
    assert seen[0].shards == 2 and seen[0].token == TOKEN


def _clean_environ(**extra: str) -> dict[str, str]:
    ours = (*OWN_PREFIXES, "WORKERS", "TIMEOUT", "LOG_LEVEL", "LOG_FORMAT", "SHUTDOWN_TIMEOUT")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    env.update(extra)
    return env


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--check-config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_exit_statuses(tmp_path: Path) -> None:
    ok = _check(_clean_environ(DISCORD_TOKEN=TOKEN))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "configuration OK\n", "")

    no_token = _check(_clean_environ())
    assert no_token.returncode == 2
    assert no_token.stderr.startswith("configuration error: DISCORD_TOKEN: expected a bot token")

    unreadable = _check(_clean_environ(DISCORD_TOKEN_FILE=str(tmp_path / "missing")))
    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith("configuration error: DISCORD_TOKEN_FILE: expected a readable file")

    bad = _check(_clean_environ(DISCORD_TOKEN=TOKEN, REDIS_POOL_SIZE="many"))
    assert bad.returncode == 2
    assert bad.stderr == "configuration error: REDIS_POOL_SIZE: expected an integer, got 'many'\n"


# -- the worker's environment ---------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_duration = st.one_of(
    st.integers(0, 10**6).map(float), st.floats(min_value=0.0, max_value=1e9, allow_nan=False)
)
_positive_duration = _duration.filter(lambda seconds: seconds > 0)
_event_name = st.from_regex(r"[A-Z][A-Z0-9_]{0,24}", fullmatch=True)
_amqp_url = st.from_regex(r"amqps?://[a-z]{1,8}:[A-Za-z0-9%]{1,12}@[a-z]{1,8}(:[0-9]{1,4})?/", fullmatch=True)
_redis_url = st.from_regex(r"rediss?://(:[A-Za-z0-9]{1,12}@)?[a-z]{1,8}:[0-9]{1,4}(/[0-9])?", fullmatch=True)
_amqp_name = st.from_regex(r"[A-Za-z0-9_.:\-]{1,30}", fullmatch=True)
_address = st.builds(
    "{}:{}".format, st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "[::1]"]), st.integers(0, 65535)
)
_presence = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["online", "dnd", "idle", "invisible", "offline"]),
        "afk": st.booleans(),
        "since": st.none() | st.integers(0, 2**53),
        "activities": st.lists(st.fixed_dictionaries({"name": _text, "type": st.integers(0, 5)}), max_size=2),
    },
)


@st.composite
def settings_strategy(draw: st.DrawFn) -> Settings:
    shards = draw(st.none() | st.integers(1, 3000))
    ids = draw(st.none() | st.sets(st.integers(0, (shards or 3000) - 1), min_size=1, max_size=40))
    return Settings(
        token=draw(st.from_regex(r"[A-Za-z0-9._\-]{10,72}", fullmatch=True)),
        api_url=draw(st.sampled_from(["https://discord.com/api/v10", "http://127.0.0.1:8080/api/v10"])),
        shards=shards,
        shard_ids=tuple(sorted(ids)) if ids else None,
        workers=draw(st.none() | st.integers(1, 256)),
        intents=draw(st.integers(0, 2**26)),
        events=draw(st.none() | st.frozensets(_event_name, min_size=1)),
        presence=draw(st.none() | _presence),
        compression=draw(st.sampled_from(get_args(Compression))),
        broker_type=draw(st.sampled_from(get_args(BrokerType))),
        broker_group=draw(_amqp_name),
        broker_encoding=draw(st.sampled_from(get_args(Encoding))),
        broker_message_timeout_s=draw(_duration),
        amqp_url=draw(_amqp_url),
        shard_store_type=draw(st.sampled_from(get_args(StoreType))),
        shard_store_prefix=draw(st.from_regex(r"[!-~]{1,16}", fullmatch=True)),
        redis_url=draw(_redis_url),
        redis_pool_size=draw(st.integers(1, 1000)),
        ratelimit_backend=draw(st.sampled_from(get_args(RatelimitBackend))),
        global_limit=draw(st.integers(1, 10**6)),
        amqp_group=draw(_amqp_name),
        amqp_event=draw(_amqp_name),
        proxy_http_address=draw(st.none() | _address),
        timeout_s=draw(_positive_duration),
        log_level=draw(st.sampled_from(get_args(LogLevel))),
        log_format=draw(st.sampled_from(get_args(LogFormat))),
        prometheus_address=draw(st.none() | _address),
        prometheus_endpoint=draw(st.from_regex(r"/[a-z0-9/_\-]{0,16}", fullmatch=True)),
        shutdown_timeout_s=draw(_positive_duration),
        restart_max=draw(st.integers(0, 100)),
        restart_window_s=draw(_positive_duration),
        identify_reserve=draw(st.integers(0, 10_000)),
        # RESHARD=auto follows Discord's count: only with `--shards auto` and no fixed shard ids.
        reshard=draw(st.sampled_from(["auto", "off"])) if shards is None and not ids else "off",
        reshard_check_interval_s=draw(st.floats(10.0, 86_400.0)),
    )  # fmt: skip


#: The settings a worker reads (the table's `processes`), all of which the hand-over must carry.
WORKER_FIELDS = tuple(row.field for row in SETTINGS if "worker" in row.processes)


@given(settings_strategy(), st.data())
def test_a_worker_configuration_round_trips_through_the_control_channel(
    settings: Settings, data: st.DataObject
) -> None:
    shard_count = settings.shards or 3000
    ids = tuple(sorted(data.draw(st.sets(st.integers(0, shard_count - 1), min_size=1, max_size=20))))
    workers = data.draw(st.integers(1, 64))
    assignment = ShardAssignment(
        ids, shard_count, "wss://gateway.example", 16, ratelimit_fallback_share=workers
    )
    message = decode(encode(Configure(WorkerConfig(settings, assignment))))
    assert isinstance(message, Configure)
    config = message.config
    assert config.assignment == assignment
    for name in WORKER_FIELDS:
        assert getattr(config.settings, name) == getattr(settings, name), name
    # What only the supervisor reads stays behind (the worker sees its defaults).
    assert (
        config.settings.prometheus_address is None and config.settings.restart_max == Settings().restart_max
    )


def test_the_hand_over_carries_the_token_and_never_a_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    settings = load_settings([], {"DISCORD_TOKEN_FILE": str(path)}).settings
    wire = worker_wire(settings)
    assert wire["DISCORD_TOKEN"] == TOKEN and "DISCORD_TOKEN_FILE" not in wire
    assert settings_from_wire(wire).token == TOKEN


def test_a_hand_over_with_an_unknown_or_bad_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="NOT_A_SETTING"):
        settings_from_wire({"NOT_A_SETTING": "1"})
    with pytest.raises(ConfigError, match="REDIS_POOL_SIZE"):
        settings_from_wire({"REDIS_POOL_SIZE": "zero"})


def _as_environment(settings: Settings) -> dict[str, str]:
    return dict(row.to_text(getattr(settings, row.field)) for row in SETTINGS)


@given(settings_strategy())
def test_every_setting_written_as_text_reads_back(settings: Settings) -> None:
    assert load_settings([], _as_environment(settings)).settings == settings


def test_defaults() -> None:
    settings = load_settings([], {}).settings
    assert settings == Settings()
    assert settings.intents == DEFAULT_INTENTS
    assert (settings.shutdown_timeout_s, settings.restart_max, settings.restart_window_s) == (25.0, 5, 60.0)
    assert settings.identify_reserve == 10
    assert "token=" not in repr(Settings(token=TOKEN)) and TOKEN not in repr(Settings(token=TOKEN))


# -- cluster mode --------------------------------------------------------------------------------------------


def test_cluster_mode_keeps_sessions_in_redis() -> None:
    settings = load_settings([], {"DISCORD_TOKEN": "abc.def", "CLUSTER_MODE": "redis"}).settings
    assert settings.shard_store_type == "redis"


@pytest.mark.parametrize(
    ("argv", "environ", "key"),
    [
        ([], {"SHARD_STORE_TYPE": "memory"}, "SHARD_STORE_TYPE"),
        (["--shard-ids", "0-3"], {}, "--shard-ids"),
        ([], {"DISCORD_SHARD_IDS": "0-3"}, "DISCORD_SHARD_IDS"),
        ([], {"CLUSTER_LEASE_TTL": "1500ms"}, "CLUSTER_LEASE_TTL"),
    ],
)
def test_cluster_mode_refuses_what_contradicts_it(argv: list[str], environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, {"DISCORD_TOKEN": "abc.def", "CLUSTER_MODE": "redis", **environ})
    assert caught.value.key == key


def test_reshard_is_auto_with_auto_shards_and_off_where_the_count_is_not_discords() -> None:
    token = {"DISCORD_TOKEN": "abc.def"}
    assert load_settings([], token).settings.reshard == "auto"
    assert load_settings(["--shards", "auto"], token).settings.reshard == "auto"
    assert load_settings(["--shards", "8"], token).settings.reshard == "off"
    assert load_settings(["--shards", "8", "--shard-ids", "0-3"], token).settings.reshard == "off"
    # A cluster node follows the cluster's reshards; with `auto` it may lead them.
    assert load_settings([], {**token, "CLUSTER_MODE": "redis"}).settings.reshard == "auto"
    assert load_settings(["--shards", "8"], {**token, "CLUSTER_MODE": "redis"}).settings.reshard == "off"
    assert load_settings([], {**token, "RESHARD": "off"}).settings.reshard == "off"


@pytest.mark.parametrize(
    ("argv", "environ", "key"),
    [
        (["--shards", "8"], {"RESHARD": "auto"}, "RESHARD"),
        ([], {"DISCORD_SHARD_COUNT": "8", "RESHARD": "auto"}, "RESHARD"),
        (["--shards", "8"], {"CLUSTER_MODE": "redis", "RESHARD": "auto"}, "RESHARD"),
        ([], {"RESHARD_CHECK_INTERVAL": "9s"}, "RESHARD_CHECK_INTERVAL"),
    ],
)
def test_reshard_auto_refuses_a_fixed_shard_count(argv: list[str], environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, {"DISCORD_TOKEN": "abc.def", **environ})
    assert caught.value.key == key
