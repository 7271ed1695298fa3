"""Run a module under cProfile for a window: `python -m benchmarks.profiled OUT.prof -m MODULE [ARGS...]`.

The gateway benchmark's `--profile` starts the worker through this wrapper. It runs `MODULE` as `__main__`
(as `python -m MODULE ARGS` would) with a `cProfile.Profile` that is off until the process gets SIGUSR1
(`START_SIGNAL`) and that SIGUSR2 (`STOP_SIGNAL`) turns off again and writes to OUT.prof (through a
temporary file and a rename, so the file is whole once it exists). The benchmark sends them at the start and
the end of its measurement window, so the profile holds the hot path under load, without the imports, the
connects and the idle waits a whole-process `python -m cProfile` would add to it.

cProfile follows the main thread only (where trio runs the worker); time in `trio.to_thread` helpers is not
in it. It times with the wall clock, and it slows what it profiles several-fold, so figures measured with
it on are marked `profiled`.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Final

START_SIGNAL: Final = signal.SIGUSR1
STOP_SIGNAL: Final = signal.SIGUSR2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module, rest = args[0], args[2], args[3:]
    profile = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profile.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profile.disable()
        partial = f"{out}.partial"
        profile.dump_stats(partial)
        os.replace(partial, out)

    signal.signal(START_SIGNAL, start)
    signal.signal(STOP_SIGNAL, stop)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
