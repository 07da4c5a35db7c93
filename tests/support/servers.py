"""In-process servers, entered and ready."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from pricestream.api.server import Server
from pricestream.settings import Settings


@contextlib.asynccontextmanager
async def ready_server(settings: Settings) -> AsyncIterator[Server]:
    """An in-process server, entered and ready (Redis reachable, Pub/Sub live)."""
    async with Server(settings) as srv:
        await wait_ready(srv)
        yield srv


async def wait_ready(srv: Server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not srv.engine.ready:
        if time.monotonic() > deadline:
            raise AssertionError("server did not become ready")
        await asyncio.sleep(0.02)
