"""Redis Pub/Sub over a small fixed pool of connections, each with its own reader.

Channels are hashed onto connections. Each connection keeps the discipline of
``pubsub_base.PubSubBase`` (a desired and a subscribed set, a sync task whose every command
Redis must confirm within ``probe_timeout``, PING probes, close in one ``finally`` and
reconnect with backoff, subscribing everything again); here the sync task sends SUBSCRIBE and
UNSUBSCRIBE for the difference in chunks of 512, one write per command. In subscribed mode
Redis answers a PING with ``['pong', '']`` on the same socket. Each connection also subscribes
a probe channel of its own: it is live once Redis confirmed that subscription.

A PING proves the socket, not that the node on the other end is the one prices are published
to: in sentinel mode a demoted master answers it too while it receives nothing. There each
connection also follows a ``MasterWatch`` and is replaced as soon as its peer is not the
master the sentinels name.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

from pricestream.codec import PROBE_CHANNEL_PREFIX, last_price_key, price_channel
from pricestream.engine.broker import MessageHandler
from pricestream.observability.metrics import Metrics
from pricestream.redis.batch import CommandBatcher
from pricestream.redis.pubsub_base import SUBSCRIBE_CHUNK, PubSubBase
from pricestream.redis.sentinel import MasterWatch
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait

_MESSAGE = b"message"
_SUBSCRIBE = b"subscribe"
_UNSUBSCRIBE = b"unsubscribe"
_PONG = b"pong"
_CONFIRMATIONS = frozenset({_SUBSCRIBE, _UNSUBSCRIBE, _PONG})


class NotMaster(Exception):
    """The connection's peer is no longer the master the sentinels name."""


def _chunks(items: Iterable[bytes], size: int) -> Iterable[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class PubSubConnection(PubSubBase):
    """One Pub/Sub connection slot of a standalone or sentinel Redis."""

    RECONNECT_ON = (*PubSubBase.RECONNECT_ON, NotMaster)
    LOST_LOG = "Redis Pub/Sub connection %d lost: %s; reconnecting in %.2fs"
    RESTORED_LOG = "Redis Pub/Sub connection %d restored"

    def __init__(
        self,
        index: int,
        pool: ConnectionPool,
        settings: Settings,
        metrics: Metrics,
        handler_ref: list[MessageHandler],
        watch: MasterWatch | None = None,
    ) -> None:
        super().__init__(settings, metrics, "connection", index, "")
        self.index = index
        self._watch = watch
        self._pool = pool
        self._handler_ref = handler_ref
        self.probe_channel = f"{PROBE_CHANNEL_PREFIX}{settings.pod_name}:{index}".encode()
        self.desired.add(self.probe_channel)
        self._subscribed: set[bytes] = set()

    def _open(self) -> AbstractConnection:
        return self._pool.make_connection()

    def _forget_subscriptions(self) -> None:
        self._subscribed = set()

    def _serving(self, conn: AbstractConnection) -> list[Coroutine[Any, Any, None]]:
        tasks = super()._serving(conn)
        if self._watch is not None:
            tasks.append(self._follow_master(conn, self._watch))
        return tasks

    async def _read(self, conn: AbstractConnection) -> None:
        probe = self.probe_channel
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if not isinstance(reply, list):
                if reply == b"PONG":  # a PING answered before the first SUBSCRIBE took effect
                    self._confirmed()
                continue
            kind = reply[0]
            if kind == _MESSAGE:
                if reply[1] != probe:
                    self._handler_ref[0](reply[1], reply[2])
            elif kind in _CONFIRMATIONS:
                self._confirmed()
                if kind == b"subscribe" and reply[1] == probe:
                    self.live = True

    async def _send(
        self, conn: AbstractConnection, kind: bytes, command: str, channels: list[bytes]
    ) -> asyncio.Future[None]:
        """Write one command, answered with one ``kind`` reply per channel (one if none);
        settled when they have all arrived."""
        async with self._send_lock:
            done = self._owe(kind, channels)
            await conn.send_command(command, *channels, check_health=False)
        return done

    async def _ping(self, conn: AbstractConnection) -> asyncio.Future[None]:
        return await self._send(conn, _PONG, "PING", [])

    async def _sync(self, conn: AbstractConnection) -> None:
        while True:
            await self._next_change(conn)
            owed: list[asyncio.Future[None]] = []
            add = self.desired - self._subscribed
            for chunk in _chunks(sorted(add), SUBSCRIBE_CHUNK):
                owed.append(await self._send(conn, _SUBSCRIBE, "SUBSCRIBE", chunk))
            self._subscribed |= add
            remove = self._subscribed - self.desired
            for chunk in _chunks(sorted(remove), SUBSCRIBE_CHUNK):
                owed.append(await self._send(conn, _UNSUBSCRIBE, "UNSUBSCRIBE", chunk))
            self._subscribed -= remove
            if owed:
                await self._answered(owed, "SUBSCRIBE/UNSUBSCRIBE")

    async def _follow_master(self, conn: AbstractConnection, watch: MasterWatch) -> None:
        """End the connection once the sentinels name another node as master (an unknown
        master, all sentinels down, leaves a working connection alone)."""
        while True:
            master = watch.master
            if master is not None and (conn.host, conn.port) != master:
                raise NotMaster(
                    f"{conn.host}:{conn.port} is no longer the master; "
                    f"the sentinels name {master[0]}:{master[1]}"
                )
            await watch.changed()


def _drop(channel: bytes, payload: bytes) -> None:
    """Handler until one is set."""


class RedisBroker:
    def __init__(
        self,
        pool: ConnectionPool,
        commands: Redis,
        settings: Settings,
        metrics: Metrics,
        batcher: CommandBatcher,
        watch: MasterWatch | None = None,
    ):
        self._commands = commands
        self._batcher = batcher
        self._watch = watch
        self._handler_ref: list[MessageHandler] = [_drop]
        self._connections = [
            PubSubConnection(i, pool, settings, metrics, self._handler_ref, watch)
            for i in range(settings.pubsub_connections)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler_ref[0] = handler

    def _connection_for(self, channel: bytes) -> PubSubConnection:
        return self._connections[zlib.crc32(channel) % len(self._connections)]

    def want(self, channel: str) -> None:
        key = channel.encode()
        self._connection_for(key).want(key)

    def unwant(self, channel: str) -> None:
        key = channel.encode()
        self._connection_for(key).unwant(key)

    @property
    def healthy(self) -> bool:
        return all(conn.live for conn in self._connections)

    @property
    def connections_active(self) -> int:
        return sum(1 for conn in self._connections if conn.connected)

    @property
    def shards_wanted(self) -> int:
        return 1  # standalone or sentinel: one Redis, one "shard"

    @property
    def shards_live(self) -> int:
        return int(self.healthy)  # live when every connection delivers

    @property
    def channels_unconfirmed(self) -> int | None:
        return None  # not tracked outside cluster mode: the gauge is not exported

    def subscribed_channels(self) -> int:
        """Channels wanted across all connections, service channels excluded."""
        return sum(len(conn.desired) - 1 for conn in self._connections)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(conn.run(), name=f"pubsub-connection-{conn.index}")
            for conn in self._connections
        ]
        if self._watch is not None:
            self._tasks.append(asyncio.create_task(self._watch.run(), name="sentinel-watch"))

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def last_prices(self, tickers: Sequence[str]) -> list[bytes | None]:
        if not tickers:
            return []
        return await self._batcher.mget([last_price_key(t) for t in tickers])

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._commands.publish(channel, payload)

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        await RedisPricePublisher(self._commands).publish_prices(prices)


class RedisPricePublisher:
    """The producer side of the ingestion contract, in one pipeline per batch."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for ticker, payload in prices:
                pipe.set(last_price_key(ticker), payload)
                pipe.publish(price_channel(ticker), payload)
            await pipe.execute()
