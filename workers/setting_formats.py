"""The text formats of settings: one parser per format, and the writer that is its inverse.

Every layer of settings (the TOML file, the environment, the command line, the supervisor's hand-over to a
worker) yields text, so each format has exactly one parser, here, and `workers.settings` names which parser
reads which setting. A parser takes the key as the user spelled it (`DISCORD_SHARD_COUNT`,
`discord_shard_count` or `--shards`) and the text, and raises `ConfigError` naming that key and what was
expected; entry points turn it into exit status 2. Messages never echo a secret (a token, a URL's password).

Spectacles' gateway silently ignored every numeric, duration and JSON variable for five years because its
parse errors were dropped (anchors/spectacles.md 1.1); here a value that does not parse is always an error.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, Final, get_args

import orjson

from ratelimit.redis_url import RedisAddress

from .errors import ConfigError
from .logs import redact_url

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
PRESENCE_KEYS: Final = frozenset({"since", "activities", "status", "afk"})
PRESENCE_STATUSES: Final = ("online", "dnd", "idle", "invisible", "offline")
_EVENT_NAME: Final = re.compile(r"[A-Z][A-Z0-9_]*")


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


# -- parsers: (key as the user spelled it, text) -> value ---------------------------------------------------


def parse_token(key: str, text: str) -> str:
    """A bot token, with or without its `Bot ` prefix; never echoed, since this message may reach a log."""
    token = text.strip().removeprefix("Bot ")
    if not token:
        raise ConfigError(key, "a bot token (or DISCORD_TOKEN_FILE naming a file holding one)")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(key, "a bot token (one word, without spaces or control characters)")
    return token


def parse_token_file(key: str, text: str) -> str:
    """The token held by the file named `text` (`DISCORD_TOKEN_FILE`); the file's contents are never shown."""
    path = text.strip()
    try:
        with open(path, encoding="utf-8") as file:
            contents = file.read()
    except (OSError, ValueError) as exc:
        # ValueError: a NUL in the path, or contents that are not UTF-8. Neither message may show the
        # file's contents (UnicodeDecodeError's shows none, but only the reason is kept, to be sure).
        if isinstance(exc, UnicodeDecodeError):
            reason = "not UTF-8 text"
        elif isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
        else:
            reason = "not a usable path"
        raise ConfigError(key, f"a readable file of UTF-8 text, got {path!r} ({reason})") from None
    if not contents.strip().removeprefix("Bot "):
        raise ConfigError(key, f"a file holding a bot token, {text!r} is empty")
    return parse_token(key, contents)


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


def parse_http_url(key: str, text: str) -> str:
    url = text.strip().rstrip("/")
    parts = _split_url(key, url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"an http(s) URL such as {DEFAULT_API_URL}, got {text!r}")
    return url


def url_parser(schemes: tuple[str, ...], example: str) -> Callable[[str, str], str]:
    def parse(key: str, text: str) -> str:
        url = text.strip()
        parts = _split_url(key, url)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ConfigError(key, f"a {'/'.join(schemes)} URL such as {example}, got {redact_url(url)!r}")
        return url

    return parse


def parse_redis_url(key: str, text: str) -> str:
    """A URL the Redis client can use (ratelimit.redis_url): its scheme, its query parameters, and for
    rediss:// TLS files that can be read, so that `--check-config` catches what would fail at start."""
    url = url_parser(("redis", "rediss", "unix"), "redis://127.0.0.1:6379")(key, text)
    try:
        address = RedisAddress.parse(url)
        if address.tls is not None:
            address.tls.context()
    except ValueError as exc:  # the messages never hold the password
        raise ConfigError(key, str(exc)) from None
    return url


def parse_auto_shard_count(key: str, text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return parse_shard_count(key, text)
    except ConfigError:
        raise ConfigError(
            key, f'"auto" or a shard count from 1 to {MAX_SHARD_ID + 1}, got {text[:40]!r}'
        ) from None


def auto_int_parser(minimum: int) -> Callable[[str, str], int | None]:
    def parse(key: str, text: str) -> int | None:
        if text.strip().lower() == "auto":
            return None
        try:
            return parse_int(key, text, minimum=minimum)
        except ConfigError:
            raise ConfigError(key, f'"auto" or an integer of at least {minimum}, got {text!r}') from None

    return parse


def parse_events(key: str, text: str) -> frozenset[str]:
    names = frozenset(name.strip().upper() for name in text.split(",") if name.strip())
    bad = sorted(name for name in names if not _EVENT_NAME.fullmatch(name))
    if not names or bad:
        raise ConfigError(key, f"dispatch names such as MESSAGE_CREATE,GUILD_CREATE, got {text!r}")
    return names


def parse_presence(key: str, text: str) -> dict[str, Any]:
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


def choice_parser(literal: Any) -> Callable[[str, str], str]:
    choices: tuple[str, ...] = get_args(literal)
    return lambda key, text: parse_choice(key, text, choices)


def int_parser(minimum: int) -> Callable[[str, str], int]:
    return lambda key, text: parse_int(key, text, minimum=minimum)


def duration_parser(*, positive: bool) -> Callable[[str, str], float]:
    def parse(key: str, text: str) -> float:
        seconds = parse_duration(key, text)
        if positive and seconds == 0:
            raise ConfigError(key, f"a duration above zero, got {text!r}")
        return seconds

    return parse


def parse_word(key: str, text: str) -> str:
    word = text.strip()
    if not word or any(c.isspace() for c in word):
        raise ConfigError(key, f"a name without spaces, got {text!r}")
    return word


def parse_secret(key: str, text: str) -> str:
    # Never echoed: this message may reach a log.
    secret = text.strip()
    if len(secret) < 16 or any(c.isspace() or not c.isprintable() or not c.isascii() for c in secret):
        raise ConfigError(key, "a shared secret of at least 16 printable ASCII characters without spaces")
    return secret


#: Where a bare port (`9464`, `:9464`) listens: loopback. Every interface only when written (`0.0.0.0:9464`),
#: since some servers read a bare port as "every interface" and metrics or a proxy are not for the internet.
BARE_PORT_HOST: Final = "127.0.0.1"


def parse_optional_address(key: str, text: str) -> str | None:
    """`off` (None), `host:port`, or a bare port (`9464` or `:9464`, as Spectacles' `:8080`) written as
    `127.0.0.1:PORT`, so what is shown (`--print-config`) is where it listens."""
    address = text.strip()
    if address.lower() == "off":  # DESIGN 3.2's word for the default, which workers accept too
        return None
    port = address.removeprefix(":")
    if port.isascii() and port.isdigit() and len(port) <= _MAX_PORT_DIGITS:
        address = f"{BARE_PORT_HOST}:{port}"
    parse_address(key, address)
    return address


def parse_endpoint(key: str, text: str) -> str:
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


def intents_text(bits: int) -> str:
    """Intent names when `bits` is made of known ones (the bitfield alongside), else the bitfield."""
    names: dict[int, str] = {}
    for name, bit in INTENT_BITS.items():
        names.setdefault(bit, name)  # the first name of a bit is its current one
    listed = [name for bit, name in sorted(names.items()) if bits >> bit & 1]
    if sum(1 << INTENT_BITS[name] for name in listed) != bits:
        return str(bits)
    return f"{','.join(listed) or '(none)'} (= {bits})"


def value_text(value: Any) -> str:
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
