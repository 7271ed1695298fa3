"""The ratelimit benchmark's printed table: figures by variant, each with its verdict, then the 429s of
each workload by the simulator ledger's categories."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from benchmarks.ratelimit.settings import TARGETS, VARIANTS
from benchmarks.targets import format_value

#: The table's rows, in order.
ROWS: Final = (
    "avoidable_429_per_10k",
    "first_contact_429",
    "global_429",
    "bans",
    "requests",
    "global_utilization",
    "hot_bucket_utilization",
    "fallback_grants",
    "interaction_wait_p50_ms",
    "interaction_wait_p99_ms",
    "interaction_latency_p99_ms",
    "acquire_p50_us",
    "acquire_p99_us",
    "loaded_acquire_p50_us",
    "loaded_acquire_p99_us",
    "grants_per_s",
    "concurrent_grants_per_s",
    "concurrent_loaded_acquire_p99_us",
)


def format_table(flat: Mapping[str, float | None], results: Mapping[str, Any]) -> str:
    """A figure-by-variant matrix; each cell is the value and its verdict against the target."""
    variants = [v for v in VARIANTS if any(k.startswith(v + ".") for k in flat)]
    verdict = results["verdicts"]
    width = max(len(row) for row in ROWS)
    cell = 19
    lines = [
        f"{'figure':<{width}}  "
        + "".join(f"{v.removeprefix('peer.'):>{cell}}" for v in variants)
        + "  target"
    ]
    for row in ROWS:
        keys = [f"{variant}.{row}" for variant in variants]
        if not any(key in flat for key in keys):
            continue
        cells = []
        targets = {str(TARGETS[key]) for key in keys if key in TARGETS}
        for key in keys:
            if key not in flat:
                cells.append(f"{'':>{cell}}")
                continue
            mark = {"PASS": " ok", "FAIL": " FAIL", "ERROR": " ERR"}.get(verdict.get(key, ""), "")
            cells.append(f"{format_value(flat[key]) + mark:>{cell}}")
        target = " / ".join(sorted(targets))
        lines.append(f"{row:<{width}}  " + "".join(cells) + f"  {target}")
    lines.append("")
    lines.append("429s by ledger category and workload (requests answered / successes):")
    for label, details in results["runs"].items():
        for workload, entry in details.get("workloads", {}).items():
            ledger = entry.get("ledger")
            if ledger is None:
                continue
            nonzero = {k: v for k, v in ledger["429_by_category"].items() if v}
            lines.append(
                f"  {label:<15} {workload:<13} {ledger['requests']:>6} / {ledger['successes']:<6} "
                f"{nonzero or 'no 429s'}"
            )
    for key, message in results["errors"].items():
        lines.append(f"ERROR {key}: {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)
