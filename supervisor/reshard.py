"""Live resharding on one host: a new generation of shards beside the running one, then one cut-over.

When Discord's recommended shard count changes (`RESHARD=auto`: asked every `RESHARD_CHECK_INTERVAL`, at once
on SIGUSR1, and when a shard is closed with 4011), the supervisor reshards without downtime:

1. **Decide** (`decide`, pure): the recommended count `M` against the running `N`. Equal counts do nothing,
   except after a 4011, where Discord refuses `N` and offers nothing else: that is fatal (exit 3, as with
   `RESHARD=off`), never a loop. A new generation that would leave less than `SESSION_START_RESERVE` of the
   daily identify budget is refused with an alert (`reshard.refused`); the running generation stays.
2. **Start** the new generation: `M` shards over new worker processes (planned like a start), in the
   *shadow* role: they IDENTIFY through the same identify gate as everything else (so `max_concurrency`
   paces them and the budget is never overspent), receive every event, and publish nothing; each keeps
   the last few seconds of its events.
3. **Wait** until every new shard is READY and the guilds READY announced have arrived (`guilds_pending`
   0 in its heartbeat). The old generation publishes all along. If the new one does not get there within
   `ready_timeout_s` (the identify bound for `M` shards plus `READY_SLACK_S`), the reshard is abandoned: the
   new workers stop and their sessions are dropped; the old generation never stopped.
4. **Cut over**: each old worker is told to retire. It stops publishing and consuming commands, drains
   what it already accepted, reports the digests of the events it published in the last seconds, closes its
   sessions with 1000 (never resumed) and exits. Then each new worker is told to go live with the union of
   those digests: it publishes the events it kept that the old generation did not publish, in order, then
   everything, still skipping what the old generation published while the two overlap. So every event
   comes out once, with no gap but the cut-over's own round trip. Commands follow: the old generation stops
   taking them when it retires, the new one starts when it goes live, and stdin commands are routed by
   the new shard count from then on.

Crashes: a worker of either generation that dies during a reshard is restarted in its role and RESUMEs its
sessions (kept per shard *and* shard count, so the two generations' shard 7s never mix), so nothing is
identified twice. If the supervisor itself dies, the next start runs Discord's recommended count and
RESUMEs whichever sessions of that count exist: the old generation, or the new one, never neither.

What is not exact: an old worker that dies between the order to retire and its report leaves no digests,
so the events it published in its last seconds can come out twice (never lost); a digest is a hash of
the event's name and body, so two distinct events with identical bodies on one guild would count as one.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final, Literal

from workers.identify import IDENTIFY_INTERVAL_S
from workers.reshard import pack_digests, unpack_digests

from .planning import check_session_budget

__all__ = [
    "READY_SLACK_S",
    "ReshardDecision",
    "ReshardState",
    "Trigger",
    "decide",
    "merge_digests",
    "ready_timeout_s",
]

#: What started a reshard check.
Trigger = Literal["interval", "signal", "4011", "start"]
#: Beyond the identify bound, how long a new generation may take to be READY with its guilds.
READY_SLACK_S: Final = 120.0


class ReshardState(enum.Enum):
    """The supervisor's reshard phase (the `discord_reshard_state` gauge holds its number)."""

    IDLE = 0
    STARTING = 1  # the new generation identifies and waits for its guilds, in the shadow
    SWITCHING = 2  # the old generation retires, the new one goes live


@dataclass(frozen=True, slots=True)
class ReshardDecision:
    action: Literal["none", "reshard", "refuse", "fatal"]
    #: For the log line and, with "fatal" and "refuse", the error.
    reason: str
    current: int
    target: int


def decide(
    current: int,
    recommended: int,
    trigger: Trigger,
    *,
    remaining: int,
    total: int,
    reset_after_ms: int,
    reserve: int,
) -> ReshardDecision:
    """Whether to reshard from `current` to `recommended` shards (module docstring, step 1)."""
    if recommended < 1:
        return ReshardDecision("none", f"Discord recommends {recommended} shards; ignored", current, current)
    if recommended == current:
        if trigger == "4011":
            return ReshardDecision(
                "fatal",
                f"Discord closed a shard with 4011 (sharding required) but still recommends {current} "
                "shards, the count running; nothing to reshard to",
                current,
                current,
            )
        return ReshardDecision(
            "none", f"the recommended count is the running one, {current}", current, current
        )
    budget = check_session_budget(recommended, remaining, total, reset_after_ms, reserve)
    if not budget.ok:
        return ReshardDecision(
            "refuse", f"a new generation of {recommended} shards: {budget.message}", current, recommended
        )
    return ReshardDecision("reshard", f"{current} -> {recommended} shards ({trigger})", current, recommended)


def ready_timeout_s(shard_count: int, max_concurrency: int) -> float:
    """How long a new generation of `shard_count` shards may take to be READY: the identify bound (one
    IDENTIFY per bucket per 5 s) plus `READY_SLACK_S`."""
    windows = math.ceil(shard_count / max(1, max_concurrency))
    return windows * IDENTIFY_INTERVAL_S + READY_SLACK_S


def merge_digests(reports: list[bytes]) -> bytes:
    """The union of several `Retired` digest strings, sorted, as one digest string (`workers.reshard`'s
    packing); ValueError for a report that is not whole digests."""
    return pack_digests(sorted(frozenset().union(*(unpack_digests(report) for report in reports))))
