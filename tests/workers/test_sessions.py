"""SessionStore: one contract for both stores, then Redis specifics (layout, TTL, batching, outages).

The Redis tests use the shared server on 127.0.0.1:6379 under a random key prefix each, deleted afterwards.
Outages are simulated in front of it (a port where nothing listens, a server that never answers, and a proxy
that can be switched off and on), so the shared server is never stopped.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from benchmarks.children import free_port
from ratelimit.redis_client import RedisClient
from ratelimit.resp import Reply
from workers.errors import SessionStoreError
from workers.sessions import (
    LOAD_TIMEOUT_S,
    InMemorySessionStore,
    RedisSessionStore,
    SessionStore,
    StoredSession,
    open_redis_session_store,
    session_key,
    stored_session_shards,
)

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
A1 = StoredSession("session-a", 10, "wss://resume-a.example", 16)
A2 = StoredSession("session-a", 12, "wss://resume-a.example", 16)
B1 = StoredSession("session-b", 3, "wss://resume-b.example", 16)


class Probe:
    """Direct access to a Redis (the shared one unless a test says otherwise), to check what was written."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def call(self, *command: Any) -> Any:
        """One command, e.g. `call("PTTL", key)`; with a deadline, so that a hang fails fast."""
        with trio.fail_after(5):
            return await self.client.execute(*command)

    async def hash(self, shard_id: int) -> dict[bytes, bytes]:
        flat: list[Reply] = await self.call("HGETALL", session_key(self.prefix, shard_id))
        return {bytes(k): bytes(v) for k, v in zip(flat[0::2], flat[1::2], strict=True)}  # type: ignore[arg-type]

    async def cleanup(self) -> None:
        keys = await self.call("KEYS", f"{{{self.prefix}}}:*")
        if keys:
            await self.call("DEL", *keys)


@pytest.fixture
def prefix() -> str:
    return f"test-sessions-{secrets.token_hex(6)}"


@pytest.fixture
async def probe(prefix: str) -> AsyncIterator[Probe]:
    async with RedisClient.from_url(REDIS_URL, timeout_s=5.0).closing() as client:
        probe = Probe(client, prefix)
        try:
            yield probe
        finally:
            await probe.cleanup()


OpenStore = Callable[[], AbstractAsyncContextManager[SessionStore]]


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest, probe: Probe) -> OpenStore:
    """Opens a store; for Redis, a second one opened later sees what the first wrote (same prefix)."""
    if request.param == "memory":
        shared = InMemorySessionStore()

        @asynccontextmanager
        async def memory() -> AsyncIterator[SessionStore]:
            yield shared

        return memory
    return lambda: open_redis_session_store(REDIS_URL, prefix=probe.prefix)


# -- the contract --------------------------------------------------------------------------------------------


async def test_absent_session_loads_as_none(open_store: OpenStore) -> None:
    async with open_store() as store:
        assert await store.load(0) is None


async def test_save_then_load_before_and_after_flush(open_store: OpenStore) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            store.save(3, A1)
            assert await store.load(3) == A1
            await store.flush()
            assert await store.load(3) == A1
            assert await store.load(4) is None
        async with open_store() as store:
            assert await store.load(3) == A1


@pytest.mark.parametrize("flush_between", [False, True])
async def test_seq_only_moves_forward_within_a_session(open_store: OpenStore, flush_between: bool) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            store.save(0, A2)
            if flush_between:
                await store.flush()
            store.save(0, A1)  # an older seq of the same session: ignored
            assert await store.load(0) == A2
            await store.flush()
            assert await store.load(0) == A2
        async with open_store() as store:
            assert await store.load(0) == A2


@pytest.mark.parametrize("flush_between", [False, True])
async def test_a_new_session_replaces(open_store: OpenStore, flush_between: bool) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            store.save(0, A2)
            if flush_between:
                await store.flush()
            store.save(0, B1)  # lower seq, but a new session: seq restarts
            assert await store.load(0) == B1
        async with open_store() as store:
            assert await store.load(0) == B1


@pytest.mark.parametrize("flush_between", [False, True])
async def test_delete(open_store: OpenStore, flush_between: bool) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            store.save(1, A1)
            store.save(2, B1)
            if flush_between:
                await store.flush()
            store.delete(1)
            store.delete(7)  # nothing there: fine
            assert await store.load(1) is None
            assert await store.load(2) == B1
        async with open_store() as store:
            assert await store.load(1) is None
            assert await store.load(2) == B1


async def test_save_after_delete_starts_afresh(open_store: OpenStore) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            store.save(0, A2)
            await store.flush()
            store.delete(0)
            store.save(0, A1)  # same session id, lower seq: after a delete it is simply the session
            assert await store.load(0) == A1
        async with open_store() as store:
            assert await store.load(0) == A1


async def test_flush_with_nothing_pending_returns(open_store: OpenStore) -> None:
    with trio.fail_after(5):
        async with open_store() as store:
            await store.flush()
            await store.flush()


# -- Redis: layout, TTL, batching ----------------------------------------------------------------------------


async def test_redis_key_layout(probe: Probe) -> None:
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix) as store:
            store.save(7, StoredSession("abc", 2**40 + 1, "wss://gateway-us-east1-b.discord.gg", 32))
            await store.flush()
        assert session_key(probe.prefix, 7) == f"{{{probe.prefix}}}:7:session"
        assert await probe.hash(7) == {
            b"session_id": b"abc",
            b"seq": b"1099511627777",
            b"resume_url": b"wss://gateway-us-east1-b.discord.gg",
            b"shard_count": b"32",
        }


async def test_two_shard_counts_keep_apart_and_an_earlier_versions_key_still_resumes(probe: Probe) -> None:
    """A live reshard runs two generations whose shard 7s are different shards: each store keys by its
    shard count. A store with a count reads the key of earlier versions (no count) when its own is
    missing, but only a session of its own count; `stored_session_shards` counts both keys."""
    old_gen = StoredSession("old", 10, "wss://a", 16)
    new_gen = StoredSession("new", 20, "wss://b", 32)
    with trio.fail_after(5):
        async with (
            open_redis_session_store(REDIS_URL, prefix=probe.prefix, shard_count=16) as sixteen,
            open_redis_session_store(REDIS_URL, prefix=probe.prefix, shard_count=32) as thirty_two,
        ):
            sixteen.save(7, old_gen)
            thirty_two.save(7, new_gen)
            await sixteen.flush()
            await thirty_two.flush()
            assert await sixteen.load(7) == old_gen
            assert await thirty_two.load(7) == new_gen
            assert session_key(probe.prefix, 7, 32) == f"{{{probe.prefix}}}:32:7:session"
            assert (
                await probe.call("EXISTS", session_key(probe.prefix, 7, 16), session_key(probe.prefix, 7, 32))
                == 2
            )
            assert await probe.call("EXISTS", session_key(probe.prefix, 7)) == 0
        # An earlier version wrote shard 3's session (of 16 shards) under the key without a count.
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix) as earlier:
            earlier.save(3, old_gen)
            await earlier.flush()
        async with (
            open_redis_session_store(REDIS_URL, prefix=probe.prefix, shard_count=16) as sixteen,
            open_redis_session_store(REDIS_URL, prefix=probe.prefix, shard_count=32) as thirty_two,
        ):
            assert await sixteen.load(3) == old_gen
            assert await thirty_two.load(3) is None  # of another shard count: not this store's
        found = await stored_session_shards(REDIS_URL, probe.prefix, [3, 7, 9], 16)
        assert found == frozenset({3, 7})
        assert await stored_session_shards(REDIS_URL, probe.prefix, [3, 7, 9], 32) == frozenset({3, 7})
        assert await stored_session_shards(REDIS_URL, probe.prefix, [3, 7, 9]) == frozenset({3})


async def test_ttl_is_set_and_refreshed_on_every_write(probe: Probe) -> None:
    key = session_key(probe.prefix, 0)
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix, ttl_s=600.0) as store:
            store.save(0, A1)
            await store.flush()
            assert 595_000 < await probe.call("PTTL", key) <= 600_000
            await probe.call("PEXPIRE", key, 5_000)
            store.save(0, A1)  # the same value again still refreshes the TTL
            await store.flush()
            assert 595_000 < await probe.call("PTTL", key) <= 600_000


async def test_session_expires_after_ttl(probe: Probe) -> None:
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix, ttl_s=0.3) as store:
            store.save(0, A1)
            await store.flush()
            assert await store.load(0) == A1
            await trio.sleep(0.5)
            assert await store.load(0) is None


class Monitor:
    """Reads Redis MONITOR on its own connection: the server's own record of every command it ran."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def read_until(self, marker: str) -> list[str]:
        """Every command line up to the one containing ``marker``."""
        lines: list[str] = []
        while True:
            while b"\r\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\r\n", 1)
                text = line.decode(errors="replace")
                if marker in text:
                    return lines
                lines.append(text)
            self._buffer += await self._stream.receive_some(65536)


@asynccontextmanager
async def redis_monitor() -> AsyncIterator[Monitor]:
    async with await trio.open_tcp_stream(REDIS_HOST, REDIS_PORT) as stream:
        await stream.send_all(b"MONITOR\r\n")
        monitor = Monitor(stream)
        await monitor.read_until("+OK")
        yield monitor


def script_calls(lines: list[str], prefix: str) -> list[str]:
    """The EVAL/EVALSHA calls that touched our keys (not the commands the script ran inside Redis)."""
    call = re.compile(r'\] "(?:EVALSHA|EVAL)" ', re.IGNORECASE)
    return [line for line in lines if call.search(line) and f"{{{prefix}}}:" in line]


async def test_saves_within_the_window_go_in_one_script_call(probe: Probe) -> None:
    marker = f"marker-{probe.prefix}"
    with trio.fail_after(10):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix) as store:
            store.save(99, A1)  # warm-up: loads the script, so NOSCRIPT retries don't count below
            await store.flush()
            async with redis_monitor() as monitor:
                batches_before = store.statistics().batches_written
                start = trio.current_time()
                for seq in range(1, 201):
                    shard_id = seq % 10
                    store.save(shard_id, StoredSession("s", seq, "wss://r", 10))
                    if seq % 20 == 0:
                        await trio.sleep(0.002)
                assert trio.current_time() - start < 0.08
                await trio.sleep(0.3)  # past the window: written by the flusher, not by flush()
                await probe.call("ECHO", marker)
                calls = script_calls(await monitor.read_until(marker), probe.prefix)
                assert len(calls) == 1, calls
                assert all(f'"{{{probe.prefix}}}:{shard}:session"' in calls[0] for shard in range(10))
                assert store.statistics().batches_written == batches_before + 1
                # Saves further apart than the window are separate calls: the count above can tell.
                store.save(0, StoredSession("s", 1000, "wss://r", 10))
                await trio.sleep(0.25)
                store.save(0, StoredSession("s", 1001, "wss://r", 10))
                await store.flush()
                await probe.call("ECHO", marker + "-2")
                assert len(script_calls(await monitor.read_until(marker + "-2"), probe.prefix)) == 2
        for shard_id in range(1, 10):
            assert (await probe.hash(shard_id))[b"seq"] == str(190 + shard_id).encode()
        assert (await probe.hash(0))[b"seq"] == b"1001"


async def test_more_concurrent_loads_than_connections(probe: Probe) -> None:
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix, pool_size=2) as store:
            for shard_id in range(20):
                store.save(shard_id, StoredSession(f"s{shard_id}", shard_id, "wss://r", 20))
            await store.flush()
            loaded: dict[int, StoredSession | None] = {}

            async def load(shard_id: int) -> None:
                loaded[shard_id] = await store.load(shard_id)

            async with trio.open_nursery() as nursery:
                for shard_id in range(20):
                    nursery.start_soon(load, shard_id)
            assert loaded == {i: StoredSession(f"s{i}", i, "wss://r", 20) for i in range(20)}


async def test_unreadable_hash_loads_as_none(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    await probe.call("HSET", session_key(probe.prefix, 0), "session_id", "x", "seq", "not a number")
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix) as store:
            assert await store.load(0) is None
    assert any(record.message == "session_store.unreadable" for record in caplog.records)


async def test_a_url_it_cannot_use_is_a_session_store_error() -> None:
    with pytest.raises(SessionStoreError, match=r"REDIS_URL.*ssl_ca_certs") as caught:
        async with open_redis_session_store("redis://:hunter2@127.0.0.1/0?ssl_ca_certs=/ca.pem"):
            pass
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("bad_prefix", ["", "a{b", "a}b"])
async def test_prefix_must_make_a_hash_tag(bad_prefix: str) -> None:
    with pytest.raises(SessionStoreError, match="SHARD_STORE_PREFIX"):
        async with open_redis_session_store(REDIS_URL, prefix=bad_prefix):
            pass


# -- Redis outages -------------------------------------------------------------------------------------------


async def timed(load: Awaitable[StoredSession | None]) -> tuple[StoredSession | None, float]:
    start = trio.current_time()
    result = await load
    return result, trio.current_time() - start


def events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(record.message == name for record in caplog.records)


async def test_redis_refusing_connections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.sessions")
    with trio.fail_after(15):
        async with open_redis_session_store(f"redis://127.0.0.1:{free_port()}/0", prefix="unused") as store:
            result, elapsed = await timed(store.load(0))
            assert result is None and elapsed <= LOAD_TIMEOUT_S + 0.5
            store.save(1, A1)  # never raises
            store.save(1, A2)
            await trio.sleep(1.0)
            stats = store.statistics()
            assert stats.batches_failed >= 2 and stats.pending == 1 and not stats.redis_available
            assert await store.load(1) == A2  # its own unwritten change
            store.delete(2)
            assert store.unwritten() == {1: A2.seq, 2: None}
    assert events(caplog, "session_store.redis_unavailable") == 1  # once per outage, not once per retry
    assert events(caplog, "session_store.load_failed") == 2  # each load that needed Redis says so
    [unwritten] = [
        record for record in caplog.records if record.message == "session_store.unwritten_on_close"
    ]
    assert vars(unwritten)["seqs"] == {"1": A2.seq, "2": None}  # what a restart cannot resume from


async def test_redis_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    accepted: list[trio.SocketStream] = []

    async def blackhole(stream: trio.SocketStream) -> None:
        accepted.append(stream)  # keep it open, read nothing, answer nothing
        await trio.sleep_forever()

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, blackhole, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            async with open_redis_session_store(f"redis://127.0.0.1:{port}/0", prefix="unused") as store:
                result, elapsed = await timed(store.load(0))
                assert result is None and LOAD_TIMEOUT_S - 0.5 <= elapsed <= LOAD_TIMEOUT_S + 0.5
                store.save(0, A1)
            nursery.cancel_scope.cancel()
    assert accepted
    assert events(caplog, "session_store.unwritten_on_close") == 1


class SwitchableProxy:
    """A TCP proxy to the shared Redis that can be switched off (closing every connection) and on again."""

    def __init__(self) -> None:
        self.up = False
        self._connections: set[trio.CancelScope] = set()

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            for scope in self._connections:
                scope.cancel()

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            with trio.CancelScope() as scope:
                self._connections.add(scope)
                try:
                    async with await trio.open_tcp_stream(REDIS_HOST, REDIS_PORT) as upstream:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                            nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)
                finally:
                    self._connections.discard(scope)

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


async def test_outage_then_recovery_writes_the_newest_values(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.sessions")
    proxy = SwitchableProxy()
    proxy.set_up(True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
            url = f"redis://127.0.0.1:{listener.socket.getsockname()[1]}/0"
            async with open_redis_session_store(url, prefix=probe.prefix) as store:
                store.save(2, B1)
                store.save(0, StoredSession("session-a", 1, "wss://resume-a.example", 16))
                await store.flush()
                proxy.set_up(False)
                store.save(0, A1)
                store.save(1, B1)
                await trio.sleep(0.5)
                assert store.statistics().batches_failed >= 1
                store.save(0, A2)  # newer than the failed batch
                store.delete(2)
                store.save(1, A1)  # a new session for shard 1 while its first one is still unwritten
                await trio.sleep(0.5)
                assert (await probe.hash(0))[b"seq"] == b"1"  # nothing reached Redis during the outage
                assert await store.load(3) is None
                proxy.set_up(True)
                await store.flush()
                assert store.statistics().redis_available
            nursery.cancel_scope.cancel()
    assert await probe.hash(0) == {
        b"session_id": b"session-a",
        b"seq": b"12",
        b"resume_url": b"wss://resume-a.example",
        b"shard_count": b"16",
    }
    assert (await probe.hash(1))[b"session_id"] == b"session-a"
    assert await probe.hash(2) == {}
    assert events(caplog, "session_store.redis_unavailable") == 1
    assert events(caplog, "session_store.redis_recovered") == 1
    assert events(caplog, "session_store.unwritten_on_close") == 0


async def test_statistics_count_batches(probe: Probe) -> None:
    with trio.fail_after(5):
        async with open_redis_session_store(REDIS_URL, prefix=probe.prefix) as store:
            assert isinstance(store, RedisSessionStore)
            store.save(0, A1)
            assert store.statistics().pending == 1
            await store.flush()
            stats = store.statistics()
            assert (stats.pending, stats.batches_written, stats.batches_failed) == (0, 1, 0)
