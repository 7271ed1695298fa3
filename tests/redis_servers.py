"""redis-server processes of a test's own, on free loopback ports: a plain one (no persistence: a restart
on the same port is a Redis that restarted empty), one with TLS, a unix socket and ACL users, and a 3-node
Redis Cluster. Debian's redis-server (7.0) is built with TLS; `openssl` makes the certificates.

Each opener is a context manager that stops what it started (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from benchmarks.children import free_port

START_TIMEOUT_S: Final = 10.0
USER, PASSWORD = "gateway", "acl-Pa55word-7f3"
DEFAULT_PASSWORD: Final = "default-Pa55word-7f3"

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("openssl") is None,
    reason="needs redis-server and openssl",
)


def make_certificates(folder: Path) -> None:
    """A self-signed CA (`ca.pem`), and a server (`server.pem`, for 127.0.0.1) and a client certificate
    (`client.pem`) signed by it, with their keys."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=30)

    # The extensions a strict verifier wants (Python 3.13 sets VERIFY_X509_STRICT by default): a CA marked
    # as one, with key usage; leaf certificates with key identifiers and their own usages.
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash", "-keyout", "ca.key", "-out", "ca.pem",
    )  # fmt: skip
    (folder / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    for name in ("server", "client"):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem",
        )  # fmt: skip


@contextlib.contextmanager
def _running(argv: list[str], cwd: Path, port: int | None, socket_path: Path | None = None) -> Iterator[None]:
    log = (cwd / f"redis-{port or 'unix'}.log").open("wb")
    server = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(port, socket_path):
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                status = server.poll()
                tail = Path(log.name).read_text()[-2000:]
                pytest.fail(f"redis-server did not start (status {status}): {tail}")
            time.sleep(0.05)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _listening(port: int | None, socket_path: Path | None) -> bool:
    if socket_path is not None:
        return socket_path.exists()
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port or 0)) == 0


@contextlib.contextmanager
def open_plain_redis(folder: Path, port: int | None = None) -> Iterator[int]:
    """Plain TCP on `port` (default: a free one), no password, nothing saved; yields the port once it listens.
    Leaving stops it; entering again with the same port is the same Redis restarted empty."""
    port = port or free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with _running(argv, folder, port):
        yield port


@dataclass(frozen=True)
class TlsRedis:
    folder: Path
    port: int
    socket_path: Path

    def url(self, query: str = "", login: str = f"{USER}:{PASSWORD}") -> str:
        """`rediss://` with the ACL user and the CA (plus `query`)."""
        ca = f"ssl_ca_certs={self.folder / 'ca.pem'}"
        return f"rediss://{login}@127.0.0.1:{self.port}/0?{ca}{'&' + query if query else ''}"

    def unix_url(self, login: str = f"{USER}:{PASSWORD}") -> str:
        return f"unix://{login}@{self.socket_path}?db=1"


@contextlib.contextmanager
def open_tls_redis(folder: Path) -> Iterator[TlsRedis]:
    """TLS only (no plain TCP port), client certificates optional, plus a unix socket; the default user has
    a password and `USER` is an ACL user with its own."""
    make_certificates(folder)
    port, socket_path = free_port(), folder / "redis.sock"
    argv = [
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem",
        "--tls-auth-clients", "optional", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no",
        "--user", "default", "on", f">{DEFAULT_PASSWORD}", "~*", "&*", "+@all",
        "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all",
    ]  # fmt: skip
    with _running(argv, folder, port):
        yield TlsRedis(folder, port, socket_path)


def free_cluster_port() -> int:
    """A free port whose Cluster bus port (the port + 10000) is a port, and free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


@contextlib.contextmanager
def open_redis_cluster(folder: Path) -> Iterator[list[int]]:
    """Three masters on free loopback ports, slots split by `redis-cli --cluster create` (the first port
    serves 0-5460); yields the ports once every node reports `cluster_state:ok`."""
    ports = [free_cluster_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            node = folder / str(port)
            node.mkdir()
            argv = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
            ]  # fmt: skip
            stack.enter_context(_running(argv, node, port))
        addresses = [f"127.0.0.1:{port}" for port in ports]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=30,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {(created.stdout + created.stderr)[-2000:]!r}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(b"cluster_state:ok" in _cli(port, "CLUSTER", "INFO") for port in ports):
            if time.monotonic() > deadline:
                pytest.fail("the test's Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield ports


def _cli(port: int, *command: str) -> bytes:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *command], check=True, capture_output=True, timeout=10
    ).stdout
