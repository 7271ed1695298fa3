"""The command line of `python -m supervisor` (DESIGN 3.1): parse, then run, print or check the settings.

`parse_command_line` is the one place that decides what the process will do; `main` turns its outcome into
an exit status: 0 for a clean stop or a good check, 2 for bad configuration (the message names the key, as
`configuration error: KEY: expected ...` on stderr).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from workers.errors import ConfigError
from workers.exit_status import ExitStatus
from workers.settings import SETTINGS, LoadedSettings, Settings

from .config import build_parser, settings_from_arguments

__all__ = ["Action", "format_config", "main", "parse_command_line"]

Action = Literal["run", "print", "check"]


def parse_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[LoadedSettings, Action]:
    """The resolved settings and what to do with them.

    Raises ConfigError for a bad value, and for a missing token unless the action is "print" (which shows
    it unset). Malformed flags are argparse's: usage on stderr and SystemExit(2).
    """
    args = build_parser().parse_args(list(argv))
    loaded = settings_from_arguments(args, environ)
    action: Action = "print" if args.print_config else "check" if args.check_config else "run"
    if action != "print":
        loaded.require_token()
    return loaded, action


def format_config(loaded: LoadedSettings) -> str:
    """One `KEY = value  (source)` line per setting, secrets redacted; the `--print-config` output."""
    lines = []
    for row in SETTINGS:
        value = getattr(loaded.settings, row.field)
        source = loaded.sources[row.env]
        shown = row.display(value)
        where = str(source)
        if source.kind in ("env", "file") and source.key.upper() != row.env:
            where += f", {source.key}"  # the other spelling: DISCORD_TOKEN_FILE, DISCORD_RAW_INTENTS
        if row.field == "token" and loaded.settings.token_file:
            shown += f" (read from {loaded.settings.token_file})"
        lines.append(f"{row.env} = {shown}  ({where})")
    return "\n".join(lines) + "\n"


def _run(settings: Settings, environ: Mapping[str, str]) -> int:
    """Configure logging for this process and run the supervisor until it stops; returns the exit status."""
    import trio

    from workers.logs import configure_logging

    from .app import run_supervisor

    configure_logging(settings.log_level, settings.log_format)
    return trio.run(run_supervisor, settings, dict(environ))


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    run: Callable[[Settings, Mapping[str, str]], int] = _run,
) -> int:
    """`python -m supervisor`: returns the exit status. `run` is called with the settings for "run"."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        loaded, action = parse_command_line(argv, environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if action == "print":
        sys.stdout.write(format_config(loaded))
        return ExitStatus.OK
    if action == "check":
        print("configuration OK")
        return ExitStatus.OK
    return run(loaded.settings, environ)
