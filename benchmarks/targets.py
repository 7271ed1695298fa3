"""Figures against targets, shared by the startup, proxy and scaling suites and by `benchmarks all`.

A suite's figures are flat dotted names (`proxy.http.added_p50_ms`) mapped to a number, or None when the
run that should have produced it failed. Its results file holds them nested (`{"proxy": {"http": ...}}`),
so the key named in the issue is the path through the JSON; `targets` and `verdicts` are keyed by the flat
name. Targets are informational: a FAIL verdict does not change a suite's exit status.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Comparison = Literal[">=", "<=", ">", "<", "=="]
Verdict = Literal["PASS", "FAIL", "ERROR"]
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
    """PASS, FAIL or ERROR (no figure) for every figure that has a target; figures not measured are left
    out (a subset run has no verdict on what it did not try)."""
    return {key: target.judge(figures[key]) for key, target in targets.items() if key in figures}


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
    figures: Mapping[str, float | None], targets: Mapping[str, Target], errors: Mapping[str, str]
) -> str:
    """The table a suite prints: figure, value, target, verdict; then one line per error."""
    judged = verdicts(figures, targets)
    rows = [
        (key, format_value(value), str(targets[key]) if key in targets else "", judged.get(key, ""))
        for key, value in figures.items()
    ]
    width = max([len("figure"), *(len(row[0]) for row in rows)])
    lines = [f"{'figure':<{width}}  {'value':>12}  {'target':<10}  verdict"]
    lines += [f"{k:<{width}}  {v:>12}  {t:<10}  {s}" for k, v, t, s in rows]
    lines += [f"ERROR {key}: {message.splitlines()[0] if message else ''}" for key, message in errors.items()]
    return "\n".join(lines)
