"""`GET /gateway/bot`: the gateway URL, the recommended shard count and the identify budget.

One fetcher for the supervisor (planning, the budget guard) and a standalone worker (its URL and
`max_concurrency`). A 401 is `GatewayBotError(refused=True)`: the entry points exit with status 3 so that
systemd does not restart into a loop with a dead token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

import httpx

GATEWAY_BOT_TIMEOUT_S: Final = 30.0


class GatewayBotError(Exception):
    """`GET /gateway/bot` failed; `refused` when Discord rejected the token (401)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True, slots=True)
class GatewayBot:
    url: str
    shards: int
    total: int
    remaining: int
    reset_after_ms: int
    max_concurrency: int


async def fetch_gateway_bot(api_url: str, token: str) -> GatewayBot:
    """Ask Discord (or `api_url`) for the gateway; GatewayBotError names the URL and why it failed."""
    url = f"{api_url}/gateway/bot"
    shown = _shown_url(url)
    try:
        async with httpx.AsyncClient(timeout=GATEWAY_BOT_TIMEOUT_S) as http:
            response = await http.get(url, headers={"Authorization": f"Bot {token}"})
    except httpx.HTTPError as exc:
        raise GatewayBotError(f"cannot reach {shown}: {_reason(exc)}") from exc
    if response.status_code == 401:
        raise GatewayBotError(f"Discord refused the token (401 on GET {shown})", refused=True)
    if response.status_code != 200:
        raise GatewayBotError(f"GET {shown} answered HTTP {response.status_code}")
    try:
        body = response.json()
        limit = body["session_start_limit"]
        return GatewayBot(
            str(body["url"]),
            int(body["shards"]),
            int(limit["total"]),
            int(limit["remaining"]),
            int(limit["reset_after"]),
            int(limit["max_concurrency"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise GatewayBotError(f"GET {shown} answered a body we cannot read: {exc!r}") from exc


def _shown_url(url: str) -> str:
    """`url` without any user or password it may carry (the message reaches logs)."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "DISCORD_API_URL"


def _reason(exc: httpx.HTTPError) -> str:
    """Why a request failed, in words: the OS's reason (`connection refused`, a DNS failure) when one is
    underneath httpx's exception (trio's "all attempts to connect failed" holds one per address), else its
    kind (`timed out after 30 s`)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {GATEWAY_BOT_TIMEOUT_S:g} s"
    reasons = list(dict.fromkeys(_os_reasons(exc)))
    return ", ".join(reasons) if reasons else str(exc) or type(exc).__name__


def _os_reasons(exc: BaseException | None, depth: int = 0) -> list[str]:
    if exc is None or depth > 8:
        return []
    if isinstance(exc, OSError) and exc.errno is not None:
        # errno > 0: the OS's own words (trio's strerror adds the address); < 0: a resolver (gai) error.
        text = os.strerror(exc.errno) if exc.errno > 0 else str(exc.strerror or exc)
        return [text[:1].lower() + text[1:]]
    if isinstance(exc, BaseExceptionGroup):
        return [reason for inner in exc.exceptions for reason in _os_reasons(inner, depth + 1)]
    return _os_reasons(exc.__cause__ or exc.__context__, depth + 1)
