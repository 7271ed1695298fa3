"""systemd's notify protocol (sd_notify(3)), our own ~100 lines instead of python-systemd or `sdnotify`.

Rule (anchors/style-and-ecosystem.md B1): only the supervisor, the unit's main PID, talks to systemd
(`NotifyAccess=main`). It sends `READY=1` once the workers are spawned and the control plane is up (not when
every shard is READY: identify concurrency can make that minutes), shard progress in `STATUS=`, `STOPPING=1`
on a graceful stop, `RELOADING=1` with `MONOTONIC_USEC=` on SIGHUP (without the timestamp
`Type=notify-reload` may ignore the message) and then `READY=1` again, and `WATCHDOG=1` every
`WATCHDOG_USEC / 2` from its own loop: the watchdog means "the supervisor is alive", never "every shard is",
or one stuck shard would get the whole unit killed. Workers get an environment without `NOTIFY_SOCKET` and
`WATCHDOG_*` (`child_environment`), so nothing they run can speak for the unit.

The wire format: one datagram of `KEY=value` lines on an `AF_UNIX`/`SOCK_DGRAM` socket whose address is
`$NOTIFY_SOCKET`, a filesystem path or, with a leading `@`, an abstract socket (`@` stands for the leading
NUL byte). Outside systemd the variable is unset and every call is a no-op, as in gunicorn's `systemd.py`.

Why the calls are plain functions and not `async`: they must work anywhere, including in a `finally` block of
a cancelled scope (`STOPPING=1` during shutdown), and a checkpoint there would raise `Cancelled` instead. So
each call sends on a fresh non-blocking socket, which never waits: systemd (PID 1) drains its notify socket
at once, and if its queue is ever full, systemd is wedged and no wait of ours would help. The datagram is then
dropped with a warning and the call returns False; the watchdog simply tries again next period. A fresh
socket per call also means there is nothing to open or close (a notification every few seconds costs
nothing), and `CLOEXEC` is Python's default (PEP 446), so no child inherits one.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

__all__ = ["NOTIFY_ENVIRONMENT_KEYS", "SystemdNotifier", "child_environment"]

LOGGER: Final = logging.getLogger("supervisor.sdnotify")
US_PER_S: Final = 1_000_000
#: Variables meant for the main process only: workers must not notify or inherit sockets for the unit.
NOTIFY_ENVIRONMENT_KEYS: Final = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
)
_FIELD_NAME: Final = re.compile(r"[A-Z][A-Z0-9_]*")


def _monotonic_us() -> int:
    """CLOCK_MONOTONIC in µs, the clock systemd compares MONOTONIC_USEC against (not trio's clock)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` for a worker: without the notify socket, the watchdog and socket activation."""
    return {key: value for key, value in environ.items() if key not in NOTIFY_ENVIRONMENT_KEYS}


class SystemdNotifier:
    """Sends sd_notify messages to `address`, or does nothing when `address` is None (not under systemd).

    Every method is synchronous, never blocks and is not a checkpoint; each returns True when the datagram
    was handed to the kernel and False when there was nothing to send to or the send failed (logged).
    """

    def __init__(
        self,
        address: bytes | None,
        *,
        watchdog_interval_s: float | None = None,
        monotonic_us: Callable[[], int] = _monotonic_us,
    ) -> None:
        self.address = address
        self._watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._monotonic_us = monotonic_us

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default: `os.environ`, `os.getpid()`)."""
        env = os.environ if environ is None else environ
        return cls(
            _parse_address(env.get("NOTIFY_SOCKET", "")),
            watchdog_interval_s=_watchdog_interval_s(env, os.getpid() if pid is None else pid),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (sd_watchdog_enabled(3)).

        None when there is no watchdog for us: no `NOTIFY_SOCKET`, no or a bad `WATCHDOG_USEC`, or a
        `WATCHDOG_PID` naming another process.
        """
        return self._watchdog_interval_s

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines, in the order given: `notify(READY=1, STATUS="booted")`."""
        if not fields:
            raise ValueError("notify needs at least one field")
        lines = []
        for name, value in fields.items():
            text = str(value)
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"sd_notify field names are upper case, not {name!r}")
            if "\n" in text:
                raise ValueError(f"sd_notify field {name} must not contain a newline")
            lines.append(f"{name}={text}")
        return self._send("\n".join(lines).encode())

    def ready(self, status: str | None = None) -> bool:
        """`READY=1`: start-up, or a reload, is complete."""
        return self.notify(READY=1) if status is None else self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """`STATUS=...`, shown by `systemctl status`: `14/16 shards ready, 2 identifying`."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """`RELOADING=1` with `MONOTONIC_USEC=` now; send `ready()` when the reload is done."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic_us())

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """`EXTEND_TIMEOUT_USEC=`: ask for `seconds` more before a start, reload or stop times out."""
        return self.notify(EXTEND_TIMEOUT_USEC=round(seconds * US_PER_S))

    def _send(self, message: bytes) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            # BlockingIOError (systemd's queue is full) included: dropping beats stalling the control loop.
            LOGGER.warning("sdnotify.send_failed", extra={"error": repr(exc), "datagram": message[:64]})
            return False
        return True


def _parse_address(value: str) -> bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    # systemd also knows vsock: addresses (for VMs); we don't run there, and a relative path is meaningless.
    LOGGER.warning("sdnotify.unsupported_address", extra={"notify_socket": value})
    return None


def _watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        watchdog_pid = int(environ["WATCHDOG_PID"]) if "WATCHDOG_PID" in environ else pid
    except ValueError:
        return None
    if usec <= 0 or watchdog_pid != pid:
        return None
    return usec / US_PER_S / 2
