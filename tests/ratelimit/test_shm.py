"""The shared-memory backend: the slot table with explicit times, then real segment files shared by real
processes (`tests/ratelimit/shm_peer.py`), killed with SIGKILL where the point is what a dead process leaves.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.backend import BackendUnavailable
from ratelimit.buckets import RateLimitHeaders
from ratelimit.model import MAX_PAYLOAD, EngineConfig, MemoryStore, Outcome, Permit, Wait
from ratelimit.shm import (
    HEADER_SIZE,
    MAGIC,
    SLOT_SIZE,
    ShmBackend,
    ShmError,
    SlotTable,
    read_header,
    write_header,
)
from tests.ratelimit.shm_peer import ASK, config_json

ROOT = Path(__file__).resolve().parents[2]
NAME = "rl"
TIMEOUT_S = 10.0
BOOT_ID = uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip()).bytes


def table(slot_count: int, probe_window: int) -> SlotTable:
    buffer = mmap.mmap(-1, HEADER_SIZE + slot_count * SLOT_SIZE)
    return SlotTable(buffer, slot_count=slot_count, probe_window=probe_window)


def learned(limit: int, remaining: int, reset_after: float) -> Outcome:
    return Outcome("response", status=200, headers=RateLimitHeaders(limit, remaining, reset_after, "h1"))


# --- the slot table --------------------------------------------------------------------------------------


def test_records_expire_and_a_deleted_record_is_gone() -> None:
    records = table(64, 8)
    records.put("a", b"alpha", 10.0)
    records.put("b", b"", math.inf)
    assert records.get("a", 9.999) == b"alpha"
    assert records.get("a", 10.0) is None  # now >= expires_at
    assert records.get("a", -math.inf) == b"alpha"  # the model reads an expired record this way
    assert records.get("b", 1e12) == b""
    records.delete("b")
    assert records.get("b", 0.0) is None
    records.delete("never-put")
    assert records.occupied == 1


def test_a_payload_is_copied_out_and_bounded() -> None:
    records = table(64, 8)
    records.put("a", b"x" * MAX_PAYLOAD, 10.0)
    payload = records.get("a", 0.0)
    records.put("a", b"y", 10.0)
    assert payload == b"x" * MAX_PAYLOAD and type(payload) is bytes
    assert records.get("a", 0.0) == b"y"
    with pytest.raises(ValueError, match="over 104"):
        records.put("a", b"z" * (MAX_PAYLOAD + 1), 10.0)


def test_a_full_window_evicts_the_record_that_expires_first() -> None:
    records = table(4, 4)  # one window: every key competes for the same 4 slots
    for index, expires_at in enumerate([30.0, 10.0, 40.0, 20.0]):
        records.put(f"k{index}", b"%d" % index, expires_at)
    records.now = 0.0
    records.put("new", b"n", 50.0)
    assert records.evictions == 1
    assert records.get("k1", 0.0) is None  # expired first: evicted
    assert [records.get(key, 0.0) for key in ("k0", "k2", "k3", "new")] == [b"0", b"2", b"3", b"n"]
    assert records.occupied == 4


def test_an_expired_slot_is_reused_without_eviction() -> None:
    records = table(4, 4)
    for index in range(4):
        records.put(f"k{index}", b"old", 10.0 + index)
    records.now = 10.5  # k0 has expired
    records.put("new", b"n", 60.0)
    assert records.evictions == 0
    assert records.get("new", 10.5) == b"n"
    assert records.get("k0", -math.inf) is None  # its slot was taken
    assert records.live(10.5) == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["get", "put", "delete"]),
            st.integers(0, 7),  # key
            st.binary(max_size=MAX_PAYLOAD),
            st.floats(0.0, 5.0),  # expires after now
            st.floats(0.0, 2.0),  # time step
        ),
        max_size=60,
    )
)
def test_the_table_answers_like_the_memory_store(
    operations: list[tuple[str, int, bytes, float, float]],
) -> None:
    records, reference = table(256, 16), MemoryStore()
    now = 100.0
    for operation, index, payload, ttl, step in operations:
        now += step
        records.now = now
        key = f"bkt|tok|{index}|1"
        if operation == "put":
            records.put(key, payload, now + ttl)
            reference.put(key, payload, now + ttl)
        elif operation == "delete":
            records.delete(key)
            reference.delete(key)
        assert records.get(key, now) == reference.get(key, now)
    assert records.evictions == 0


# --- segment files -----------------------------------------------------------------------------------------


def open_backend(directory: Path, config: EngineConfig | None = None, **options: object) -> ShmBackend:
    return ShmBackend.open(NAME, config, directory=directory, **options)  # type: ignore[arg-type]


def rewrite_header(path: Path, **changes: object) -> None:
    with path.open("r+b") as file, mmap.mmap(file.fileno(), HEADER_SIZE) as head:
        write_header(head, dataclasses.replace(read_header(bytes(head)), **changes))  # type: ignore[arg-type]


async def test_created_owner_only_with_a_header_that_names_its_creator(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        backend = open_backend(tmp_path, create=True, slot_count=1024)
    finally:
        os.umask(previous)
    async with backend:
        path = tmp_path / NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(os.listdir(tmp_path)) == [NAME]  # no temporary file left behind
        header = backend.header
        assert (header.magic, header.slot_count, header.creator_pid) == (MAGIC, 1024, os.getpid())
        assert header.boot_id == BOOT_ID
        assert path.stat().st_size == HEADER_SIZE + 1024 * SLOT_SIZE
        assert backend.owns and backend.statistics().slots == 1024


async def test_opening_without_an_owner_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ShmError, match=f"{tmp_path / NAME}: no ratelimit segment"):
        open_backend(tmp_path)
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ShmError, match="symbolic link"):
        open_backend(tmp_path, create=True)
    with pytest.raises(ShmError, match="bad segment name"):
        ShmBackend.open("../escape", directory=tmp_path)


async def test_a_second_owner_attaches_to_a_live_segment(tmp_path: Path) -> None:
    async with open_backend(tmp_path, create=True) as first, open_backend(tmp_path, create=True) as second:
        assert first.owns and not second.owns
        probe = await first.acquire(ASK)
        assert isinstance(probe, Permit)
        assert isinstance(await second.acquire(ASK), Wait)  # one state: the probe is in flight
        with pytest.raises(ShmError, match="only the process that created"):
            second.unlink()
        with pytest.raises(ShmError, match="asked for 64"):
            open_backend(tmp_path, create=True, slot_count=64, probe_window=8)


async def test_a_corrupt_segment_is_refused_by_users_and_replaced_by_an_owner(tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(b"not a segment" * 1000)
    path.chmod(0o600)
    with pytest.raises(ShmError, match=f"{path}: unusable segment: bad magic"):
        open_backend(tmp_path)
    async with open_backend(tmp_path, create=True) as backend:
        assert backend.owns and backend.header.magic == MAGIC
    rewrite_header(path, version=99)
    with pytest.raises(ShmError, match="layout version 99"):
        open_backend(tmp_path)
    async with open_backend(tmp_path, create=True) as backend:
        assert backend.owns and backend.header.version == 1


async def test_a_segment_from_another_boot_is_replaced(tmp_path: Path) -> None:
    await open_backend(tmp_path, create=True).aclose()
    rewrite_header(tmp_path / NAME, boot_id=bytes(range(16)))
    with pytest.raises(ShmError, match="before the last boot"):
        open_backend(tmp_path)
    async with open_backend(tmp_path, create=True) as backend:
        assert backend.owns


async def test_a_reused_creator_pid_does_not_keep_a_segment_alive(tmp_path: Path) -> None:
    async with open_backend(tmp_path, create=True) as first:
        # Our own pid with another start time: the pid was reused, the creator is gone.
        rewrite_header(tmp_path / NAME, creator_start=first.header.creator_start + 1)
        async with open_backend(tmp_path, create=True) as second:
            assert second.owns
            assert isinstance(await first.acquire(ASK), Permit)  # first follows the name to the new one
            assert first.statistics().reopened == 1
            assert isinstance(await second.acquire(ASK), Wait)


async def test_the_owner_removes_it_and_users_then_fall_back(tmp_path: Path) -> None:
    owner = open_backend(tmp_path, create=True, unlink_on_close=True)
    async with open_backend(tmp_path) as user:
        await owner.aclose()
        assert not (tmp_path / NAME).exists()
        with pytest.raises(BackendUnavailable, match="no ratelimit segment"):
            await user.acquire(ASK)
        async with open_backend(tmp_path, create=True) as again:
            assert isinstance(await user.acquire(ASK), Permit)  # the name is back
            assert isinstance(await again.acquire(ASK), Wait)
    with pytest.raises(trio.ClosedResourceError):
        await user.acquire(ASK)


async def test_a_small_table_evicts_and_keeps_working(tmp_path: Path) -> None:
    async with open_backend(tmp_path, create=True, slot_count=8, probe_window=8) as backend:
        permits = []
        for index in range(20):
            permit = await backend.acquire(dataclasses.replace(ASK, route=f"POST /r{index}"))
            assert isinstance(permit, Permit)
            permits.append(permit)
        for permit in permits:  # most of their buckets were evicted: nothing to give back to
            await backend.release(permit, Outcome("cancel"))
        statistics = backend.statistics()
        assert statistics.evictions == 12 and statistics.slots_used == 8


# --- several processes -------------------------------------------------------------------------------------


class Peer:
    """A `shm_peer` process and its stdout, read a line at a time."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"peer exited: {self._buffer.decode()!r}")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()


@asynccontextmanager
async def peer(command: str, directory: Path, config: EngineConfig, *args: str) -> AsyncIterator[Peer]:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tests.ratelimit.shm_peer",
            command,
            str(directory),
            NAME,
            config_json(config),
            *args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        yield Peer(process)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


async def test_four_processes_share_a_bucket_of_five(tmp_path: Path) -> None:
    config = EngineConfig()
    with trio.fail_after(TIMEOUT_S):
        async with open_backend(tmp_path, config, create=True) as owner, AsyncExitStack() as stack:
            probe = await owner.acquire(ASK)
            assert isinstance(probe, Permit)
            await owner.release(probe, learned(5, 5, 60.0))  # the bucket: 5 per minute
            peers = [await stack.enter_async_context(peer("grants", tmp_path, config, "5")) for _ in range(4)]
            assert [await each.line() for each in peers] == ["ready"] * 4
            for each in peers:
                await each.send("go")
            granted = [int(await each.line()) for each in peers]
            assert sum(granted) == 5, granted
            waiting = await owner.acquire(ASK)
            assert isinstance(waiting, Wait) and waiting.reason == "bucket"


async def test_a_process_killed_holding_the_lock_blocks_nobody(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_backend(tmp_path, create=True, lock_timeout_s=5.0) as backend,
            open_backend(tmp_path, lock_timeout_s=0.2) as impatient,
            open_backend(tmp_path, lock_timeout_s=5.0) as closing,
            peer("hold", tmp_path, backend.config) as holder,
        ):
            permit = await backend.acquire(ASK)
            assert isinstance(permit, Permit)
            assert await holder.line() == "locked"
            with pytest.raises(BackendUnavailable, match=r"held for over 0\.2 s"):
                await impatient.acquire(ASK)
            with trio.move_on_after(0.1) as waited:
                await backend.acquire(ASK)
            assert waited.cancelled_caught  # cancelled while waiting: nothing taken
            async with trio.open_nursery() as nursery:

                async def acquire_closed() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await closing.acquire(ASK)

                nursery.start_soon(acquire_closed)
                await trio.sleep(0.05)
                await closing.aclose()  # the waiting task must not touch the closed descriptor
            async with trio.open_nursery() as nursery:

                async def give_back_cancelled() -> None:
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await backend.release(permit, Outcome("cancel"))  # shielded: still given back

                nursery.start_soon(give_back_cancelled)
                await trio.sleep(0.05)
                await holder.kill()
            assert isinstance(await backend.acquire(ASK), Permit)
            assert backend.statistics().lock_contended >= 2


async def test_the_permit_of_a_killed_process_expires_with_its_lease(tmp_path: Path) -> None:
    config = EngineConfig(lease_s=0.5)
    with trio.fail_after(TIMEOUT_S):
        async with open_backend(tmp_path, config, create=True) as backend:
            async with peer("probe", tmp_path, config) as prober:
                assert await prober.line() == "granted"
                await prober.kill()
            waiting = await backend.acquire(ASK)
            assert isinstance(waiting, Wait) and waiting.reason == "probe"
            assert 0.0 < waiting.seconds <= 0.5
            await trio.sleep(waiting.seconds)
            assert isinstance(await backend.acquire(ASK), Permit)  # the dead process's probe is forgotten


async def test_a_segment_whose_creator_died_is_used_then_replaced(tmp_path: Path) -> None:
    config = EngineConfig()
    with trio.fail_after(TIMEOUT_S):
        async with peer("create", tmp_path, config) as creator:
            creator_pid = int(await creator.line())
            assert await creator.process.wait() == 0
        async with open_backend(tmp_path, config) as user:
            assert not user.owns and user.header.creator_pid == creator_pid  # users attach meanwhile
            async with open_backend(tmp_path, config, create=True) as owner:
                assert owner.owns and owner.header.creator_pid == os.getpid()
                assert isinstance(await owner.acquire(ASK), Permit)
                assert isinstance(await user.acquire(ASK), Wait)  # it followed the name to the new one
                assert user.statistics().reopened == 1


async def test_processes_with_another_config_refuse(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_backend(tmp_path, EngineConfig(global_rate=50), create=True):
            async with peer("open", tmp_path, EngineConfig(global_rate=100)) as other:
                assert await other.line() == (
                    f"ShmError: {tmp_path / NAME}: the segment was made by pid {os.getpid()} with another "
                    "EngineConfig (global_rate: segment 50, here 100); "
                    "every process sharing it must use the same"
                )
                assert await other.process.wait() == 3
            async with peer("open", tmp_path, EngineConfig(global_rate=50)) as same:
                assert await same.process.wait() == 0
