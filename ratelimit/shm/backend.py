"""`ShmBackend`: the model's two operations on a shared segment, each under the segment's lock (DESIGN 5).

`ShmBackend` runs `model.acquire` and `model.release` on the segment's `SlotTable`, each call under an
exclusive `fcntl.flock` on the file. The lock is taken with `LOCK_NB` from trio and retried (a few spins,
then `trio.sleep(0)`, then short sleeps): the trio thread never blocks in the kernel.

Time is `time.monotonic()`: CLOCK_MONOTONIC is one system-wide clock on Linux, so every process's `now`
compares with every other's. It is read after the lock is taken, so the shared state never sees time go
backwards. It restarts at boot, which is why the boot id is in the header.

A segment retired by its owner (removed or replaced, `ratelimit.shm.segment`) is noticed at the next
operation, which follows the name to the new one.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import trio
import trio.lowlevel

from ratelimit import model
from ratelimit.backend import BackendUnavailable
from ratelimit.model import Ask, EngineConfig, Outcome, Permit, Refusal, Wait
from ratelimit.shm.header import SegmentHeader
from ratelimit.shm.segment import Segment, SegmentLayout, ShmError, lock_blocking, open_segment, unlock
from ratelimit.shm.table import DEFAULT_PROBE_WINDOW, SlotTable

__all__ = [
    "DEFAULT_DIRECTORY",
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_SLOT_COUNT",
    "ShmBackend",
    "ShmStatistics",
]

DEFAULT_DIRECTORY: Final = Path("/dev/shm")
DEFAULT_SLOT_COUNT: Final = 32_768
#: An operation that cannot get the lock within this long raises `BackendUnavailable` (a holder that is
#: stopped, not dead: a dead one releases it at once).
DEFAULT_LOCK_TIMEOUT_S: Final = 1.0


#: Lock attempts: `_SPINS` immediate retries, then `os.sched_yield()` + `trio.sleep(0)` until `_YIELD_FOR_S`
#: has passed, then sleeps of `_BACKOFF_S` (trio's timers have millisecond resolution anyway).
_SPINS: Final = 16
_YIELD_FOR_S: Final = 0.002
_BACKOFF_S: Final = 0.001
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


@dataclass(frozen=True, slots=True)
class ShmStatistics:
    path: str
    owns: bool
    slots: int
    slots_used: int  # holding a record, expired ones not yet reused included (all processes)
    evictions: int  # records dropped before their expiry (all processes)
    lock_acquisitions: int  # by this process
    lock_contended: int  # of those, how many found the lock taken at the first try
    reopened: int  # times this process followed the name to a replaced segment


class ShmBackend:
    """The ratelimit state of one host, shared by every process that opens the same segment name.

    Open with `ShmBackend.open(...)`; close with `aclose` (or `async with`). `acquire` and `release` take the
    segment's lock, run the model on the shared table and drop the lock: microseconds, with no checkpoint
    inside. They are checkpoints only when the lock is busy (they then wait in `trio.sleep`); cancelled
    there, nothing has been taken. `release` waits for the lock shielded from cancellation (bounded by the
    lock timeout), so a cancelled caller still gives its permit back. Both raise `BackendUnavailable` when
    the lock stays taken past the lock timeout or the segment is gone.
    """

    name = "shm"

    def __init__(
        self,
        segment: Segment,
        config: EngineConfig,
        *,
        create: bool,
        layout: SegmentLayout,
        clock: Callable[[], float],
        lock_timeout_s: float,
        unlink_on_close: bool,
    ) -> None:
        self.config = config
        self._segment: Segment | None = segment
        self._create = create
        self._layout = layout
        self._clock = clock
        self._lock_timeout_s = lock_timeout_s
        self._unlink_on_close = unlink_on_close
        self._acquisitions = 0
        self._contended = 0
        self._reopened = 0

    @classmethod
    def open(
        cls,
        name: str,
        config: EngineConfig | None = None,
        *,
        create: bool = False,
        directory: Path | str = DEFAULT_DIRECTORY,
        slot_count: int = DEFAULT_SLOT_COUNT,
        probe_window: int = DEFAULT_PROBE_WINDOW,
        unlink_on_close: bool = False,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> ShmBackend:
        """Attach to the segment `directory/name`; with `create`, make it when it is missing or stale (its
        owner: the supervisor, or a process running alone). `slot_count` and `probe_window` apply to a
        segment this call creates; an attaching owner checks they match, others take the segment's. Raises
        `ShmError`. Synchronous: it may wait up to `lock_timeout_s` for another process's lock.

        `clock` must be CLOCK_MONOTONIC (the default) for processes to share the segment; a test clock is
        for one process alone.
        """
        if not _NAME.fullmatch(name):
            raise ShmError(f"bad segment name {name!r}: letters, digits, '.', '_' and '-' only")
        if not 1 <= probe_window <= slot_count <= 2**31:
            raise ShmError(f"need 1 <= probe_window <= slot_count, got {probe_window} and {slot_count}")
        config = config or EngineConfig()
        layout = SegmentLayout(slot_count, probe_window)
        path = Path(directory) / name
        segment = open_segment(path, config, create=create, layout=layout, lock_timeout_s=lock_timeout_s)
        return cls(
            segment,
            config,
            create=create,
            layout=layout,
            clock=clock,
            lock_timeout_s=lock_timeout_s,
            unlink_on_close=unlink_on_close,
        )

    @property
    def path(self) -> Path:
        return self._live().path

    @property
    def owns(self) -> bool:
        """Whether this process created the segment (and may `unlink` it)."""
        return self._live().owns

    @property
    def header(self) -> SegmentHeader:
        return self._live().header

    @property
    def table(self) -> SlotTable:
        """The shared table, for tests and tools (read without the lock: other processes may be writing)."""
        return self._live().table

    async def acquire(self, ask: Ask) -> Permit | Wait | Refusal:
        """`model.acquire` on the shared state. Raises `BackendUnavailable`."""
        segment = self._lock_nowait() or await self._lock()
        try:
            now = self._clock()
            segment.table.now = now
            return model.acquire(segment.table, ask, now, self.config)
        finally:
            unlock(segment.fd)

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        """`model.release` on the shared state. Raises `BackendUnavailable`."""
        segment = self._lock_nowait() or await self._lock_shielded()
        try:
            now = self._clock()
            segment.table.now = now
            model.release(segment.table, permit, outcome, now, self.config)
        finally:
            unlock(segment.fd)

    async def aclose(self) -> None:
        """Close the map and the descriptor; remove the segment if this process owns it and was opened with
        `unlink_on_close`. Idempotent."""
        segment, self._segment = self._segment, None
        if segment is None:
            return
        try:
            if self._unlink_on_close and segment.owns:
                self._unlink(segment)
        finally:
            segment.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    def unlink(self) -> None:
        """Remove the segment from its directory (its owner only; when the supervisor stops). Processes
        still attached find it retired at their next operation and raise `BackendUnavailable` until an
        owner creates it again."""
        segment = self._live()
        if not segment.owns:
            raise ShmError(f"{segment.path}: only the process that created the segment removes it")
        self._unlink(segment)

    def statistics(self) -> ShmStatistics:
        segment = self._live()
        return ShmStatistics(
            path=str(segment.path),
            owns=segment.owns,
            slots=segment.table.slot_count,
            slots_used=segment.table.occupied,
            evictions=segment.table.evictions,
            lock_acquisitions=self._acquisitions,
            lock_contended=self._contended,
            reopened=self._reopened,
        )

    def _live(self) -> Segment:
        if self._segment is None:
            raise trio.ClosedResourceError("the shm backend is closed")
        return self._segment

    def _unlink(self, segment: Segment) -> None:
        lock_blocking(segment.fd, segment.path, self._lock_timeout_s)
        try:
            segment.retire()
            try:
                if os.stat(segment.path).st_ino == os.fstat(segment.fd).st_ino:
                    segment.path.unlink()
            except FileNotFoundError:
                pass  # already gone, or replaced by an owner: not ours to remove
        finally:
            unlock(segment.fd)

    def _lock_nowait(self) -> Segment | None:
        """The fast path: the segment, locked, if its lock was free and it is not retired; else None and
        the caller goes on with `_lock`."""
        segment = self._live()
        self._acquisitions += 1
        if not self._try_lock(segment.fd):
            self._contended += 1
            return None
        if segment.retired:
            unlock(segment.fd)
            return None
        return segment

    async def _lock(self) -> Segment:
        """The slow path: wait for the lock, following the name when the segment was retired. The segment is
        looked up again after every sleep: another task may have reopened or closed it meanwhile."""
        started = time.monotonic()
        tries = 0
        while True:
            segment = self._live()
            if self._try_lock(segment.fd):
                if not segment.retired:
                    return segment
                unlock(segment.fd)
                self._reopen(segment)
                continue
            # The holder's critical section is tens of microseconds: a few immediate retries usually do;
            # then let other tasks run between tries; then back off (the holder is preempted or stopped).
            tries += 1
            if tries <= _SPINS:
                continue
            waited = time.monotonic() - started
            if waited >= self._lock_timeout_s:
                raise BackendUnavailable(
                    f"{segment.path}: the segment's lock was held for over {self._lock_timeout_s} s"
                )
            if waited < _YIELD_FOR_S:
                # With more runnable processes than cores the holder is often preempted inside its few
                # microseconds: give it this core (sched_yield) rather than spin or sleep a whole timer tick.
                os.sched_yield()
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(_BACKOFF_S)

    async def _lock_shielded(self) -> Segment:
        # Only on the slow path: entering a cancel scope costs several microseconds.
        segment: Segment | None = None
        with trio.CancelScope(shield=True):
            segment = await self._lock()
        assert segment is not None  # a shielded scope catches no cancellation
        return segment

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _reopen(self, retired: Segment) -> None:
        """The segment was removed or replaced: follow the name (an owner may create it again)."""
        try:
            fresh = open_segment(
                retired.path,
                self.config,
                create=self._create,
                layout=self._layout,
                lock_timeout_s=self._lock_timeout_s,
            )
        except ShmError as error:
            raise BackendUnavailable(str(error)) from error
        retired.close()
        self._segment = fresh
        self._reopened += 1
