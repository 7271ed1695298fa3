"""The one Redis client's deployments, for each of its users (the ratelimit backend, the session store, the
identify gate): TLS with an ACL user (and a wrong CA refused), a client certificate, a unix socket, a
password-only login, and a 3-node Redis Cluster whose slots for the test's keys live on another node than
the one the URL names (MOVED), plus a slot in migration (ASK). The servers are the test's own
(tests/redis_servers.py); the shared Redis is not touched.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ratelimit.backend import BackendUnavailable
from ratelimit.model import Ask, EngineConfig, Outcome, Permit
from ratelimit.redis_backend import RedisBackend, open_redis_backend
from ratelimit.redis_client import RedisClient, open_redis_client
from ratelimit.resp import RedisConnectionError, key_slot
from supervisor.identify_redis import open_redis_identify_gate
from tests.redis_servers import (
    DEFAULT_PASSWORD,
    PASSWORD,
    TlsRedis,
    make_certificates,
    needs_redis_server,
    open_redis_cluster,
    open_tls_redis,
)
from workers.sessions import StoredSession, open_redis_session_store, stored_session_shards

pytestmark = needs_redis_server

SESSION = StoredSession("s-deploy", 7, "wss://resume.example", 4)
FIRST_NODE_SLOTS = range(5461)  # `redis-cli --cluster create` gives the first node 0-5460


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    with open_tls_redis(tmp_path_factory.mktemp("redis-tls")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with open_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as ports:
        yield ports


@pytest.fixture
def cluster_url(cluster_ports: list[int]) -> str:
    """The URL names the first node."""
    return f"redis://127.0.0.1:{cluster_ports[0]}/0"


def elsewhere(name: str) -> str:
    """A unique prefix whose hash tag's slot is not served by the cluster's first node."""
    while True:
        prefix = f"{name}-{secrets.token_hex(4)}"
        if key_slot(prefix) not in FIRST_NODE_SLOTS:
            return prefix


async def exercise_all_users(url: str, prefix: str) -> None:
    """The ratelimit backend grants and takes back, the session store writes and reads back (and counts),
    the identify gate grants through Redis: all through `url`."""
    async with open_redis_backend(url, EngineConfig(global_rate=1000), prefix=prefix) as backend:
        permit = await backend.acquire(Ask("t", "GET /a", "1"))
        assert isinstance(permit, Permit)
        await backend.release(permit, Outcome("cancel"))
        assert backend.statistics().errors == 0
    async with open_redis_session_store(url, prefix=prefix) as store:
        store.save(3, SESSION)
        await store.flush()
        assert store.statistics().batches_written == 1 and store.statistics().batches_failed == 0
    async with open_redis_session_store(url, prefix=prefix) as store:
        assert await store.load(3) == SESSION
    assert await stored_session_shards(url, prefix, [2, 3]) == {3}
    async with open_redis_identify_gate(url, prefix=prefix, max_concurrency=1) as gate:
        await gate.wait_for_permit(0)
        stats = gate.statistics()
        assert stats.redis_available and stats.local_grants == 0 and stats.redis_calls == 1


# -- TLS, ACL, unix sockets ----------------------------------------------------------------------------------


async def test_every_user_over_tls_with_an_acl_user(tls_redis: TlsRedis) -> None:
    with trio.fail_after(15):
        await exercise_all_users(tls_redis.url(), f"tls-{secrets.token_hex(4)}")


async def test_every_user_over_a_unix_socket(tls_redis: TlsRedis) -> None:
    with trio.fail_after(15):
        await exercise_all_users(tls_redis.unix_url(), f"unix-{secrets.token_hex(4)}")
        async with open_redis_client(tls_redis.unix_url()) as client:
            info = await client.execute("CLIENT", "INFO")
    assert isinstance(info, bytes) and b" db=1 " in info and f"user={'gateway'} ".encode() in info


async def test_a_client_certificate_and_a_password_only_login(tls_redis: TlsRedis) -> None:
    folder = tls_redis.folder
    url = tls_redis.url(
        f"ssl_certfile={folder / 'client.pem'}&ssl_keyfile={folder / 'client.key'}&ssl_cert_reqs=required",
        login=f":{DEFAULT_PASSWORD}",
    )
    with trio.fail_after(10):
        async with open_redis_client(url) as client:
            info = await client.execute("CLIENT", "INFO")
    assert isinstance(info, bytes) and b" user=default " in info


async def test_a_wrong_ca_is_refused_with_a_clear_error(tls_redis: TlsRedis, tmp_path: Path) -> None:
    make_certificates(tmp_path)  # another CA, which did not sign the server's certificate
    url = tls_redis.url().split("?")[0] + f"?ssl_ca_certs={tmp_path / 'ca.pem'}"
    with trio.fail_after(10):
        async with open_redis_client(url) as client:
            with pytest.raises(RedisConnectionError, match="TLS certificate verification failed") as caught:
                await client.execute("PING")
        with pytest.raises(BackendUnavailable, match="certificate verification failed") as unavailable:
            async with open_redis_backend(url, prefix="wrong-ca"):
                pass
    for error in (caught.value, unavailable.value):
        assert PASSWORD not in str(error) and "***" in str(error)


async def test_plain_tcp_to_a_tls_port_fails_fast(tls_redis: TlsRedis) -> None:
    url = f"redis://127.0.0.1:{tls_redis.port}/0"
    with trio.fail_after(5), pytest.raises(BackendUnavailable):
        async with open_redis_backend(url, prefix="plain", timeout_s=0.5):
            pass


# -- Redis Cluster -------------------------------------------------------------------------------------------


async def test_every_user_follows_moved_in_a_cluster(cluster_url: str) -> None:
    with trio.fail_after(20):
        await exercise_all_users(cluster_url, elsewhere("cluster"))


async def test_the_client_learns_the_slot_after_one_moved(cluster_url: str) -> None:
    key = f"{{{elsewhere('moved')}}}:k"
    with trio.fail_after(10):
        async with open_redis_client(cluster_url) as client:
            assert await client.execute("SET", key, "v") == "OK"
            assert client.redirects == 1
            assert await client.execute("GET", key) == b"v"
            assert client.redirects == 1  # the second call went straight to the slot's node
        backend = RedisBackend(cluster_url, prefix=elsewhere("moved-backend"))
        async with backend:
            await backend.load_scripts()
            for _ in range(3):
                permit = await backend.acquire(Ask("t", "GET /a", "1", exempt=True))
                assert isinstance(permit, Permit)
                await backend.release(permit, Outcome("cancel"))
            assert backend._client.redirects == 1  # one MOVED, for the first script load


async def test_ask_during_a_slot_migration(cluster_url: str, cluster_ports: list[int]) -> None:
    """A slot migrating from its node to another: a key the old node no longer has is answered ASK, and the
    client asks the new node (ASKING, then the command) without changing its slot map."""
    tag = elsewhere("ask")
    slot = key_slot(tag)
    seed = RedisClient.from_url(cluster_url, timeout_s=5.0)
    with trio.fail_after(15):
        async with seed.closing():
            await seed.execute("SET", f"{{{tag}}}:warm", "1")  # learns the slot's node through MOVED
            source = seed._slot_nodes[slot]
            target = next(source.at(source.host, port) for port in cluster_ports if port != source.port)
            async with (
                RedisClient(source, timeout_s=5.0).closing() as old,
                RedisClient(target, timeout_s=5.0).closing() as new,
            ):
                old_id, new_id = await old.execute("CLUSTER", "MYID"), await new.execute("CLUSTER", "MYID")
                assert isinstance(old_id, bytes) and isinstance(new_id, bytes)
                await new.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
                await old.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
                try:
                    redirects = seed.redirects
                    assert await seed.execute("SET", f"{{{tag}}}:new", "v") == "OK"
                    assert seed.redirects == redirects + 1
                    assert seed._slot_nodes[slot] == source  # ASK is a one-off
                    assert await new.execute("ASKING") == "OK"
                    assert await new.execute("GET", f"{{{tag}}}:new") == b"v"  # it went to the new node
                finally:
                    for node in (old, new):
                        await node.execute("CLUSTER", "SETSLOT", slot, "STABLE")
