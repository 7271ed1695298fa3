"""The shared-memory ratelimit backend: one file in /dev/shm that every process of the host maps (DESIGN 5).

`ShmBackend` runs `model.acquire` and `model.release` on a `RecordStore` that lives in a shared, `mmap`ed
table, each call under an exclusive `fcntl.flock` on the file. N independently started processes that open
the same name share one state.

Why this and not the obvious alternatives:

- `multiprocessing.Lock` (a POSIX semaphore) is not released when its holder dies: one worker killed inside
  the critical section deadlocks every other process for good. The kernel drops an `flock` when the last
  descriptor of its holder's open file description closes, so a process killed with SIGKILL while holding it
  blocks nobody. The lock is taken with `LOCK_NB` from trio and retried (a few spins, then
  `trio.sleep(0)`, then short sleeps): the trio thread never blocks in the kernel.
- `multiprocessing.shared_memory.SharedMemory` attached by name from an independently started process
  registers the segment with that process's resource tracker, which unlinks it when the process exits
  (Python 3.11), pulling the state from under everyone else. A plain file in /dev/shm (tmpfs) is the same
  memory without that behaviour, and its lifetime is ours: created by its owner, removed by `unlink`.

Layout (little-endian): a 4 KiB header, then `slot_count` slots of `SLOT_SIZE` bytes:

    header  magic, layout version, slot size, slot count, probe window, config fingerprint (blake2b-128 of
            the EngineConfig as JSON, whose text follows so that a mismatch can name the fields), creator
            pid, creator start time (/proc/<pid>/stat field 22), boot id, creation CLOCK_MONOTONIC time;
            then the live words: retired flag, slots in use, evictions.
    slot    key digest (blake2b of the key, 16 bytes), expires_at (double), payload length, state (never
            used, used, or empty: deleted or being written), payload (up to `MAX_PAYLOAD` = 104 bytes).

A key lives in the probe window of `probe_window` consecutive slots that starts at its home (the digest
modulo `slot_count - probe_window + 1`; windows never wrap). A new key takes the first slot of its window
that is never used, empty or expired (`now >= expires_at`); when none is, the slot that expires first is
evicted. So a lookup reads the home slot (a never-used home means the key is absent; most keys sit at home),
and otherwise does one `mmap.find` of the digest over the window (C speed, no per-slot Python loop).

Eviction forgets a record early: a bucket relearns with one probe (a grant given back to a forgotten
bucket is skipped by the model), a global-limit record restarts pacing with one request, a route's hash is
learned again from the next response. With the default 32,768 slots and the few records a bot keeps per
route it should not happen; `statistics().evictions` says when it does. A write clears the slot's state
byte first and sets it last, so a process killed in the middle of a write leaves the record absent, never
torn.

Time is `time.monotonic()`: CLOCK_MONOTONIC is one system-wide clock on Linux, so every process's `now`
compares with every other's. It is read after the lock is taken, so the shared state never sees time go
backwards. It restarts at boot, which is why the boot id is in the header.

Creation and the stale rule. The owner (`create=True`) builds the whole file under a temporary name,
`O_CREAT | O_EXCL` with mode 0o600, writes the header, and publishes it with `link()` (fails if someone else
published first: we attach to theirs instead). An existing file at the name is judged under its own lock:

1. corrupt (bad magic, another layout version or slot size, a file size that does not match its header),
   or retired (its owner removed or replaced it): replaced by an owner; an error for everyone else;
2. from another boot (boot id differs: its monotonic times mean nothing now): replaced by an owner; an
   error for everyone else;
3. its creator is dead (no process with that pid, a zombie, or a process with that pid that started at
   another time, i.e. the pid was reused): replaced by an owner; attached by everyone else (workers keep
   sharing while the supervisor restarts);
4. otherwise it is live: everyone attaches to it, an owner included (`owns` is then False).

A file that is not ours, or that others may read, is refused by everyone (we never made it). Expired
records are not swept: their slots are reused by the next new key of their window.

Replacing renames the new file over the old one while holding the old one's lock and marks the old one
retired first, so a second owner racing us sees the name move and attaches to ours, and a process still
attached to the old file notices the retired flag at its next operation and reopens the name. Its in-flight
grants are then forgotten (a fresh table): at worst a bucket is overrun once by what was in flight. Every
opener refuses a segment made with another `EngineConfig` (`ShmError` naming the fields that differ): the
model's decisions are only shared if the tunables are.

Not for threads, and not across `fork()` (a forked child shares its parent's open file description, so
their flocks would not exclude each other): open the backend in each process.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import trio
import trio.lowlevel

from ratelimit import model
from ratelimit.backend import BackendUnavailable
from ratelimit.model import MAX_PAYLOAD, Ask, EngineConfig, Outcome, Permit, Refusal, Wait

__all__ = [
    "DEFAULT_DIRECTORY",
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_PROBE_WINDOW",
    "DEFAULT_SLOT_COUNT",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "SLOT_SIZE",
    "SegmentHeader",
    "ShmBackend",
    "ShmError",
    "ShmStatistics",
    "SlotTable",
    "read_header",
    "write_header",
]

DEFAULT_DIRECTORY: Final = Path("/dev/shm")
DEFAULT_SLOT_COUNT: Final = 32_768
DEFAULT_PROBE_WINDOW: Final = 32
#: An operation that cannot get the lock within this long raises `BackendUnavailable` (a holder that is
#: stopped, not dead: a dead one releases it at once).
DEFAULT_LOCK_TIMEOUT_S: Final = 1.0

MAGIC: Final = b"TSGRLSHM"
LAYOUT_VERSION: Final = 1
HEADER_SIZE: Final = 4096

# The header's fixed part (see SegmentHeader), its live words, and the config text.
_HEADER: Final = struct.Struct("<8sIIII16sqQ16sdI")
_RETIRED_AT: Final = 128
_OCCUPIED_AT: Final = 136  # SlotTable's counters: slots in use, then evictions at 144
_CONFIG_AT: Final = 256
_U64: Final = struct.Struct("<Q")

# A slot: digest, expires_at, payload length, state, 6 pad bytes, payload.
_SLOT: Final = struct.Struct(f"<16sdBB6x{MAX_PAYLOAD}s")
SLOT_SIZE: Final = _SLOT.size
_EXPIRES_AT: Final = 16
_STATE_AT: Final = 25
_PAYLOAD_AT: Final = 32
_META: Final = struct.Struct("<dBB")  # expires_at, length, state
_NEVER_USED: Final = 0  # zero-filled: this slot never held a record
_USED: Final = 1
_EMPTY: Final = 2  # deleted, or being written
_ZERO_DIGEST: Final = bytes(16)

#: Lock attempts: `_SPINS` immediate retries, then `os.sched_yield()` + `trio.sleep(0)` until `_YIELD_FOR_S`
#: has passed, then sleeps of `_BACKOFF_S` (trio's timers have millisecond resolution anyway).
_SPINS: Final = 16
_YIELD_FOR_S: Final = 0.002
_BACKOFF_S: Final = 0.001
#: Digests of keys seen by this process; cleared when it grows past this many.
_DIGEST_CACHE_SIZE: Final = 65_536
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class ShmError(Exception):
    """A segment cannot be created or opened (the message names its path and why)."""


# --- the header ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The fixed part of a segment's header."""

    version: int
    slot_size: int
    slot_count: int
    probe_window: int
    fingerprint: bytes  # blake2b-128 of `config_json`
    creator_pid: int
    creator_start: int  # the creator's start time, clock ticks after boot (/proc/<pid>/stat field 22)
    boot_id: bytes  # /proc/sys/kernel/random/boot_id as 16 bytes
    created_at: float  # CLOCK_MONOTONIC
    config_json: str
    magic: bytes = MAGIC

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.slot_count * self.slot_size


def read_header(data: bytes) -> SegmentHeader:
    """Decode the first `HEADER_SIZE` bytes of a segment (no validation beyond the format)."""
    magic, version, slot_size, slot_count, window, fingerprint, pid, start, boot, created, length = (
        _HEADER.unpack_from(data)
    )
    text = data[_CONFIG_AT : _CONFIG_AT + length].decode("utf-8", "replace")
    return SegmentHeader(
        version, slot_size, slot_count, window, fingerprint, pid, start, boot, created, text, magic
    )


def write_header(buffer: mmap.mmap | bytearray, header: SegmentHeader) -> None:
    """Encode `header` at the start of `buffer` (the live words are left as they are)."""
    text = header.config_json.encode()
    if _CONFIG_AT + len(text) > HEADER_SIZE:
        raise ValueError(f"the EngineConfig text is {len(text)} bytes, over {HEADER_SIZE - _CONFIG_AT}")
    _HEADER.pack_into(
        buffer,
        0,
        header.magic,
        header.version,
        header.slot_size,
        header.slot_count,
        header.probe_window,
        header.fingerprint,
        header.creator_pid,
        header.creator_start,
        header.boot_id,
        header.created_at,
        len(text),
    )
    buffer[_CONFIG_AT : _CONFIG_AT + len(text)] = text


def _config_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _fingerprint(config_json: str) -> bytes:
    return hashlib.blake2b(config_json.encode(), digest_size=16).digest()


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


def _config_difference(theirs: str, ours: str) -> str:
    try:
        segment: dict[str, object] = json.loads(theirs)
    except ValueError:
        return "unreadable config in the segment"
    here: dict[str, object] = json.loads(ours)
    names = sorted(set(segment) | set(here))
    return "; ".join(
        f"{name}: segment {segment.get(name)!r}, here {here.get(name)!r}"
        for name in names
        if segment.get(name) != here.get(name)
    )


# --- the table ------------------------------------------------------------------------------------------


class SlotTable:
    """A `RecordStore` over fixed-size slots in `buffer` (the segment's mmap, or an anonymous one in tests).

    Not locked: the caller holds the segment's lock for the whole of one model operation. `now` is the time
    of that operation: `put` judges which slots have expired by it (the `RecordStore` protocol passes no
    time to `put`). Payloads are copied out of the map.
    """

    def __init__(
        self,
        buffer: mmap.mmap,
        *,
        slot_count: int,
        probe_window: int = DEFAULT_PROBE_WINDOW,
        slots_at: int = HEADER_SIZE,
        counters_at: int = _OCCUPIED_AT,
    ) -> None:
        if not 1 <= probe_window <= slot_count:
            raise ValueError(f"need 1 <= probe_window <= slot_count, got {probe_window} and {slot_count}")
        if len(buffer) < slots_at + slot_count * SLOT_SIZE:
            raise ValueError("the buffer is smaller than the table")
        self.slot_count = slot_count
        self.probe_window = probe_window
        self.now = -math.inf
        self._buffer = buffer
        self._slots_at = slots_at
        self._occupied_at = counters_at
        self._evictions_at = counters_at + 8
        self._homes = slot_count - probe_window + 1
        self._window_bytes = probe_window * SLOT_SIZE
        # (expires_at, state) of every slot of a window in one call.
        self._window = struct.Struct("<" + f"16xdxB{SLOT_SIZE - 26}x" * probe_window)
        self._digests: dict[str, tuple[bytes, int]] = {}

    # RecordStore

    def get(self, key: str, now: float) -> bytes | None:
        digest, start = self._locate(key)
        at = self._find(digest, start)
        if at < 0:
            return None
        expires_at, length, state = _META.unpack_from(self._buffer, at + _EXPIRES_AT)
        if state != _USED or now >= expires_at:
            return None
        return self._buffer[at + _PAYLOAD_AT : at + _PAYLOAD_AT + length]

    def put(self, key: str, payload: bytes, expires_at: float) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"record payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
        buffer = self._buffer
        digest, start = self._locate(key)
        at = self._find(digest, start)
        if at < 0:
            at = self._claim(start)
        was_used = buffer[at + _STATE_AT] == _USED
        # Empty while it is written: a writer killed half-way leaves no torn record.
        buffer[at + _STATE_AT] = _EMPTY
        _SLOT.pack_into(buffer, at, digest, expires_at, len(payload), _EMPTY, payload)
        buffer[at + _STATE_AT] = _USED
        if not was_used:
            self._add(self._occupied_at, 1)

    def delete(self, key: str) -> None:
        digest, start = self._locate(key)
        at = self._find(digest, start)
        if at < 0:
            return
        was_used = self._buffer[at + _STATE_AT] == _USED
        self._buffer[at + _STATE_AT] = _EMPTY
        self._buffer[at : at + 16] = _ZERO_DIGEST
        if was_used:
            self._add(self._occupied_at, -1)

    # statistics

    @property
    def occupied(self) -> int:
        """Slots holding a record, expired ones not yet reused included."""
        return int(_U64.unpack_from(self._buffer, self._occupied_at)[0])

    @property
    def evictions(self) -> int:
        """Records dropped before their expiry because their probe window was full."""
        return int(_U64.unpack_from(self._buffer, self._evictions_at)[0])

    def live(self, now: float) -> int:
        """Slots holding an unexpired record at `now` (a scan of the whole table: for tests and tools)."""
        count = 0
        for index in range(self.slot_count):
            expires_at, _, state = _META.unpack_from(
                self._buffer, self._slots_at + index * SLOT_SIZE + _EXPIRES_AT
            )
            count += state == _USED and now < expires_at
        return count

    # internals

    def _locate(self, key: str) -> tuple[bytes, int]:
        """The key's digest and the offset of its probe window."""
        located = self._digests.get(key)
        if located is None:
            if len(self._digests) >= _DIGEST_CACHE_SIZE:
                self._digests.clear()
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            home = int.from_bytes(digest[:8], "little") % self._homes
            located = self._digests[key] = (digest, self._slots_at + home * SLOT_SIZE)
        return located

    def _find(self, digest: bytes, start: int) -> int:
        """The offset of the slot in the window at `start` whose digest is `digest`, or -1."""
        buffer = self._buffer
        # Most keys sit in their home slot. A home slot never used means the key is nowhere: a key is put
        # in the first reusable slot of its window, and a never-used slot is reusable.
        if buffer[start + _STATE_AT] == _NEVER_USED:
            return -1
        if buffer[start : start + 16] == digest:
            return start
        end = start + self._window_bytes
        at = buffer.find(digest, start + SLOT_SIZE, end)
        # A match that is not at a slot's start is payload bytes that happen to equal the digest.
        while at >= 0 and (at - self._slots_at) % SLOT_SIZE:
            at = buffer.find(digest, at + 1, end)
        return at

    def _claim(self, start: int) -> int:
        """A slot for a new key: the first empty or expired one of the window, else evict the earliest."""
        meta = self._window.unpack_from(self._buffer, start)
        now = self.now
        earliest, earliest_at = 0, meta[0]
        for index in range(self.probe_window):
            expires_at = meta[2 * index]
            if meta[2 * index + 1] != _USED or now >= expires_at:
                return start + index * SLOT_SIZE
            if expires_at < earliest_at:
                earliest, earliest_at = index, expires_at
        self._add(self._evictions_at, 1)
        return start + earliest * SLOT_SIZE

    def _add(self, at: int, delta: int) -> None:
        _U64.pack_into(self._buffer, at, max(0, _U64.unpack_from(self._buffer, at)[0] + delta))


# --- the segment file ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    slot_count: int
    probe_window: int


class _Segment:
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
        return self.map[_RETIRED_AT] != 0

    def retire(self) -> None:
        self.map[_RETIRED_AT] = 1

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _lock_blocking(fd: int, path: Path, timeout_s: float) -> None:
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


def _unlock(fd: int) -> None:
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
    if data[_RETIRED_AT] != 0:
        return header, "retired by its owner"
    return header, None


def _new_header(config: EngineConfig, layout: _Layout) -> SegmentHeader:
    text = _config_json(config)
    pid = os.getpid()
    return SegmentHeader(
        version=LAYOUT_VERSION,
        slot_size=SLOT_SIZE,
        slot_count=layout.slot_count,
        probe_window=layout.probe_window,
        fingerprint=_fingerprint(text),
        creator_pid=pid,
        creator_start=_start_time(pid) or 0,
        boot_id=_boot_id(),
        created_at=time.monotonic(),
        config_json=text,
    )


def _build(path: Path, config: EngineConfig, layout: _Layout) -> tuple[Path, int, SegmentHeader]:
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
    path: Path, header: SegmentHeader, config: EngineConfig, layout: _Layout | None
) -> None:
    text = _config_json(config)
    if header.fingerprint != _fingerprint(text):
        raise ShmError(
            f"{path}: the segment was made by pid {header.creator_pid} with another EngineConfig "
            f"({_config_difference(header.config_json, text)}); every process sharing it must use the same"
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


def _open_segment(
    path: Path, config: EngineConfig, *, create: bool, layout: _Layout, lock_timeout_s: float
) -> _Segment:
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


def _publish(path: Path, config: EngineConfig, layout: _Layout) -> _Segment | None:
    """Create the segment where there is none; None if another process published one first."""
    temporary, fd, header = _build(path, config, layout)
    try:
        os.link(temporary, path)
        return _Segment(path, fd, header, owns=True)
    except FileExistsError:
        os.close(fd)
        return None
    except (OSError, ShmError) as error:
        os.close(fd)
        raise ShmError(f"{path}: cannot create the segment: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _judge(
    path: Path, fd: int, config: EngineConfig, *, create: bool, layout: _Layout, lock_timeout_s: float
) -> _Segment | None:
    """Attach to the existing file `fd`, replace it (`create`: a segment on another descriptor), or refuse
    (`ShmError`); None when the name moved meanwhile (retry)."""
    _check_owner(path, fd)
    _lock_blocking(fd, path, lock_timeout_s)
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
        return _Segment(path, fd, header, owns=False)
    finally:
        _unlock(fd)


def _replace(
    path: Path, old_fd: int, old: SegmentHeader | None, config: EngineConfig, layout: _Layout
) -> _Segment:
    """Publish a new segment over the stale one at `path` (whose lock we hold), retiring the old one."""
    temporary, fd, header = _build(path, config, layout)
    try:
        if old is not None:
            # Processes still attached to the old file reopen the name at their next operation.
            with mmap.mmap(old_fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as head:
                head[_RETIRED_AT] = 1
        os.rename(temporary, path)
        return _Segment(path, fd, header, owns=True)
    except (OSError, ShmError) as error:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise ShmError(f"{path}: cannot replace the stale segment: {error}") from error


# --- the backend ----------------------------------------------------------------------------------------


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
        segment: _Segment,
        config: EngineConfig,
        *,
        create: bool,
        layout: _Layout,
        clock: Callable[[], float],
        lock_timeout_s: float,
        unlink_on_close: bool,
    ) -> None:
        self.config = config
        self._segment: _Segment | None = segment
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
        layout = _Layout(slot_count, probe_window)
        path = Path(directory) / name
        segment = _open_segment(path, config, create=create, layout=layout, lock_timeout_s=lock_timeout_s)
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
            _unlock(segment.fd)

    async def release(self, permit: Permit, outcome: Outcome) -> None:
        """`model.release` on the shared state. Raises `BackendUnavailable`."""
        segment = self._lock_nowait() or await self._lock_shielded()
        try:
            now = self._clock()
            segment.table.now = now
            model.release(segment.table, permit, outcome, now, self.config)
        finally:
            _unlock(segment.fd)

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

    def _live(self) -> _Segment:
        if self._segment is None:
            raise trio.ClosedResourceError("the shm backend is closed")
        return self._segment

    def _unlink(self, segment: _Segment) -> None:
        _lock_blocking(segment.fd, segment.path, self._lock_timeout_s)
        try:
            segment.retire()
            try:
                if os.stat(segment.path).st_ino == os.fstat(segment.fd).st_ino:
                    segment.path.unlink()
            except FileNotFoundError:
                pass  # already gone, or replaced by an owner: not ours to remove
        finally:
            _unlock(segment.fd)

    def _lock_nowait(self) -> _Segment | None:
        """The fast path: the segment, locked, if its lock was free and it is not retired; else None and
        the caller goes on with `_lock`."""
        segment = self._live()
        self._acquisitions += 1
        if not self._try_lock(segment.fd):
            self._contended += 1
            return None
        if segment.retired:
            _unlock(segment.fd)
            return None
        return segment

    async def _lock(self) -> _Segment:
        """The slow path: wait for the lock, following the name when the segment was retired. The segment is
        looked up again after every sleep: another task may have reopened or closed it meanwhile."""
        started = time.monotonic()
        tries = 0
        while True:
            segment = self._live()
            if self._try_lock(segment.fd):
                if not segment.retired:
                    return segment
                _unlock(segment.fd)
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

    async def _lock_shielded(self) -> _Segment:
        # Only on the slow path: entering a cancel scope costs several microseconds.
        segment: _Segment | None = None
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

    def _reopen(self, retired: _Segment) -> None:
        """The segment was removed or replaced: follow the name (an owner may create it again)."""
        try:
            fresh = _open_segment(
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
