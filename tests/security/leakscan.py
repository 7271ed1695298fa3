"""The session-wide secret scan (issue 7 item 4): no token or password the tests use may reach a log line, a
captured output or a file the suite's processes wrote.

`tests/conftest.py` calls three hooks here:

- `record_report` for every test phase: scans what pytest captured (stdout, stderr, and every log record
  that reached the root logger at the levels the code under test logs at), which covers in-process code;
- `finish_session` at the end: scans every regular file under the session's base temporary directory, where
  the process tests write the logs of `python -m supervisor` / `python -m workers` and of the simulator, and
  fails the session (exit status 1) on any hit;
- `summarize` prints each hit (where, which secret, an excerpt with the secret replaced).

Files that tests write *on purpose* with a secret in them (a token file, a TOML config holding a token, a
copy of the source tree that a packaging test installs) are inputs, not outputs, and are skipped by name
(`is_input_file`). A known leak that is reported but not yet fixed is listed in `KNOWN_LEAKS`: printed, not
failed. The scan reads at most `MAX_FILE_BYTES` of a file and takes a few milliseconds for a whole run.

The secrets are the literals the tests use; `test_secret_leaks.py` checks that every token-shaped literal in
`tests/` is listed here, so a new test with a new token is scanned too.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: name -> secret. A name says where the secret comes from; the secret itself is never printed.
KNOWN_SECRETS: Final[Mapping[str, str]] = {
    # benchmarks.simulator.DEFAULT_TOKEN (not imported: importing the simulator costs the start-up a second).
    "simulator DEFAULT_TOKEN": "MTA4NzY1NDMyMTA5ODc2NTQzMg.GsimUL.c2ltdWxhdG9yLW9ubHktdG9rZW4tbm90LXJlYWw",
    "tests/supervisor/test_config.py TOKEN": "MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.secret-token-value",
    "test_routes.py secret": "MTA4NzY1NDMyMTA5ODc2NTQzMg.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB",
    "fuzz proxy SECRET": "MTAwMDAwMDAwMDAwMDAwMDAw.Gfuzz1.c2VjcmV0LWZ1enotdG9rZW4tdmFsdWU",
    "tests/security token": "MTk5OTk5OTk5OTk5OTk5OTk5.Gsecur.c2VjdXJpdHktdGVzdC10b2tlbi12YWx1ZQ",
    "tests/workers/test_worker_process.py refused token": "not-the-token-at-all-000000",
    "AMQP password (test_supervisor.py)": "hunter2secret",
    "AMQP password (test_config.py)": "amqp-pass-123",
    "Redis password (test_config.py)": "redis-pass-456",
    "AMQP password (tests/security)": "amqp-url-pass-7f3",
    "Redis password (tests/security)": "redis-url-pass-9c1",
    "Redis ACL password (tests/redis_servers.py)": "acl-Pa55word-7f3",
    "Redis default password (tests/redis_servers.py)": "default-Pa55word-7f3",
}
#: glob on the file's path -> why it is allowed for now. Each is a finding to fix, then to delete here.
KNOWN_LEAKS: Final[dict[str, str]] = {}
#: Inputs: copies of the source (the Docker image test installs the tree), token files, TOML configs.
INPUT_SUFFIXES: Final = frozenset({".py", ".pyc", ".toml", ".token"})
#: A file larger than this is scanned only up to it (logs of the suite are far smaller).
MAX_FILE_BYTES: Final = 64 * 1024 * 1024
#: Shown either side of a hit.
EXCERPT_CHARS: Final = 40
#: The shape of a Discord bot token: `test_secret_leaks.py` finds new ones in the tests with it.
TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True, slots=True)
class Hit:
    where: str
    secret_name: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.where}: {self.secret_name} in ...{self.excerpt}..."


def scan_text(text: str, where: str, secrets: Mapping[str, str] = KNOWN_SECRETS) -> list[Hit]:
    hits = []
    for name, secret in secrets.items():
        index = text.find(secret)
        if index >= 0:
            hits.append(Hit(where, name, _excerpt(text, index, secrets)))
    return hits


def is_input_file(path: Path) -> bool:
    """A file a test writes with a secret in it on purpose: a token file, a TOML config, source code."""
    return path.suffix in INPUT_SUFFIXES or path.name.startswith("token")


def known_leak(hit: Hit) -> str | None:
    """Why `hit` is tolerated for now (KNOWN_LEAKS), or None."""
    return next((why for pattern, why in KNOWN_LEAKS.items() if fnmatch.fnmatch(hit.where, pattern)), None)


def scan_tree(root: Path, secrets: Mapping[str, str] = KNOWN_SECRETS) -> list[Hit]:
    """Every regular file under `root` that is not an input (symbolic links are not followed)."""
    needles = [(name, secret.encode()) for name, secret in secrets.items()]
    hits: list[Hit] = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or is_input_file(path):
            continue
        try:
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES)
        except OSError:
            continue
        for name, needle in needles:
            index = data.find(needle)
            if index >= 0:
                text = data[max(0, index - EXCERPT_CHARS * 4) : index + len(needle) + EXCERPT_CHARS * 4]
                decoded = text.decode("utf-8", "replace")
                hits.append(Hit(str(path), name, _excerpt(decoded, decoded.find(secrets[name]), secrets)))
    return hits


def _excerpt(text: str, index: int, secrets: Mapping[str, str]) -> str:
    piece = text[max(0, index - EXCERPT_CHARS) : index + EXCERPT_CHARS + max(map(len, secrets.values()))]
    for name, secret in secrets.items():
        piece = piece.replace(secret, f"<{name}>")
    return piece.replace("\n", "\\n")


# -- the pytest side (called from tests/conftest.py) ----------------------------------------------------

_HITS: list[Hit] = []


def record_report(report: Any) -> None:
    """`pytest_runtest_logreport`: scan the captured output and log records of one test phase."""
    for title, content in getattr(report, "sections", ()):
        _HITS.extend(scan_text(content, f"{report.nodeid} ({title})"))


def finish_session(session: Any) -> None:
    """`pytest_sessionfinish`: scan the base temporary directory; any hit fails the session."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)  # None: no test asked for a temporary directory
    if basetemp is not None and Path(basetemp).is_dir():
        _HITS.extend(scan_tree(Path(basetemp)))
    if any(known_leak(hit) is None for hit in _HITS) and session.exitstatus == 0:
        session.exitstatus = 1


def summarize(terminal: Any) -> None:
    """`pytest_terminal_summary`: name every hit (known leaks as such)."""
    if not _HITS:
        return
    failing = [hit for hit in _dedupe(_HITS) if known_leak(hit) is None]
    terminal.section("secret leaks", sep="=", red=bool(failing), yellow=not failing, bold=True)
    for hit in _dedupe(_HITS):
        why = known_leak(hit)
        terminal.line(f"{hit}" if why is None else f"known, not failed ({why}): {hit}")


def _dedupe(hits: Iterable[Hit]) -> list[Hit]:
    return list(dict.fromkeys(hits))
