"""The ratelimit benchmark's figures, computed from the simulator's ledger and the clients' reports. Pure.

The simulator's REST ledger is the authority: it decided every request at its arrival and put each 429 in
one category (`benchmarks/simulator/rest_ledger.py`). Its request records (arrival time on the simulator's
monotonic clock, route label, majors, status, category) are split by workload here through the channel,
guild and interaction ids each workload uses (`workloads.py` keeps their ranges disjoint).
`analyse_http` turns one variant's ledger and reports into its figures and the details behind them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchmarks.harness import BenchmarkError
from benchmarks.ratelimit.settings import Settings, message_shape
from benchmarks.ratelimit.workloads import (
    HOT_CHANNEL,
    INTERACTION_FIRST_ID,
    STORM_FIRST_CHANNEL,
    ZIPF_FIRST_CHANNEL,
    Plan,
    engine_config,
)
from benchmarks.simulator.rest import GLOBAL_WINDOW_S
from benchmarks.simulator.rest_ledger import CATEGORIES

MESSAGE_ROUTE: Final = "POST /channels/{channel_id}/messages"
INTERACTION_ROUTE: Final = "POST /interactions/{interaction_id}/{interaction_token}/callback"
STORM_ROUTES: Final = frozenset(
    {
        "PUT /channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
        "POST /channels/{channel_id}/typing",
        "PUT /guilds/{guild_id}/members/{user_id}/roles/{role_id}",
    }
)
Record = Mapping[str, Any]


def workload_of(record: Record) -> str:
    """Which workload sent `record`: hot, zipf, interactions, storm, banned (answered with the ban page
    before the simulator looked at its route), or other (a peer's login)."""
    if record.get("category") == "ban":
        return "banned"
    label = record.get("template")
    try:
        major = int(str(record.get("major") or "0").split("/")[0])
    except ValueError:
        return "other"
    if label == INTERACTION_ROUTE and major >= INTERACTION_FIRST_ID:
        return "interactions"
    if label == MESSAGE_ROUTE and major == HOT_CHANNEL:
        return "hot"
    if label == MESSAGE_ROUTE and ZIPF_FIRST_CHANNEL < major < STORM_FIRST_CHANNEL:
        return "zipf"
    if label in STORM_ROUTES and STORM_FIRST_CHANNEL <= major < INTERACTION_FIRST_ID:
        return "storm"
    return "other"


def split(records: Iterable[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for record in records:
        out.setdefault(workload_of(record), []).append(record)
    return out


def is_success(record: Record) -> bool:
    return 200 <= int(record["status"]) < 300


def ledger_counts(records: Sequence[Record]) -> dict[str, Any]:
    """Requests, successes, statuses and 429s by category of `records`."""
    statuses: dict[str, int] = {}
    categories: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    for record in records:
        statuses[str(record["status"])] = statuses.get(str(record["status"]), 0) + 1
        if record.get("category") is not None:
            categories[str(record["category"])] += 1
    return {
        "requests": len(records),
        "successes": sum(1 for record in records if is_success(record)),
        "statuses": dict(sorted(statuses.items())),
        "429_by_category": categories,
    }


#: 429 incidents kept per workload in the results, and answers of the same counter shown before each.
MAX_INCIDENTS: Final = 5
INCIDENT_CONTEXT: Final = 8


def incidents(records: Sequence[Record], origin: float) -> list[dict[str, Any]]:
    """The first avoidable and first-contact 429s of `records`, each with the answers the same counter
    (route and majors) gave before it: the evidence to tell a limiter bug from a simulator artefact.
    Times are seconds after `origin`."""
    out: list[dict[str, Any]] = []
    ordered = sorted(records, key=lambda record: float(record["arrival"]))
    for position, record in enumerate(ordered):
        if record.get("category") not in ("avoidable", "first-contact"):
            continue
        same = [
            earlier
            for earlier in ordered[:position]
            if earlier.get("template") == record.get("template")
            and earlier.get("major") == record.get("major")
        ]
        out.append(
            {
                "category": record["category"],
                "route": record.get("template"),
                "major": record.get("major"),
                "at_s": round(float(record["arrival"]) - origin, 4),
                "before": [
                    [round(float(earlier["arrival"]) - origin, 4), earlier["status"], earlier.get("category")]
                    for earlier in same[-INCIDENT_CONTEXT:]
                ],
            }
        )
        if len(out) >= MAX_INCIDENTS:
            break
    return out


def per_10k(count: int, total: int) -> float | None:
    return round(count * 10_000 / total, 2) if total else None


def bucket_utilization(records: Sequence[Record], limit: int, window_s: float) -> float | None:
    """Sustained successes per second of one counter over its allowed rate `limit / window_s`.

    Successes `N` arriving between the first (`t_1`) and the last (`t_N`): the counter starts full, so it
    admits `limit` at `t_1` and then at most `limit / window_s` per second (GCRA, or one fixed window
    after another), i.e. at most `limit + (t_N - t_1) * limit / window_s` in all. The figure is
    `((N - limit) / (t_N - t_1)) / (limit / window_s)`: 1.0 for a client that keeps the counter exactly
    saturated, whatever the phase of the run's start and end. None with too few successes to tell.
    """
    arrivals = sorted(float(record["arrival"]) for record in records if is_success(record))
    if len(arrivals) <= limit or arrivals[-1] <= arrivals[0]:
        return None
    sustained = (len(arrivals) - limit) / (arrivals[-1] - arrivals[0])
    return round(sustained / (limit / window_s), 4)


def global_utilization(records: Sequence[Record], rate: float, start: float, end: float) -> float | None:
    """Successful global-counted requests (every route but interaction callbacks) arriving in
    `[start, end)` per second, over the configured global rate."""
    if end <= start:
        return None
    counted = sum(
        1
        for record in records
        if record.get("template") != INTERACTION_ROUTE
        and is_success(record)
        and start <= float(record["arrival"]) < end
    )
    return round(counted / (end - start) / rate, 4)


def global_gaps(records: Sequence[Record], start: float, end: float) -> list[float]:
    """Seconds between consecutive arrivals of successful global-counted requests in `[start, end)`: a
    limiter pacing at its rate shows its emission interval; longer gaps are dispatch lateness."""
    arrivals = sorted(
        float(record["arrival"])
        for record in records
        if record.get("template") != INTERACTION_ROUTE
        and is_success(record)
        and start <= float(record["arrival"]) < end
    )
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def window_headroom(records: Sequence[Record], rate: int, window_s: float) -> float | None:
    """How close the busiest window came to a global 429: the shortest span between an arrival the
    simulator counted toward the global limit and the one `rate` counted arrivals later, less `window_s`.
    The simulator admits at most `rate` in any `(t - window_s, t]`, so this is never negative for what it
    admitted; it is the time by which the tightest `rate + 1` arrivals could have been closer without a
    global 429 (for our engine: its margin, `jitter_margin_s` plus the tolerance, less the compression
    that grant-to-arrival delays actually caused). None with too few arrivals to tell."""
    arrivals = sorted(
        float(record["arrival"])
        for record in records
        if record.get("template") != INTERACTION_ROUTE
        and record.get("category") not in ("global", "ban")
        and int(record["status"]) not in (401, 404)
    )
    if len(arrivals) <= rate:
        return None
    return min(later - earlier for earlier, later in zip(arrivals, arrivals[rate:], strict=False)) - window_s


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (`fraction` in (0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def scaled(value: float | None, factor: float, digits: int = 3) -> float | None:
    return None if value is None else round(value * factor, digits)


def merge_tallies(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The clients' own counts per workload, summed over processes (latency lists dropped)."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, tally in report["workloads"].items():
            into = merged.setdefault(
                name,
                {"scheduled": 0, "shed": 0, "completed": 0, "cancelled": 0, "statuses": {}, "errors": {}},
            )
            for key in ("scheduled", "shed", "completed", "cancelled"):
                into[key] += int(tally[key])
            for key in ("statuses", "errors"):
                for item, count in tally[key].items():
                    into[key][item] = into[key].get(item, 0) + int(count)
    return merged


def latencies(reports: Sequence[Mapping[str, Any]], workload: str) -> list[float]:
    return [float(value) for report in reports for value in report["workloads"][workload]["latencies_s"]]


@dataclass(slots=True)
class VariantRun:
    """One variant's HTTP workloads: its figures and the details behind them."""

    figures: dict[str, float | None]
    details: dict[str, Any]


def analyse_http(
    settings: Settings, plan: Plan, ledger: dict[str, Any], reports: list[dict[str, Any]]
) -> VariantRun:
    records: list[dict[str, Any]] = ledger["requests"]
    if ledger["requests_dropped"]:
        raise BenchmarkError(f"the simulator dropped {ledger['requests_dropped']} request records")
    by_workload = split(records)
    total = ledger_counts(records)
    categories = total["429_by_category"]
    out: dict[str, float | None] = {
        "avoidable_429_per_10k": per_10k(categories["avoidable"], total["requests"]),
        "first_contact_429": categories["first-contact"],
        "global_429": categories["global"],
        "shared_429": categories["shared"],
        "sublimit_429": categories["sublimit"],
        "ban_429": categories["ban"],
        "requests": total["requests"],
    }
    details: dict[str, Any] = {"ledger": total, "workloads": {}}
    clients = merge_tallies(reports)
    origin = min((float(record["arrival"]) for record in records), default=0.0)
    for name, workload_records in sorted(by_workload.items()):
        details["workloads"][name] = {"ledger": ledger_counts(workload_records)}
        found = incidents(workload_records, origin)
        if found:
            details["workloads"][name]["incidents"] = found
    for name, tally in clients.items():
        if tally["scheduled"]:
            details["workloads"].setdefault(name, {})["clients"] = tally
    if plan.hot is not None:
        limit, window_s = message_shape(settings)
        hot = by_workload.get("hot", [])
        out["hot_bucket_utilization"] = bucket_utilization(hot, limit, window_s)
        details["workloads"].setdefault("hot", {})["bucket"] = {
            "limit": limit,
            "window_s": window_s,
            "offered_per_s": plan.hot.rate_total,
            "allowed_per_s": round(limit / window_s, 4),
        }
    if plan.zipf is not None:
        zipf = [*by_workload.get("zipf", []), *by_workload.get("interactions", [])]
        if zipf:
            first = min(float(record["arrival"]) for record in zipf)
            start = first + settings.global_warmup_s
            end = first + plan.zipf.duration_s - settings.global_cooldown_s
            out["global_utilization"] = global_utilization(zipf, settings.global_rate, start, end)
            gaps = global_gaps(zipf, start, end)
            headroom = window_headroom(zipf, settings.global_rate, GLOBAL_WINDOW_S)
            pacing: dict[str, float] = {}
            if plan.engine is not None:
                interval = engine_config(plan.engine).global_limiter().emission_interval_s
                pacing = {
                    "engine_interval_ms": round(interval * 1000, 3),
                    "engine_ceiling_utilization": round(1 / (interval * settings.global_rate), 4),
                }
            details["workloads"].setdefault("zipf", {})["global"] = {
                **pacing,
                "window_s": round(end - start, 3),
                "gap_p10_ms": scaled(percentile(gaps, 0.1), 1000),
                "gap_p50_ms": scaled(percentile(gaps, 0.5), 1000),
                "gap_p90_ms": scaled(percentile(gaps, 0.9), 1000),
                "gap_p99_ms": scaled(percentile(gaps, 0.99), 1000),
                "window_headroom_ms": scaled(headroom, 1000),
            }
        else:
            out["global_utilization"] = None
        waits = [float(value) for report in reports for value in report.get("interaction_waits_s", [])]
        if waits:
            out["interaction_wait_p50_ms"] = scaled(percentile(waits, 0.5), 1000)
            out["interaction_wait_p99_ms"] = scaled(percentile(waits, 0.99), 1000)
        callbacks = latencies(reports, "interactions")
        out["interaction_latency_p50_ms"] = scaled(percentile(callbacks, 0.5), 1000, 1)
        out["interaction_latency_p99_ms"] = scaled(percentile(callbacks, 0.99), 1000, 1)
    engines = [report["engine"] for report in reports if "engine" in report]
    if engines:
        details["engine"] = merge_counters(engines)
        # Grants made by the conservative local fallback while the shared backend did not answer.
        out["fallback_grants"] = details["engine"]["fallback_grants"]
    return VariantRun(out, details)


def merge_counters(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum numbers and dicts of numbers key by key."""
    merged: dict[str, Any] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, dict):
                into = merged.setdefault(key, {})
                for inner, count in value.items():
                    into[inner] = into.get(inner, 0) + count
            else:
                merged[key] = merged.get(key, 0) + value
    return merged
