"""Waiting for RabbitMQ or Redis at start instead of crashing: backoff, one warning every so often, a gauge.

Design note. After a reboot the broker may take longer to accept connections than this service takes to
start (systemd's `After=` orders starts, it does not wait for a port). Failing the first connect made the
worker exit 1, the supervisor restart it, and its crash-loop cap end the service within seconds, with a
traceback per attempt and the one useful line at the bottom. Waiting is the right answer for a dependency
that is *not up yet*: nothing is wrong with the worker, and a restart cannot make the broker come up sooner.

Where the wait lives: in the supervisor first (`supervisor.app` waits for every dependency the settings use
before it spawns a worker, so one process logs one line and `/readyz` says what it waits for), and again in
the worker around its own connect (`workers.main._open_broker`), so a worker restarted during a later outage
waits too instead of spending the crash-loop cap. The cap then keeps its meaning: a worker that dies over
and over for a reason a restart does not fix (a bug, a bad setting), not a broker that is still booting.

The policy is pure (`DependencyWait`: time is passed in): retry delays double from `RETRY_INITIAL_S` to
`RETRY_MAX_S`; the warning, which names the dependency and its redacted URL, is logged at the first failure
and then at most every `WARN_EVERY_S`; one info line when it is up after a wait, with how long that took.
`discord_dependency_up{dependency}` is 0 while a process waits and 1 once connected.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import trio

from .logs import redact_url
from .telemetry import metrics_enabled

__all__ = [
    "DEPENDENCIES",
    "RETRY_INITIAL_S",
    "RETRY_MAX_S",
    "WARN_EVERY_S",
    "Dependency",
    "DependencyWait",
    "RetryStep",
    "open_when_up",
    "wait_until_up",
]

LOGGER: Final = logging.getLogger("workers.dependencies")
T = TypeVar("T")

Dependency = Literal["amqp", "redis"]
#: The label values of `discord_dependency_up`.
DEPENDENCIES: Final[tuple[Dependency, ...]] = ("amqp", "redis")
RETRY_INITIAL_S: Final = 0.5
RETRY_MAX_S: Final = 5.0
#: A dependency that stays down is reported this often (the first failure is reported at once).
WARN_EVERY_S: Final = 30.0
_SETTING: Final[dict[Dependency, str]] = {"amqp": "AMQP_URL", "redis": "REDIS_URL"}


@dataclass(frozen=True, slots=True)
class RetryStep:
    """What to do after one failed connect: sleep `delay_s`, and log the warning when `warn`."""

    delay_s: float
    warn: bool


class DependencyWait:
    """Backoff and log pacing for one dependency that is not up yet. Pure: time is passed in."""

    def __init__(self, *, initial_s: float = RETRY_INITIAL_S, max_s: float = RETRY_MAX_S) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._delay_s = initial_s
        self.failures = 0
        self.since: float | None = None
        self._warned_at: float | None = None

    def failed(self, now: float) -> RetryStep:
        """Record one failed connect at `now`."""
        if self.since is None:
            self.since = now
        warn = self._warned_at is None or now - self._warned_at >= WARN_EVERY_S
        if warn:
            self._warned_at = now
        delay, self._delay_s = self._delay_s, min(self._delay_s * 2, self._max_s)
        self.failures += 1
        return RetryStep(delay, warn)

    def waited_s(self, now: float) -> float | None:
        """How long it was down before `now` (None when the first connect worked)."""
        return None if self.since is None else now - self.since


def _set_gauge(dependency: Dependency, up: bool) -> None:
    if not metrics_enabled():  # no metrics directory: nothing would read it (metric_defs's import note)
        return
    from . import metric_defs

    metric_defs.DEPENDENCY_UP.labels(dependency=dependency).set(1 if up else 0)


async def _retry(dependency: Dependency, url: str, wait: DependencyWait, exc: BaseException) -> None:
    step = wait.failed(trio.current_time())
    if wait.failures == 1:
        _set_gauge(dependency, False)
    if step.warn:
        LOGGER.warning(
            "dependency.waiting",
            extra={
                "dependency": dependency,
                "setting": _SETTING[dependency],
                "url": redact_url(url),
                "error": str(exc) or type(exc).__name__,
                "waiting_s": round(wait.waited_s(trio.current_time()) or 0.0, 1),
                "next_report_s": WARN_EVERY_S,
            },
        )
    await trio.sleep(step.delay_s)


def _up(dependency: Dependency, url: str, wait: DependencyWait) -> None:
    _set_gauge(dependency, True)
    waited = wait.waited_s(trio.current_time())
    if waited is not None:
        LOGGER.info(
            "dependency.up",
            extra={"dependency": dependency, "url": redact_url(url), "waited_s": round(waited, 1)},
        )


async def wait_until_up(
    dependency: Dependency,
    url: str,
    probe: Callable[[], AbstractAsyncContextManager[object]],
    errors: tuple[type[BaseException], ...],
) -> None:
    """Open and close `probe()` until that works, retrying on `errors` (see the module note). Checkpoint;
    waits forever unless cancelled."""
    async with open_when_up(dependency, url, probe, errors):
        pass


@contextlib.asynccontextmanager
async def open_when_up(
    dependency: Dependency,
    url: str,
    opener: Callable[[], AbstractAsyncContextManager[T]],
    errors: tuple[type[BaseException], ...],
) -> AsyncIterator[T]:
    """`async with opener()`, entered once it works: a failure in `errors` while entering is retried with
    backoff (see the module note). Errors raised inside the block are not retried."""
    wait = DependencyWait()
    async with contextlib.AsyncExitStack() as stack:
        while True:
            try:
                value = await stack.enter_async_context(opener())
            except errors as exc:
                await _retry(dependency, url, wait, exc)
                continue
            break
        _up(dependency, url, wait)
        yield value
