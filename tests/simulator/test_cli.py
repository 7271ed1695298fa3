"""`python -m benchmarks.simulator`: every setting has a documented flag, and the program serves."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from benchmarks.children import stop_process
from benchmarks.simulator import DEFAULT_TOKEN, GatewayConfig, RestConfig, SimulatorConfig
from benchmarks.simulator.cli import build_parser, config_from_args, field_docs

from .gateway_client import open_gateway_client


@pytest.mark.parametrize("cls", [SimulatorConfig, GatewayConfig, RestConfig])
def test_every_setting_has_a_documented_flag(cls: type) -> None:
    docs = field_docs(cls)
    help_text = "".join(build_parser().format_help().split())  # argparse re-wraps lines, even at hyphens
    for field in dataclasses.fields(cls):
        if field.name in ("gateway", "rest"):
            continue
        assert docs.get(field.name), f"{cls.__name__}.{field.name} has no #: comment in config.py"
        flag = "--token" if field.name == "tokens" else "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        assert "".join(docs[field.name].split()) in help_text


def test_help_never_shows_a_token() -> None:
    """The built-in token is named, not printed: --help output ends up in issues, logs and screenshots."""
    help_text = subprocess.run(
        [sys.executable, "-m", "benchmarks.simulator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--token" in help_text and "DEFAULT_TOKEN" in help_text
    assert DEFAULT_TOKEN not in help_text
    assert DEFAULT_TOKEN.split(".")[0] not in help_text


def test_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "--shard-count",
            "8",
            "--max-concurrency",
            "16",
            "--compressions",
            "zlib-stream, none",
            "--token",
            "a",
            "--token",
            "b",
            "--privileged-intents",
            "--global-limit",
            "500",
            "--bucket-time-scale",
            "0.5",
            "--seed",
            "7",
            "--guild-count",
            "64",
            "--guild-event-rate",
            "2.5",
            "--min-shard-count",
            "4",
        ]
    )
    config = config_from_args(args)
    assert config.gateway.shard_count == 8
    assert config.gateway.max_concurrency == 16
    assert config.gateway.compressions == ("zlib-stream", "none")
    assert config.gateway.privileged_intents is True
    assert config.tokens == ("a", "b")
    assert config.rest.global_limit == 500
    assert config.rest.bucket_time_scale == 0.5
    assert config.seed == 7
    assert (config.gateway.guild_count, config.gateway.guild_event_rate) == (64, 2.5)
    assert config.gateway.min_shard_count == 4
    assert config_from_args(build_parser().parse_args([])) == SimulatorConfig()


def test_bad_flag_value_exits_2_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.simulator", "--compressions", "gzip"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--compressions" in result.stderr and "gzip" in result.stderr


async def test_the_program_serves_and_prints_its_addresses() -> None:
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "benchmarks.simulator", "--shard-count", "2", "--max-concurrency", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "the simulator exited before printing its addresses"
                line += chunk
            addresses = json.loads(line)
            async with httpx.AsyncClient() as http:
                info = await http.get(
                    addresses["rest_url"] + "/gateway/bot", headers={"Authorization": f"Bot {DEFAULT_TOKEN}"}
                )
            assert info.json()["shards"] == 2
            assert info.json()["url"] == addresses["gateway_url"]
            async with open_gateway_client(addresses["gateway_url"]) as client:
                ready = await client.ready(DEFAULT_TOKEN, (1, 2))
                assert ready["d"]["resume_gateway_url"] == addresses["resume_gateway_url"]
                await client.close()
        finally:
            await stop_process(process, signal.SIGINT, grace_s=10)
        assert process.returncode == 0
