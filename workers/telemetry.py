"""Worker metrics: the shards' statistics fed to Prometheus (multiprocess mode) for the supervisor to serve.

Only when the supervisor gave this process `PROMETHEUS_MULTIPROC_DIR` (metrics live in shared mmap files
there; workers/metric_defs.py defines them once for every process). Counters advance by the difference
between two statistics snapshots, once per `FEED_PERIOD_S`, so the hot path pays nothing for metrics except
the confirm-lag observation, one per published batch.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

import trio

from .metric_labels import MULTIPROC_DIR_ENV, SHARD_STATES
from .publish.base import OutboundEvent

if TYPE_CHECKING:
    from ratelimit.engine import Ratelimiter
    from ratelimit.proxy import RestProxy

    from .shard import ShardRunner

LOGGER: Final = logging.getLogger("workers.telemetry")
FEED_PERIOD_S: Final = 1.0
#: The loop watchdog wakes this often; a wake-up later than LOOP_STALL_REPORT_S is a stall (F15).
LOOP_CHECK_S: Final = 0.25
LOOP_STALL_REPORT_S: Final = 1.0


def metrics_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


def observe_confirmed(batch: Sequence[OutboundEvent]) -> None:
    """Record the confirm lag of a published batch (its newest event). The events are counted by
    `ShardMetricsFeed`, with the dispatches they came from."""
    from . import metric_defs as metrics

    newest = batch[-1]
    if newest.received_at:
        metrics.PUBLISH_CONFIRM_LAG.observe(max(0.0, trio.current_time() - newest.received_at))


class ShardMetricsFeed:
    """The shard gauges and counters, advanced from the runners' statistics (`update`, every
    `FEED_PERIOD_S` in `run`).

    `discord_events_published_total` is never ahead of `discord_events_received_total`: both advance here,
    from one snapshot per shard, in which the confirmed events are a subset of the dispatches counted
    (an event is confirmed after it was received). Counting published events as confirms arrive, and
    received ones a second later, let a scrape in between see more published than received, and lost the
    last second of received events at every stop. Call `update` once more after the publish pump drained,
    so the final confirms are counted too.
    """

    def __init__(self, runners: Mapping[int, ShardRunner]) -> None:
        self._runners = runners
        self._last: dict[int, tuple[int, int, int, int, Counter[str]]] = {}

    def update(self) -> None:
        from . import metric_defs as metrics

        states: Counter[str] = Counter()
        for shard_id, runner in self._runners.items():
            stats = runner.statistics()
            states[stats.state] += 1
            dispatches, confirmed, identifies, resumes, reconnects = self._last.get(
                shard_id, (0, 0, 0, 0, Counter())
            )
            metrics.EVENTS_RECEIVED.inc(stats.dispatches - dispatches)
            metrics.EVENTS_PUBLISHED.inc(stats.confirmed - confirmed)
            metrics.IDENTIFIES.inc(stats.identifies - identifies)
            metrics.RESUMES.inc(stats.resumes - resumes)
            now_reconnects = Counter(stats.reconnects)
            for reason, count in (now_reconnects - reconnects).items():
                metrics.count_reconnect(reason, count)
            if stats.heartbeat_latency_s is not None:
                metrics.HEARTBEAT_LATENCY.observe(stats.heartbeat_latency_s)
            self._last[shard_id] = (
                stats.dispatches,
                stats.confirmed,
                stats.identifies,
                stats.resumes,
                now_reconnects,
            )
        for state in SHARD_STATES:
            metrics.SHARDS.labels(state=state).set(states.get(state, 0))

    async def run(self) -> None:
        """`update` every FEED_PERIOD_S until cancelled."""
        while True:
            self.update()
            await trio.sleep(FEED_PERIOD_S)


async def watch_event_loop(
    on_stall: Callable[[float], None],
    *,
    check_s: float = LOOP_CHECK_S,
    report_s: float = LOOP_STALL_REPORT_S,
) -> None:
    """Report event-loop stalls until cancelled (anchors gateway.md F15, as discord.py's heartbeat thread
    warns of a blocked loop): a sleep that ends `report_s` or more after it was due means nothing ran on
    this loop for that long (a blocking call, a long GC pause, a stopped process). Logs
    `worker.loop_stalled` and calls `on_stall(seconds)`. The stall itself is not a zombie: the shards'
    ACK deadlines count any inbound message, which the socket buffered meanwhile."""
    due = trio.current_time() + check_s
    while True:
        await trio.sleep_until(due)
        now = trio.current_time()
        late = now - due
        if late >= report_s:
            LOGGER.warning("worker.loop_stalled", extra={"stalled_s": round(late, 3)})
            on_stall(late)
        due = now + check_s


def count_stall(seconds: float) -> None:
    """`watch_event_loop`'s metric: stalls and their total length."""
    from . import metric_defs as metrics

    metrics.LOOP_STALLS.inc()
    metrics.LOOP_STALL_SECONDS.inc(seconds)


def _counts_delta(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in now.items() if value > before.get(key, 0)}


async def feed_rest_metrics(limiter: Ratelimiter, proxy: RestProxy) -> None:
    """Feed the ratelimit engine's and the REST proxy's statistics to Prometheus until cancelled."""
    from . import metric_defs as metrics

    last_grants = last_timeouts = 0
    last: dict[str, dict[str, int]] = {
        "waits": {},
        "refusals": {},
        "outcomes": {},
        "responses": {},
        "errors": {},
    }
    while True:
        engine = limiter.statistics()
        snapshot = proxy.statistics()
        metrics.RATELIMIT_GRANTS.inc(engine.grants - last_grants)
        metrics.RATELIMIT_TIMEOUTS.inc(engine.timeouts - last_timeouts)
        last_grants, last_timeouts = engine.grants, engine.timeouts
        current = {
            "waits": dict(engine.waits),
            "refusals": dict(engine.refusals),
            "outcomes": dict(engine.outcomes),
            "responses": {str(status): count for status, count in snapshot.responses.items()},
            "errors": dict(snapshot.errors),
        }
        for name, counter, label in (
            ("waits", metrics.RATELIMIT_WAITS, "reason"),
            ("refusals", metrics.RATELIMIT_REFUSALS, "reason"),
            ("outcomes", metrics.RATELIMIT_OUTCOMES, "outcome"),
            ("responses", metrics.PROXY_RESPONSES, "status"),
            ("errors", metrics.PROXY_ERRORS, "kind"),
        ):
            for key, amount in _counts_delta(current[name], last[name]).items():
                counter.labels(**{label: key}).inc(amount)
        last = current
        metrics.RATELIMIT_FALLBACK.set(1 if limiter.in_fallback else 0)
        await trio.sleep(FEED_PERIOD_S)
