"""The supervisor's settings: the TOML file and command-line layers over the environment, and their checks.

Precedence (DESIGN 3.1): defaults < TOML file (`--config FILE`) < environment < command line. The settings
themselves, their parsers and the resolution of layers are declared once in `workers.settings`; this module
adds what only the supervisor reads: the TOML file (keys are the variables in lower case:
`discord_shard_count = 16`; a TOML value is type-checked, then written as the text an environment variable
would hold, so each format keeps one parser), the flags, and warnings about variables that look like ours
but are not read. An unknown TOML key, a TOML value of the wrong type and a `--config` file that cannot be
read are `ConfigError`s naming the key; unknown variables with one of our prefixes (a typo, or a
Spectacles-only name such as `DISCORD_API_VERSION`) cannot be errors, since the environment is shared, so
they are reported in `LoadedSettings.warnings`. A missing token is not an error here (`--print-config` shows
it unset); `LoadedSettings.require_token` makes it one for running and `--check-config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import orjson

from workers.errors import ConfigError
from workers.metric_labels import MULTIPROC_DIR_ENV
from workers.setting_formats import parse_address
from workers.settings import (
    KNOWN_VARIABLES,
    SETTING_BY_VARIABLE,
    SETTINGS,
    LoadedSettings,
    TextLayer,
    TomlKind,
    environment_layer,
    resolve,
)

__all__ = [
    "OWN_PREFIXES",
    "build_parser",
    "load_settings",
    "settings_from_arguments",
    "split_address",
]

#: pyproject.toml's `[project.scripts]` name for `python -m supervisor`.
CONSOLE_SCRIPT: Final = "trio-shard-gateway"
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
READ_ELSEWHERE: Final = frozenset({MULTIPROC_DIR_ENV})
_ALTERNATE_TOML_KIND: Final[dict[str, TomlKind]] = {"DISCORD_TOKEN_FILE": "str", "DISCORD_RAW_INTENTS": "int"}


def split_address(address: str) -> tuple[str, int]:
    """`(host, port)` of a validated `host:port` setting (`proxy_http_address`, `prometheus_address`)."""
    return parse_address("address", address)


# -- the TOML file ----------------------------------------------------------------------------------------

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


def _file_layer(path: str) -> TextLayer:
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
        kind = _ALTERNATE_TOML_KIND.get(env) or SETTING_BY_VARIABLE[env].toml
        text = _toml_text(kind, toml_key, value)
        if text.strip():
            values[env] = (toml_key, text)
    return TextLayer("file", values, path)


def _env_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(
        f"{name} is not a setting of the supervisor and is ignored"
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
        # The console script's name when run as `trio-shard-gateway`, else the module's.
        prog=CONSOLE_SCRIPT if Path(sys.argv[0]).name == CONSOLE_SCRIPT else "python -m supervisor",
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
    parser.set_defaults(**{_dest(row.flag): _NOT_GIVEN for row in SETTINGS if row.flag})
    return parser


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _flag_layer(args: argparse.Namespace) -> TextLayer:
    values: dict[str, tuple[str, str]] = {}
    for row in SETTINGS:
        if row.flag:
            text = getattr(args, _dest(row.flag))
            if text is not _NOT_GIVEN and text.strip():
                values[row.env] = (row.flag, text)
    return TextLayer("flag", values)


# -- resolution -----------------------------------------------------------------------------------------


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> LoadedSettings:
    """Resolve every setting from `argv` (without the program name) and `environ`; ConfigError if bad.

    argparse handles malformed flags itself (usage on stderr, exit status 2).
    """
    return settings_from_arguments(build_parser().parse_args(list(argv)), environ)


def settings_from_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> LoadedSettings:
    """`load_settings` for a command line already parsed by `build_parser()`."""
    config_path: str | None = args.config or None
    layers = [_file_layer(config_path)] if config_path else []
    layers += [environment_layer(environ), _flag_layer(args)]
    loaded = resolve(layers, config_path=config_path)
    return dataclasses.replace(loaded, warnings=_env_warnings(environ))
