"""Command line for `python -m benchmarks.simulator`: one flag per config field, documented from config.py.

Flags are generated from the config dataclasses so a new setting cannot be forgotten on the command line;
each flag's help is the field's `#:` comment in config.py (the same convention Sphinx autodoc reads).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import signal
from collections.abc import Sequence
from typing import Any, Final, get_args

import trio

from workers.logs import configure_logging

from . import config as config_module
from .app import open_simulator
from .config import GatewayConfig, RestConfig, SimulatorConfig

LOGGER: Final = logging.getLogger("benchmarks.simulator")
#: Top-level fields whose flags are spelled differently from the field name.
FLAG_NAMES: Final = {"tokens": "--token"}
SECTIONS: Final = (("gateway", GatewayConfig), ("rest", RestConfig))


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of `cls` to the `#:` comment lines directly above it."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif ":" in stripped and not stripped.startswith(("#", "def ", "class ", '"', "@")):
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier() and pending:
                docs[name] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def _flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _add_field(group: Any, cls: type, field: dataclasses.Field[Any], docs: dict[str, str], dest: str) -> None:
    default = field.default if field.default is not dataclasses.MISSING else None
    # Every setting is documented in config.py (a test checks it); argparse %-formats help strings.
    help_text = docs[field.name].replace("%", "%%")
    metavar = field.name.upper()
    annotation = str(field.type)
    if annotation == "bool":
        group.add_argument(
            _flag(field.name),
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )
    elif annotation.startswith("tuple["):
        shown = ",".join(default) if isinstance(default, tuple) else ""
        if field.name == "tokens":
            group.add_argument(
                "--token",
                dest=dest,
                action="append",
                default=None,
                metavar="TOKEN",
                help=f"{help_text} (repeatable; default: the built-in DEFAULT_TOKEN)",
            )
        else:
            choices = get_args(config_module.Compression) if "Compression" in annotation else None
            group.add_argument(
                _flag(field.name),
                dest=dest,
                default=shown,
                metavar=metavar,
                help=f"{help_text} (comma-separated{'; from ' + ', '.join(choices) if choices else ''};"
                f" default: {shown})",
            )
    else:
        kind = {"int": int, "float": float, "str": str}[annotation]
        group.add_argument(
            _flag(field.name),
            dest=dest,
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{help_text} (default: {default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.simulator",
        description="A local Discord REST API and gateway that enforce Discord's rules and keep a ledger. "
        "When ready it prints one JSON line with its addresses on stdout; logs go to stderr. "
        "Control endpoint: GET /_sim/ledger, GET /_sim/state, POST /_sim/gateway/<action>, "
        "POST /_sim/rest/<action> on the REST port.",
    )
    top = parser.add_argument_group("listening and identity")
    docs = field_docs(SimulatorConfig)
    for field in dataclasses.fields(SimulatorConfig):
        if field.name not in ("gateway", "rest"):
            _add_field(top, SimulatorConfig, field, docs, field.name)
    for section, cls in SECTIONS:
        group = parser.add_argument_group(section)
        section_docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            _add_field(group, cls, field, section_docs, f"{section}.{field.name}")
    parser.add_argument("--log-level", default="info", help="logging level for stderr (default: info)")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log lines as the gateway writes them (default: auto, JSON unless stderr is a terminal)",
    )
    return parser


def _convert(field: dataclasses.Field[Any], value: Any) -> Any:
    if str(field.type).startswith("tuple[") and isinstance(value, str):
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if "Compression" in str(field.type):
            allowed = get_args(config_module.Compression)
            for item in items:
                if item not in allowed:
                    raise ValueError(f"--{field.name.replace('_', '-')}: {item!r} is not one of {allowed}")
        return items
    if field.name == "tokens" and isinstance(value, list):
        return tuple(value)
    return value


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    values = vars(args)
    top: dict[str, Any] = {}
    for field in dataclasses.fields(SimulatorConfig):
        if field.name in ("gateway", "rest"):
            continue
        if values.get(field.name) is not None:
            top[field.name] = _convert(field, values[field.name])
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS:
        kwargs = {f.name: _convert(f, values[f"{section}.{f.name}"]) for f in dataclasses.fields(cls)}
        sections[section] = cls(**kwargs)
    return SimulatorConfig(**top, **sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    # The same formats as the supervisor and the workers, so a demo's stderr reads as one log.
    configure_logging(args.log_level, args.log_format)
    trio.run(_serve, config)
    return 0


async def _serve(config: SimulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM, then close everything and return (exit status 0)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_simulator(config) as simulator:
            addresses = simulator.addresses
            print(
                json.dumps(
                    {
                        "rest_url": addresses.rest_url,
                        "control_url": addresses.control_url,
                        "gateway_url": addresses.gateway_url,
                        "resume_gateway_url": addresses.resume_gateway_url,
                    }
                ),
                flush=True,
            )
            async for signum in signals:
                LOGGER.info("simulator.stopping", extra={"signal": signal.Signals(signum).name})
                break
