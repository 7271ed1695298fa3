"""The PNG plots of `python -m benchmarks all` (matplotlib, Agg backend), from the merged results.

Each plot reads one suite's node of `results.json` (see `benchmarks.report`) and is skipped, with the
reason, when its data is missing (a failed suite, a subset run). matplotlib (the `bench` extra) is
imported here only, and only when plots are drawn, so nothing else in the service pays for it; without it
every plot is skipped with that reason and the report keeps its tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from benchmarks.targets import lookup

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OURS: Final = "#1f77b4"
PEER_COLOURS: Final = {"discord.py": "#ff7f0e", "hikari": "#2ca02c", "Redis": "#9467bd"}
TARGET_COLOUR: Final = "#d62728"
DPI: Final = 110


class Skipped(Exception):
    """The plot's data is not in the results; the message says what is missing."""


def _figure(columns: int = 1, width: float = 7.0, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bars(axes: Axes, labels: Sequence[str], values: Sequence[float | None], colours: Sequence[str]) -> None:
    heights = [value or 0.0 for value in values]
    bars = axes.bar(range(len(labels)), heights, color=colours)
    axes.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    for bar, value in zip(bars, values, strict=True):
        text = "not measured" if value is None else f"{value:,.3g}" if value < 100 else f"{value:,.0f}"
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")


def gateway_throughput(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "gateway")
    rows = (
        ("ours zlib / null", "events_per_cpu_s.zlib.null", OURS),
        ("ours zstd / null", "events_per_cpu_s.zstd.null", OURS),
        ("ours zlib / AMQP", "events_per_cpu_s.zlib.amqp", OURS),
        ("discord.py zlib", "peer.discordpy.events_per_cpu_s.zlib", PEER_COLOURS["discord.py"]),
        ("discord.py raw zlib", "peer.discordpy_raw.events_per_cpu_s.zlib", PEER_COLOURS["discord.py"]),
        ("discord.py raw zstd", "peer.discordpy_raw.events_per_cpu_s.zstd", PEER_COLOURS["discord.py"]),
    )
    values = [_number(lookup(suite, key)) for _, key, _ in rows]
    if all(value is None for value in values):
        raise Skipped("the gateway suite has no events-per-CPU-second figure")
    figure, (axes,) = _figure()
    _bars(axes, [label for label, _, _ in rows], values, [colour for _, _, colour in rows])
    for threshold, label in ((25_000, "target, null sink"), (10_000, "target, AMQP")):
        axes.axhline(threshold, color=TARGET_COLOUR, linestyle="--", linewidth=1)
        axes.annotate(label, (-0.4, threshold), ha="left", va="bottom", color=TARGET_COLOUR, fontsize=8)
    axes.set_ylabel("events per CPU-second of the client")
    axes.set_title("Gateway throughput by compression and sink")
    figure.savefig(figure_path)
    return (
        "Events per CPU-second of the client process, by transport compression and sink, against discord.py "
        "with its models (what a bot pays) and raw (its parsers off: equal work)"
    )


def gateway_rss(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "gateway")
    idle = lookup(suite, "runs.idle")
    if not isinstance(idle, list) or not idle:
        raise Skipped("the gateway suite has no idle-memory runs")
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for run in idle:
        series.setdefault((str(run["client"]), str(run["compression"])), []).append(
            (int(run["shards"]), run["rss_kib"] / 1024)
        )
    figure, (axes,) = _figure()
    counts: set[int] = set()
    for (client, compression), points in sorted(series.items()):
        points.sort()
        counts.update(shards for shards, _ in points)
        name = "discord.py" if client == "discordpy" else "ours"
        colour = PEER_COLOURS["discord.py"] if client == "discordpy" else OURS
        style = "-" if compression == "zlib" else ":"
        axes.plot(*zip(*points, strict=True), style, marker="o", color=colour, label=f"{name}, {compression}")
    axes.set_xlabel("idle shards in one process")
    axes.set_ylabel("resident memory, MiB")
    note = "" if len(counts) > 2 else f" (measured at {' and '.join(map(str, sorted(counts)))} shards only)"
    axes.set_title("RSS against shard count" + note)
    axes.legend()
    figure.savefig(figure_path)
    return "Resident memory of one client process against its number of idle shards" + note


def startup_against_bound(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "startup")
    configs = {
        label: node for label, node in suite.items() if isinstance(node, Mapping) and "bound_s" in node
    }
    measured = {label: node for label, node in configs.items() if _number(node.get("ready_s")) is not None}
    if not measured:
        raise Skipped("the startup suite measured no configuration")
    figure, (axes,) = _figure()
    labels = list(measured)
    width = 0.27
    for offset, (key, name, colour) in enumerate(
        (
            ("ready_s", "all shards READY", OURS),
            ("identify_spread_s", "first to last IDENTIFY", "#aec7e8"),
            ("bound_s", "Discord's bound", "#7f7f7f"),
        )
    ):
        values = [_number(measured[label].get(key)) or 0.0 for label in labels]
        positions = [index + (offset - 1) * width for index in range(len(labels))]
        bars = axes.bar(positions, values, width, label=name, color=colour)
        axes.bar_label(bars, [f"{value:.1f}" for value in values], fontsize=7)
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylabel("seconds")
    axes.set_ylim(0, axes.get_ylim()[1] * 1.25)  # room for the legend above the bars
    axes.set_title("Start-up time against the identify bound")
    axes.legend(loc="upper center", ncols=3, fontsize=8)
    figure.savefig(figure_path)
    return (
        "Time to every shard READY and the identify spread against (ceil(shards / max_concurrency) - 1) x 5 s"
    )


RATELIMIT_VARIANTS: Final = (
    ("shm", "ours (shm)", OURS),
    ("redis", "ours (Redis)", PEER_COLOURS["Redis"]),
    ("peer.discordpy", "discord.py", PEER_COLOURS["discord.py"]),
    ("peer.hikari", "hikari", PEER_COLOURS["hikari"]),
)
WORKLOADS: Final = ("hot", "zipf", "interactions", "storm")


def _measured_variant(node: Any) -> bool:
    return isinstance(node, Mapping) and any(_number(value) is not None for value in node.values())


def ratelimit_429s(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "ratelimit")
    # A variant that failed has its figures as None (its targets ERROR): not drawn as a bar of 0 429s.
    present = [v for v in RATELIMIT_VARIANTS if _measured_variant(lookup(suite, v[0]))]
    if not present:
        raise Skipped("the ratelimit suite measured no variant")
    figure, (left, right) = _figure(columns=2)
    width = 0.8 / len(present)
    drew_workloads = False
    highest = 0.0
    for index, (key, name, colour) in enumerate(present):
        workloads = lookup(suite.get("runs", {}).get(key, {}), "workloads")  # keyed "peer.discordpy"
        counts = []
        for workload in WORKLOADS:
            by_category = lookup(workloads, f"{workload}.ledger.429_by_category") if workloads else None
            if isinstance(by_category, Mapping):
                drew_workloads = True
                counts.append(float(by_category.get("avoidable", 0) + by_category.get("first-contact", 0)))
            else:
                counts.append(0.0)
        positions = [w + (index - (len(present) - 1) / 2) * width for w in range(len(WORKLOADS))]
        bars = left.bar(positions, counts, width, label=name, color=colour)
        left.bar_label(bars, [f"{count:.0f}" for count in counts], fontsize=7)
        highest = max(highest, *counts)
    left.set_xticks(range(len(WORKLOADS)), WORKLOADS)
    left.set_yscale("symlog", linthresh=1)
    left.set_ylim(0, max(10.0, highest * 20))
    left.set_ylabel("avoidable + first-contact 429s")
    left.set_title("429s per workload" + ("" if drew_workloads else " (no per-workload data)"))
    left.legend(loc="upper left", ncols=2, fontsize=8)
    figures = (("hot_bucket_utilization", "hot bucket"), ("global_utilization", "global (Zipf)"))
    for index, (key, name, colour) in enumerate(present):
        values = [_number(lookup(suite, f"{key}.{figure}")) or 0.0 for figure, _ in figures]
        positions = [f + (index - (len(present) - 1) / 2) * width for f in range(len(figures))]
        right.bar(positions, values, width, label=name, color=colour)
    right.axhline(0.95, color=TARGET_COLOUR, linestyle="--", linewidth=1)
    right.set_xticks(range(len(figures)), [name for _, name in figures])
    right.set_ylim(0, 1.1)
    right.set_ylabel("utilization of the allowed rate")
    right.set_title("Utilization (target 0.95)")
    figure.savefig(figure_path)
    return (
        "Avoidable and first-contact 429s per workload, and utilization, ours against discord.py and hikari"
    )


_PERCENTILE_KEY: Final = re.compile(r"^(loaded_)?acquire_p(\d+)_us$")


def ratelimit_acquire(results: Mapping[str, Any], figure_path: Path) -> str:
    """Every `acquire_p<N>_us` the suite wrote, as a percentile curve per backend (two points when it
    wrote only p50 and p99)."""
    suite = _suite(results, "ratelimit")
    curves: dict[str, list[tuple[float, float]]] = {}
    for backend in ("shm", "redis"):
        node = suite.get(backend)
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            match = _PERCENTILE_KEY.match(key)
            number = _number(value)
            if match and number is not None and number > 0:
                digits = match.group(2)
                percentile = int(digits) / 10 ** (len(digits) - 2) if len(digits) > 2 else float(digits)
                label = f"{backend}, {'under load' if match.group(1) else 'one process alone'}"
                curves.setdefault(label, []).append((percentile, number))
    if not curves:
        raise Skipped("the ratelimit suite has no acquire latency percentiles")
    figure, (axes,) = _figure()
    if max(len(points) for points in curves.values()) >= 3:
        for label, points in sorted(curves.items()):
            points.sort()
            colour = OURS if label.startswith("shm") else PEER_COLOURS["Redis"]
            style = "-" if "alone" in label else ":"
            axes.plot(*zip(*points, strict=True), style, marker="o", color=colour, label=label)
        axes.set_xlabel("percentile")
    else:  # p50 and p99 only: bars, since a line between two percentiles would invent the ones between
        percentiles = sorted({percentile for points in curves.values() for percentile, _ in points})
        width = 0.8 / len(curves)
        for index, (label, points) in enumerate(sorted(curves.items())):
            values = dict(points)
            colour = OURS if label.startswith("shm") else PEER_COLOURS["Redis"]
            positions = [p + (index - (len(curves) - 1) / 2) * width for p in range(len(percentiles))]
            bars = axes.bar(
                positions,
                [values.get(percentile, 0.0) for percentile in percentiles],
                width,
                color=colour,
                alpha=1.0 if "alone" in label else 0.55,
                label=label,
            )
            axes.bar_label(
                bars, [f"{values[p]:,.0f}" if p in values else "" for p in percentiles], fontsize=7
            )
        axes.set_xticks(range(len(percentiles)), [f"p{percentile:g}" for percentile in percentiles])
    axes.set_yscale("log")
    axes.set_ylabel("acquire latency, microseconds")
    axes.axhline(50, color=TARGET_COLOUR, linestyle="--", linewidth=1)
    axes.axhline(1000, color=TARGET_COLOUR, linestyle="--", linewidth=1)
    axes.set_title("Ratelimit acquire latency (targets: shm p50 50 us, Redis p50 1 ms)")
    axes.legend()
    figure.savefig(figure_path)
    return "Acquire latency by percentile, shm and Redis backends, alone and under the capacity load"


def proxy_latency(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "proxy")
    distributions = lookup(suite, "runs.latency_distribution_ms")
    if not isinstance(distributions, Mapping) or not distributions:
        raise Skipped("the proxy suite has no latency samples")
    figure, (axes,) = _figure()
    colours = {"direct": "#7f7f7f", "http": OURS, "amqp": PEER_COLOURS["discord.py"]}
    for path, points in distributions.items():
        curve = sorted((value, float(key[1:])) for key, value in points.items() if key.startswith("p"))
        axes.plot(*zip(*curve, strict=True), "-", marker=".", label=path, color=colours.get(path))
    axes.set_xscale("log")
    axes.set_xlabel("request latency, ms (log scale)")
    axes.set_ylabel("percentile")
    axes.set_ylim(0, 100)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title("REST proxy: latency of direct, HTTP-proxied and AMQP-proxied requests")
    axes.legend()
    figure.savefig(figure_path)
    return (
        "Latency distribution (percentiles) of GET /users/@me: direct, through the HTTP proxy, through AMQP"
    )


def scaling_curve(results: Mapping[str, Any], figure_path: Path) -> str:
    suite = _suite(results, "scaling")
    per_s = suite.get("events_per_s")
    if not isinstance(per_s, Mapping):
        raise Skipped("the scaling suite has no figures")
    points = sorted((int(label[1:]), float(v)) for label, v in per_s.items() if _number(v) is not None)
    if not points:
        raise Skipped("the scaling suite measured no point")
    runs = suite.get("runs", {})
    figure, (axes,) = _figure()
    axes.plot(*zip(*points, strict=True), "-o", color=OURS, label="measured")
    one = dict(points).get(1)
    if one:
        top = points[-1][0]
        axes.plot(
            [1, top], [one, one * top], "--", color=TARGET_COLOUR, linewidth=1, label="linear from one worker"
        )
    for count, value in points:
        shared = any(run.get("overlap") for run in runs.get(f"w{count}", []))
        if shared:
            axes.annotate(
                "simulators share\nthe workers' CPUs", (count, value), ha="right", va="top", fontsize=8
            )
    axes.set_xticks([count for count, _ in points])
    axes.set_xlabel("worker processes")
    axes.set_ylabel("events per second, all workers")
    axes.set_ylim(bottom=0)
    axes.set_title("Scaling across cores")
    axes.legend()
    figure.savefig(figure_path)
    return "Total events per second against the number of worker processes"


def _suite(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    suite = results.get(name)
    if not isinstance(suite, Mapping):
        raise Skipped(f"no {name} results")
    return suite


PLOTS: Final[tuple[tuple[str, Callable[[Mapping[str, Any], Path], str]], ...]] = (
    ("gateway_throughput.png", gateway_throughput),
    ("gateway_rss.png", gateway_rss),
    ("startup.png", startup_against_bound),
    ("ratelimit_429s.png", ratelimit_429s),
    ("ratelimit_acquire.png", ratelimit_acquire),
    ("proxy_latency.png", proxy_latency),
    ("scaling.png", scaling_curve),
)


def draw_all(results: Mapping[str, Any], out_dir: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Draw every plot whose data is present; returns `(file name, caption)` of those drawn and
    `{file name: reason}` of those skipped."""
    drawn: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    try:
        import matplotlib
    except ImportError:  # an install without the `bench` extra: the report still gets its tables
        return drawn, dict.fromkeys(
            (name for name, _ in PLOTS), "matplotlib is not installed (the bench extra)"
        )
    matplotlib.use("Agg")
    for file_name, draw in PLOTS:
        try:
            caption = draw(results, out_dir / file_name)
        except Skipped as exc:
            skipped[file_name] = str(exc)
        except (KeyError, TypeError, ValueError) as exc:  # malformed suite output: say so, draw the rest
            skipped[file_name] = f"unreadable data ({exc.__class__.__name__}: {exc})"
        else:
            drawn.append((file_name, caption))
    return drawn, skipped


__all__ = ["PLOTS", "Skipped", "draw_all"]
