"""Every metric the gateway exports, defined once for the supervisor and the workers.

Import this module only where metrics are updated, and only after `PROMETHEUS_MULTIPROC_DIR` is set (the
supervisor: after `supervisor.metrics.prepare_multiprocess_dir()`; workers: the supervisor puts it in their
environment). prometheus_client decides at its first import whether values go to the shared mmap files or
stay in this process's memory, and values in memory never reach the supervisor's `/metrics`; importing this
module in that state raises instead of losing them quietly. Without the variable at all (a test, a one-off
run) the metrics count in memory, which is harmless.

Names follow Prometheus conventions: a `discord_` prefix, base units (`_seconds`), `_total` counters. Labels
come from bounded sets (`metric_labels.SHARD_STATES`, `RECONNECT_REASONS`, `WORKER_RESTART_CAUSES`);
there is deliberately no per-event label. The per-shard gauges (`discord_shard_latency_seconds{shard}`,
`discord_shard_state{shard,state}`, as Spectacles' `gateway_ping{id}`) grow with the bot by design, one or
a few series per shard; only the supervisor sets them, from its workers' heartbeats.
Gauges name their multiprocess mode: `livesum` adds up the processes that are alive, so a dead worker's shards
vanish from `discord_shards` once it is reaped (`mark_worker_dead`). Histograms and counters of dead processes
keep counting, so totals never go backwards across restarts.
"""

from __future__ import annotations

import os
from typing import Final, get_args

from prometheus_client import Counter, Gauge, Histogram, values

from ratelimit.model import WaitReason

from .metric_labels import (
    MULTIPROC_DIR_ENV,
    RECONNECT_REASONS,
    SHARD_STATES,
    WORKER_RESTART_CAUSES,
    reconnect_reason_label,
)

__all__ = [
    "BUILD_INFO",
    "CLUSTER_HANDOVERS",
    "CLUSTER_LEASE_FAILURES",
    "CLUSTER_LEASE_RENEWALS",
    "CLUSTER_NODES",
    "CLUSTER_SHARDS_OWNED",
    "CLUSTER_TAKEOVERS",
    "DEPENDENCY_UP",
    "EVENTS_PUBLISHED",
    "EVENTS_RECEIVED",
    "HEARTBEAT_LATENCY",
    "IDENTIFIES",
    "IDENTIFY_BUDGET_REMAINING",
    "IDENTIFY_WAITING",
    "LOOP_STALLS",
    "LOOP_STALL_SECONDS",
    "PUBLISH_CONFIRM_LAG",
    "RECONNECTS",
    "RESHARDS",
    "RESHARD_DUPLICATES_SUPPRESSED",
    "RESHARD_GENERATION",
    "RESHARD_READY",
    "RESHARD_SHARDS",
    "RESHARD_STATE",
    "RESUMES",
    "SHARDS",
    "SHARD_LATENCY",
    "SHARD_STATE",
    "WORKERS",
    "WORKER_RESTARTS",
    "count_reconnect",
]

if os.environ.get(MULTIPROC_DIR_ENV) and values.ValueClass is values.MutexValue:
    raise RuntimeError(
        f"prometheus_client was imported before {MULTIPROC_DIR_ENV} was set, so its values would stay in "
        "this process; set the variable (prepare_multiprocess_dir) before importing anything that uses it"
    )

#: Broker confirms arrive in a few ms (the publish benchmark's p99 target is 50 ms); the tail goes to 10 s.
CONFIRM_LAG_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Gateway round trips: tens of ms normally; seconds mean a struggling connection (the ACK deadline is 10 s).
HEARTBEAT_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- workers -----------------------------------------------------------------------------------------------

SHARDS: Final = Gauge(
    "discord_shards",
    "Gateway shards on this host by connection state.",
    ["state"],
    multiprocess_mode="livesum",
)
EVENTS_RECEIVED: Final = Counter(
    "discord_events_received_total", "Dispatch events received from the gateway."
)
EVENTS_PUBLISHED: Final = Counter(
    "discord_events_published_total", "Dispatch events published to the broker and confirmed by it."
)
PUBLISH_CONFIRM_LAG: Final = Histogram(
    "discord_publish_confirm_lag_seconds",
    "Time from receiving a dispatch to the broker's publish confirm.",
    buckets=CONFIRM_LAG_BUCKETS_S,
)
HEARTBEAT_LATENCY: Final = Histogram(
    "discord_heartbeat_latency_seconds",
    "Time from sending a gateway heartbeat to its ACK.",
    buckets=HEARTBEAT_BUCKETS_S,
)
IDENTIFIES: Final = Counter("discord_identifies_total", "IDENTIFY payloads sent (each spends daily budget).")
RESUMES: Final = Counter("discord_resumes_total", "RESUME payloads sent.")
RECONNECTS: Final = Counter("discord_reconnects_total", "Gateway reconnects by reason.", ["reason"])
LOOP_STALLS: Final = Counter(
    "discord_event_loop_stalls_total", "Times a worker's event loop ran nothing for a second or more."
)
LOOP_STALL_SECONDS: Final = Counter(
    "discord_event_loop_stall_seconds_total", "Time worker event loops spent in stalls of 1 s or more."
)
RESHARD_DUPLICATES_SUPPRESSED: Final = Counter(
    "discord_reshard_duplicates_suppressed_total",
    "Events a new shard generation did not publish during a live reshard: the old generation had.",
)
RESHARD_STATE: Final = Gauge(
    "discord_reshard_state",
    "The supervisor's live reshard phase: 0 idle, 1 the new generation starting, 2 switching over.",
    multiprocess_mode="livemax",
)
RESHARD_GENERATION: Final = Gauge(
    "discord_reshard_generation",
    "Live reshards this supervisor completed (the running shard generation, counted from 0).",
    multiprocess_mode="livemax",
)
RESHARD_SHARDS: Final = Gauge(
    "discord_reshard_shards",
    "Shard count of each generation: the current one, and the next while a live reshard runs (else 0).",
    ["generation"],
    multiprocess_mode="livemax",
)
RESHARD_READY: Final = Gauge(
    "discord_reshard_shards_ready",
    "READY shards of each generation (current, and next while a live reshard runs).",
    ["generation"],
    multiprocess_mode="livemax",
)
RESHARDS: Final = Counter(
    "discord_reshard_runs_total",
    "Live reshards by outcome: done, refused (the identify budget), abandoned (not READY in time).",
    ["outcome"],
)

# -- REST ratelimit engine and proxy (fed from each worker's statistics) ---------------------------------

RATELIMIT_GRANTS: Final = Counter(
    "discord_rest_ratelimit_grants_total", "Permits the ratelimit engine granted (requests allowed to leave)."
)
RATELIMIT_WAITS: Final = Counter(
    "discord_rest_ratelimit_waits_total",
    "Times a request had to wait for a limit, by reason (bucket, global, probe, blocked, sublimit, ban).",
    ["reason"],
)
RATELIMIT_REFUSALS: Final = Counter(
    "discord_rest_ratelimit_refusals_total",
    "Requests refused without sending (token_revoked, webhook_dead, invalid_budget).",
    ["reason"],
)
RATELIMIT_TIMEOUTS: Final = Counter(
    "discord_rest_ratelimit_timeouts_total", "Requests whose limits would have held them past their timeout."
)
RATELIMIT_OUTCOMES: Final = Counter(
    "discord_rest_outcomes_total",
    "What became of granted requests: response, limited:<scope> (429s; cloudflare = ban), cancel, lost.",
    ["outcome"],
)
RATELIMIT_FALLBACK: Final = Gauge(
    "discord_rest_ratelimit_fallback",
    "Worker processes whose shared ratelimit backend is unreachable (conservative local limits).",
    multiprocess_mode="livesum",
)
PROXY_RESPONSES: Final = Counter(
    "discord_rest_proxy_responses_total",
    "Discord answers the REST proxy relayed, by HTTP status.",
    ["status"],
)
PROXY_ERRORS: Final = Counter(
    "discord_rest_proxy_errors_total", "REST proxy requests that failed, by kind.", ["kind"]
)

# -- dependencies (workers.dependencies: the supervisor and each worker wait for them at start) ----------

# livemin: 0 while any live process waits for the dependency, 1 once every process that uses it connected.
DEPENDENCY_UP: Final = Gauge(
    "discord_dependency_up",
    "Whether RabbitMQ (amqp) or Redis (redis) accepted this host's connection at start (0 while waiting).",
    ["dependency"],
    multiprocess_mode="livemin",
)

# -- supervisor --------------------------------------------------------------------------------------------

WORKER_RESTARTS: Final = Counter(
    "discord_worker_restarts_total", "Worker processes respawned by the supervisor, by cause.", ["cause"]
)
# Only the supervisor sets it; livesum of one live process is its value, and it vanishes if that dies.
WORKERS: Final = Gauge("discord_workers", "Worker processes running.", multiprocess_mode="livesum")
# Per shard, from the workers' heartbeats (supervisor.shard_status). Only the supervisor sets them, so a
# replaced worker's shards keep their series (as disconnected) instead of vanishing with its files.
SHARD_LATENCY: Final = Gauge(
    "discord_shard_latency_seconds",
    "A shard's last gateway heartbeat round trip (NaN before the first ACK).",
    ["shard"],
    multiprocess_mode="livemax",
)
SHARD_STATE: Final = Gauge(
    "discord_shard_state",
    "1 for a shard's current connection state, 0 for the states it was in before.",
    ["shard", "state"],
    multiprocess_mode="livemax",
)
IDENTIFY_BUDGET_REMAINING: Final = Gauge(
    "discord_identify_budget_remaining",
    "IDENTIFYs left in the daily session-start budget, as the identify gate counts them (NaN: unknown).",
    multiprocess_mode="livemax",
)
IDENTIFY_WAITING: Final = Gauge(
    "discord_identify_waiting",
    "Shards waiting for an IDENTIFY permit (for long only when the daily budget is spent).",
    multiprocess_mode="livemax",
)
CLUSTER_NODES: Final = Gauge(
    "discord_cluster_nodes",
    "Live nodes of the cluster this node last saw in Redis (CLUSTER_MODE=redis).",
    multiprocess_mode="livemax",
)
CLUSTER_SHARDS_OWNED: Final = Gauge(
    "discord_cluster_shards_owned",
    "Shards whose lease this node holds.",
    multiprocess_mode="livemax",
)
CLUSTER_LEASE_RENEWALS: Final = Counter(
    "discord_cluster_lease_renewals_total", "Successful syncs with Redis (each renews every lease held)."
)
CLUSTER_LEASE_FAILURES: Final = Counter(
    "discord_cluster_lease_failures_total", "Syncs with Redis that failed (Redis unreachable or too slow)."
)
CLUSTER_HANDOVERS: Final = Counter(
    "discord_cluster_handovers_total",
    "Shard groups this node handed over (stopped and released for another node) or took by hand-over.",
    ["direction"],
)
CLUSTER_TAKEOVERS: Final = Counter(
    "discord_cluster_takeovers_total",
    "Shard groups this node took from a node whose lease expired (failover), or lost to another node.",
    ["direction"],
)
BUILD_INFO: Final = Gauge(
    "discord_gateway_build_info",
    "Always 1; the labels name the running version and Python.",
    ["version", "python"],
    multiprocess_mode="livemax",
)

# Known label values start at 0, so a rate() over them works before the first increment.
for _state in SHARD_STATES:
    SHARDS.labels(state=_state)
for _cause in WORKER_RESTART_CAUSES:
    WORKER_RESTARTS.labels(cause=_cause)
for _reason in RECONNECT_REASONS:
    RECONNECTS.labels(reason=_reason)
for _direction in ("in", "out"):
    CLUSTER_HANDOVERS.labels(direction=_direction)
    CLUSTER_TAKEOVERS.labels(direction=_direction)
for _reason in get_args(WaitReason):
    RATELIMIT_WAITS.labels(reason=_reason)
for _generation in ("current", "next"):
    RESHARD_SHARDS.labels(generation=_generation)
    RESHARD_READY.labels(generation=_generation)
for _outcome in ("done", "refused", "abandoned"):
    RESHARDS.labels(outcome=_outcome)


def count_reconnect(reason: str, amount: int = 1) -> None:
    """Count `amount` reconnects; `reason` as workers.protocol's `Reconnect.reason` gives it."""
    RECONNECTS.labels(reason=reconnect_reason_label(reason)).inc(amount)
