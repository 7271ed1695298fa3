"""`GET /gateway/bot`: the gateway URL, the recommended shard count and the identify budget.

One fetcher for the supervisor (planning, the budget guard) and a standalone worker (its URL and
`max_concurrency`). A 401 is `GatewayBotError(refused=True)`: the entry points exit with status 3 so that
systemd does not restart into a loop with a dead token.
"""

from __future__ import annotations

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
    try:
        async with httpx.AsyncClient(timeout=GATEWAY_BOT_TIMEOUT_S) as http:
            response = await http.get(f"{api_url}/gateway/bot", headers={"Authorization": f"Bot {token}"})
    except httpx.HTTPError as exc:
        raise GatewayBotError(f"GET /gateway/bot failed: {exc.__class__.__name__}") from exc
    if response.status_code == 401:
        raise GatewayBotError("Discord refused the token (401 on GET /gateway/bot)", refused=True)
    if response.status_code != 200:
        raise GatewayBotError(f"GET /gateway/bot answered HTTP {response.status_code}")
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
        raise GatewayBotError(f"GET /gateway/bot answered a body we cannot read: {exc!r}") from exc
