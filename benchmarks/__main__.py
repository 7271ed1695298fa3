"""`python -m benchmarks <suite> [options]`: run one benchmark suite against the simulator.

Each suite is a module with `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int` (the exit status),
registered in `SUITES` by module name (its module docstring is its `--help`); a suite with targets also
has `target_keys(size)` (what `all` counts as ERROR when the suite fails) and `--strict` (exit status 3,
`benchmarks.targets.STRICT_EXIT_STATUS`, on a FAIL or ERROR verdict). A new suite (startup,
ratelimit, proxy, scaling, cluster, all) is one module and one line here. The simulator on its own is
`python -m benchmarks.simulator`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

#: Suite name -> the module that implements it.
SUITES: Final = {
    "gateway": "benchmarks.gateway",
    "startup": "benchmarks.startup",
    "ratelimit": "benchmarks.ratelimit",
    "proxy": "benchmarks.proxy",
    "scaling": "benchmarks.scaling",
    "cluster": "benchmarks.cluster",
    "reshard": "benchmarks.reshard",
    "faults": "benchmarks.faults",
    "all": "benchmarks.all",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark suites; each prints a table of figures against its targets and writes JSON "
        "(exit status 0 unless the run itself failed; with a suite's --strict, 3 when a target's verdict "
        "is FAIL or ERROR).",
    )
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module_name in SUITES.items():
        module = importlib.import_module(module_name)
        suite = suites.add_parser(
            name,
            help=module.DESCRIPTION,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(suite)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUITES[args.suite])
    status: int = module.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
