"""A segment file's lifecycle: creating it, judging an existing one stale or live, replacing it (DESIGN 5).

The owner (`create=True`) builds the whole file under a temporary name, `O_CREAT | O_EXCL` with mode 0o600,
writes the header, and publishes it with `link()` (fails if someone else published first: we attach to
theirs instead). An existing file at the name is judged under its own lock:

1. corrupt (bad magic, another layout version or slot size, a file size that does not match its header),
   or retired (its owner removed or replaced it): replaced by an owner; an error for everyone else;
2. from another boot (boot id differs: its monotonic times mean nothing now): replaced by an owner; an
   error for everyone else;
3. its creator is dead (no process with that pid, a zombie, or a process with that pid that started at
   another time, i.e. the pid was reused): replaced by an owner; attached by everyone else (workers keep
   sharing while the supervisor restarts);
4. otherwise it is live: everyone attaches to it, an owner included (`owns` is then False).

A file that is not ours, or that others may read, is refused by everyone (we never made it).

Replacing renames the new file over the old one while holding the old one's lock and marks the old one
retired first, so a second owner racing us sees the name move and attaches to ours, and a process still
attached to the old file notices the retired flag at its next operation and reopens the name. Its in-flight
grants are then forgotten (a fresh table): at worst a bucket is overrun once by what was in flight. Every
opener refuses a segment made with another `EngineConfig` (`ShmError` naming the fields that differ).

The lock is an exclusive `fcntl.flock` on the file (the package docstring says why); here it is taken
synchronously, only while opening.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ratelimit.errors import RatelimitError
from ratelimit.model import EngineConfig
from ratelimit.shm.header import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    RETIRED_AT,
    SegmentHeader,
    config_difference,
    config_fingerprint,
    config_json,
    read_header,
    write_header,
)
from ratelimit.shm.table import SLOT_SIZE, SlotTable

__all__ = ["Segment", "SegmentLayout", "ShmError", "lock_blocking", "open_segment", "unlock"]

_ZERO_DIGEST: Final = bytes(16)


class ShmError(RatelimitError):
    """A segment cannot be created or opened (the message names its path and why)."""


def _boot_id() -> bytes:
    try:
        return uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip()).bytes
    except (OSError, ValueError):
        return _ZERO_DIGEST  # no /proc: every segment looks like this boot's


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), or None if there is no live one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0  # unreadable: it exists
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])  # field 22 overall; fields[0] is field 3


def _creator_alive(header: SegmentHeader) -> bool:
    """Whether the process that made the segment still runs: its pid exists and started when it did (a
    reused pid started later). A start time of 0 is one that could not be read: the pid decides alone."""
    start = _start_time(header.creator_pid)
    return start is not None and (start == header.creator_start or 0 in (start, header.creator_start))


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """The table shape a process asks for: a segment it creates gets it, an owner attaching checks it."""

    slot_count: int
    probe_window: int


class Segment:
    """One open segment file: its descriptor (the lock), its map and its table."""

    def __init__(self, path: Path, fd: int, header: SegmentHeader, *, owns: bool) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.owns = owns
        try:
            self.map = mmap.mmap(fd, header.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:  # the caller closes `fd`
            raise ShmError(f"{path}: cannot map the segment: {error}") from error
        self.table = SlotTable(self.map, slot_count=header.slot_count, probe_window=header.probe_window)

    @property
    def retired(self) -> bool:
        return self.map[RETIRED_AT] != 0

    def retire(self) -> None:
        self.map[RETIRED_AT] = 1

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def lock_blocking(fd: int, path: Path, timeout_s: float) -> None:
    """Take the exclusive lock, sleeping between tries (only while opening: a sync call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ShmError(f"{path}: the segment's lock was held for over {timeout_s} s") from None
            time.sleep(0.0005)


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def _inspect(fd: int) -> tuple[SegmentHeader | None, str | None]:
    """The header of the open file `fd`, and why it is unusable (corrupt or retired), if it is."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, HEADER_SIZE, 0)
    if len(data) < HEADER_SIZE:
        return None, f"{size} bytes is too small for a segment"
    header = read_header(data)
    if header.magic != MAGIC:
        return None, f"bad magic {header.magic!r}"
    if header.version != LAYOUT_VERSION or header.slot_size != SLOT_SIZE:
        return None, (
            f"layout version {header.version} with {header.slot_size}-byte slots, "
            f"this process uses version {LAYOUT_VERSION} with {SLOT_SIZE}-byte slots"
        )
    if not 1 <= header.probe_window <= header.slot_count or size != header.file_size:
        return None, f"{size} bytes does not match its header ({header.slot_count} slots)"
    if data[RETIRED_AT] != 0:
        return header, "retired by its owner"
    return header, None


def _new_header(config: EngineConfig, layout: SegmentLayout) -> SegmentHeader:
    text = config_json(config)
    pid = os.getpid()
    return SegmentHeader(
        version=LAYOUT_VERSION,
        slot_size=SLOT_SIZE,
        slot_count=layout.slot_count,
        probe_window=layout.probe_window,
        fingerprint=config_fingerprint(text),
        creator_pid=pid,
        creator_start=_start_time(pid) or 0,
        boot_id=_boot_id(),
        created_at=time.monotonic(),
        config_json=text,
    )


def _build(path: Path, config: EngineConfig, layout: SegmentLayout) -> tuple[Path, int, SegmentHeader]:
    """A complete new segment under a temporary name next to `path`: (temporary path, fd, header)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    header = _new_header(config, layout)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as error:
        raise ShmError(f"{path}: cannot create the segment: {error}") from error
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.ftruncate(fd, header.file_size)  # zero-filled: every slot empty
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as head:
            write_header(head, header)
    except (OSError, ValueError) as error:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise ShmError(f"{path}: cannot create the segment: {error}") from error
    return temporary, fd, header


def _check_compatible(
    path: Path, header: SegmentHeader, config: EngineConfig, layout: SegmentLayout | None
) -> None:
    text = config_json(config)
    if header.fingerprint != config_fingerprint(text):
        raise ShmError(
            f"{path}: the segment was made by pid {header.creator_pid} with another EngineConfig "
            f"({config_difference(header.config_json, text)}); every process sharing it must use the same"
        )
    if layout is not None and (header.slot_count, header.probe_window) != (
        layout.slot_count,
        layout.probe_window,
    ):
        raise ShmError(
            f"{path}: the live segment has {header.slot_count} slots in windows of {header.probe_window}, "
            f"this process asked for {layout.slot_count} in windows of {layout.probe_window}"
        )


def _check_owner(path: Path, fd: int) -> None:
    status = os.fstat(fd)
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise ShmError(
            f"{path}: the segment must belong to uid {os.getuid()} with mode 0o600, "
            f"it has uid {status.st_uid} and mode {oct(status.st_mode & 0o777)}"
        )


def open_segment(
    path: Path, config: EngineConfig, *, create: bool, layout: SegmentLayout, lock_timeout_s: float
) -> Segment:
    """Attach to the segment at `path`, or (`create`) publish a new one when there is none or it is stale.

    The stale rule is in the module docstring.
    """
    for _ in range(16):  # every retry means another process moved the name meanwhile
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise ShmError(f"{path}: no ratelimit segment (is its owner running?)") from None
            segment = _publish(path, config, layout)
            if segment is not None:
                return segment
            continue  # another owner published first: attach to theirs
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ShmError(f"{path}: is a symbolic link; refusing it") from error
            raise ShmError(f"{path}: cannot open the segment: {error}") from error
        try:
            segment = _judge(path, fd, config, create=create, layout=layout, lock_timeout_s=lock_timeout_s)
        except BaseException:
            os.close(fd)
            raise
        if segment is None or segment.fd != fd:  # the name moved, or a new segment replaced this one
            os.close(fd)
        if segment is not None:
            return segment
    raise ShmError(f"{path}: the segment kept being replaced while opening it")


def _publish(path: Path, config: EngineConfig, layout: SegmentLayout) -> Segment | None:
    """Create the segment where there is none; None if another process published one first."""
    temporary, fd, header = _build(path, config, layout)
    try:
        os.link(temporary, path)
        return Segment(path, fd, header, owns=True)
    except FileExistsError:
        os.close(fd)
        return None
    except (OSError, ShmError) as error:
        os.close(fd)
        raise ShmError(f"{path}: cannot create the segment: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _judge(
    path: Path, fd: int, config: EngineConfig, *, create: bool, layout: SegmentLayout, lock_timeout_s: float
) -> Segment | None:
    """Attach to the existing file `fd`, replace it (`create`: a segment on another descriptor), or refuse
    (`ShmError`); None when the name moved meanwhile (retry)."""
    _check_owner(path, fd)
    lock_blocking(fd, path, lock_timeout_s)
    try:
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return None
        except FileNotFoundError:
            return None
        header, unusable = _inspect(fd)
        if unusable is None and header is not None and header.boot_id != _boot_id():
            unusable = "made before the last boot"
        if unusable is not None or header is None:
            if not create:
                raise ShmError(f"{path}: unusable segment: {unusable}")
            return _replace(path, fd, header, config, layout)
        if create and not _creator_alive(header):
            return _replace(path, fd, header, config, layout)
        _check_compatible(path, header, config, layout if create else None)
        return Segment(path, fd, header, owns=False)
    finally:
        unlock(fd)


def _replace(
    path: Path, old_fd: int, old: SegmentHeader | None, config: EngineConfig, layout: SegmentLayout
) -> Segment:
    """Publish a new segment over the stale one at `path` (whose lock we hold), retiring the old one."""
    temporary, fd, header = _build(path, config, layout)
    try:
        if old is not None:
            # Processes still attached to the old file reopen the name at their next operation.
            with mmap.mmap(old_fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as head:
                head[RETIRED_AT] = 1
        os.rename(temporary, path)
        return Segment(path, fd, header, owns=True)
    except (OSError, ShmError) as error:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise ShmError(f"{path}: cannot replace the stale segment: {error}") from error
