"""The per-token global limit (R5): 50 requests per second by default, paced by GCRA. Pure: time is passed in.

Rule (anchors/ratelimit.md 1.2, 1.3, R5, R9): Discord counts the global limit per token at *arrival*, over any
1 s; interaction routes are exempt (their callers never ask this limiter). A fixed 1 s window, the obvious
choice of discord.js and twilight, lets 2x the rate through across a window boundary; and counting when a
request *arrives at the proxy* (nirn) rather than when it is dispatched lets requests that waited in
different bucket queues leave together above the rate. So this limiter is asked at dispatch, one grant per
request that leaves, and spaces grants with GCRA (a virtual scheduling "theoretical arrival time").

Jitter margin: requests sent `T` apart can arrive closer together when their latencies differ (#5144 saw
global 429s from exactly that with 1 s windows). If latency varies by at most `jitter_margin_s`, the arrivals
in any `window_s` at Discord left us within `window_s + jitter_margin_s`. GCRA with burst `B` admits at most
`floor(L / T) + B` grants in any closed span of length `L`, so the emission interval is
`T = (window_s + jitter_margin_s) / (rate - B)`, and at most `rate` requests land in any window. The default
`B = 1` (no burst) and 25 ms margin give 49 / 1.025 s = 47.8 req/s sustained (95.6 % of 50): every extra
burst slot would cost another 1/1.025 req/s and miss the 95 % target. A tolerance of less than one more
interval (`SLACK`) keeps that bound and lets a late caller catch up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_GLOBAL_RATE",
    "DEFAULT_JITTER_MARGIN_S",
    "GLOBAL_WINDOW_S",
    "SLACK",
    "GlobalLimiter",
    "GlobalStatistics",
]

DEFAULT_GLOBAL_RATE: Final = 50  # requests per window per token; big bots get more by configuration
GLOBAL_WINDOW_S: Final = 1.0
DEFAULT_JITTER_MARGIN_S: Final = 0.025
#: The fraction of one emission interval a grant may come early (GCRA tolerance beyond the burst); < 1.
SLACK: Final = 0.9


@dataclass(frozen=True, slots=True)
class GlobalStatistics:
    rate: int
    emission_interval_s: float
    theoretical_arrival: float
    frozen_until: float
    granted: int
    refunded: int


class GlobalLimiter:
    """GCRA pacing of one token's global limit. Asked at dispatch, never for interaction routes."""

    def __init__(
        self,
        rate: int = DEFAULT_GLOBAL_RATE,
        *,
        window_s: float = GLOBAL_WINDOW_S,
        jitter_margin_s: float = DEFAULT_JITTER_MARGIN_S,
        burst: int = 1,
    ) -> None:
        if not 1 <= burst < rate:
            raise ValueError(f"burst must be in [1, rate); got burst={burst}, rate={rate}")
        if window_s <= 0.0 or jitter_margin_s < 0.0:
            raise ValueError("window_s must be positive and jitter_margin_s not negative")
        self.rate = rate
        self.burst = burst
        self.emission_interval_s = (window_s + jitter_margin_s) / (rate - burst)
        # A grant is allowed once now >= TAT - tolerance; each grant pushes TAT one interval on. The
        # tolerance holds `SLACK` of one interval beyond the burst: a caller that wakes up late (timers are
        # late by 0.4 ms at the median here, by milliseconds under load) may then take its slot early next
        # time instead of losing it for good (without it utilization measured 0.88-0.92). The bound holds:
        # floor((L + tolerance) / T) + 1 = rate - burst + floor(burst - 1 + SLACK) + 1 = rate for SLACK < 1.
        self._tolerance_s = (burst - 1 + SLACK) * self.emission_interval_s
        self._tat = -math.inf
        self._frozen_until = -math.inf
        self._granted = 0
        self._refunded = 0

    @property
    def tolerance_s(self) -> float:
        """How early before its theoretical arrival time a grant may come (burst and slack)."""
        return self._tolerance_s

    def wait_s(self, now: float) -> float:
        """The seconds until a grant is possible (0.0: now); counts nothing."""
        return max(0.0, self._frozen_until - now, self._tat - self._tolerance_s - now)

    def try_acquire(self, now: float) -> float:
        """0.0 and a grant is counted, or the seconds to wait before asking again (nothing counted)."""
        wait = self.wait_s(now)
        if wait > 0.0:
            return wait
        self._tat = max(self._tat, now) + self.emission_interval_s
        self._granted += 1
        return 0.0

    def refund(self, now: float) -> None:
        """A granted request never left (R9): give its slot back. Never earlier than `now`, so a refund
        cannot bank capacity for a later burst."""
        self._tat = max(self._tat - self.emission_interval_s, now)
        self._refunded += 1

    def freeze(self, until: float) -> None:
        """A global 429 (R5): nothing is granted before `until`, then pacing restarts without a burst."""
        self._frozen_until = max(self._frozen_until, until)
        self._tat = max(self._tat, until)

    def to_record(self) -> tuple[float, float]:
        """(theoretical arrival, frozen until): all the shared backends keep of a token's global limit."""
        return (self._tat, self._frozen_until)

    def load_record(self, record: tuple[float, float]) -> None:
        self._tat, self._frozen_until = record

    def statistics(self) -> GlobalStatistics:
        return GlobalStatistics(
            rate=self.rate,
            emission_interval_s=self.emission_interval_s,
            theoretical_arrival=self._tat,
            frozen_until=self._frozen_until,
            granted=self._granted,
            refunded=self._refunded,
        )
