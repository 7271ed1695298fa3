"""Logging for every process of the service: stdlib `logging`, configured once at each entry point.

- JSON lines on stderr when stderr is not a TTY or journald is attached (`JOURNAL_STREAM`), console lines on a
  TTY; `--log-format` / `LOG_FORMAT` force either.
- Stable event names as messages (`shard.ready`, `publish.retry`) with fields in `extra=`.
- A redaction filter that removes every registered secret (the bot token, URL passwords) and anything shaped
  like an `Authorization` header value from messages, arguments, extra fields and tracebacks, so a secret
  cannot reach a log line by accident (anchors/spectacles.md 1.9: the original printed IDENTIFY at debug).
- Context (`shard`, `worker`) comes from contextvars, bound once where a shard's nursery opens.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
import urllib.parse
from typing import Any, Final, Literal

LogFormat = Literal["auto", "json", "console"]

SHARD_ID: Final[contextvars.ContextVar[int | None]] = contextvars.ContextVar("shard_id", default=None)
WORKER_ID: Final[contextvars.ContextVar[int | None]] = contextvars.ContextVar("worker_id", default=None)
REDACTED: Final = "[redacted]"
#: `LogRecord` attributes that are not user-supplied `extra` fields.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys() | {"message", "asctime"}
)
_AUTH_HEADER: Final = re.compile(r"((?:Bot|Bearer)\s+)[A-Za-z0-9._\-]{20,}")


class SecretRegistry:
    """The secrets this process must never log. Registered once, read by the redaction filter."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def add_url(self, url: str | None) -> None:
        """Register the password of a URL such as `amqp://user:pass@host/`, as written and decoded."""
        if url:
            for password in _url_passwords(url):
                self.add(password)
                self.add(urllib.parse.unquote(password))  # what the client sends, and its errors may show
                self.add(urllib.parse.quote(password, safe=""))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _AUTH_HEADER.sub(lambda m: m.group(1) + REDACTED, text)


SECRETS: Final = SecretRegistry()


def redact_url(url: str) -> str:
    """`url` with its password replaced, for logs and `--print-config`.

    The userinfo ends at the *last* `@`: a password with an unescaped `/`, `?`, `#` or `@` ends `urlsplit`'s
    netloc early, so it would show part of it (the URL is broken then, but its password is still secret).
    A URL with `@` in its path or query may be over-redacted; this is for showing, not for connecting.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:{REDACTED}@{host}"


def _url_passwords(url: str) -> set[str]:
    """The password of `url` as `urlsplit` reads it, and as read up to the last `@` (see `redact_url`)."""
    passwords = {urllib.parse.urlsplit(url).password or ""}
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if sep and at:
        passwords.add(userinfo.partition(":")[2])
    return passwords - {""}


class RedactionFilter(logging.Filter):
    """Rewrites each record so that no registered secret survives formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = SECRETS.redact(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, SECRETS.redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = SECRETS.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        shard = SHARD_ID.get()
        if shard is not None and not hasattr(record, "shard"):
            record.shard = shard
        worker = WORKER_ID.get()
        if worker is not None and not hasattr(record, "worker"):
            record.worker = worker
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_extras(record))
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()} {fields}".rstrip()
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def configure_logging(level: str = "info", log_format: LogFormat = "auto") -> None:
    """Configure the root logger once for this process: stderr, redacted, JSON or console."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Chatty libraries stay at warning unless we debug. The AMQP library's own errors during a broker outage
    # (a dozen ERROR lines with tracebacks per drop, from reconnect internals) say nothing the publish pump's
    # two lines (`publish.broker_unavailable`, `publish.broker_recovered`) do not: only critical ones pass.
    if root.level > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in ("aio_pika", "aiormq"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
