"""Listening sockets are off, or on loopback, unless configured otherwise (issue 7 item 4; DESIGN 3.2, 3.6).

`PROMETHEUS_ADDRESS` (metrics, health) and `PROXY_HTTP_ADDRESS` (the HTTP REST proxy) default to off; a
bare port (`9100`, `:9100`, as the README, the Dockerfile and Spectacles' `:8080` write it), which some
servers read as "every interface", means loopback here and is shown as `127.0.0.1:PORT`; `0.0.0.0` only
when written. Workers never serve metrics.
Where the running supervisor's metrics socket is bound is checked in `test_secret_leaks.py`.
"""

from __future__ import annotations

from typing import Final

import pytest

from supervisor.cli import format_config
from supervisor.config import load_settings, split_address
from workers.config import standalone_config
from workers.errors import ConfigError
from workers.settings import worker_wire

ADDRESS_KEYS: Final = ("PROMETHEUS_ADDRESS", "PROXY_HTTP_ADDRESS")
WORKER: Final = {"DISCORD_TOKEN": "x" * 30, "DISCORD_SHARD_COUNT": "1"}


def test_both_default_to_off() -> None:
    loaded = load_settings([], {})
    assert loaded.settings.prometheus_address is None
    assert loaded.settings.proxy_http_address is None
    shown = format_config(loaded)
    assert "PROMETHEUS_ADDRESS = off  (default)" in shown
    assert "PROXY_HTTP_ADDRESS = off  (default)" in shown
    assert standalone_config(WORKER).settings.proxy_http_address is None


@pytest.mark.parametrize("key", ADDRESS_KEYS)
def test_off_is_accepted_as_written(key: str) -> None:
    assert getattr(load_settings([], {key: "off"}).settings, key.lower()) is None
    if key == "PROXY_HTTP_ADDRESS":
        assert standalone_config({**WORKER, key: "off"}).settings.proxy_http_address is None


@pytest.mark.parametrize("key", ADDRESS_KEYS)
@pytest.mark.parametrize("value", ["9100", ":9100", " :9100 "])
def test_a_bare_port_is_loopback(key: str, value: str) -> None:
    loaded = load_settings([], {key: value})
    assert getattr(loaded.settings, key.lower()) == "127.0.0.1:9100"
    assert f"{key} = 127.0.0.1:9100" in format_config(loaded)
    if key == "PROXY_HTTP_ADDRESS":
        assert standalone_config({**WORKER, key: value}).settings.proxy_http_address == "127.0.0.1:9100"
        assert split_address("127.0.0.1:9100") == ("127.0.0.1", 9100)


@pytest.mark.parametrize("key", ADDRESS_KEYS)
@pytest.mark.parametrize("value", ["*9100", "0.0.0.0", "[::]", "host:", "host:port", "99999", ":", "::9100"])
def test_a_missing_host_or_a_bad_port_is_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {key: value})
    assert caught.value.key == key
    if key == "PROXY_HTTP_ADDRESS":
        with pytest.raises(ConfigError) as caught:
            standalone_config({**WORKER, key: value})
        assert caught.value.key == key


@pytest.mark.parametrize("key", ADDRESS_KEYS)
@pytest.mark.parametrize(
    ("value", "host"), [("127.0.0.1:9100", "127.0.0.1"), ("0.0.0.0:9100", "0.0.0.0"), ("[::]:9100", "::")]
)
def test_every_interface_only_when_written(key: str, value: str, host: str) -> None:
    assert getattr(load_settings([], {key: value}).settings, key.lower()) == value
    if key == "PROXY_HTTP_ADDRESS":
        assert standalone_config({**WORKER, key: value}).settings.proxy_http_address == value
        assert split_address(value) == (host, 9100)


def test_workers_never_serve_metrics_and_serve_the_proxy_only_when_configured() -> None:
    configured = load_settings([], dict.fromkeys(ADDRESS_KEYS, "127.0.0.1:9100")).settings
    handed_over = worker_wire(configured)
    assert "PROMETHEUS_ADDRESS" not in handed_over
    assert handed_over["PROXY_HTTP_ADDRESS"] == "127.0.0.1:9100"
    default = worker_wire(load_settings([], {}).settings)
    assert "PROMETHEUS_ADDRESS" not in default and "PROXY_HTTP_ADDRESS" not in default
