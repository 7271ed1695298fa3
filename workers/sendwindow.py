"""The gateway's send limit for one connection: 120 payloads per 60 s, heartbeats included.

Rule (anchors/gateway.md 1-G1, 6.3 F9): going over earns close code 4008, so the limit is enforced locally
with a sliding log, not a fixed window (a fixed window lets 240 through across a boundary). Heartbeats must
never wait behind commands, so `ceil(60 / interval) + 1` slots are reserved for them (twilight's rule; 3
before HELLO tells us the interval): commands get at most `120 - reserve`. Heartbeats are recorded too, and
if the server asked for extra ones (op 1) so they outnumber the reserve, commands give way to them. Identify
and resume are recorded as commands.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["DEFAULT_HEARTBEAT_RESERVE", "SEND_LIMIT", "SEND_WINDOW_S", "SendWindow", "heartbeat_reserve"]

SEND_LIMIT: Final = 120
SEND_WINDOW_S: Final = 60.0
DEFAULT_HEARTBEAT_RESERVE: Final = 3


def heartbeat_reserve(interval_s: float | None) -> int:
    """Slots kept free for heartbeats: `ceil(60 / interval) + 1`, or 3 while the interval is unknown."""
    if interval_s is None:
        return DEFAULT_HEARTBEAT_RESERVE
    # Clamped so one command always fits in an empty window, however absurd the interval.
    return min(SEND_LIMIT - 1, math.ceil(SEND_WINDOW_S / interval_s) + 1)


class SendWindow:
    """A sliding log of the sends of one connection. Pure: time is passed in."""

    def __init__(self, heartbeat_interval_s: float | None = None) -> None:
        self._log: deque[tuple[float, bool]] = deque()  # (sent at, is heartbeat), oldest first
        self._heartbeats = 0
        self.reserve = heartbeat_reserve(heartbeat_interval_s)

    def reset(self) -> None:
        """A new connection: forget every send and the interval (the reserve goes back to 3)."""
        self._log.clear()
        self._heartbeats = 0
        self.reserve = DEFAULT_HEARTBEAT_RESERVE

    def set_heartbeat_interval(self, interval_s: float) -> None:
        self.reserve = heartbeat_reserve(interval_s)

    @property
    def command_limit(self) -> int:
        return SEND_LIMIT - self.reserve

    def record(self, now: float, heartbeat: bool) -> None:
        """Log a send at `now`. Heartbeats are logged but never refused."""
        self._expire(now)
        self._log.append((now, heartbeat))
        self._heartbeats += heartbeat

    def delay_for_command(self, now: float) -> float:
        """Seconds until a command may be sent (0.0 if now). Records nothing."""
        self._expire(now)
        commands = len(self._log) - self._heartbeats
        heartbeats = self._heartbeats
        if commands + max(self.reserve, heartbeats) < SEND_LIMIT:
            return 0.0
        # Walk the log oldest first, letting entries expire until the command fits.
        for sent_at, is_heartbeat in self._log:
            if is_heartbeat:
                heartbeats -= 1
            else:
                commands -= 1
            if commands + max(self.reserve, heartbeats) < SEND_LIMIT:
                return sent_at + SEND_WINDOW_S - now
        raise AssertionError("unreachable: an empty window always has room")  # pragma: no cover

    def __len__(self) -> int:
        return len(self._log)

    def _expire(self, now: float) -> None:
        horizon = now - SEND_WINDOW_S
        log = self._log
        while log and log[0][0] <= horizon:
            _, is_heartbeat = log.popleft()
            self._heartbeats -= is_heartbeat
