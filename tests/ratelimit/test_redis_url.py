"""`REDIS_URL` as the Redis client reads it (ratelimit/redis_url.py), and Cluster key slots
(ratelimit/resp.py): pure, no server."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from ratelimit.redis_url import RedisAddress, TlsOptions
from ratelimit.resp import key_slot

SECRET = "hunter2-url-pass"


def test_rediss_with_the_query_parameters_redis_py_reads() -> None:
    address = RedisAddress.parse(
        f"rediss://bot:{SECRET}@redis.example:6380/2?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem"
        "&ssl_keyfile=/c.key&ssl_cert_reqs=optional&ssl_check_hostname=false"
    )
    assert (address.scheme, address.host, address.port, address.db) == ("rediss", "redis.example", 6380, 2)
    assert address.tls == TlsOptions("/etc/ca.pem", "/c.pem", "/c.key", "optional", check_hostname=False)
    assert address.redacted() == "rediss://bot:***@redis.example:6380/2"
    assert SECRET not in repr(address)


def test_unix_sockets_take_the_database_from_the_query() -> None:
    address = RedisAddress.parse(f"unix://:{SECRET}@/run/redis/redis.sock?db=3")
    assert (address.path, address.db, address.username, address.password) == (
        "/run/redis/redis.sock",
        3,
        None,
        SECRET,
    )
    assert address.node == "/run/redis/redis.sock" and address.tls is None
    assert address.redacted() == "unix://:***@/run/redis/redis.sock?db=3"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://:{SECRET}@h/0", "redis://, rediss:// or unix://"),
        (f"redis://:{SECRET}@h/0?ssl_ca_cert=/ca.pem&password={SECRET}", "unknown query parameters"),
        (f"redis://:{SECRET}@h/0?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
        # An unencoded `?` in the password: its tail parses as a query parameter and must not be echoed.
        (f"redis://user:?{SECRET}@host/", "unknown query parameters .*in a password, write \\?"),
        (f"rediss://:{SECRET}@h/0?ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
        (f"redis://:{SECRET}@h/db", "must be a number"),
        (f"unix://:{SECRET}@", "socket's path"),
    ],
)
def test_urls_it_cannot_use_are_refused_by_name_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        RedisAddress.parse(url)
    assert SECRET not in str(caught.value)


def test_a_cluster_redirection_keeps_the_login_and_tls() -> None:
    address = RedisAddress.parse(f"rediss://bot:{SECRET}@10.0.0.1:6380/0?ssl_ca_certs=/ca.pem")
    moved = address.at("10.0.0.2", 6381)
    assert (moved.host, moved.port, moved.node) == ("10.0.0.2", 6381, "10.0.0.2:6381")
    assert (moved.username, moved.password, moved.tls) == ("bot", SECRET, address.tls)


def test_tls_contexts_follow_the_parameters(tmp_path: Path) -> None:
    assert TlsOptions().context().verify_mode == ssl.CERT_REQUIRED
    relaxed = TlsOptions(cert_reqs="none").context()
    assert relaxed.verify_mode == ssl.CERT_NONE and not relaxed.check_hostname
    with pytest.raises(ValueError, match=r"missing\.pem"):
        TlsOptions(ca_certs=str(tmp_path / "missing.pem")).context()


def test_key_slots_match_the_cluster_specification() -> None:
    assert key_slot("123456789") == 0x31C3 % 16384  # the specification's CRC16 check value
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag hashes the whole key
    assert key_slot("{gateway}:7:session") == key_slot("{gateway}:identify:3") == key_slot("gateway")
