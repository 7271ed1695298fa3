"""How far a start is: `N/M shards ready` lines, paced, with the identify bound's estimate of the time left.

Rule: a line when the count crosses the next tenth of the shards, else at most every `PROGRESS_EVERY_S`
while it changes, and one `all shards ready` line at the end (which is never held back). The estimate is
the identify bound (anchors/gateway.md: one IDENTIFY per `max_concurrency` key per 5 s), so with `waiting`
shards still to connect about `ceil(waiting / max_concurrency) * IDENTIFY_INTERVAL_S` remain. It is an upper
bound for shards that RESUME (they wait for no key) and ignores the daily budget. Pure: time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from workers.identify import IDENTIFY_INTERVAL_S

__all__ = ["PROGRESS_EVERY_S", "ProgressLine", "StartProgress", "identify_eta_s"]

#: Between two progress lines that do not cross a tenth, at least this long.
PROGRESS_EVERY_S: Final = 5.0
_STEPS: Final = 10


def identify_eta_s(waiting: int, max_concurrency: int) -> float:
    """Seconds until `waiting` shards have identified, one per key per IDENTIFY_INTERVAL_S."""
    return math.ceil(waiting / max(1, max_concurrency)) * IDENTIFY_INTERVAL_S


@dataclass(frozen=True, slots=True)
class ProgressLine:
    ready: int
    total: int
    eta_s: float
    done: bool


class StartProgress:
    """Decides which ready-shard counts of one start get a log line (see the module note)."""

    def __init__(self, total: int, max_concurrency: int) -> None:
        self.total = total
        self.max_concurrency = max_concurrency
        self.done = False
        self._logged_ready = 0
        self._logged_at = -math.inf

    def observe(self, ready: int, now: float) -> ProgressLine | None:
        """The line to log for `ready` shards at `now`, or None; nothing more once all were ready."""
        if self.done or ready == self._logged_ready or self.total <= 0:
            return None
        done = ready >= self.total
        crossed = self._step(ready) > self._step(self._logged_ready)
        if not (done or crossed or now - self._logged_at >= PROGRESS_EVERY_S):
            return None
        self.done = done
        self._logged_ready, self._logged_at = ready, now
        eta = identify_eta_s(max(0, self.total - ready), self.max_concurrency)
        return ProgressLine(ready, self.total, eta, done)

    def _step(self, ready: int) -> int:
        return ready * _STEPS // self.total
