"""A TCP proxy on a free loopback port that can stall one direction of the Pub/Sub connections.

Every connection is forwarded as is, in both directions, until a stall is switched on. A
connection counts as Pub/Sub once the client has sent a SUBSCRIBE on it (command connections
are never stalled, as in the field: one socket broken, the others fine). A stall of
``upstream`` (client→Redis) stops reading from the client, so its bytes wait in the kernel
and are forwarded when the stall ends, while the Redis→client direction keeps flowing;
``downstream`` does the opposite (a black hole for what Redis sends). A stall applies to
connections opened during it too, from their first SUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

Direction = Literal["upstream", "downstream"]


class _Link:
    def __init__(self) -> None:
        self.pubsub = False


class StallingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = {"upstream": asyncio.Event(), "downstream": asyncio.Event()}
        for event in self._flowing.values():
            event.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stall(self, direction: Direction) -> None:
        self._flowing[direction].clear()

    def resume(self, direction: Direction) -> None:
        self._flowing[direction].set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        for event in self._flowing.values():
            event.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, redis_w}
        link = _Link()
        pumps = [
            asyncio.create_task(self._pump(client_r, redis_w, link, "upstream")),
            asyncio.create_task(self._pump(redis_r, client_w, link, "downstream")),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for writer in (client_w, redis_w):
                writer.close()
                self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        direction: Direction,
    ) -> None:
        flowing = self._flowing[direction]
        while True:
            if link.pubsub:
                await flowing.wait()  # stalled: nothing is read, so the sender's bytes wait
            data = await reader.read(65536)
            if not data:
                return
            if direction == "upstream" and not link.pubsub and b"SUBSCRIBE" in data.upper():
                link.pubsub = True
            if link.pubsub:
                await flowing.wait()  # held until the stall ends
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()


@contextlib.asynccontextmanager
async def stalling_proxy(target_port: int) -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
