"""Fixtures shared by the workers tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio_asyncio


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop that redis-py (sessions, the Redis identify gate) runs on."""
    async with trio_asyncio.open_loop():
        yield
