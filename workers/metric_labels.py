"""Metric names' bounded label values and the metrics directory variable, shared by every process.

The supervisor serves the metrics (`supervisor.metrics`) and every process updates them (`metric_defs`);
both need the same label sets, and neither may import prometheus_client to get them (see metric_defs's
import-order note), so they live here, below both.
"""

from __future__ import annotations

from typing import Final

from .protocol import ShardState

__all__ = [
    "MULTIPROC_DIR_ENV",
    "RECONNECT_REASONS",
    "SHARD_STATES",
    "WORKER_RESTART_CAUSES",
    "reconnect_reason_label",
]

#: prometheus_client's multiprocess directory; the supervisor sets it for itself and every worker.
MULTIPROC_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: `discord_shards{state}`: the values of `ShardState` (READY covers RESUMED).
SHARD_STATES: Final = tuple(state.value for state in ShardState)
#: `discord_reconnects_total{reason}`: the reasons workers.protocol gives, plus `close-<code>` for the close
#: codes in `_LABELLED_CLOSE_CODES`; anything else is `other`.
RECONNECT_REASONS: Final = (
    "reconnect-requested",
    "invalid-session",
    "invalid-session-resumable",
    "zombie",
    "dropped",
    "connect-failed",
    "hello-timeout",
    "ready-timeout",
    "other",
)
# WebSocket close codes (RFC 6455) and Discord's: a fixed set, so `close-<code>` stays bounded.
_LABELLED_CLOSE_CODES: Final = frozenset(range(1000, 1016)) | frozenset(range(4000, 4015))
#: `discord_worker_restarts_total{cause}`.
WORKER_RESTART_CAUSES: Final = ("crash", "clean_exit", "unresponsive", "rolling_restart")


def reconnect_reason_label(reason: str) -> str:
    """`reason` as a `discord_reconnects_total` label: itself if it is in the bounded set, else `other`."""
    if reason in RECONNECT_REASONS:
        return reason
    code = reason.removeprefix("close-")
    if code != reason and code.isdigit() and int(code) in _LABELLED_CLOSE_CODES:
        return f"close-{int(code)}"
    return "other"
