"""What every script that runs discord.py against the simulator does first (tests/peers, the benchmark)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def run_discordpy_script(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]
) -> int:
    """Run `run(args)` under asyncio and print its report as one JSON line.

    With `args.compression == "zlib-stream"`, zstandard is hidden first: discord.py picks zstd-stream
    whenever a zstd module imports, and this is the only way to get its zlib-stream path.
    """
    if args.compression == "zlib-stream":
        sys.modules["zstandard"] = None  # type: ignore[assignment]
        sys.modules["compression.zstd"] = None  # type: ignore[assignment]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report: dict[str, Any] = asyncio.run(run(args))
    print(json.dumps(report), flush=True)
    return 0
