"""Supervisor settings: every value resolved from four layers, each with its source.

Precedence (DESIGN 3.1): defaults < TOML file (`--config FILE`) < environment < command line.

- One table, `KEYS`, names each setting once: its variable (DESIGN 3.2), its TOML key (the variable in lower
  case: `discord_shard_count = 16`), its flag if it has one, how to parse it and how to write it back. The
  writer is the parser's inverse, so `--print-config` and the environment handed to each worker are built
  from the same resolved values the supervisor runs with.
- Every layer yields text (a TOML value is type-checked, then written as the same text an environment
  variable would hold), so each format has exactly one parser: the worker's, in `workers/config.py`.
- Spectacles' gateway silently ignored every numeric, duration and JSON variable for five years because its
  parse errors were dropped, and a missing TOML file too (anchors/spectacles.md 1.1). Here a value that does
  not parse is a `ConfigError` naming the key as the user wrote it (`DISCORD_SHARD_COUNT`,
  `discord_shard_count` or `--shards`) and what was expected; so is an unknown TOML key, a TOML value of the
  wrong type, and a `--config` file that cannot be read. Unknown variables with one of our prefixes (a typo,
  or a Spectacles-only name such as `DISCORD_API_VERSION`) cannot be errors, since the environment is shared,
  but they are reported in `LoadedSettings.warnings`.
- An empty value is unset in every layer, so `REDIS_POOL_SIZE=` in an env file falls through to the file or
  the default instead of failing or meaning zero.
- Two settings each have two spellings: `DISCORD_TOKEN` / `DISCORD_TOKEN_FILE` and `DISCORD_INTENTS` /
  `DISCORD_RAW_INTENTS`. The highest layer that sets either spelling wins; setting both in one layer is an
  error rather than a silent preference.
- A missing token is not an error here (`--print-config` shows it unset); `LoadedSettings.require_token`
  makes it one for running and `--check-config`. An unreadable `DISCORD_TOKEN_FILE` is a bad value, so it
  is an error everywhere.
"""

from __future__ import annotations

import argparse
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import orjson

from workers.config import (
    DEFAULT_API_URL,
    DEFAULT_INTENTS,
    INTENT_BITS,
    MAX_SHARD_ID,
    BrokerType,
    Compression,
    Encoding,
    LogLevel,
    StoreType,
    format_shard_ids,
    parse_address,
    parse_amqp_name,
    parse_choice,
    parse_directory,
    parse_duration,
    parse_int,
    parse_intents,
    parse_shard_count,
    parse_shard_ids,
    read_token,
)
from workers.errors import ConfigError
from workers.logs import REDACTED, LogFormat, redact_url

__all__ = [
    "KEYS",
    "KNOWN_VARIABLES",
    "OWN_PREFIXES",
    "Key",
    "LoadedSettings",
    "RatelimitBackend",
    "Settings",
    "Source",
    "build_parser",
    "load_settings",
    "settings_from_arguments",
    "split_address",
]

RatelimitBackend = Literal["shm", "redis"]

#: Shard ids above this are refused before a range such as `0-999999999` is expanded into memory.
#: Variable prefixes we own: an unknown variable with one of them is probably a typo and gets a warning.
OWN_PREFIXES: Final = (
    "DISCORD_",
    "GATEWAY_",
    "BROKER_",
    "AMQP_",
    "SHARD_STORE_",
    "REDIS_",
    "RATELIMIT_",
    "PROXY_",
    "PROMETHEUS_",
    "RESTART_",
    "SESSION_START_",
)
#: Variables with one of our prefixes that the supervisor reads outside its settings.
READ_ELSEWHERE: Final = frozenset({"PROMETHEUS_MULTIPROC_DIR"})
#: Set by the supervisor for each worker (what it learnt from `GET /gateway/bot`), never read by it.
WORKER_ONLY_VARIABLES: Final = ("DISCORD_GATEWAY_URL", "DISCORD_MAX_CONCURRENCY", "RATELIMIT_FALLBACK_SHARE")
PRESENCE_KEYS: Final = frozenset({"since", "activities", "status", "afk"})
PRESENCE_STATUSES: Final = ("online", "dnd", "idle", "invisible", "offline")
_EVENT_NAME: Final = re.compile(r"[A-Z][A-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the supervisor runs with, resolved; `worker_environment` hands a worker its part.

    Units are in the names (`_s` = seconds). `None` means "decide at run time" for `shards` (the count
    `GET /gateway/bot` recommends), `shard_ids` (all of `0..shards-1`) and `workers` (one per CPU core, never
    more than shards), and "off" for the two listening addresses.
    """

    token: str = field(default="", repr=False)
    #: The file the token was read from (`DISCORD_TOKEN_FILE`), for diagnostics; None when given directly.
    token_file: str | None = None
    api_url: str = DEFAULT_API_URL
    shards: int | None = None
    shard_ids: tuple[int, ...] | None = None
    workers: int | None = None
    intents: int = DEFAULT_INTENTS
    #: Dispatch names to publish; None publishes all.
    events: frozenset[str] | None = None
    presence: dict[str, Any] | None = None
    compression: Compression = "zlib-stream"
    broker_type: BrokerType = "stdio"
    broker_group: str = "gateway"
    broker_encoding: Encoding = "spectacles"
    broker_message_timeout_s: float = 120.0
    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1/", repr=False)
    shard_store_type: StoreType = "memory"
    shard_store_prefix: str = "gateway"
    redis_url: str = field(default="redis://127.0.0.1:6379", repr=False)
    redis_pool_size: int = 5
    ratelimit_backend: RatelimitBackend = "shm"
    #: The directory of the shared-memory ratelimit segment (tmpfs; a systemd RuntimeDirectory works too).
    ratelimit_shm_dir: str = "/dev/shm"
    #: Global REST requests per second for this bot.
    global_limit: int = 50
    amqp_group: str = "rest"
    amqp_event: str = "REQUEST"
    #: `host:port` of the HTTP REST proxy; None = off.
    proxy_http_address: str | None = None
    #: Shared secret the HTTP proxy's clients must send in `X-Proxy-Secret`; None = not required.
    proxy_http_secret: str | None = field(default=None, repr=False)
    #: REST proxy: the longest a request may wait for limits plus Discord's answer.
    timeout_s: float = 30.0
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    #: `host:port` of `/metrics`, `/healthz`, `/readyz`; None = off.
    prometheus_address: str | None = None
    prometheus_endpoint: str = "/metrics"
    #: Graceful stop: how long workers get to drain before they are killed.
    shutdown_timeout_s: float = 25.0
    #: Crash-loop cap: more than `restart_max` restarts of one worker within `restart_window_s` gives up.
    restart_max: int = 5
    restart_window_s: float = 60.0
    #: Daily session starts (IDENTIFYs) a start must leave unspent, kept for sessions that must be
    #: re-established later (`supervisor.planning.check_session_budget`). A count, not a share of
    #: `session_start_limit.total`: the total is only known after `GET /gateway/bot`, and 10 covers a few
    #: crash-and-reidentify cycles on any bot while costing a 1,000-a-day bot 1% of its budget.
    identify_reserve: int = 10

    def worker_environment(
        self,
        shard_ids: Sequence[int],
        shard_count: int,
        gateway_url: str,
        max_concurrency: int,
        workers: int = 1,
    ) -> dict[str, str]:
        """The variables a worker (`python -m workers`) reads, for the shards `shard_ids` of `shard_count`.

        Every variable the worker reads is present, empty meaning unset, so the result can be laid over the
        supervisor's own environment without an inherited value (say `DISCORD_INTENTS`, or a token that came
        from a TOML file and not the environment) leaking through. `workers.config.worker_config_from_env`
        turns it back into the same values.
        """
        env = {key.env: key.to_text(getattr(self, key.field)) for key in KEYS if key.worker}
        env.update(
            DISCORD_TOKEN_FILE="",  # the token travels resolved; an inherited file must not compete
            DISCORD_INTENTS="",  # intents travel as the raw bitfield
            DISCORD_RAW_INTENTS=str(self.intents),
            DISCORD_SHARD_COUNT=str(shard_count),
            DISCORD_SHARD_IDS=format_shard_ids(tuple(sorted(shard_ids))),
            DISCORD_GATEWAY_URL=gateway_url,
            DISCORD_MAX_CONCURRENCY=str(max_concurrency),
            # While Redis is away each worker paces its own share of the global limit (R10).
            RATELIMIT_FALLBACK_SHARE=str(max(1, workers)),
            PROMETHEUS_ADDRESS="",  # the supervisor serves metrics; a worker must never bind the same port
        )
        return env


def split_address(address: str) -> tuple[str, int]:
    """`(host, port)` of a validated `host:port` setting (`proxy_http_address`, `prometheus_address`)."""
    return parse_address("address", address)


# -- parsers: (key as the user spelled it, text) -> value ---------------------------------------------------


def _parse_token(key: str, text: str) -> str:
    try:
        token = read_token({"DISCORD_TOKEN": text})
    except ConfigError as exc:
        raise ConfigError(key, exc.expected) from None
    return _checked_token(key, token)


def _read_token_file(key: str, text: str) -> str:
    try:
        token = read_token({"DISCORD_TOKEN_FILE": text})
    except ConfigError as exc:
        if exc.key == "DISCORD_TOKEN_FILE":
            raise ConfigError(key, exc.expected) from None
        raise ConfigError(key, f"a file holding a bot token, {text!r} is empty") from None
    return _checked_token(key, token)


def _checked_token(key: str, token: str) -> str:
    # The token is never echoed: this message may reach a log.
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(key, "a bot token (one word, without spaces or control characters)")
    return token


def _split_url(key: str, url: str) -> urllib.parse.SplitResult:
    """`urlsplit`, with a malformed URL (or port) as a ConfigError that does not echo a password."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        # Not `exc`: it quotes the "port", which is the start of the password when that holds a `/`.
        raise ConfigError(
            key, "a well-formed URL (a numeric port; / ? # @ : in a password written as %2F %3F %23 %40 %3A)"
        ) from None
    return parts


def _parse_http_url(key: str, text: str) -> str:
    url = text.strip().rstrip("/")
    parts = _split_url(key, url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"an http(s) URL such as {DEFAULT_API_URL}, got {text!r}")
    return url


def _url_parser(schemes: tuple[str, ...], example: str) -> Callable[[str, str], str]:
    def parse(key: str, text: str) -> str:
        url = text.strip()
        parts = _split_url(key, url)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ConfigError(key, f"a {'/'.join(schemes)} URL such as {example}, got {redact_url(url)!r}")
        return url

    return parse


def _auto_shard_count(key: str, text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return parse_shard_count(key, text)
    except ConfigError:
        raise ConfigError(
            key, f'"auto" or a shard count from 1 to {MAX_SHARD_ID + 1}, got {text[:40]!r}'
        ) from None


def _auto_int_parser(minimum: int) -> Callable[[str, str], int | None]:
    def parse(key: str, text: str) -> int | None:
        if text.strip().lower() == "auto":
            return None
        try:
            return parse_int(key, text, minimum=minimum)
        except ConfigError:
            raise ConfigError(key, f'"auto" or an integer of at least {minimum}, got {text!r}') from None

    return parse


def _parse_shard_ids(key: str, text: str) -> tuple[int, ...]:
    # The length first: `int()` refuses more than 4300 digits with a ValueError.
    if any(len(number) > 7 or int(number) > MAX_SHARD_ID for number in re.findall(r"\d+", text)):
        raise ConfigError(key, f"shard ids up to {MAX_SHARD_ID}, got {text!r}")
    return parse_shard_ids(key, text)


def _parse_events(key: str, text: str) -> frozenset[str]:
    names = frozenset(name.strip().upper() for name in text.split(",") if name.strip())
    bad = sorted(name for name in names if not _EVENT_NAME.fullmatch(name))
    if not names or bad:
        raise ConfigError(key, f"dispatch names such as MESSAGE_CREATE,GUILD_CREATE, got {text!r}")
    return names


def _parse_presence(key: str, text: str) -> dict[str, Any]:
    try:
        presence = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ConfigError(key, f'a JSON object such as {{"status": "online"}}, got {text!r}') from None
    if not isinstance(presence, dict):
        raise ConfigError(key, f'a JSON object such as {{"status": "online"}}, got {text!r}')
    unknown = sorted(set(presence) - PRESENCE_KEYS)
    if unknown:
        raise ConfigError(key, f"presence fields from {', '.join(sorted(PRESENCE_KEYS))}, got {unknown[0]!r}")
    if "status" in presence and presence["status"] not in PRESENCE_STATUSES:
        raise ConfigError(key, f"a status from {', '.join(PRESENCE_STATUSES)}, got {presence['status']!r}")
    return presence


def _choice_parser(literal: Any) -> Callable[[str, str], str]:
    choices: tuple[str, ...] = get_args(literal)
    return lambda key, text: parse_choice(key, text, choices)


def _int_parser(minimum: int) -> Callable[[str, str], int]:
    return lambda key, text: parse_int(key, text, minimum=minimum)


def _duration_parser(*, positive: bool) -> Callable[[str, str], float]:
    def parse(key: str, text: str) -> float:
        seconds = parse_duration(key, text)
        if positive and seconds == 0:
            raise ConfigError(key, f"a duration above zero, got {text!r}")
        return seconds

    return parse


def _parse_word(key: str, text: str) -> str:
    word = text.strip()
    if not word or any(c.isspace() for c in word):
        raise ConfigError(key, f"a name without spaces, got {text!r}")
    return word


def _parse_secret(key: str, text: str) -> str:
    # Never echoed: this message may reach a log.
    secret = text.strip()
    if len(secret) < 16 or any(c.isspace() or not c.isprintable() or not c.isascii() for c in secret):
        raise ConfigError(key, "a shared secret of at least 16 printable ASCII characters without spaces")
    return secret


def _parse_address(key: str, text: str) -> str | None:
    if text.strip().lower() == "off":  # DESIGN 3.2's word for the default, which workers accept too
        return None
    parse_address(key, text)
    return text.strip()


def _parse_endpoint(key: str, text: str) -> str:
    path = text.strip()
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        raise ConfigError(key, f"a URL path such as /metrics, got {text!r}")
    return path


# -- writers: value -> the text its parser reads back ----------------------------------------------------


def _seconds_text(seconds: float) -> str:
    if seconds.is_integer():
        return f"{int(seconds)}s"
    text = repr(seconds)
    return text if "e" in text else f"{text}s"


def _intents_text(bits: int) -> str:
    """Intent names when `bits` is made of known ones (the bitfield alongside), else the bitfield."""
    names: dict[int, str] = {}
    for name, bit in INTENT_BITS.items():
        names.setdefault(bit, name)  # the first name of a bit is its current one
    listed = [name for bit, name in sorted(names.items()) if bits >> bit & 1]
    if sum(1 << INTENT_BITS[name] for name in listed) != bits:
        return str(bits)
    return f"{','.join(listed) or '(none)'} (= {bits})"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        raise TypeError("no setting is a boolean")
    if isinstance(value, float):
        return _seconds_text(value)
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    if isinstance(value, tuple):
        return format_shard_ids(value)
    return str(value)


# -- the table ------------------------------------------------------------------------------------------

TomlKind = Literal["str", "int", "int_or_auto", "duration", "names", "shard_ids", "table"]
_TOML_EXPECTED: Final[dict[str, str]] = {
    "str": "a string",
    "int": "an integer",
    "int_or_auto": 'an integer or "auto"',
    "duration": 'a duration string such as "30s" or a number of seconds',
    "names": 'an array of names or a comma-separated string such as "GUILDS,GUILD_MESSAGES"',
    "shard_ids": 'an array of shard ids or a string such as "0-7,16-23"',
    "table": "a table or a JSON string",
}
_TOML_TYPE_NAMES: Final = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: where it is read from and how. The TOML key is `env.lower()`."""

    env: str
    field: str
    parse: Callable[[str, str], Any]
    toml: TomlKind = "str"
    flag: str | None = None
    #: A second spelling of the same setting, with its own parser (`DISCORD_TOKEN_FILE`).
    alternate: str | None = None
    parse_alternate: Callable[[str, str], Any] | None = None
    #: Whether a worker reads it (and so `Settings.worker_environment` carries it).
    worker: bool = True
    #: How `--print-config` shows None.
    unset: str = "(unset)"
    secret: Literal["", "token", "url"] = ""

    def to_text(self, value: Any) -> str:
        """The text `parse` reads back as `value` ("" for None); for intents, `parse_alternate` (the raw
        bitfield, since not every bitfield has names)."""
        return _text(value)

    def display(self, value: Any) -> str:
        if value is None or value == "":
            return self.unset
        if self.secret == "token":
            return REDACTED
        if self.secret == "url":
            return redact_url(value)
        if self.field == "intents":
            return _intents_text(value)
        return _text(value)


KEYS: Final[tuple[Key, ...]] = (
    Key("DISCORD_TOKEN", "token", _parse_token, alternate="DISCORD_TOKEN_FILE",
        parse_alternate=_read_token_file, secret="token"),
    Key("DISCORD_API_URL", "api_url", _parse_http_url),
    Key("DISCORD_SHARD_COUNT", "shards", _auto_shard_count, "int_or_auto", "--shards", worker=False,
        unset="auto"),
    Key("DISCORD_SHARD_IDS", "shard_ids", _parse_shard_ids, "shard_ids", "--shard-ids", worker=False,
        unset="all"),
    Key("WORKERS", "workers", _auto_int_parser(1), "int_or_auto", "--workers", worker=False, unset="auto"),
    Key("DISCORD_INTENTS", "intents", parse_intents, "names", alternate="DISCORD_RAW_INTENTS",
        parse_alternate=_int_parser(0), worker=False),
    Key("DISCORD_EVENTS", "events", _parse_events, "names", unset="all"),
    Key("DISCORD_PRESENCE", "presence", _parse_presence, "table", unset="none"),
    Key("GATEWAY_COMPRESSION", "compression", _choice_parser(Compression)),
    Key("BROKER_TYPE", "broker_type", _choice_parser(BrokerType)),
    Key("BROKER_GROUP", "broker_group", parse_amqp_name),
    Key("BROKER_ENCODING", "broker_encoding", _choice_parser(Encoding)),
    Key("BROKER_MESSAGE_TIMEOUT", "broker_message_timeout_s", _duration_parser(positive=False), "duration"),
    Key("AMQP_URL", "amqp_url", _url_parser(("amqp", "amqps"), "amqp://guest:guest@127.0.0.1/"),
        secret="url"),
    Key("SHARD_STORE_TYPE", "shard_store_type", _choice_parser(StoreType)),
    Key("SHARD_STORE_PREFIX", "shard_store_prefix", _parse_word),
    Key("REDIS_URL", "redis_url", _url_parser(("redis", "rediss", "unix"), "redis://127.0.0.1:6379"),
        secret="url"),
    Key("REDIS_POOL_SIZE", "redis_pool_size", _int_parser(1), "int"),
    Key("RATELIMIT_BACKEND", "ratelimit_backend", _choice_parser(RatelimitBackend)),
    Key("RATELIMIT_SHM_DIR", "ratelimit_shm_dir", parse_directory),
    Key("DISCORD_GLOBAL_LIMIT", "global_limit", _int_parser(1), "int"),
    Key("AMQP_GROUP", "amqp_group", parse_amqp_name),
    Key("AMQP_EVENT", "amqp_event", parse_amqp_name),
    Key("PROXY_HTTP_ADDRESS", "proxy_http_address", _parse_address, unset="off"),
    Key("PROXY_HTTP_SECRET", "proxy_http_secret", _parse_secret, unset="none", secret="token"),
    Key("TIMEOUT", "timeout_s", _duration_parser(positive=True), "duration"),
    Key("LOG_LEVEL", "log_level", _choice_parser(LogLevel), flag="--log-level"),
    Key("LOG_FORMAT", "log_format", _choice_parser(LogFormat), flag="--log-format"),
    Key("PROMETHEUS_ADDRESS", "prometheus_address", _parse_address, worker=False, unset="off"),
    Key("PROMETHEUS_ENDPOINT", "prometheus_endpoint", _parse_endpoint, worker=False),
    Key("SHUTDOWN_TIMEOUT", "shutdown_timeout_s", _duration_parser(positive=True), "duration", worker=False),
    Key("RESTART_MAX", "restart_max", _int_parser(0), "int", worker=False),
    Key("RESTART_WINDOW", "restart_window_s", _duration_parser(positive=True), "duration", worker=False),
    Key("SESSION_START_RESERVE", "identify_reserve", _int_parser(0), "int", worker=False),
)  # fmt: skip
_KEY_BY_ENV: Final = {key.env: key for key in KEYS}
_ALTERNATES: Final = {key.alternate: key for key in KEYS if key.alternate}
#: Every spelling we read, primary and alternate.
KNOWN_VARIABLES: Final = frozenset(_KEY_BY_ENV) | frozenset(_ALTERNATES)
_ALTERNATE_TOML_KIND: Final[dict[str, TomlKind]] = {"DISCORD_TOKEN_FILE": "str", "DISCORD_RAW_INTENTS": "int"}


# -- sources and layers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value came from; `key` is its name there (`DISCORD_SHARD_COUNT`, `discord_shard_count`,
    `--shards`), the name an error about it uses."""

    kind: Literal["default", "file", "env", "flag"]
    key: str
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "flag":
            return f"flag {self.key}"
        return self.kind


@dataclass(frozen=True, slots=True)
class _Layer:
    kind: Literal["file", "env", "flag"]
    #: variable name -> (the name in this layer, its text)
    values: dict[str, tuple[str, str]]
    path: str = ""


def _toml_text(kind: TomlKind, key: str, value: object) -> str:
    """The text form of a TOML value, after checking its type is one this key accepts."""
    if isinstance(value, str):
        if kind in ("str", "int_or_auto", "duration", "names", "shard_ids", "table"):
            return value
    elif isinstance(value, bool):
        pass  # a bool is an int to Python, never to us
    elif isinstance(value, int):
        if kind in ("int", "int_or_auto", "duration"):
            return str(value)
    elif isinstance(value, float):
        if kind == "duration":
            return repr(value)
    elif isinstance(value, list):
        if kind == "names" and value and all(isinstance(item, str) and "," not in item for item in value):
            return ",".join(value)
        if kind == "shard_ids" and value and all(type(item) is int for item in value):
            return ",".join(str(item) for item in value)
        if kind in ("names", "shard_ids"):
            item = "names" if kind == "names" else "integer ids"
            raise ConfigError(key, f"a non-empty array of {item}, got {value!r}")
    elif isinstance(value, dict) and kind == "table":
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            raise ConfigError(key, "a table JSON can hold (64-bit integers, under 255 levels)") from None
    got = _TOML_TYPE_NAMES.get(type(value), type(value).__name__)
    raise ConfigError(key, f"{_TOML_EXPECTED[kind]}, got {got}")


def _file_layer(path: str) -> _Layer:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("--config", f"a readable TOML file, got {path!r} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"a valid TOML file, {path!r} has an error: {exc}") from None
    except (ValueError, RecursionError):  # tomllib: an integer of over 4300 digits, arrays nested too deep
        raise ConfigError("--config", f"a valid TOML file, {path!r} has a value too large or deep") from None
    values: dict[str, tuple[str, str]] = {}
    for toml_key, value in document.items():
        env = toml_key.upper()
        if toml_key != toml_key.lower() or env not in KNOWN_VARIABLES:
            raise ConfigError(
                toml_key,
                "a known setting: the keys are the environment variables in lower case, such as "
                f"discord_shard_count (in {path})",
            )
        kind = _ALTERNATE_TOML_KIND[env] if env in _ALTERNATES else _KEY_BY_ENV[env].toml
        text = _toml_text(kind, toml_key, value)
        if text.strip():
            values[env] = (toml_key, text)
    return _Layer("file", values, path)


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    return _Layer(
        "env", {name: (name, environ[name]) for name in KNOWN_VARIABLES if environ.get(name, "").strip()}
    )


def _env_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(
        f"{name} is not a setting of the supervisor and is ignored"
        + (" (it sets it for each worker)" if name in WORKER_ONLY_VARIABLES else "")
        for name in sorted(environ)
        if name.startswith(OWN_PREFIXES) and name not in KNOWN_VARIABLES and name not in READ_ELSEWHERE
    )


# -- the command line -----------------------------------------------------------------------------------

#: argparse's default for a settings flag that was not given (hypercorn's sentinel): only a flag that was
#: given overrides the lower layers, so `--log-level` does not undo `LOG_LEVEL` by defaulting to "info".
_NOT_GIVEN: Final = None


def build_parser() -> argparse.ArgumentParser:
    """The command line of DESIGN 3.1. Settings flags default to "not given", so only given flags count."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description="Run every gateway shard of a Discord bot across one worker process per core. Settings "
        "come from defaults < a TOML file (--config) < the environment < these flags; see --print-config.",
    )
    parser.add_argument("--shards", metavar="auto|N", help="total shard count (default: auto, from Discord)")
    parser.add_argument(
        "--shard-ids", metavar="A-B[,C-D...]", help="the shards this host runs (default: all)"
    )
    parser.add_argument("--workers", metavar="auto|N", help="worker processes (default: auto, one per core)")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings; keys are the variable names in lower case (discord_shard_count = 16)",
    )
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument(
        "--print-config", action="store_true", help="show every setting and its source, exit"
    )
    actions.add_argument("--check-config", action="store_true", help="validate the settings, exit 0 or 2")
    parser.add_argument("--log-format", metavar="auto|json|console", help="log format (default: auto)")
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default: info)")
    parser.set_defaults(**{_dest(key.flag): _NOT_GIVEN for key in KEYS if key.flag})
    return parser


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _flag_layer(args: argparse.Namespace) -> _Layer:
    values: dict[str, tuple[str, str]] = {}
    for key in KEYS:
        if key.flag:
            text = getattr(args, _dest(key.flag))
            if text is not _NOT_GIVEN and text.strip():
                values[key.env] = (key.flag, text)
    return _Layer("flag", values)


# -- resolution -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedSettings:
    """Resolved settings plus where each came from (by variable name), for `--print-config` and errors."""

    settings: Settings
    sources: Mapping[str, Source]
    config_path: str | None = None
    #: Variables that look like ours but are not read (typos, Spectacles-only names).
    warnings: tuple[str, ...] = ()

    def name_of(self, env: str) -> str:
        """The name the user gave the setting `env` (variable, TOML key or flag), for error messages."""
        source = self.sources.get(env)
        return source.key if source is not None and source.kind != "default" else env

    def require_token(self) -> Settings:
        """The settings, or ConfigError when no token is configured (running and --check-config need one)."""
        if not self.settings.token:
            raise ConfigError(
                "DISCORD_TOKEN", "a bot token (or DISCORD_TOKEN_FILE naming a file holding one)"
            )
        return self.settings

    def check_shard_count(self, shard_count: int) -> None:
        """Raise ConfigError naming `--shard-ids` (or its variable) when an id is not below `shard_count`;
        called at load when the count is configured, and by the caller once `auto` is resolved."""
        ids = self.settings.shard_ids
        if ids and max(ids) >= shard_count:
            raise ConfigError(
                self.name_of("DISCORD_SHARD_IDS"),
                f"shard ids below the shard count {shard_count}, got {format_shard_ids(ids)}",
            )


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> LoadedSettings:
    """Resolve every setting from `argv` (without the program name) and `environ`; ConfigError if bad.

    argparse handles malformed flags itself (usage on stderr, exit status 2).
    """
    return settings_from_arguments(build_parser().parse_args(list(argv)), environ)


def settings_from_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> LoadedSettings:
    """`load_settings` for a command line already parsed by `build_parser()`."""
    config_path: str | None = args.config or None
    layers = [_file_layer(config_path)] if config_path else []
    layers += [_env_layer(environ), _flag_layer(args)]
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for key in KEYS:
        names = (key.env, key.alternate) if key.alternate else (key.env,)
        for layer in reversed(layers):
            given = [name for name in names if name in layer.values]
            if len(given) > 1:
                first, second = (layer.values[name][0] for name in given)
                raise ConfigError(second, f"only one of {first} and {second}")
            if given:
                name = given[0]
                layer_key, text = layer.values[name]
                parse = key.parse if name == key.env else key.parse_alternate
                assert parse is not None
                values[key.field] = parse(layer_key, text)
                sources[key.env] = Source(layer.kind, layer_key, layer.path)
                if name == "DISCORD_TOKEN_FILE":
                    values["token_file"] = text.strip()
                break
        else:
            sources[key.env] = Source("default", key.env)
    loaded = LoadedSettings(Settings(**values), sources, config_path, _env_warnings(environ))
    if loaded.settings.shards is not None:
        loaded.check_shard_count(loaded.settings.shards)
    return loaded
