"""Reconnect delays for one shard: full-jitter exponential backoff with a floor of one attempt per second.

Rule (anchors/gateway.md 6.3 F14): a connect that fails (the socket drops before READY/RESUMED, or the
HELLO or READY timeout fires) waits `uniform(0, min(60, 1 * 2**n))` seconds, n being the number of failures
in a row. Full jitter (rather than plain doubling) spreads the shards of a worker that all lost their
connections at once. Independently of the jitter, attempts are never closer than `MIN_ATTEMPT_SPACING_S`:
with full jitter the draw can be ~0, and a tight reconnect loop is what burns the daily identify budget
(anchor 1-C3).
"""

from __future__ import annotations

import math
import random
from typing import Final

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "MIN_ATTEMPT_SPACING_S", "ReconnectBackoff"]

BACKOFF_BASE_S: Final = 1.0
BACKOFF_CAP_S: Final = 60.0
MIN_ATTEMPT_SPACING_S: Final = 1.0
# 2**6 already exceeds the cap; clamping the exponent keeps the float math finite for any failure count.
_MAX_EXPONENT: Final = 16


class ReconnectBackoff:
    """Counts consecutive failed connects and turns them into delays. Pure: time is passed in."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.failures = 0
        self._last_attempt_at = -math.inf

    def failure_delay(self, now: float) -> float:
        """Record one more failure and return how long to wait before the next attempt."""
        cap = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(self.failures, _MAX_EXPONENT))
        self.failures += 1
        return self.floored(now, self._rng.uniform(0.0, cap))

    def floored(self, now: float, delay_s: float) -> float:
        """`delay_s`, raised so that the next attempt starts at least 1 s after the previous one."""
        return max(delay_s, self._last_attempt_at + MIN_ATTEMPT_SPACING_S - now, 0.0)

    def attempt_started(self, at: float) -> None:
        """Note that a connection attempt starts (or started) at `at`; the latest one wins."""
        self._last_attempt_at = max(self._last_attempt_at, at)

    def reset(self) -> None:
        """A session became READY or RESUMED: the next failure starts the sequence again."""
        self.failures = 0
