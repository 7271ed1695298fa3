"""sd_notify against real datagram sockets: a path and an abstract name; the exact bytes that arrive."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import SystemdNotifier, child_environment

RECEIVE_TIMEOUT_S = 5.0
# sockaddr_un holds 108 bytes; pytest's tmp_path can be longer than that for long test names.
MAX_SOCKET_PATH_BYTES = 100


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    if len(os.fsencode(tmp_path / "n.sock")) <= MAX_SOCKET_PATH_BYTES:
        yield str(tmp_path / "n.sock")
        return
    with tempfile.TemporaryDirectory(prefix="sd") as short:
        yield os.path.join(short, "n.sock")


@pytest.fixture
def receiver(socket_path: str) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and the NOTIFY_SOCKET value that reaches it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(socket_path)
        sock.settimeout(RECEIVE_TIMEOUT_S)
        yield sock, socket_path


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"trio-shard-gateway-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECEIVE_TIMEOUT_S)
        yield sock, "@" + name


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_messages_reach_a_path_socket_exactly(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address}, pid=1234)
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == b"READY=1"
    assert notifier.ready("Gateway supervisor started")
    assert received(sock) == b"READY=1\nSTATUS=Gateway supervisor started"
    assert notifier.status("14/16 shards ready, 2 identifying")
    assert received(sock) == b"STATUS=14/16 shards ready, 2 identifying"
    assert notifier.watchdog()
    assert received(sock) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert received(sock) == b"STOPPING=1"
    assert notifier.extend_timeout(2.5)
    assert received(sock) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert notifier.notify(STATUS="draining", STOPPING=1)
    assert received(sock) == b"STATUS=draining\nSTOPPING=1"


def test_messages_reach_an_abstract_socket(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, address = abstract_receiver
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.address == b"\0" + address[1:].encode()
    assert notifier.ready()
    assert received(sock) == b"READY=1"


def test_reloading_carries_clock_monotonic_in_microseconds(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = SystemdNotifier(address.encode(), monotonic_us=lambda: 123_456_789)
    assert notifier.reloading()
    assert received(sock) == b"RELOADING=1\nMONOTONIC_USEC=123456789"

    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    head, stamp = received(sock).split(b"\n")
    assert head == b"RELOADING=1"
    assert stamp.startswith(b"MONOTONIC_USEC=")
    assert before <= int(stamp.removeprefix(b"MONOTONIC_USEC=")) <= after


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval_s() is None  # nothing to send it to


def test_unsupported_addresses_disable_notification(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="supervisor.sdnotify"):
        assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
        assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": "relative/notify"}).enabled
    assert [record.message for record in caplog.records] == ["sdnotify.unsupported_address"] * 2


def test_a_missing_receiver_is_logged_not_raised(socket_path: str, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": socket_path})
    with caplog.at_level(logging.WARNING, logger="supervisor.sdnotify"):
        assert not notifier.ready()
    assert [record.message for record in caplog.records] == ["sdnotify.send_failed"]


def test_a_full_queue_drops_instead_of_blocking(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    _sock, address = receiver  # never read: the kernel queue (net.unix.max_dgram_qlen) fills up
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="supervisor.sdnotify"):
        for _ in range(100_000):
            if not notifier.status("x" * 1024):
                break
        else:
            pytest.fail("the queue never filled")
    assert time.monotonic() - started < RECEIVE_TIMEOUT_S
    assert "BlockingIOError" in str(caplog.records[-1].__dict__["error"])


@pytest.mark.parametrize(
    ("environ", "interval_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4321"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "999"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval_s: float | None
) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@x", **environ}, pid=4321)
    assert notifier.watchdog_interval_s() == interval_s


def test_our_own_pid_is_the_default() -> None:
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(environ).watchdog_interval_s() == 1.0


def test_bad_fields_are_refused() -> None:
    notifier = SystemdNotifier(b"\0unused")
    with pytest.raises(ValueError, match="newline"):
        notifier.status("two\nlines")
    with pytest.raises(ValueError, match="upper case"):
        notifier.notify(ready=1)
    with pytest.raises(ValueError, match="at least one field"):
        notifier.notify()


def test_child_environment_drops_what_belongs_to_the_main_process() -> None:
    environ = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
        "PATH": "/usr/bin",
        "DISCORD_TOKEN_FILE": "/run/credentials/token",
    }
    assert child_environment(environ) == {"PATH": "/usr/bin", "DISCORD_TOKEN_FILE": "/run/credentials/token"}
    assert "NOTIFY_SOCKET" in environ  # the caller's mapping is left alone
