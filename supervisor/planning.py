"""Shard planning: which worker runs which shards, and whether today's IDENTIFY budget allows starting them.

Worker ranges (DESIGN.md 3.1): `--workers auto` means one worker per CPU core, and never more workers than
shards. Each worker gets one contiguous slice of the shard list, in the order given, and the slice sizes
differ by at most one. Contiguous slices matter beyond tidiness: IDENTIFY buckets are
`shard_id % max_concurrency` and open in order (anchors/gateway.md C2), so when every worker holds a run of
consecutive ids, each worker's shards spread evenly across the buckets and the first wave of identifies is
spread across all workers instead of queueing inside one. Round-robin assignment would do the same for
buckets but scatter a multi-host `--shard-ids` subset into ranges that no log line can name briefly.

IDENTIFY budget (anchors/gateway.md C3): `GET /gateway/bot` returns `session_start_limit` (`total`,
`remaining`, `reset_after` in ms, `max_concurrency`). Exhausting it ends every session and resets the bot's
token, and the limit exists to stop restart loops, so the supervisor never spends the last `reserve`
identifies on a start: they are kept for sessions that must be re-established later. When the budget is too
thin it waits for `reset_after` or exits with the message built here. The obvious alternative, starting
anyway and letting Discord refuse, is what burns the token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["MS_PER_S", "BudgetDecision", "ShardRange", "check_session_budget", "plan_workers"]

MS_PER_S: Final = 1000.0


@dataclass(frozen=True, slots=True)
class ShardRange:
    """The shards of one worker, in the order they were planned (usually ascending and consecutive)."""

    worker_index: int
    shard_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.shard_ids:
            raise ValueError(f"worker {self.worker_index} must be given at least one shard")

    @property
    def first(self) -> int:
        return self.shard_ids[0]

    @property
    def last(self) -> int:
        return self.shard_ids[-1]

    def __len__(self) -> int:
        return len(self.shard_ids)

    def __str__(self) -> str:
        """The `--shard-ids` form: `0-15`, or `0-3,8-11` when the ids have gaps (a single id: `5-5`)."""
        return ",".join(f"{start}-{end}" for start, end in _runs(self.shard_ids))


def _runs(shard_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs of consecutive ascending ids, as (first, last) pairs."""
    start = prev = shard_ids[0]
    for shard_id in shard_ids[1:]:
        if shard_id != prev + 1:
            yield start, prev
            start = shard_id
        prev = shard_id
    yield start, prev


def plan_workers(shard_ids: Sequence[int], workers: int | None, cpu_count: int) -> list[ShardRange]:
    """Split `shard_ids` into contiguous, balanced ranges, one per worker.

    Args:
        shard_ids: the shards this host runs, in the order to assign them (normally ascending).
        workers: how many workers to run, or None for one per CPU core.
        cpu_count: the number of usable cores (`os.process_cpu_count()` or `len(os.sched_getaffinity(0))`).

    Returns:
        `min(workers or cpu_count, len(shard_ids))` ranges with worker indexes 0, 1, ...; the first
        `len(shard_ids) % count` ranges hold one shard more than the others. No shards, no ranges.

    Raises:
        ValueError: `workers` or `cpu_count` is below 1, or a shard id is negative or repeated.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (or None for one per core), not {workers}")
    if cpu_count < 1:
        raise ValueError(f"cpu_count must be at least 1, not {cpu_count}")
    if len(set(shard_ids)) != len(shard_ids):
        raise ValueError("shard ids must not repeat")
    if any(shard_id < 0 for shard_id in shard_ids):
        raise ValueError("shard ids must not be negative")
    count = min(cpu_count if workers is None else workers, len(shard_ids))
    if count == 0:
        return []
    base, extra = divmod(len(shard_ids), count)
    ranges: list[ShardRange] = []
    start = 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        ranges.append(ShardRange(index, tuple(shard_ids[start : start + size])))
        start += size
    return ranges


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """Whether a start may spend identifies now.

    `wait_s` is 0.0 when `ok`; the time until Discord resets the budget when waiting would help; and
    `math.inf` when even a full budget (`total`) cannot cover the start plus the reserve, so the only sound
    action is to exit with `message`.
    """

    ok: bool
    wait_s: float
    message: str


def check_session_budget(
    shards_to_start: int, remaining: int, total: int, reset_after_ms: int, reserve: int
) -> BudgetDecision:
    """Decide whether `shards_to_start` identifies may be spent from `session_start_limit`.

    Only shards that must IDENTIFY count: shards that will RESUME a stored session spend nothing. The start
    is allowed when `remaining - shards_to_start >= reserve`, i.e. the reserve survives it, and always when
    it spends nothing (a restart whose shards all RESUME).
    """
    for name, value in (
        ("shards_to_start", shards_to_start),
        ("remaining", remaining),
        ("total", total),
        ("reset_after_ms", reset_after_ms),
        ("reserve", reserve),
    ):
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value}")
    needed = shards_to_start + reserve
    if remaining - shards_to_start >= reserve or shards_to_start == 0:
        return BudgetDecision(
            ok=True,
            wait_s=0.0,
            message=(
                f"session budget: starting {shards_to_start} shards leaves {remaining - shards_to_start} "
                f"of {total} identifies (reserve {reserve})"
            ),
        )
    if needed > total:
        return BudgetDecision(
            ok=False,
            wait_s=math.inf,
            message=(
                f"session budget: {shards_to_start} shards to identify plus a reserve of {reserve} need "
                f"{needed} identifies, more than the daily total of {total}; run fewer shards on this host "
                "(--shard-ids) or lower the reserve"
            ),
        )
    wait_s = reset_after_ms / MS_PER_S
    return BudgetDecision(
        ok=False,
        wait_s=wait_s,
        message=(
            f"session budget: {shards_to_start} shards to identify plus a reserve of {reserve} need {needed} "
            f"identifies, but only {remaining} of {total} remain; the budget resets in {wait_s:.0f} s"
        ),
    )
