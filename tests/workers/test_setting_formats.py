"""The settings' text formats: every bad value is a `ConfigError` naming its key, never another exception."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from workers.config import standalone_config
from workers.errors import ConfigError
from workers.setting_formats import (
    MAX_SHARD_ID,
    parse_address,
    parse_shard_count,
    parse_shard_ids,
    parse_token_file,
)

TOKEN = "x" * 30


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), ("h:65535", ("h", 65535))],
)
def test_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_address("PROXY_HTTP_ADDRESS", text) == address


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:²",  # isdigit(), but int() refuses it
        "127.0.0.1:٣",  # an Arabic-Indic digit, which int() would take
        "127.0.0.1:" + "1" * 5000,  # int() refuses more than 4300 digits
        "127.0.0.1:000065535",
        "127.0.0.1:65536",
        "127.0.0.1:",
        "127.0.0.1",
    ],
    ids=["superscript", "arabic-indic", "5000-digits", "leading-zeros", "65536", "empty", "no-port"],
)
def test_bad_ports_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address("PROXY_HTTP_ADDRESS", text)
    assert caught.value.key == "PROXY_HTTP_ADDRESS"
    assert len(str(caught.value)) < 300  # a 5000-digit value is not echoed whole


def test_shard_ids_up_to_the_cap() -> None:
    assert parse_shard_ids("DISCORD_SHARD_IDS", "0-3,7,5-5") == (0, 1, 2, 3, 5, 7)
    assert parse_shard_ids("DISCORD_SHARD_IDS", f"{MAX_SHARD_ID}") == (MAX_SHARD_ID,)


@pytest.mark.parametrize(
    "text",
    ["1" * 5000, f"0-{'9' * 5000}", "0-999999999", f"{MAX_SHARD_ID + 1}", "٣", "0-²", "3-1", ""],
    ids=[
        "5000-digits",
        "range-to-5000-digits",
        "range-to-1e9",
        "above-cap",
        "arabic-indic",
        "super",
        "down",
        "empty",
    ],
)
def test_bad_shard_ids_are_config_errors_without_expanding(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        parse_shard_ids("DISCORD_SHARD_IDS", text)
    assert caught.value.key == "DISCORD_SHARD_IDS"
    assert time.perf_counter() - started < 0.5
    assert len(str(caught.value)) < 300


def test_the_shard_count_is_capped() -> None:
    assert parse_shard_count("DISCORD_SHARD_COUNT", str(MAX_SHARD_ID + 1)) == MAX_SHARD_ID + 1
    for text in (str(MAX_SHARD_ID + 2), str(10**12), "1" * 5000, "0"):
        with pytest.raises(ConfigError) as caught:
            parse_shard_count("DISCORD_SHARD_COUNT", text)
        assert caught.value.key == "DISCORD_SHARD_COUNT"


def test_a_huge_shard_count_without_shard_ids_is_refused_not_expanded() -> None:
    """Without shard ids a worker runs `range(DISCORD_SHARD_COUNT)`: 10**12 was a MemoryError."""
    with pytest.raises(ConfigError) as caught:
        standalone_config({"DISCORD_TOKEN": TOKEN, "DISCORD_SHARD_COUNT": str(10**12)})
    assert caught.value.key == "DISCORD_SHARD_COUNT"


def test_a_token_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\xff\xfe" + b"Sekr3tToken" * 3)
    with pytest.raises(ConfigError) as caught:
        parse_token_file("DISCORD_TOKEN_FILE", str(path))
    assert caught.value.key == "DISCORD_TOKEN_FILE"
    assert "UTF-8" in str(caught.value) and "Sekr3t" not in str(caught.value)


@pytest.mark.parametrize("path", ["/tmp/a\x00b", "/nonexistent/token", "/"], ids=["nul", "missing", "a-dir"])
def test_an_unusable_token_file_path(path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_token_file("DISCORD_TOKEN_FILE", path)
    assert caught.value.key == "DISCORD_TOKEN_FILE"


def test_a_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"Bot {TOKEN}\n")
    assert parse_token_file("DISCORD_TOKEN_FILE", str(path)) == TOKEN
