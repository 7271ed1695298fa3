"""Figures against targets, shared by the startup, proxy and scaling suites and by `benchmarks all`.

A suite's figures are flat dotted names (`proxy.http.added_p50_ms`) mapped to a number, or None when the
run that should have produced it failed. Its results file holds them nested (`{"proxy": {"http": ...}}`),
so the key named in the issue is the path through the JSON; `targets` and `verdicts` are keyed by the flat
name.

Verdicts: PASS or FAIL against the target; ERROR when the figure was attempted but not measured (a suite
puts None for every figure its options chose and its run could not produce, `with_missing`, so a failed
variant is counted, never silently dropped; a deliberate subset run has no verdict on what it did not
try); SKIP when the figure cannot mean anything on this machine (the scaling target on fewer CPUs than it
needs), never counted as a PASS, with the reason under `verdict_notes`.

Targets are informational: a FAIL or ERROR verdict does not change a suite's exit status, unless it runs
with `--strict` (`add_strict_argument`): then the exit status is STRICT_EXIT_STATUS (3) when any verdict
is FAIL or ERROR (SKIP does not count) and the run itself did not fail (that stays 1).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Comparison = Literal[">=", "<=", ">", "<", "=="]
Verdict = Literal["PASS", "FAIL", "ERROR", "SKIP"]
#: Every verdict, in the order counts show them.
VERDICTS: Final[tuple[Verdict, ...]] = ("PASS", "FAIL", "ERROR", "SKIP")
#: The verdicts that fail `--strict`.
FAILING: Final = frozenset({"FAIL", "ERROR"})
#: The exit status under `--strict` when a verdict is FAIL or ERROR (1 stays "the run itself failed").
STRICT_EXIT_STATUS: Final = 3
_COMPARE: Final = {
    ">=": lambda value, threshold: value >= threshold,
    "<=": lambda value, threshold: value <= threshold,
    ">": lambda value, threshold: value > threshold,
    "<": lambda value, threshold: value < threshold,
    "==": lambda value, threshold: value == threshold,
}


@dataclass(frozen=True, slots=True)
class Target:
    comparison: Comparison
    threshold: float

    def __str__(self) -> str:
        return f"{self.comparison} {self.threshold:g}"

    def judge(self, value: float | None) -> Verdict:
        if value is None:
            return "ERROR"
        return "PASS" if _COMPARE[self.comparison](value, self.threshold) else "FAIL"


def verdicts(figures: Mapping[str, float | None], targets: Mapping[str, Target]) -> dict[str, Verdict]:
    """PASS, FAIL or ERROR (None) for every figure that has a target; keys absent from `figures` are left
    out (a subset run has no verdict on what it did not try), so a suite first fills what it attempted
    with `with_missing`."""
    return {key: target.judge(figures[key]) for key, target in targets.items() if key in figures}


def with_missing(figures: Mapping[str, float | None], attempted: Iterable[str]) -> dict[str, float | None]:
    """`figures` plus None for every attempted key it lacks (the run that should have measured it failed),
    so a target among them is judged ERROR instead of vanishing from the verdicts. `attempted` comes from
    the run's options, not from what came back."""
    out = dict(figures)
    for key in attempted:
        out.setdefault(key, None)
    return out


def count_verdicts(judged: Mapping[str, str]) -> dict[str, int]:
    """How many of each verdict (every kind in VERDICTS, zeros included)."""
    return {kind: sum(1 for verdict in judged.values() if verdict == kind) for kind in VERDICTS}


def verdict_summary(judged: Mapping[str, str]) -> str:
    """One line: the counts, then the keys of each FAIL and ERROR."""
    counts = count_verdicts(judged)
    line = "targets: " + ", ".join(f"{counts[kind]} {kind}" for kind in VERDICTS)
    for kind in ("FAIL", "ERROR"):
        keys = [key for key, verdict in judged.items() if verdict == kind]
        if keys:
            line += f"; {kind}: {', '.join(keys)}"
    return line


def strict_status(status: int, judged: Mapping[str, str], strict: bool) -> int:
    """The exit status: `status` (the run's own) when non-zero; else, with `strict`, STRICT_EXIT_STATUS
    when any verdict is FAIL or ERROR; else 0. SKIP never fails it."""
    if status != 0:
        return status
    if strict and any(verdict in FAILING for verdict in judged.values()):
        return STRICT_EXIT_STATUS
    return 0


def add_strict_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {STRICT_EXIT_STATUS} when any target's verdict is FAIL or ERROR (SKIP, a "
        "target that cannot mean anything on this machine, does not count); without it targets are "
        "informational",
    )


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a.b.c": 1}` -> `{"a": {"b": {"c": 1}}}`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The inverse of `nest`: `(dotted key, leaf)` for every leaf that is not a mapping."""
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten(value, name)
        else:
            yield name, value


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of a nested mapping, or None if any part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"


def format_figures(
    figures: Mapping[str, float | None],
    targets: Mapping[str, Target],
    errors: Mapping[str, str],
    judged: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The table a suite prints: figure, value, target, verdict (`judged`, by default `verdicts`); then
    one line per verdict note and one per error."""
    judged = verdicts(figures, targets) if judged is None else judged
    rows = [
        (key, format_value(value), str(targets[key]) if key in targets else "", judged.get(key, ""))
        for key, value in figures.items()
    ]
    width = max([len("figure"), *(len(row[0]) for row in rows)])
    lines = [f"{'figure':<{width}}  {'value':>12}  {'target':<10}  verdict"]
    lines += [f"{k:<{width}}  {v:>12}  {t:<10}  {s}" for k, v, t, s in rows]
    lines += [f"{judged.get(key, 'NOTE')} {key}: {note}" for key, note in (notes or {}).items()]
    lines += [f"ERROR {key}: {message.splitlines()[0] if message else ''}" for key, message in errors.items()]
    return "\n".join(lines)
