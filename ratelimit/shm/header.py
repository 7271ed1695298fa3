"""A segment's header: what made it, when, with which tunables, and its live words (DESIGN 5).

Layout (little-endian): a 4 KiB header, then `slot_count` slots of `SLOT_SIZE` bytes (`ratelimit.shm.table`):

    header  magic, layout version, slot size, slot count, probe window, config fingerprint (blake2b-128 of
            the EngineConfig as JSON, whose text follows so that a mismatch can name the fields), creator
            pid, creator start time (/proc/<pid>/stat field 22), boot id, creation CLOCK_MONOTONIC time;
            then the live words: retired flag, slots in use, evictions.

Every opener refuses a segment made with another `EngineConfig` (`config_difference` names the fields that
differ): the model's decisions are only shared if the tunables are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import struct
from dataclasses import dataclass
from typing import Final

from ratelimit.model import EngineConfig

__all__ = [
    "COUNTERS_AT",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "RETIRED_AT",
    "SegmentHeader",
    "config_difference",
    "config_fingerprint",
    "config_json",
    "read_header",
    "write_header",
]

MAGIC: Final = b"TSGRLSHM"
LAYOUT_VERSION: Final = 1
HEADER_SIZE: Final = 4096

# The header's fixed part (see SegmentHeader), its live words, and the config text.
_HEADER: Final = struct.Struct("<8sIIII16sqQ16sdI")
RETIRED_AT: Final = 128
COUNTERS_AT: Final = 136  # SlotTable's counters: slots in use, then evictions at 144
_CONFIG_AT: Final = 256


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


def config_json(config: EngineConfig) -> str:
    """The tunables as the header holds them (sorted JSON)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_fingerprint(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def config_difference(theirs: str, ours: str) -> str:
    """The fields whose values differ between a segment's config text and ours, for the error message."""
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
