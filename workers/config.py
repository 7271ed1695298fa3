"""Worker settings: parsed from the environment (DESIGN 3.2) and the worker's command line.

The supervisor hands its own, fully resolved settings to each worker through the environment, so this
module's parsers (durations, intents, shard ranges) are the single definition of those formats; the
supervisor's config loader reuses them. Every bad value raises `ConfigError` naming the key and what was
expected; entry points turn it into exit status 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import orjson

from .errors import ConfigError

Compression = Literal["zlib-stream", "zstd-stream", "none"]
BrokerType = Literal["stdio", "amqp", "null"]
StoreType = Literal["memory", "redis"]
#: Where the REST proxy's ratelimit state lives; `memory` (this process only) is for tests and one worker.
RatelimitBackendKind = Literal["shm", "redis", "memory"]
Encoding = Literal["spectacles", "msgpack", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

INTENT_BITS: Final = {
    "GUILDS": 0,
    "GUILD_MEMBERS": 1,
    "GUILD_MODERATION": 2,
    "GUILD_BANS": 2,
    "GUILD_EXPRESSIONS": 3,
    "GUILD_EMOJIS_AND_STICKERS": 3,
    "GUILD_INTEGRATIONS": 4,
    "GUILD_WEBHOOKS": 5,
    "GUILD_INVITES": 6,
    "GUILD_VOICE_STATES": 7,
    "GUILD_PRESENCES": 8,
    "GUILD_MESSAGES": 9,
    "GUILD_MESSAGE_REACTIONS": 10,
    "GUILD_MESSAGE_TYPING": 11,
    "DIRECT_MESSAGES": 12,
    "DIRECT_MESSAGE_REACTIONS": 13,
    "DIRECT_MESSAGE_TYPING": 14,
    "MESSAGE_CONTENT": 15,
    "GUILD_SCHEDULED_EVENTS": 16,
    "AUTO_MODERATION_CONFIGURATION": 20,
    "AUTO_MODERATION_EXECUTION": 21,
    "GUILD_MESSAGE_POLLS": 24,
    "DIRECT_MESSAGE_POLLS": 25,
}
PRIVILEGED_INTENTS: Final = (1 << 1) | (1 << 8) | (1 << 15)
ALL_INTENTS: Final = sum(1 << bit for bit in set(INTENT_BITS.values()))
DEFAULT_INTENTS: Final = ALL_INTENTS & ~PRIVILEGED_INTENTS
DEFAULT_API_URL: Final = "https://discord.com/api/v10"
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_AMQP_NAME: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,255}")
#: Shard ids above this are refused before a range such as `0-999999999` is expanded into memory (the
#: supervisor's cap, `supervisor.config.MAX_SHARD_ID`).
MAX_SHARD_ID: Final = 1 << 20
_MAX_SHARD_ID_DIGITS: Final = len(str(MAX_SHARD_ID))
_SHARD_RANGE: Final = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_MAX_PORT_DIGITS: Final = 5


def _shown(text: str) -> str:
    """`text` for an error message, shortened: a value may be thousands of characters long."""
    return repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"


def parse_duration(key: str, text: str) -> float:
    """Seconds from `2m`, `30s`, `1h30m`, `500ms` or a plain number of seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pos = 0
        value = 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            value += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ConfigError(key, f"a duration such as 30s, 2m or 1h30m, got {text!r}") from None
    if value < 0 or not math.isfinite(value):
        raise ConfigError(key, f"a non-negative duration, got {text!r}")
    return value


def parse_positive_duration(key: str, text: str) -> float:
    value = parse_duration(key, text)
    if value <= 0:
        raise ConfigError(key, f"a duration above zero, got {text!r}")
    return value


def parse_amqp_name(key: str, text: str) -> str:
    """An exchange, queue or routing-key name: 1-255 of letters, digits and `- _ . :`."""
    name = text.strip()
    if not _AMQP_NAME.fullmatch(name):
        raise ConfigError(key, f"an AMQP name (letters, digits, - _ . :), got {text!r}")
    return name


def parse_directory(key: str, text: str) -> str:
    """An absolute directory path (the supervisor's `RATELIMIT_SHM_DIR` rule)."""
    path = text.strip()
    if not path.startswith("/") or any(c in "\n\r\x00" for c in path):
        raise ConfigError(key, f"an absolute directory path such as /dev/shm, got {text!r}")
    return path.rstrip("/") or "/"


def parse_shard_ids(key: str, text: str) -> tuple[int, ...]:
    """Shard ids from `A-B[,C-D...]` (ranges inclusive) or single ids up to `MAX_SHARD_ID`; sorted, without
    duplicates."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = _SHARD_RANGE.fullmatch(part)
        if not match:
            raise ConfigError(key, f"shard ids like 0-15 or 0-7,16-23, got {_shown(text)}")
        # The length first: `int()` refuses more than 4300 digits with a ValueError.
        if any(len(n) > _MAX_SHARD_ID_DIGITS or int(n) > MAX_SHARD_ID for n in match.groups() if n):
            raise ConfigError(key, f"shard ids up to {MAX_SHARD_ID}, got {_shown(part)}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if high < low:
            raise ConfigError(key, f"a range whose end is not below its start, got {part!r}")
        ids.update(range(low, high + 1))
    return tuple(sorted(ids))


def parse_shard_count(key: str, text: str) -> int:
    """A shard count from 1 to `MAX_SHARD_ID + 1`: without shard ids a worker runs all of them."""
    count = parse_int(key, text, minimum=1)
    if count > MAX_SHARD_ID + 1:
        raise ConfigError(key, f"a shard count of at most {MAX_SHARD_ID + 1}, got {_shown(text)}")
    return count


def format_shard_ids(ids: tuple[int, ...]) -> str:
    """The inverse of `parse_shard_ids`: contiguous runs as `A-B`."""
    runs: list[str] = []
    start = prev = None
    for shard in ids:
        if start is None:
            start = prev = shard
        elif prev is not None and shard == prev + 1:
            prev = shard
        else:
            runs.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = shard
    if start is not None:
        runs.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(runs)


def parse_intents(key: str, text: str) -> int:
    bits = 0
    for name in (n.strip().upper() for n in text.split(",")):
        if not name:
            continue
        if name not in INTENT_BITS:
            raise ConfigError(key, f"intent names from {', '.join(INTENT_BITS)}, got {name!r}")
        bits |= 1 << INTENT_BITS[name]
    return bits


def parse_int(key: str, text: str, *, minimum: int = 0) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(key, f"an integer, got {_shown(text)}") from None
    if value < minimum:
        raise ConfigError(key, f"an integer of at least {minimum}, got {value}")
    return value


def parse_choice(key: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ConfigError(key, f"one of {', '.join(choices)}, got {text!r}")
    return value


def parse_address(key: str, text: str) -> tuple[str, int]:
    """`(host, port)` from `host:port` or `[v6addr]:port`; port 0 asks the OS for a free one."""
    host, sep, port_text = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    valid_host = bool(host) and not any(c in host for c in " /[]@") and (bracketed or ":" not in host)
    # ASCII digits only, and the length first: `int()` takes "٣" but not "²", nor more than 4300 digits.
    valid_port = port_text.isascii() and port_text.isdigit() and len(port_text) <= _MAX_PORT_DIGITS
    if not sep or not valid_host or not valid_port or int(port_text) > 65535:
        raise ConfigError(
            key,
            f"host:port such as 127.0.0.1:9100 (0.0.0.0:PORT for every interface), got {_shown(text)}",
        )
    return host, int(port_text)


def read_token(environ: Mapping[str, str]) -> str:
    """`DISCORD_TOKEN`, or the contents of the file named by `DISCORD_TOKEN_FILE`."""
    token = environ.get("DISCORD_TOKEN", "").strip()
    path = environ.get("DISCORD_TOKEN_FILE", "").strip()
    if not token and path:
        try:
            with open(path, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, ValueError) as exc:
            # ValueError: a NUL in the path, or contents that are not UTF-8. Neither message may show the
            # file's contents (UnicodeDecodeError's shows none, but only the reason is kept, to be sure).
            if isinstance(exc, UnicodeDecodeError):
                reason = "not UTF-8 text"
            elif isinstance(exc, OSError):
                reason = exc.strerror or type(exc).__name__
            else:
                reason = "not a usable path"
            raise ConfigError(
                "DISCORD_TOKEN_FILE", f"a readable file of UTF-8 text, got {path!r} ({reason})"
            ) from None
    if token.startswith("Bot "):
        token = token[4:]
    if not token:
        raise ConfigError("DISCORD_TOKEN", "a bot token (or DISCORD_TOKEN_FILE naming a file holding one)")
    return token


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    token: str = field(repr=False)
    shard_ids: tuple[int, ...]
    shard_count: int
    api_url: str = DEFAULT_API_URL
    #: The gateway URL from `GET /gateway/bot`; fetched at start when empty.
    gateway_url: str = ""
    #: Identify buckets (`session_start_limit.max_concurrency`); fetched at start when 0.
    max_concurrency: int = 0
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
    #: REST proxy (DESIGN 3.6): the ratelimit backend and the directory of its shm segment (the segment is
    #: named after the token: `ratelimit.configured.shm_segment_name`), the global limit, the RPC exchange and
    #: event, the HTTP address (None = off) and the longest a request may wait for limits plus the answer.
    ratelimit_backend: RatelimitBackendKind = "shm"
    ratelimit_shm_dir: str = "/dev/shm"
    #: Worker processes on this host (set by the supervisor): while Redis is unreachable each paces
    #: 1/share of the global limit.
    ratelimit_fallback_share: int = 1
    global_limit: int = 50
    amqp_group: str = "rest"
    amqp_event: str = "REQUEST"
    proxy_http_address: tuple[str, int] | None = None
    #: A shared secret HTTP proxy clients must send in `X-Proxy-Secret` (None: none needed).
    proxy_http_secret: str | None = field(default=None, repr=False)
    proxy_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"


def worker_config_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    shard_ids: tuple[int, ...] | None = None,
    shard_count: int | None = None,
    gateway_url: str = "",
    max_concurrency: int = 0,
) -> WorkerConfig:
    """Build a `WorkerConfig` from the environment; explicit arguments (the command line) win.

    `DISCORD_GATEWAY_URL` and `DISCORD_MAX_CONCURRENCY` are how the supervisor hands a worker what it learnt
    from `GET /gateway/bot`; unset, the worker asks Discord itself.
    """
    env = os.environ if environ is None else environ

    def get(key: str, default: str = "") -> str:
        return env.get(key, default).strip()

    if shard_count is None:
        raw_count = get("DISCORD_SHARD_COUNT")
        if not raw_count or raw_count == "auto":
            raise ConfigError(
                "DISCORD_SHARD_COUNT", "a shard count (workers are given one by the supervisor)"
            )
        shard_count = parse_shard_count("DISCORD_SHARD_COUNT", raw_count)
    if shard_ids is None:
        raw_ids = get("DISCORD_SHARD_IDS")
        shard_ids = parse_shard_ids("DISCORD_SHARD_IDS", raw_ids) if raw_ids else tuple(range(shard_count))
    if not shard_ids or max(shard_ids) >= shard_count:
        raise ConfigError(
            "DISCORD_SHARD_IDS", f"shard ids below the shard count {shard_count}, got {shard_ids}"
        )
    if get("DISCORD_RAW_INTENTS"):
        intents = parse_int("DISCORD_RAW_INTENTS", get("DISCORD_RAW_INTENTS"))
    elif get("DISCORD_INTENTS"):
        intents = parse_intents("DISCORD_INTENTS", get("DISCORD_INTENTS"))
    else:
        intents = DEFAULT_INTENTS
    events_text = get("DISCORD_EVENTS")
    events = (
        frozenset(e.strip().upper() for e in events_text.split(",") if e.strip()) if events_text else None
    )
    presence = None
    if get("DISCORD_PRESENCE"):
        try:
            presence = orjson.loads(get("DISCORD_PRESENCE"))
        except orjson.JSONDecodeError:
            raise ConfigError("DISCORD_PRESENCE", 'a JSON object such as {"status": "online"}') from None
        if not isinstance(presence, dict):
            raise ConfigError("DISCORD_PRESENCE", "a JSON object")
    return WorkerConfig(
        token=read_token(env),
        shard_ids=shard_ids,
        shard_count=shard_count,
        api_url=get("DISCORD_API_URL", DEFAULT_API_URL).rstrip("/"),
        gateway_url=gateway_url or get("DISCORD_GATEWAY_URL"),
        max_concurrency=max_concurrency
        or parse_int("DISCORD_MAX_CONCURRENCY", get("DISCORD_MAX_CONCURRENCY") or "0"),
        intents=intents,
        events=events,
        presence=presence,
        compression=parse_choice(
            "GATEWAY_COMPRESSION", get("GATEWAY_COMPRESSION", "zlib-stream"), get_args(Compression)
        ),  # type: ignore[arg-type]
        broker_type=parse_choice("BROKER_TYPE", get("BROKER_TYPE", "stdio"), get_args(BrokerType)),  # type: ignore[arg-type]
        broker_group=get("BROKER_GROUP", "gateway"),
        broker_encoding=parse_choice(
            "BROKER_ENCODING", get("BROKER_ENCODING", "spectacles"), get_args(Encoding)
        ),  # type: ignore[arg-type]
        broker_message_timeout_s=parse_duration(
            "BROKER_MESSAGE_TIMEOUT", get("BROKER_MESSAGE_TIMEOUT", "2m")
        ),
        amqp_url=get("AMQP_URL", "amqp://guest:guest@127.0.0.1/"),
        shard_store_type=parse_choice(
            "SHARD_STORE_TYPE", get("SHARD_STORE_TYPE", "memory"), get_args(StoreType)
        ),  # type: ignore[arg-type]
        shard_store_prefix=get("SHARD_STORE_PREFIX", "gateway"),
        redis_url=get("REDIS_URL", "redis://127.0.0.1:6379"),
        redis_pool_size=parse_int("REDIS_POOL_SIZE", get("REDIS_POOL_SIZE", "5"), minimum=1),
        ratelimit_backend=parse_choice(
            "RATELIMIT_BACKEND", get("RATELIMIT_BACKEND", "shm"), get_args(RatelimitBackendKind)
        ),  # type: ignore[arg-type]
        ratelimit_shm_dir=parse_directory("RATELIMIT_SHM_DIR", get("RATELIMIT_SHM_DIR") or "/dev/shm"),
        ratelimit_fallback_share=parse_int(
            "RATELIMIT_FALLBACK_SHARE", get("RATELIMIT_FALLBACK_SHARE") or "1", minimum=1
        ),
        global_limit=parse_int("DISCORD_GLOBAL_LIMIT", get("DISCORD_GLOBAL_LIMIT", "50"), minimum=1),
        amqp_group=parse_amqp_name("AMQP_GROUP", get("AMQP_GROUP", "rest")),
        amqp_event=parse_amqp_name("AMQP_EVENT", get("AMQP_EVENT", "REQUEST")),
        proxy_http_address=(
            parse_address("PROXY_HTTP_ADDRESS", get("PROXY_HTTP_ADDRESS"))
            if get("PROXY_HTTP_ADDRESS") not in ("", "off")
            else None
        ),
        proxy_http_secret=get("PROXY_HTTP_SECRET") or None,
        proxy_timeout_s=parse_positive_duration("TIMEOUT", get("TIMEOUT", "30s")),
        log_level=parse_choice("LOG_LEVEL", get("LOG_LEVEL", "info"), get_args(LogLevel)),
        log_format=parse_choice("LOG_FORMAT", get("LOG_FORMAT", "auto"), ("auto", "json", "console")),  # type: ignore[arg-type]
    )
