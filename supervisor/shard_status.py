"""Per-shard status from the workers' heartbeats: the `/shards` rows and the per-shard gauges.

Every worker sends its shards' `ShardStatistics` once a second (`WorkerSlot.stats`), so the supervisor
already knows each shard's state, heartbeat latency and seq without asking anyone. A shard whose worker is
being replaced has no statistics: it shows as `disconnected` under its slot, instead of vanishing, which is
what an operator looking for a missing shard needs. Gauges are set here rather than in the workers because a
worker's live gauges vanish with it (prometheus_client's multiprocess `live*` modes).

A session's age survives a worker's replacement: the new worker RESUMEs a session it never saw begin
(`session_started_at` None), and the board keeps the start time an earlier heartbeat gave for that
session id.
"""

from __future__ import annotations

import math
import platform
import socket
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Final

from workers.control_messages import ShardStatistics
from workers.protocol import ShardState

from .processes import WorkerSlot

__all__ = ["DISTRIBUTION", "ShardBoard", "build_version", "publish_build_info"]

#: The package whose version `discord_gateway_build_info` reports.
DISTRIBUTION: Final = "trio-shard-gateway"
_UNKNOWN: Final = "unknown"


def build_version() -> str:
    """The installed version of this gateway, or `unknown` when it runs from a checkout not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _UNKNOWN


def publish_build_info() -> None:
    """`discord_gateway_build_info{version, python} 1`."""
    from workers import metric_defs as metrics

    metrics.BUILD_INFO.labels(version=build_version(), python=platform.python_version()).set(1)


class ShardBoard:
    """What the supervisor knows of each shard of its slots: JSON rows and gauges (see the module note)."""

    def __init__(self, slots: Sequence[WorkerSlot], node: str | None = None) -> None:
        self._slots = slots
        #: This host's name; later the node of a multi-host deployment.
        self.node = node or socket.gethostname()
        self._session_starts: dict[int, tuple[str, float]] = {}
        self._gauge_states: dict[int, str] = {}

    def rows(self) -> list[dict[str, object]]:
        """One JSON-ready row per shard, by shard id: state, latency, seq, session age, worker and node."""
        now = time.time()
        owned = sorted(((shard, slot) for slot in self._slots for shard in slot.shard_ids), key=_by_shard)
        return [self._row(slot, shard, now) for shard, slot in owned]

    def publish_gauges(self) -> None:
        """Set `discord_shard_state` and `discord_shard_latency_seconds` from the latest heartbeats."""
        from workers import metric_defs as metrics

        for slot in self._slots:
            for shard in slot.shard_ids:
                stats = slot.stats.get(shard)
                self._session_start(shard, stats)  # remembered across the worker's replacement
                state = stats.state if stats else ShardState.DISCONNECTED.value
                label = str(shard)
                previous = self._gauge_states.get(shard)
                if previous is not None and previous != state:
                    metrics.SHARD_STATE.labels(shard=label, state=previous).set(0)
                metrics.SHARD_STATE.labels(shard=label, state=state).set(1)
                self._gauge_states[shard] = state
                latency = stats.heartbeat_latency_s if stats else None
                metrics.SHARD_LATENCY.labels(shard=label).set(math.nan if latency is None else latency)

    def _row(self, slot: WorkerSlot, shard: int, now: float) -> dict[str, object]:
        stats = slot.stats.get(shard)
        started = self._session_start(shard, stats)
        return {
            "shard": shard,
            "state": stats.state if stats else ShardState.DISCONNECTED.value,
            "latency_s": stats.heartbeat_latency_s if stats else None,
            "seq": stats.seq if stats else None,
            "committed_seq": stats.committed_seq if stats else None,
            "session_age_s": None if started is None else round(max(0.0, now - started), 3),
            "worker": slot.index,
            "pid": slot.pid,
            "node": self.node,
        }

    def _session_start(self, shard: int, stats: ShardStatistics | None) -> float | None:
        if stats is None or stats.session_id is None:
            return None
        if stats.session_started_at is not None:
            self._session_starts[shard] = (stats.session_id, stats.session_started_at)
            return stats.session_started_at
        known = self._session_starts.get(shard)
        return known[1] if known is not None and known[0] == stats.session_id else None


def _by_shard(owned: tuple[int, WorkerSlot]) -> int:
    return owned[0]
