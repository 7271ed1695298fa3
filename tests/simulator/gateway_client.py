"""A minimal, deliberately independent gateway client for the simulator's tests (trio-websocket based)."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import zstandard
from trio_websocket import WebSocketConnection, open_websocket_url

ZLIB_SUFFIX = b"\x00\x00\xff\xff"


class GatewayTestClient:
    def __init__(self, ws: WebSocketConnection, compress: str) -> None:
        self.ws = ws
        self.compress = compress
        self._zlib = zlib.decompressobj()
        self._zstd = zstandard.ZstdDecompressor().decompressobj()
        self._buffer = bytearray()
        self.frames = 0

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                message = await self.ws.get_message()
                self.frames += 1
                if isinstance(message, str):
                    return orjson.loads(message)  # type: ignore[no-any-return]
                if self.compress == "zstd-stream":
                    return orjson.loads(self._zstd.decompress(message))  # type: ignore[no-any-return]
                self._buffer += message
                if not self._buffer.endswith(ZLIB_SUFFIX):
                    continue
                data = self._zlib.decompress(bytes(self._buffer))
                self._buffer.clear()
                return orjson.loads(data)  # type: ignore[no-any-return]

    async def recv_until(
        self, predicate: Any, timeout: float = 10.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Receive until `predicate(payload)`; returns it and everything received before it."""
        seen: list[dict[str, Any]] = []
        with trio.fail_after(timeout):
            while True:
                payload = await self.recv(timeout)
                if predicate(payload):
                    return payload, seen
                seen.append(payload)

    async def send(self, payload: dict[str, Any] | str | bytes) -> None:
        if isinstance(payload, dict):
            await self.ws.send_message(orjson.dumps(payload).decode())
        elif isinstance(payload, bytes):
            await self.ws.send_message(payload.decode())
        else:
            await self.ws.send_message(payload)

    async def close(self, code: int = 4000) -> None:
        """Close with `code` (not 1000/1001, which would end the session)."""
        await self.ws.aclose(code=code)

    async def hello(self) -> int:
        payload = await self.recv()
        assert payload["op"] == 10, payload
        return int(payload["d"]["heartbeat_interval"])

    async def identify(self, token: str, shard: tuple[int, int] | None = (0, 1), intents: int = 513) -> None:
        d: dict[str, Any] = {
            "token": token,
            "intents": intents,
            "properties": {"os": "linux", "browser": "test", "device": "test"},
        }
        if shard is not None:
            d["shard"] = list(shard)
        await self.send({"op": 2, "d": d})

    async def resume(self, token: str, session_id: str, seq: int) -> None:
        await self.send({"op": 6, "d": {"token": token, "session_id": session_id, "seq": seq}})

    async def ready(self, token: str, shard: tuple[int, int] | None = (0, 1)) -> dict[str, Any]:
        await self.hello()
        await self.identify(token, shard)
        payload = await self.recv()
        assert payload.get("t") == "READY", payload
        return payload


@asynccontextmanager
async def open_gateway_client(
    url: str, compress: str = "zlib-stream", query: str | None = None
) -> AsyncIterator[GatewayTestClient]:
    if query is None:
        query = "v=10&encoding=json" + ("" if compress == "none" else f"&compress={compress}")
    async with open_websocket_url(
        f"{url}/?{query}", max_message_size=64 * 1024 * 1024, disconnect_timeout=1.0
    ) as ws:
        try:
            yield GatewayTestClient(ws, compress)
        finally:
            # trio-websocket 0.12's client reader stops at EOF after a completed close handshake without
            # closing its socket (a ResourceWarning); close it here.
            await trio.aclose_forcefully(ws._stream)
