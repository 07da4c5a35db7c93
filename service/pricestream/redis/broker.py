"""Redis Pub/Sub over a small fixed pool of connections, each with its own reader.

Channels are hashed onto connections. Each connection keeps a desired set and a subscribed
set; a sync task sends SUBSCRIBE/UNSUBSCRIBE for the difference in chunks of 512 and waits for
Redis to confirm every channel within ``probe_timeout``. After any failure the connection is
closed (always, in one ``finally``), and a new one is opened with exponential backoff and
jitter; it starts with an empty subscribed set, so everything still desired is subscribed
again. The connection itself is probed: when nothing has been confirmed on it for
``probe_interval``, a PING is sent on it (in subscribed mode Redis answers ``['pong', '']`` on
the same socket) and must be answered within ``probe_timeout``, or the connection is replaced.
That tests both directions of the socket: incoming messages alone prove only Redis→pod, so a
socket whose pod→Redis direction stalled would otherwise look healthy. A connection turns
unhealthy within ``probe_interval + probe_timeout`` of its last confirmed reply.

A PING proves the socket, not that the node on the other end is the one prices are published
to: in sentinel mode a demoted master answers it too while it receives nothing. There each
connection also follows a ``MasterWatch`` and is replaced as soon as its peer is not the
master the sentinels name.

Replies to our commands (subscribe, unsubscribe, pong) arrive in the order the commands were
sent, between messages; each command registers how many replies it expects in a FIFO before
it is written (under a lock, so two writers cannot reorder), and the reader settles them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import zlib
from asyncio import Future
from collections import deque
from collections.abc import Iterable, Sequence

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from pricestream.codec import PROBE_CHANNEL_PREFIX, last_price_key, price_channel
from pricestream.engine.broker import MessageHandler
from pricestream.observability.metrics import Metrics
from pricestream.redis.batch import CommandBatcher
from pricestream.redis.sentinel import MasterWatch
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait, run_until_first_failure

log = logging.getLogger("pricestream.redis")

SUBSCRIBE_CHUNK = 512
_MESSAGE = b"message"
_CONFIRMATIONS = frozenset({b"subscribe", b"unsubscribe", b"pong"})


def backoff_delay(failures: int, max_backoff: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row: exponential from 0.1 s up to
    `max_backoff`, with jitter (uniform in the upper half) so clients do not retry in step."""
    ceiling = min(max_backoff, 0.1 * 2 ** (failures - 1))
    return random.uniform(ceiling / 2, ceiling)


class ProbeFailed(Exception):
    """A probe or a (un)subscribe was not answered in time: the connection is not working."""


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


class PubSubConnection:
    """One Pub/Sub connection slot: it owns its socket, reader, sync and liveness tasks."""

    def __init__(
        self,
        index: int,
        pool: ConnectionPool,
        settings: Settings,
        metrics: Metrics,
        handler_ref: list[MessageHandler],
        watch: MasterWatch | None = None,
    ) -> None:
        self.index = index
        self._watch = watch
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._handler_ref = handler_ref
        self.probe_channel = f"{PROBE_CHANNEL_PREFIX}{settings.pod_name}:{index}".encode()
        self.desired: set[bytes] = {self.probe_channel}
        self._subscribed: set[bytes] = set()
        self._changed = asyncio.Event()
        # Replies still owed by Redis, oldest first: [replies left, settled when all arrived].
        self._owed: deque[tuple[list[int], asyncio.Future[None]]] = deque()
        self._send_lock = asyncio.Lock()
        self._last_confirmed = 0.0
        self.connected = False
        self.live = False
        self._ever_connected = False

    def want(self, channel: bytes) -> None:
        if channel not in self.desired:
            self.desired.add(channel)
            self._changed.set()

    def unwant(self, channel: bytes) -> None:
        if channel in self.desired:
            self.desired.discard(channel)
            self._changed.set()

    async def run(self) -> None:
        """Keep a connection up until cancelled."""
        failures = 0
        while True:
            try:
                await self._connect_and_serve()
            except (TimeoutError, RedisError, OSError, ProbeFailed, NotMaster) as exc:
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "Redis Pub/Sub connection %d lost: %s; reconnecting in %.2fs",
                    self.index,
                    exc or type(exc).__name__,
                    delay,
                    extra={"event": "redis_connection_lost", "connection": self.index},
                )
                await asyncio.sleep(delay)
            else:
                failures = 0

    def _backoff(self, failures: int) -> float:
        return backoff_delay(failures, self._settings.reconnect_max_backoff)

    async def _connect_and_serve(self) -> None:
        conn: AbstractConnection = self._pool.make_connection()
        opened = False
        try:
            await conn.connect()
            opened = True
            self._metrics.connections_opened.inc()
            if self._ever_connected:
                self._metrics.redis_reconnects.inc()
                log.info(
                    "Redis Pub/Sub connection %d restored",
                    self.index,
                    extra={"event": "redis_connection_restored", "connection": self.index},
                )
            self._ever_connected = True
            self.connected = True
            self._subscribed = set()
            self._owed.clear()
            self._changed.set()
            self._last_confirmed = asyncio.get_running_loop().time()
            tasks = [self._read(conn), self._sync(conn), self._watch_liveness(conn)]
            if self._watch is not None:
                tasks.append(self._follow_master(conn, self._watch))
            await run_until_first_failure(*tasks)
        finally:
            self.connected = False
            self.live = False
            self._subscribed = set()
            for _, owed in self._owed:
                owed.cancel()
            self._owed.clear()
            if opened:
                self._metrics.connections_closed.inc()
            await conn.disconnect(nowait=True)

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

    def _confirmed(self) -> None:
        """One reply to our commands arrived: it settles the oldest command still owed."""
        self._last_confirmed = asyncio.get_running_loop().time()
        if not self._owed:
            return
        left, done = self._owed[0]
        left[0] -= 1
        if left[0] <= 0:
            self._owed.popleft()
            if not done.done():
                done.set_result(None)

    async def _send(self, conn: AbstractConnection, replies: int, *args: bytes | str) -> Future:
        """Write one command that Redis answers with ``replies`` replies; settled when they
        have all arrived."""
        async with self._send_lock:
            done: Future = asyncio.get_running_loop().create_future()
            self._owed.append(([replies], done))
            await conn.send_command(*args, check_health=False)
        return done

    async def _answered(self, owed: list[Future], what: str) -> None:
        timeout = self._settings.probe_timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*owed)
        except TimeoutError:
            raise ProbeFailed(f"{what} not answered within {timeout:g}s") from None

    async def _sync(self, conn: AbstractConnection) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            if not conn.is_connected:
                raise ConnectionError("Pub/Sub connection closed")
            owed: list[Future] = []
            add = self.desired - self._subscribed
            for chunk in _chunks(sorted(add), SUBSCRIBE_CHUNK):
                owed.append(await self._send(conn, len(chunk), "SUBSCRIBE", *chunk))
            self._subscribed |= add
            remove = self._subscribed - self.desired
            for chunk in _chunks(sorted(remove), SUBSCRIBE_CHUNK):
                owed.append(await self._send(conn, len(chunk), "UNSUBSCRIBE", *chunk))
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

    async def _watch_liveness(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        interval = self._settings.probe_interval
        while True:
            quiet = loop.time() - self._last_confirmed
            if quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            timeout = self._settings.probe_timeout
            try:
                async with asyncio.timeout(timeout):  # the write too: it may be what is stuck
                    pong = await self._send(conn, 1, "PING")
                    await pong
            except TimeoutError:
                raise ProbeFailed(
                    f"PING on the Pub/Sub connection not answered within {timeout:g}s"
                ) from None


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
