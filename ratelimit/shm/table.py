"""The slot table: a `RecordStore` over fixed-size slots in the segment's map (DESIGN 5).

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
torn. Expired records are not swept: their slots are reused by the next new key of their window.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from typing import Final

from ratelimit.model import MAX_PAYLOAD
from ratelimit.shm.header import COUNTERS_AT, HEADER_SIZE

__all__ = ["DEFAULT_PROBE_WINDOW", "SLOT_SIZE", "SlotTable"]

DEFAULT_PROBE_WINDOW: Final = 32

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
_U64: Final = struct.Struct("<Q")  # the counters in the header
#: Digests of keys seen by this process; cleared when it grows past this many.
_DIGEST_CACHE_SIZE: Final = 65_536


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
        counters_at: int = COUNTERS_AT,
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
