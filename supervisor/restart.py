"""The supervisor's restart policy: when to respawn a worker that exited, and when to stop trying.

Rule (DESIGN.md 2, anchors/style-and-ecosystem.md A6 and A8.12): a worker that crashes is respawned after a
full-jitter exponential backoff, `uniform(0, min(max_s, initial_s * 2**n))`, n being the crashes of that
worker before this one since it was last healthy. The first respawn therefore comes within `initial_s`
(0.5 s; the kill -9 fault test wants shards RESUMED within 3 s), and a worker that keeps dying slows down to
one attempt per `max_s`. Full jitter rather than plain doubling spreads workers that died together (an OOM
kill of several, a broker outage) so their shards do not all queue for IDENTIFY permits at once.

Crash loop: once more than `crash_limit` crashes, of any workers, fall within `window_s`, the policy gives
up. The supervisor then stops everything and exits non-zero, leaving the decision to systemd's
`Restart=`/`StartLimit*`, because a restart loop is what spends the daily IDENTIFY budget and gets the
token reset (anchors/gateway.md C3). Counting per worker only would miss a loop that moves between workers
(a poisoned event that kills whichever worker receives it). A clean exit (status 0) is respawned with the
same backoff but is not counted as a crash.

The policy is sans-io: it never sleeps or reads a clock. The caller passes `now` (trio's clock) and does the
waiting, so the tests run the whole timeline under MockClock with exact times.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "DEFAULT_CRASH_LIMIT",
    "DEFAULT_CRASH_WINDOW_S",
    "DEFAULT_INITIAL_DELAY_S",
    "DEFAULT_MAX_DELAY_S",
    "HEALTHY_UPTIME_S",
    "RestartDecision",
    "RestartPolicy",
    "RestartStatistics",
]

DEFAULT_INITIAL_DELAY_S: Final = 0.5
DEFAULT_MAX_DELAY_S: Final = 30.0
#: More crashes than this within DEFAULT_CRASH_WINDOW_S is a crash loop.
DEFAULT_CRASH_LIMIT: Final = 5
DEFAULT_CRASH_WINDOW_S: Final = 60.0
#: A suggestion for callers: a worker that has run this long (or whose shards are all READY) is healthy.
HEALTHY_UPTIME_S: Final = 30.0
# 2**64 times any sane initial delay exceeds any cap; clamping keeps the float math finite.
_MAX_EXPONENT: Final = 64


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """What to do about one worker exit: respawn after `delay_s`, or give up (`delay_s` is then 0.0)."""

    give_up: bool
    delay_s: float
    #: Crashes of this worker since it was last healthy, this one included.
    worker_crashes: int
    #: Crashes of all workers inside the window, this one included.
    crashes_in_window: int

    @property
    def restart(self) -> bool:
        return not self.give_up


@dataclass(frozen=True, slots=True)
class RestartStatistics:
    """A snapshot for metrics and /healthz."""

    crashes_in_window: int
    crash_limit: int
    #: Workers with at least one crash since they were last healthy, and how many.
    worker_crashes: Mapping[int, int]


class RestartPolicy:
    """Backoff per worker, a crash-loop cap over all workers. Pure: time is passed in, randomness injected."""

    def __init__(
        self,
        initial_s: float = DEFAULT_INITIAL_DELAY_S,
        max_s: float = DEFAULT_MAX_DELAY_S,
        crash_limit: int = DEFAULT_CRASH_LIMIT,
        window_s: float = DEFAULT_CRASH_WINDOW_S,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0:
            raise ValueError(f"initial_s must be positive, not {initial_s}")
        if max_s < initial_s:
            raise ValueError(f"max_s must be at least initial_s ({initial_s}), not {max_s}")
        if crash_limit < 0:
            raise ValueError(f"crash_limit must not be negative, not {crash_limit}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.crash_limit = crash_limit
        self.window_s = window_s
        self._rng = rng if rng is not None else random.Random()
        self._worker_crashes: dict[int, int] = {}
        # Times of the crashes still inside the window, oldest first.
        self._crash_times: deque[float] = deque()

    def on_exit(self, worker_index: int, now: float, *, clean: bool) -> RestartDecision:
        """Record that `worker_index` exited at `now` and decide what to do.

        `clean` means exit status 0 without the supervisor having asked for it; stops the supervisor
        requested are not exits to report here. Fatal exit codes (a refused token) are the caller's to
        handle before asking: no backoff makes them worth retrying.
        """
        self._expire(now)
        earlier_crashes = self._worker_crashes.get(worker_index, 0)
        if not clean:
            self._crash_times.append(now)
            self._worker_crashes[worker_index] = earlier_crashes + 1
        worker_crashes = self._worker_crashes.get(worker_index, 0)
        crashes_in_window = len(self._crash_times)
        if crashes_in_window > self.crash_limit:
            return RestartDecision(True, 0.0, worker_crashes, crashes_in_window)
        cap = min(self.max_s, self.initial_s * 2 ** min(earlier_crashes, _MAX_EXPONENT))
        return RestartDecision(False, self._rng.uniform(0.0, cap), worker_crashes, crashes_in_window)

    def on_healthy(self, worker_index: int, now: float) -> None:
        """`worker_index` has run long enough to count as healthy: its next crash starts the backoff again.

        Its crashes stay in the crash-loop window until they age out.
        """
        self._expire(now)
        self._worker_crashes.pop(worker_index, None)

    def statistics(self, now: float) -> RestartStatistics:
        self._expire(now)
        return RestartStatistics(
            crashes_in_window=len(self._crash_times),
            crash_limit=self.crash_limit,
            worker_crashes=MappingProxyType(dict(self._worker_crashes)),
        )

    def _expire(self, now: float) -> None:
        # The window is (now - window_s, now]: a crash exactly window_s ago no longer counts.
        while self._crash_times and self._crash_times[0] <= now - self.window_s:
            self._crash_times.popleft()
