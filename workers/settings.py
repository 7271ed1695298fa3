"""Every setting of the service, declared once: its variable, type, default, parser, secrecy and processes.

Design note. `Settings` *is* the table: each field is declared with `setting(...)`, which records the
variable name (DESIGN 3.2), the parser of its text form (`workers.setting_formats`), the TOML kind, the
command-line flag, whether it is a secret and which processes read it, plus the README's wording. `SETTINGS`
is derived from the dataclass's fields, so adding a setting is one edit here. Everything else derives from the
table: the supervisor's layers and `--print-config` (`supervisor.config`), the README's configuration table
(`markdown_table`, checked by a test), the standalone worker's environment (`load_from_environment`), and
what the supervisor hands a worker (`worker_wire`/`settings_from_wire`: the worker settings as text, over the
control channel, parsed by the same parsers).

Layers (DESIGN 3.1): defaults < TOML file < environment < command line. Every layer yields text, so each
format has exactly one parser. An empty value is unset in every layer, so `REDIS_POOL_SIZE=` in an env file
falls through to the lower layer or the default. Two settings have two spellings (`DISCORD_TOKEN` /
`DISCORD_TOKEN_FILE`, `DISCORD_INTENTS` / `DISCORD_RAW_INTENTS`): the highest layer that sets either spelling
wins, and both in one layer is an error rather than a silent preference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ratelimit import BackendKind, SharedBackendKind

from .errors import ConfigError
from .logs import REDACTED, LogFormat, redact_url
from .setting_formats import (
    DEFAULT_API_URL,
    DEFAULT_INTENTS,
    auto_int_parser,
    choice_parser,
    duration_parser,
    format_shard_ids,
    int_parser,
    intents_text,
    parse_amqp_name,
    parse_auto_shard_count,
    parse_directory,
    parse_endpoint,
    parse_events,
    parse_http_url,
    parse_intents,
    parse_optional_address,
    parse_presence,
    parse_redis_url,
    parse_secret,
    parse_shard_ids,
    parse_token,
    parse_token_file,
    parse_word,
    url_parser,
    value_text,
)

__all__ = [
    "KNOWN_VARIABLES",
    "SETTINGS",
    "SETTING_BY_VARIABLE",
    "BrokerType",
    "Compression",
    "Encoding",
    "LoadedSettings",
    "LogLevel",
    "Process",
    "RatelimitBackend",
    "Setting",
    "Settings",
    "Source",
    "StoreType",
    "TextLayer",
    "TomlKind",
    "environment_layer",
    "load_from_environment",
    "markdown_table",
    "resolve",
    "settings_from_wire",
    "worker_wire",
]

Compression = Literal["zlib-stream", "zstd-stream", "none"]
#: `null` drops every event after decoding it (benchmarks).
BrokerType = Literal["stdio", "amqp", "null"]
StoreType = Literal["memory", "redis"]
ClusterMode = Literal["off", "redis"]
ReshardMode = Literal["auto", "off"]
Encoding = Literal["spectacles", "msgpack", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
#: The ratelimit backends a deployment may name; `memory` (one process) is for tests and embedding only.
RatelimitBackend = SharedBackendKind
Process = Literal["supervisor", "worker"]
TomlKind = Literal["str", "int", "int_or_auto", "duration", "names", "shard_ids", "table"]
SecretKind = Literal["", "token", "url"]

_BOTH: Final[frozenset[Process]] = frozenset({"supervisor", "worker"})
_SUPERVISOR: Final[frozenset[Process]] = frozenset({"supervisor"})


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table. The TOML key is `env.lower()`; `field` is the `Settings` attribute."""

    env: str
    parse: Callable[[str, str], Any]
    meaning: str
    #: The README's "default" column; None shows the default's text.
    readme_default: str | None = None
    toml: TomlKind = "str"
    flag: str | None = None
    #: A second spelling of the same setting, with its own parser (`DISCORD_TOKEN_FILE`).
    alternate: str | None = None
    parse_alternate: Callable[[str, str], Any] | None = None
    #: The spelling whose parser reads `to_text`'s output (intents travel as the raw bitfield).
    canonical: str | None = None
    processes: frozenset[Process] = _BOTH
    #: How `--print-config` shows None.
    unset: str = "(unset)"
    secret: SecretKind = ""
    field: str = ""

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.env, self.alternate) if self.alternate else (self.env,)

    def parser_for(self, name: str) -> Callable[[str, str], Any]:
        if name == self.env:
            return self.parse
        assert name == self.alternate and self.parse_alternate is not None
        return self.parse_alternate

    def to_text(self, value: Any) -> tuple[str, str]:
        """`(spelling, text)` that this row's parser for that spelling reads back as `value`."""
        return self.canonical or self.env, value_text(value)

    def display(self, value: Any) -> str:
        """`value` for `--print-config`: secrets redacted, intents by name."""
        if value is None or value == "":
            return self.unset
        if self.secret == "token":
            return REDACTED
        if self.secret == "url":
            return redact_url(value)
        if self.field == "intents":
            return intents_text(value)
        return value_text(value)


def setting(default: Any, env: str, parse: Callable[[str, str], Any], meaning: str, **row: Any) -> Any:
    """A `Settings` field declared with its table row (see the module note)."""
    info = Setting(env, parse, meaning, **row)
    return field(default=default, repr=not info.secret, metadata={"setting": info})


_DURATION: Final = duration_parser(positive=True)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service runs with, resolved. Units are in the names (`_s` = seconds).

    `None` means "decide at run time" for `shards` (the count `GET /gateway/bot` recommends), `shard_ids` (all
    of `0..shards-1`) and `workers` (one per CPU core, never more than shards), and "off" for the two
    listening addresses.
    """

    token: str = setting(
        "",
        "DISCORD_TOKEN",
        parse_token,
        "bot token (the `_FILE` form reads it from a file)",
        readme_default="required",
        alternate="DISCORD_TOKEN_FILE",
        parse_alternate=parse_token_file,
        secret="token",
    )
    api_url: str = setting(
        DEFAULT_API_URL,
        "DISCORD_API_URL",
        parse_http_url,
        "REST base; point it at the simulator for tests and demos",
    )
    shards: int | None = setting(
        None,
        "DISCORD_SHARD_COUNT",
        parse_auto_shard_count,
        "same as `--shards`: the total shard count",
        readme_default="auto",
        toml="int_or_auto",
        flag="--shards",
        processes=_SUPERVISOR,
        unset="auto",
    )
    shard_ids: tuple[int, ...] | None = setting(
        None,
        "DISCORD_SHARD_IDS",
        parse_shard_ids,
        "same as `--shard-ids`: the shards this host runs",
        readme_default="all",
        toml="shard_ids",
        flag="--shard-ids",
        processes=_SUPERVISOR,
        unset="all",
    )
    workers: int | None = setting(
        None,
        "WORKERS",
        auto_int_parser(1),
        "same as `--workers`: one per CPU core, never more than shards",
        readme_default="auto",
        toml="int_or_auto",
        flag="--workers",
        processes=_SUPERVISOR,
        unset="auto",
    )
    intents: int = setting(
        DEFAULT_INTENTS,
        "DISCORD_INTENTS",
        parse_intents,
        "intent names, or a raw bitfield",
        readme_default="non-privileged",
        toml="names",
        alternate="DISCORD_RAW_INTENTS",
        parse_alternate=int_parser(0),
        canonical="DISCORD_RAW_INTENTS",
    )
    #: Dispatch names to publish; None publishes all.
    events: frozenset[str] | None = setting(
        None,
        "DISCORD_EVENTS",
        parse_events,
        "comma list of dispatch names to publish",
        readme_default="all",
        toml="names",
        unset="all",
    )
    presence: dict[str, Any] | None = setting(
        None,
        "DISCORD_PRESENCE",
        parse_presence,
        "JSON presence sent in IDENTIFY",
        readme_default="none",
        toml="table",
        unset="none",
    )
    compression: Compression = setting(
        "zlib-stream",
        "GATEWAY_COMPRESSION",
        choice_parser(Compression),
        "`zlib-stream`, `zstd-stream` or `none`",
    )
    broker_type: BrokerType = setting(
        "stdio",
        "BROKER_TYPE",
        choice_parser(BrokerType),
        "`amqp`, `stdio` (JSON lines on stdout) or `null` (decode and drop: benchmarks)",
    )
    broker_group: str = setting(
        "gateway", "BROKER_GROUP", parse_amqp_name, "AMQP exchange for events and commands"
    )
    broker_encoding: Encoding = setting(
        "spectacles", "BROKER_ENCODING", choice_parser(Encoding), "`spectacles`, `msgpack` or `json`"
    )
    broker_message_timeout_s: float = setting(
        120.0,
        "BROKER_MESSAGE_TIMEOUT",
        duration_parser(positive=False),
        "per-message TTL on published events",
        readme_default="`2m`",
        toml="duration",
    )
    amqp_url: str = setting(
        "amqp://guest:guest@127.0.0.1/",
        "AMQP_URL",
        url_parser(("amqp", "amqps"), "amqp://guest:guest@127.0.0.1/"),
        "RabbitMQ",
        secret="url",
    )
    shard_store_type: StoreType = setting(
        "memory",
        "SHARD_STORE_TYPE",
        choice_parser(StoreType),
        "`memory` (sessions held by the supervisor) or `redis`",
    )
    shard_store_prefix: str = setting(
        "gateway", "SHARD_STORE_PREFIX", parse_word, "prefix of every Redis key of this bot"
    )
    cluster_mode: ClusterMode = setting(
        "off",
        "CLUSTER_MODE",
        choice_parser(ClusterMode),
        "`redis`: every supervisor with the same `REDIS_URL` and `SHARD_STORE_PREFIX` is a node of one "
        "cluster that spreads the shards and fails over (implies `SHARD_STORE_TYPE=redis`)",
        processes=_SUPERVISOR,
    )
    cluster_node_id: str | None = setting(
        None,
        "CLUSTER_NODE_ID",
        parse_word,
        "this node's name in the cluster; unique per running supervisor",
        readme_default="hostname-pid",
        processes=_SUPERVISOR,
    )
    cluster_lease_ttl_s: float = setting(
        10.0,
        "CLUSTER_LEASE_TTL",
        _DURATION,
        "how long a node's shard leases outlive its last renewal: the failover time after a node dies",
        toml="duration",
        processes=_SUPERVISOR,
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379",
        "REDIS_URL",
        parse_redis_url,
        "Redis",
        secret="url",
    )
    redis_pool_size: int = setting(
        5, "REDIS_POOL_SIZE", int_parser(1), "Redis connections per process", toml="int"
    )
    #: Typed with `memory` too, which tests and embedders may set; the variable accepts `shm` or `redis`.
    ratelimit_backend: BackendKind = setting(
        "shm",
        "RATELIMIT_BACKEND",
        choice_parser(RatelimitBackend),
        "`shm` (one host) or `redis` (many hosts)",
    )
    ratelimit_shm_dir: str = setting(
        "/dev/shm",
        "RATELIMIT_SHM_DIR",
        parse_directory,
        "directory of the shared-memory ratelimit segment (any tmpfs, e.g. a systemd `RuntimeDirectory`)",
    )
    global_limit: int = setting(
        50, "DISCORD_GLOBAL_LIMIT", int_parser(1), "global requests per second for this bot", toml="int"
    )
    amqp_group: str = setting("rest", "AMQP_GROUP", parse_amqp_name, "REST proxy RPC exchange")
    amqp_event: str = setting("REQUEST", "AMQP_EVENT", parse_amqp_name, "REST proxy RPC event (queue suffix)")
    #: `host:port` of the HTTP REST proxy; None = off.
    proxy_http_address: str | None = setting(
        None,
        "PROXY_HTTP_ADDRESS",
        parse_optional_address,
        "e.g. `127.0.0.1:8081` (a bare port is loopback): serve the HTTP REST proxy there",
        readme_default="off",
        unset="off",
    )
    proxy_http_secret: str | None = setting(
        None,
        "PROXY_HTTP_SECRET",
        parse_secret,
        "when set (16+ characters), HTTP proxy clients must send it in `X-Proxy-Secret` (407 otherwise); "
        "never forwarded",
        readme_default="none",
        unset="none",
        secret="token",
    )
    timeout_s: float = setting(
        30.0,
        "TIMEOUT",
        _DURATION,
        "REST proxy: the longest a request may wait for limits plus Discord's answer",
        toml="duration",
    )
    log_level: LogLevel = setting(
        "info", "LOG_LEVEL", choice_parser(LogLevel), "same as `--log-level`", flag="--log-level"
    )
    log_format: LogFormat = setting(
        "auto", "LOG_FORMAT", choice_parser(LogFormat), "same as `--log-format`", flag="--log-format"
    )
    #: `host:port` of `/metrics`, `/healthz`, `/readyz`; None = off.
    prometheus_address: str | None = setting(
        None,
        "PROMETHEUS_ADDRESS",
        parse_optional_address,
        "metrics, health and shards endpoint (`/healthz`, `/readyz`, `/shards`); a bare port (`9464`, "
        "`:9464`) is loopback, `0.0.0.0:9464` every interface",
        readme_default="off",
        processes=_SUPERVISOR,
        unset="off",
    )
    prometheus_endpoint: str = setting(
        "/metrics", "PROMETHEUS_ENDPOINT", parse_endpoint, "the metrics path", processes=_SUPERVISOR
    )
    shutdown_timeout_s: float = setting(
        25.0,
        "SHUTDOWN_TIMEOUT",
        _DURATION,
        "drain deadline on SIGTERM/SIGINT",
        toml="duration",
        processes=_SUPERVISOR,
    )
    #: Crash-loop cap: more than `restart_max` restarts of one worker within `restart_window_s` gives up.
    restart_max: int = setting(
        5,
        "RESTART_MAX",
        int_parser(0),
        "crash-loop cap: more worker crashes than this within `RESTART_WINDOW` stop the supervisor (exit 1)",
        toml="int",
        processes=_SUPERVISOR,
    )
    restart_window_s: float = setting(
        60.0,
        "RESTART_WINDOW",
        _DURATION,
        "the crash-loop cap's window",
        toml="duration",
        processes=_SUPERVISOR,
    )
    #: Daily session starts (IDENTIFYs) a start must leave unspent, kept for sessions that must be
    #: re-established later (`supervisor.planning.check_session_budget`). A count, not a share of
    #: `session_start_limit.total`: the total is only known after `GET /gateway/bot`, and 10 covers a few
    #: crash-and-reidentify cycles on any bot while costing a 1,000-a-day bot 1% of its budget.
    reshard: ReshardMode = setting(
        "auto",
        "RESHARD",
        choice_parser(ReshardMode),
        "`auto`: follow Discord's recommended shard count live (checked every `RESHARD_CHECK_INTERVAL`, "
        "on SIGUSR1 and on a close with 4011; in cluster mode one `auto` node leads each reshard); `off` "
        "with an explicit `--shards`",
        processes=_SUPERVISOR,
    )
    reshard_check_interval_s: float = setting(
        3600.0,
        "RESHARD_CHECK_INTERVAL",
        _DURATION,
        "how often `RESHARD=auto` asks Discord for the recommended shard count",
        toml="duration",
        processes=_SUPERVISOR,
    )
    identify_reserve: int = setting(
        10,
        "SESSION_START_RESERVE",
        int_parser(0),
        "identifies of the daily budget a start-up leaves for later re-identifies",
        toml="int",
        processes=_SUPERVISOR,
    )
    #: The file the token was read from (`DISCORD_TOKEN_FILE`), for diagnostics; None when given directly.
    token_file: str | None = None


def _rows() -> tuple[Setting, ...]:
    return tuple(
        dataclasses.replace(item.metadata["setting"], field=item.name)
        for item in dataclasses.fields(Settings)
        if "setting" in item.metadata
    )


#: The table, in declaration order.
SETTINGS: Final = _rows()
#: Each spelling we read (primary and alternate) -> its row.
SETTING_BY_VARIABLE: Final = {name: row for row in SETTINGS for name in row.spellings}
#: Every spelling we read, primary and alternate.
KNOWN_VARIABLES: Final = frozenset(SETTING_BY_VARIABLE)


# -- layers and resolution ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value came from; `key` is its name there (`DISCORD_SHARD_COUNT`, `discord_shard_count`,
    `--shards`), the name an error about it uses."""

    kind: Literal["default", "file", "env", "flag", "supervisor"]
    key: str
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "flag":
            return f"flag {self.key}"
        return self.kind


@dataclass(frozen=True, slots=True)
class TextLayer:
    """One layer's values: variable spelling -> (the name in this layer, its text); empty text is unset."""

    kind: Literal["file", "env", "flag", "supervisor"]
    values: Mapping[str, tuple[str, str]]
    path: str = ""


def environment_layer(environ: Mapping[str, str]) -> TextLayer:
    return TextLayer(
        "env", {name: (name, environ[name]) for name in KNOWN_VARIABLES if environ.get(name, "").strip()}
    )


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


def resolve(layers: Iterable[TextLayer], *, config_path: str | None = None) -> LoadedSettings:
    """Every setting from `layers` (lowest first) over the defaults; ConfigError names a bad value's key."""
    ordered = list(layers)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for row in SETTINGS:
        for layer in reversed(ordered):
            given = [name for name in row.spellings if name in layer.values]
            if len(given) > 1:
                first, second = (layer.values[name][0] for name in given)
                raise ConfigError(second, f"only one of {first} and {second}")
            if given:
                layer_key, text = layer.values[given[0]]
                values[row.field] = row.parser_for(given[0])(layer_key, text)
                sources[row.env] = Source(layer.kind, layer_key, layer.path)
                if given[0] == "DISCORD_TOKEN_FILE":
                    values["token_file"] = text.strip()
                break
        else:
            sources[row.env] = Source("default", row.env)
    loaded = _check_reshard(_check_cluster(LoadedSettings(Settings(**values), sources, config_path)))
    if loaded.settings.shards is not None:
        loaded.check_shard_count(loaded.settings.shards)
    return loaded


#: The shortest `CLUSTER_LEASE_TTL`: a node renews every fifth of it, and a renewal is one Redis round trip.
MIN_LEASE_TTL_S: Final = 2.0


def _check_cluster(loaded: LoadedSettings) -> LoadedSettings:
    """`CLUSTER_MODE=redis` keeps sessions in Redis (an explicit `memory` store is an error) and decides which
    shards each node runs (an explicit `--shard-ids` is an error)."""
    settings = loaded.settings
    if settings.cluster_mode == "off":
        return loaded
    if settings.shard_ids is not None:
        raise ConfigError(
            loaded.name_of("DISCORD_SHARD_IDS"),
            "unset with CLUSTER_MODE=redis (the cluster decides which shards each node runs)",
        )
    if settings.shard_store_type != "redis":
        if loaded.sources["SHARD_STORE_TYPE"].kind != "default":
            raise ConfigError(
                loaded.name_of("SHARD_STORE_TYPE"),
                "redis with CLUSTER_MODE=redis (another node must be able to RESUME these sessions)",
            )
        settings = dataclasses.replace(settings, shard_store_type="redis")
    if settings.cluster_lease_ttl_s < MIN_LEASE_TTL_S:
        raise ConfigError(
            loaded.name_of("CLUSTER_LEASE_TTL"),
            f"at least {MIN_LEASE_TTL_S:g}s, got {settings.cluster_lease_ttl_s:g}s",
        )
    return dataclasses.replace(loaded, settings=settings)


#: The shortest `RESHARD_CHECK_INTERVAL`: each check is one `GET /gateway/bot`.
MIN_RESHARD_CHECK_INTERVAL_S: Final = 10.0


def _check_reshard(loaded: LoadedSettings) -> LoadedSettings:
    """`RESHARD=auto` follows the recommended shard count, so it needs `--shards auto` and a host that plans
    its own shards (alone, or as a cluster node): an explicit `--shards` or `--shard-ids` turns the default
    off, and an explicit `auto` with either is an error naming the key."""
    settings = loaded.settings
    if settings.reshard_check_interval_s < MIN_RESHARD_CHECK_INTERVAL_S:
        raise ConfigError(
            loaded.name_of("RESHARD_CHECK_INTERVAL"),
            f"at least {MIN_RESHARD_CHECK_INTERVAL_S:g}s, got {settings.reshard_check_interval_s:g}s",
        )
    if settings.reshard == "off":
        return loaded
    conflict = None
    if settings.shards is not None:
        conflict = "an explicit --shards (the shard count is yours, not Discord's)"
    elif settings.shard_ids is not None:
        conflict = "an explicit --shard-ids (this host runs a fixed part of the bot)"
    if conflict is None:
        return loaded
    if loaded.sources["RESHARD"].kind != "default":
        raise ConfigError(loaded.name_of("RESHARD"), f"off with {conflict}")
    return dataclasses.replace(loaded, settings=dataclasses.replace(settings, reshard="off"))


def load_from_environment(environ: Mapping[str, str]) -> Settings:
    """The settings of a process configured by its environment alone (a standalone worker)."""
    return resolve([environment_layer(environ)]).settings


# -- the hand-over to a worker -----------------------------------------------------------------------------


def worker_wire(settings: Settings) -> dict[str, str]:
    """The settings a worker reads, as text: sent over the control channel (secrets included: never through
    the worker's environment, which any process of the same user can read in /proc)."""
    wire: dict[str, str] = {}
    for row in SETTINGS:
        value = getattr(settings, row.field)
        if "worker" in row.processes and value is not None:
            name, text = row.to_text(value)
            wire[name] = text
    return wire


def settings_from_wire(wire: Mapping[str, str]) -> Settings:
    """`worker_wire`'s inverse, through the same parsers (ConfigError for anything they refuse)."""
    unknown = sorted(set(wire) - KNOWN_VARIABLES)
    if unknown:
        raise ConfigError(unknown[0], "a known setting")
    return resolve([TextLayer("supervisor", {name: (name, text) for name, text in wire.items()})]).settings


# -- the README's table ------------------------------------------------------------------------------------


def markdown_table() -> str:
    """The README's configuration table, one row per setting (checked against README.md by a test)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in SETTINGS:
        names = " / ".join(f"`{name}`" for name in row.spellings)
        default = row.readme_default
        if default is None:
            default = f"`{value_text(_DEFAULTS[row.field])}`"
        lines.append(f"| {names} | {default} | {row.meaning} |")
    return "\n".join(lines) + "\n"


_DEFAULTS: Final = {item.name: item.default for item in dataclasses.fields(Settings)}


if __name__ == "__main__":  # `python -m workers.settings`: the README's table, to paste between its markers
    print(markdown_table(), end="")
