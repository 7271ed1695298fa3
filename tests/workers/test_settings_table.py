"""The settings table (workers/settings.py) is the one declaration every view of the settings derives from."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from workers.logs import REDACTED
from workers.settings import KNOWN_VARIABLES, SETTINGS, Settings, markdown_table, worker_wire

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text()
    match = re.search(r"<!-- settings-table:[^\n]*-->\n(.*?)<!-- /settings-table -->", text, re.S)
    assert match, "README.md lost its settings-table markers"
    assert match.group(1) == markdown_table(), "regenerate it: python -m workers.settings"


def test_every_field_but_the_token_file_is_a_row_and_every_variable_is_unique() -> None:
    fields = [item.name for item in dataclasses.fields(Settings) if item.name != "token_file"]
    assert [row.field for row in SETTINGS] == fields
    spellings = [name for row in SETTINGS for name in row.spellings]
    assert len(spellings) == len(set(spellings)) == len(KNOWN_VARIABLES)


def test_secrets_are_redacted_and_kept_out_of_repr() -> None:
    secret = "S3cr3tValue-0123456789"
    settings = Settings(
        token=secret,
        proxy_http_secret=secret,
        amqp_url=f"amqp://user:{secret}@host/",
        redis_url=f"redis://user:{secret}@host:6379",
    )
    assert secret not in repr(settings)
    for row in SETTINGS:
        shown = row.display(getattr(settings, row.field))
        assert secret not in shown, row.env
        if row.secret:
            assert REDACTED in shown, row.env


def test_only_what_a_worker_reads_is_handed_over() -> None:
    wire = worker_wire(Settings(token="t" * 30, prometheus_address="127.0.0.1:9100", workers=4, shards=8))
    supervisor_only = {row.env for row in SETTINGS if "worker" not in row.processes}
    assert supervisor_only >= {"PROMETHEUS_ADDRESS", "WORKERS", "DISCORD_SHARD_COUNT", "RESTART_MAX"}
    assert not supervisor_only & set(wire)
    assert wire["DISCORD_TOKEN"] == "t" * 30
