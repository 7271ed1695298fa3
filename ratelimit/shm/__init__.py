"""The shared-memory ratelimit backend: one file in /dev/shm that every process of the host maps (DESIGN 5).

`ShmBackend` runs `model.acquire` and `model.release` on a `RecordStore` that lives in a shared, `mmap`ed
table, each call under an exclusive `fcntl.flock` on the file. N independently started processes that open
the same name share one state.

Why this and not the obvious alternatives:

- `multiprocessing.Lock` (a POSIX semaphore) is not released when its holder dies: one worker killed inside
  the critical section deadlocks every other process for good. The kernel drops an `flock` when the last
  descriptor of its holder's open file description closes, so a process killed with SIGKILL while holding it
  blocks nobody. (`backend` takes it without ever blocking the trio thread in the kernel.)
- `multiprocessing.shared_memory.SharedMemory` attached by name from an independently started process
  registers the segment with that process's resource tracker, which unlinks it when the process exits
  (Python 3.11), pulling the state from under everyone else. A plain file in /dev/shm (tmpfs) is the same
  memory without that behaviour, and its lifetime is ours: created by its owner, removed by `unlink`.

The modules, from the bytes up:

- `header`: the segment's 4 KiB header (layout version, config fingerprint, creator, boot id, live words).
- `table`: `SlotTable`, the records in fixed-size slots found by probe windows; eviction.
- `segment`: creating, judging (the stale rule), replacing and retiring a segment file; `ShmError`.
- `backend`: `ShmBackend`, the model's two operations under the segment's lock; `ShmStatistics`.

Not for threads, and not across `fork()` (a forked child shares its parent's open file description, so
their flocks would not exclude each other): open the backend in each process.
"""

from ratelimit.shm.backend import (
    DEFAULT_DIRECTORY,
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_SLOT_COUNT,
    ShmBackend,
    ShmStatistics,
)
from ratelimit.shm.header import HEADER_SIZE, LAYOUT_VERSION, MAGIC, SegmentHeader, read_header, write_header
from ratelimit.shm.segment import ShmError
from ratelimit.shm.table import DEFAULT_PROBE_WINDOW, SLOT_SIZE, SlotTable

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
