"""`report.md` of `python -m benchmarks all`: our figures beside the peers', from the merged results.

Each section reads its suite's node of `results.json`: the suite's own JSON without `machine`, where the
suites whose figures sit under their own name (`startup`, `proxy`, `cluster`, `scaling`) have that level
lifted, so `results["proxy"]["http"]["added_p50_ms"]` is the issue's `proxy.http.added_p50_ms`.

Pure: it reads the merged results (`benchmarks.all`'s `results.json`) and returns Markdown, so tests can
feed it canned results. A suite that failed or a figure that is missing shows as `-` and the suite's
status says why; no table is left out because one number is missing. The suites table counts each
suite's verdicts from the merged `verdicts` (a failed suite's targets are there as ERROR) as pass, fail,
error and skip (SKIP: not judged on this machine, never counted as a pass), and every verdict other than
PASS is listed below it with its note from `verdict_notes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from benchmarks.targets import VERDICTS, count_verdicts, format_value, lookup

#: (row label, our key, discord.py's key, the key whose target and verdict the row shows), relative to the
#: gateway suite's results.
GATEWAY_ROWS: Final = (
    (
        "events per CPU-second, zlib-stream, null sink (discord.py with models: what a bot pays)",
        "events_per_cpu_s.zlib.null",
        "peer.discordpy.events_per_cpu_s.zlib",
        "events_per_cpu_s.zlib.null",
    ),
    (
        "events per CPU-second, zlib-stream, null sink (discord.py on equal work)",
        "events_per_cpu_s.zlib.null",
        "peer.discordpy_raw.events_per_cpu_s.zlib",
        "ours_over_discordpy_raw.events_per_cpu_s.zlib",
    ),
    (
        "events per CPU-second, zstd-stream, null sink (discord.py on equal work)",
        "events_per_cpu_s.zstd.null",
        "peer.discordpy_raw.events_per_cpu_s.zstd",
        "ours_over_discordpy_raw.events_per_cpu_s.zstd",
    ),
    (
        "events per CPU-second, zlib-stream, AMQP (confirms)",
        "events_per_cpu_s.zlib.amqp",
        None,
        "events_per_cpu_s.zlib.amqp",
    ),
    (
        "RSS KiB per idle shard, zlib-stream",
        "rss_kib_per_idle_shard.zlib",
        "peer.discordpy.rss_kib_per_idle_shard.zlib",
        "rss_kib_per_idle_shard.zlib",
    ),
    (
        "RSS KiB per idle shard, zstd-stream",
        "rss_kib_per_idle_shard.zstd",
        None,
        "rss_kib_per_idle_shard.zstd",
    ),
)
#: The Python ceiling (the bare decode loop) and our fraction of it, below the gateway table.
GATEWAY_CEILING: Final = ("ceiling.events_per_cpu_s.zlib", "ours_fraction_of_ceiling.events_per_cpu_s.zlib")
RATELIMIT_VARIANTS: Final = (
    ("shm", "ours (shm)"),
    ("redis", "ours (Redis)"),
    ("peer.discordpy", "discord.py"),
    ("peer.hikari", "hikari"),
)
RATELIMIT_ROWS: Final = (
    "avoidable_429_per_10k",
    "first_contact_429",
    "global_429",
    "shared_429",
    "global_utilization",
    "hot_bucket_utilization",
    "interaction_wait_p99_ms",
    "interaction_latency_p99_ms",
    "acquire_p50_us",
    "acquire_p99_us",
    "loaded_acquire_p50_us",
    "loaded_acquire_p99_us",
    "grants_per_s",
)
RATELIMIT_WORKLOADS: Final = ("hot", "zipf", "interactions", "storm")
STARTUP_COLUMNS: Final = (
    ("shards", "shards"),
    ("max_concurrency", "max conc."),
    ("workers", "workers"),
    ("ready_s", "ready s"),
    ("readyz_s", "/readyz s"),
    ("identify_spread_s", "identify spread s"),
    ("bound_s", "bound s"),
    ("spread_over_bound", "spread / bound"),
    ("identifies", "identifies"),
    ("rules_broken", "rules broken"),
)
SUITE_TITLES: Final = {
    "gateway": "Gateway: events per CPU-second and memory (B1-B3)",
    "startup": "Start-up: all shards READY against Discord's identify bound",
    "ratelimit": "Ratelimit engine against discord.py's and hikari's own limiters",
    "proxy": "REST proxy overhead",
    "cluster": "Cluster mode: a dead node's shards resumed on the others",
    "reshard": "Live resharding: 4 -> 8 shards under a guild stream, every event once",
    "scaling": "Multi-core scaling",
}
#: (row label, key) of the cluster suite's figures.
CLUSTER_ROWS: Final = (
    ("failover s (node SIGKILL to its last shard RESUMED), median", "failover_s"),
    ("IDENTIFYs per failover", "identifies_per_failover"),
    ("RESUMEs per failover", "resumes_per_failover"),
    ("two connections serving one shard", "overlaps"),
    ("lease TTL s", "lease_ttl_s"),
    ("nodes", "nodes"),
    ("shards", "shards"),
)

#: (row label, key) of the reshard suite's figures.
RESHARD_ROWS: Final = (
    ("guild events lost", "lost"),
    ("guild events published twice", "duplicates"),
    ("longest gap of one guild's events s", "max_guild_gap_s"),
    ("gap without a reshard s (guilds / events per second)", "guild_period_s"),
    ("reshard s (start to the new generation live)", "duration_s"),
    ("new generation READY s", "ready_s"),
    ("identify bound s (ceil(M / max_concurrency) x 5 s)", "identify_bound_s"),
    ("reshard s / identify bound", "duration_over_bound"),
    ("IDENTIFYs of the new shard count", "identifies"),
    ("IDENTIFYs of other shard counts", "identifies_other"),
    ("RESUMEs", "resumes"),
    ("two connections serving one shard", "overlaps"),
    ("guild events generated", "events"),
    ("MESSAGE_CREATEs published", "published"),
)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format_value(value)
    return str(value)


def _verdict(suite: Mapping[str, Any], key: str) -> str:
    verdicts: Mapping[str, str] = suite.get("verdicts", {})
    targets: Mapping[str, str] = suite.get("targets", {})
    if key not in targets:
        return ""
    return f"{targets[key]}: {verdicts.get(key, 'not run')}"


def gateway_section(suite: Mapping[str, Any]) -> str:
    rows = []
    for label, ours_key, peer_key, judged_key in GATEWAY_ROWS:
        ours = lookup(suite, ours_key)
        peer = lookup(suite, peer_key) if peer_key else None
        ratio = (
            f"{ours / peer:.2f}"
            if isinstance(ours, int | float) and isinstance(peer, int | float) and peer
            else "-"
        )
        rows.append(
            [label, cell(ours), cell(peer) if peer_key else "n/a", ratio, _verdict(suite, judged_key)]
        )
    ceiling_key, fraction_key = GATEWAY_CEILING
    ceiling = (
        f"Python ceiling (the bare decode loop on the same zlib-stream bytes): "
        f"{cell(lookup(suite, ceiling_key))} events per CPU-second; ours is "
        f"{cell(lookup(suite, fraction_key))} of it ({_verdict(suite, fraction_key) or 'no target'})."
    )
    return table(["figure", "ours", "discord.py", "ours / discord.py", "target"], rows) + "\n\n" + ceiling


def startup_section(suite: Mapping[str, Any]) -> str:
    rows = []
    for label, figures in suite.items():
        if not isinstance(figures, Mapping) or "bound_s" not in figures:
            continue
        rows.append([label, *(cell(figures.get(key)) for key, _ in STARTUP_COLUMNS)])
    if not rows:
        return "_no configuration measured_"
    return table(["configuration", *(title for _, title in STARTUP_COLUMNS)], rows)


def ratelimit_section(suite: Mapping[str, Any]) -> str:
    present = [(key, title) for key, title in RATELIMIT_VARIANTS if isinstance(lookup(suite, key), Mapping)]
    if not present:
        return "_no variant measured_"
    rows = []
    for figure in RATELIMIT_ROWS:
        values = [lookup(suite, f"{key}.{figure}") for key, _ in present]
        if all(value is None for value in values):
            continue
        targets = {suite.get("targets", {}).get(f"{key}.{figure}") for key, _ in present} - {None}
        rows.append([figure, *(cell(value) for value in values), ", ".join(sorted(targets))])
    parts = [table(["figure", *(title for _, title in present), "target"], rows)]
    workload_rows = []
    for key, title in present:
        # `runs` is keyed by the variant's flat name ("peer.discordpy"), not nested.
        workloads = lookup(suite.get("runs", {}).get(key, {}), "workloads")
        if not isinstance(workloads, Mapping):
            continue
        for workload in RATELIMIT_WORKLOADS:
            ledger = lookup(workloads, f"{workload}.ledger")
            if not isinstance(ledger, Mapping):
                continue
            by_category: Mapping[str, int] = ledger.get("429_by_category", {})
            workload_rows.append(
                [
                    title,
                    workload,
                    cell(ledger.get("requests")),
                    cell(ledger.get("successes")),
                    *(cell(by_category.get(c)) for c in ("avoidable", "first-contact", "global", "shared")),
                ]
            )
    if workload_rows:
        parts.append("429s by workload (the simulator's ledger):")
        parts.append(
            table(
                [
                    "client",
                    "workload",
                    "requests",
                    "successes",
                    "avoidable 429",
                    "first-contact 429",
                    "global 429",
                    "shared 429",
                ],
                workload_rows,
            )
        )
    return "\n\n".join(parts)


def proxy_section(suite: Mapping[str, Any]) -> str:
    rows = []
    for path, title in (
        ("direct", "direct (httpx to the simulator)"),
        ("http", "HTTP proxy"),
        ("amqp", "AMQP RPC proxy"),
    ):
        figures = suite.get(path)
        if not isinstance(figures, Mapping):
            continue
        rows.append(
            [
                title,
                cell(figures.get("p50_ms")),
                cell(figures.get("p99_ms")),
                cell(figures.get("added_p50_ms")) if path != "direct" else "",
                cell(figures.get("added_p99_ms")) if path != "direct" else "",
                cell(figures.get("requests_per_s")),
                _verdict(suite, f"proxy.{path}.added_p50_ms"),
            ]
        )
    if not rows:
        return "_not measured_"
    return table(["path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "requests/s", "target"], rows)


def cluster_section(suite: Mapping[str, Any]) -> str:
    if suite.get("failover_s") is None and not suite.get("runs", {}).get("samples"):
        return "_not measured_"
    rows = [[label, cell(suite.get(key)), _verdict(suite, f"cluster.{key}")] for label, key in CLUSTER_ROWS]
    samples = lookup(suite, "runs.failover_samples_s") or []
    rows.insert(1, ["failover s, each sample", ", ".join(cell(value) for value in samples) or "-", ""])
    return table(["figure", "value", "target"], rows)


def reshard_section(suite: Mapping[str, Any]) -> str:
    if suite.get("lost") is None and not (suite.get("runs") or {}).get("grow"):
        return "_not measured_"
    settings = suite.get("settings", {})
    rows = [[label, cell(suite.get(key)), _verdict(suite, f"reshard.{key}")] for label, key in RESHARD_ROWS]
    summary = (
        f"{cell(settings.get('shards'))} -> {cell(settings.get('target'))} shards on "
        f"{cell(settings.get('workers'))} workers, max_concurrency {cell(settings.get('max_concurrency'))}, "
        f"{cell(settings.get('guild_count'))} guilds at {cell(settings.get('guild_event_rate'))} events/s."
    )
    return table(["figure", "value", "target"], rows) + "\n\n" + summary


def scaling_section(suite: Mapping[str, Any]) -> str:
    node = suite
    per_s: Mapping[str, Any] = node.get("events_per_s", {})
    if not per_s:
        return "_not measured_"
    runs: Mapping[str, Any] = suite.get("runs", {})
    one = per_s.get("w1")
    rows = []
    for label, value in per_s.items():
        count = int(label[1:])
        efficiency = value / (count * one) if isinstance(value, int | float) and one else None
        overlap = {bool(run.get("overlap")) for run in runs.get(label, [])}
        rows.append(
            [
                str(count),
                cell(value),
                cell(lookup(node, f"events_per_worker_cpu_s.{label}")),
                cell(lookup(node, f"worker_cpu_share.{label}")),
                cell(round(efficiency, 3) if efficiency is not None else None),
                "shared" if True in overlap else "own" if overlap else "-",
            ]
        )
    summary = (
        f"Efficiency at {cell(node.get('max_workers'))} workers: {cell(node.get('efficiency_at_max'))} "
        f"(per worker CPU-second: {cell(node.get('cpu_efficiency_at_max'))}); at the largest count whose "
        f"simulators had CPUs of their own ({cell(node.get('largest_unshared_workers'))}): "
        f"{cell(node.get('efficiency_unshared'))}."
    )
    target = _verdict(suite, "scaling.efficiency_unshared")
    if target:
        note = suite.get("verdict_notes", {}).get("scaling.efficiency_unshared")
        summary += f" Target `efficiency_unshared` {target}{f' ({note})' if note else ''}."
    header = [
        "workers",
        "events/s",
        "events per worker CPU-s",
        "worker core share",
        "efficiency",
        "simulator CPUs",
    ]
    return table(header, rows) + "\n\n" + summary


SECTIONS: Final = {
    "gateway": gateway_section,
    "startup": startup_section,
    "ratelimit": ratelimit_section,
    "proxy": proxy_section,
    "cluster": cluster_section,
    "reshard": reshard_section,
    "scaling": scaling_section,
}


def machine_section(machine: Mapping[str, Any]) -> str:
    rows = [
        [
            "CPU",
            f"{machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} CPUs, "
            f"{machine.get('cpus_usable', '?')} usable)",
        ],
        ["memory", f"{cell(machine.get('memory_mib'))} MiB"],
        ["kernel", cell(machine.get("kernel"))],
        ["Python", f"{machine.get('implementation', '')} {machine.get('python', '?')}"],
        ["git commit", f"{machine.get('git_commit') or '?'}{' (dirty)' if machine.get('git_dirty') else ''}"],
        ["date (UTC)", cell(machine.get("date"))],
        ["load average at start", cell(machine.get("load_average_at_start"))],
    ]
    return table(["", ""], rows)


def suite_verdicts(results: Mapping[str, Any], name: str) -> dict[str, str]:
    """Suite `name`'s verdicts: from the merged `verdicts` (full keys under `name.`) where there are
    any, else from the suite's own results."""
    merged: Mapping[str, str] | None = results.get("verdicts")
    if isinstance(merged, Mapping):
        return {key: str(value) for key, value in merged.items() if key.startswith(name + ".")}
    suite = results.get(name)
    own = suite.get("verdicts", {}) if isinstance(suite, Mapping) else {}
    return {str(key): str(value) for key, value in own.items()}


def suites_section(results: Mapping[str, Any]) -> str:
    rows = []
    for name, status in results.get("suites", {}).items():
        counts = count_verdicts(suite_verdicts(results, name))
        rows.append(
            [
                name,
                status.get("status", "?"),
                cell(status.get("elapsed_s")),
                ", ".join(f"{counts[kind]} {kind.lower()}" for kind in VERDICTS),
                (status.get("error") or "").splitlines()[0][:160] if status.get("error") else "",
            ]
        )
    return table(["suite", "status", "seconds", "targets", "error"], rows)


def verdict_notes_section(results: Mapping[str, Any]) -> str:
    """One line per verdict other than PASS, with its note (SKIP: why it is not judged here)."""
    notes: Mapping[str, str] = results.get("verdict_notes", {})
    lines = []
    for name in results.get("suites", {}):
        for key, verdict in suite_verdicts(results, name).items():
            if verdict != "PASS":
                note = notes.get(key)
                lines.append(f"- `{key}`: {verdict}{f' ({note})' if note else ''}")
    return "\n".join(lines)


def errors_section(name: str, suite: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    lines = []
    if status.get("status") == "failed":
        lines.append(f"**This suite failed**: {(status.get('error') or 'no reason given').splitlines()[0]}")
    for key, message in suite.get("errors", {}).items():
        first = message.splitlines()[0] if message else ""
        lines.append(f"- error in `{key}`: {first[:300]}")
    return "\n".join(lines)


def render(results: Mapping[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    """The whole report; `plots` is `(file name, caption)` of every PNG written beside it."""
    size = results.get("settings", {}).get("size")
    flag = f" --{size}" if size not in (None, "full") else ""
    parts = [
        "# Benchmark report",
        f"`python -m benchmarks all{flag}`, "
        f"{cell(results.get('elapsed_s'))} s in all. Figures come from `results.json` beside this file; "
        "each suite's own JSON and child logs are in the same folder. Targets are the issues'; they are "
        "informational (a FAIL or ERROR fails the run only with `--strict`; a SKIP is a target not judged "
        "on this machine, not a pass).",
        "## Machine",
        machine_section(results.get("machine", {})),
        "## Suites",
        suites_section(results),
    ]
    notes = verdict_notes_section(results)
    if notes:
        parts.append("Targets not passed:\n\n" + notes)
    for name, status in results.get("suites", {}).items():
        suite = results.get(name)
        parts.append(f"## {SUITE_TITLES.get(name, name)}")
        if isinstance(suite, Mapping) and name in SECTIONS:
            parts.append(SECTIONS[name](suite))
        else:
            parts.append("_no results_")
        notes = errors_section(name, suite if isinstance(suite, Mapping) else {}, status)
        if notes:
            parts.append(notes)
    if plots:
        parts.append("## Plots")
        for file_name, caption in plots:
            parts.append(f"![{caption}]({file_name})\n\n_{caption}_")
    skipped = results.get("plots_skipped", {})
    if skipped:
        parts.append(
            "Plots not drawn: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."
        )
    return "\n\n".join(parts) + "\n"
