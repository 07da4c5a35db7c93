"""The broker of cluster mode: sharded Pub/Sub, one connection per master that owns a channel
this pod wants, following the slot map.

Why not redis-py's ``ClusterPubSub``: it reads its per-node connections by polling
``get_message`` in turn, confirms nothing, has no liveness probe, and opens and drops node
connections on its own, so the counters of DESIGN.md (every connection opened is closed, and
counted) and readiness ("Pub/Sub delivers") could not be derived from it. The standalone
broker's discipline is proven by the resilience tests (a reader per connection, every
(un)subscribe confirmed within a timeout, PING probes, close-in-``finally`` and resubscribe
everything on reconnect: ``pubsub_base.PubSubBase``); ``ShardConnection`` keeps it per shard,
and this module adds the routing. redis-py is still used for commands (``RedisCluster``:
sessions, last prices, SPUBLISH), where its MOVED/ASK handling is what we want.

Channels on the wire: ``price:{TICKER}`` (the ticker is the hash tag, so the channel shares
its slot with ``price:last:{TICKER}``); the hub keeps the standalone names (``price:TICKER``),
translated here both ways. Service channels (session-closed) keep their name.

Routing: a wanted channel goes to the connection of its slot's master (``SlotMap``). A
connection with nothing left to subscribe is closed at once (the hub's linger already damps
churn). The slot map is read at start, every ``probe_interval``, every 0.5 s while some shard
is not live, and at once (at most every 0.1 s) when a connection says it may be stale: a
refused SSUBSCRIBE (MOVED...), a pushed ``sunsubscribe`` (the slot moved), a lost connection.
After each read every channel whose owner changed is unsubscribed from the old shard and
subscribed on the new one; nodes added to the cluster are used as soon as they own slots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from pricestream.codec import (
    CHANNEL_PREFIX,
    cluster_last_price_key,
    cluster_price_channel,
)
from pricestream.engine.broker import MessageHandler
from pricestream.observability.metrics import Metrics
from pricestream.redis.batch import CommandBatcher
from pricestream.redis.cluster_client import Address, NodeOptions
from pricestream.redis.shard_connection import ShardConnection
from pricestream.redis.slots import SlotMap, TopologyUnavailable, channel_slot
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait, cancel_until_ended

log = logging.getLogger("pricestream.redis")

STALE_REFRESH_GAP = 0.1  # seconds between two slot map reads asked for by connections
UNSETTLED_REFRESH = 0.5  # seconds between reads while a shard is not live


def wire_channel(channel: str) -> str:
    """The cluster-mode name of a channel: ``price:AAPL`` -> ``price:{AAPL}``."""
    if channel.startswith(CHANNEL_PREFIX):
        return cluster_price_channel(channel.removeprefix(CHANNEL_PREFIX))
    return channel


def _drop(channel: bytes, payload: bytes) -> None:
    """Handler until one is set."""


@dataclass
class _Shard:
    conn: ShardConnection
    task: asyncio.Task[None]


class ShardedBroker:
    def __init__(
        self, client: RedisCluster, settings: Settings, metrics: Metrics, batcher: CommandBatcher
    ) -> None:
        self._client = client
        self._batcher = batcher
        self._settings = settings
        self._metrics = metrics
        self._options = NodeOptions.from_settings(settings)
        self._slots = SlotMap(self._options)
        self._handler: MessageHandler = _drop
        self._wanted: dict[bytes, bytes] = {}  # wire name -> the hub's name
        self._slot_of: dict[bytes, int] = {}
        self._route: dict[bytes, Address] = {}  # wire name -> the shard it is assigned to
        self._shards: dict[Address, _Shard] = {}
        self._closing: dict[asyncio.Task[None], ShardConnection] = {}
        self._stale = asyncio.Event()
        self._topology_task: asyncio.Task[None] | None = None
        self._map_failing = False

    # --- the Broker contract -------------------------------------------------------------

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    def want(self, channel: str) -> None:
        wire = wire_channel(channel).encode()
        if wire in self._wanted:
            return
        self._wanted[wire] = channel.encode()
        self._slot_of[wire] = channel_slot(wire)
        if self._topology_task is not None and self._slots.known:
            self._assign(wire, self._slots.owner(self._slot_of[wire]))

    def unwant(self, channel: str) -> None:
        wire = wire_channel(channel).encode()
        if self._wanted.pop(wire, None) is None:
            return
        del self._slot_of[wire]
        address = self._route.pop(wire, None)
        if address is not None:
            self._shards[address].conn.unwant(wire)
            self._close_if_idle(address)

    @property
    def healthy(self) -> bool:
        """The slot map is known and every shard this pod needs has a live connection."""
        if not self._slots.known or self._topology_task is None:
            return False
        return all(shard.conn.live for shard in self._shards.values())

    @property
    def connections_active(self) -> int:
        conns = [s.conn for s in self._shards.values()] + list(self._closing.values())
        return sum(1 for conn in conns if conn.connected)

    @property
    def shards_wanted(self) -> int:
        """Masters owning at least one channel this pod wants."""
        return len(self._shards)

    @property
    def shards_live(self) -> int:
        """Of those, the ones whose Pub/Sub connection is up and answered its PING."""
        return sum(1 for shard in self._shards.values() if shard.conn.live)

    @property
    def channels_unconfirmed(self) -> int:
        """Wanted channels no shard has confirmed a subscription for (yet, or any more)."""
        confirmed = sum(len(s.conn.confirmed) for s in self._shards.values())
        return len(self._wanted) - confirmed

    async def start(self) -> None:
        self._topology_task = asyncio.create_task(self._follow_topology(), name="cluster-slots")

    async def aclose(self) -> None:
        tasks = [s.task for s in self._shards.values()] + list(self._closing)
        if self._topology_task is not None:
            tasks.append(self._topology_task)
        await cancel_and_wait(tasks)
        self._shards.clear()
        self._closing.clear()
        self._topology_task = None

    async def last_prices(self, tickers: Sequence[str]) -> list[bytes | None]:
        if not tickers:
            return []
        # One GET per ticker (each its own slot); the batcher pipelines them per master. A
        # shard that is down costs only its own tickers' first price (None: it comes with the
        # next tick); if none could be read, the error is raised.
        keys = [cluster_last_price_key(t) for t in tickers]
        reads = [self._batcher.get(key) for key in keys]
        results = await asyncio.gather(*reads, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        return [None if isinstance(r, BaseException) else r for r in results]

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._client.spublish(wire_channel(channel), payload)

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        await ClusterPricePublisher(self._client).publish_prices(prices)

    # --- routing -------------------------------------------------------------------------

    def _on_message(self, wire: bytes, payload: bytes) -> None:
        channel = self._wanted.get(wire)
        if channel is not None:
            self._handler(channel, payload)

    def _mark_stale(self) -> None:
        self._stale.set()

    def _assign(self, wire: bytes, address: Address) -> None:
        self._route[wire] = address
        shard = self._shards.get(address)
        if shard is None:
            conn = ShardConnection(
                address,
                self._options,
                self._settings,
                self._metrics,
                self._on_message,
                self._mark_stale,
            )
            task = asyncio.create_task(conn.run(), name=f"pubsub-shard-{conn.name}")
            shard = self._shards[address] = _Shard(conn, task)
        shard.conn.want(wire)

    def _close_if_idle(self, address: Address) -> None:
        shard = self._shards[address]
        if shard.conn.desired:
            return
        del self._shards[address]
        self._closing[shard.task] = shard.conn
        shard.task.add_done_callback(self._closed)
        # Cancelled until it has ended: one lost cancel (redis-py's wait_for on Python 3.11)
        # would keep an idle connection open until the broker closes, and the next stream of
        # a ticker on this shard opens a new one.
        cancel_until_ended(shard.task)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.pop(task, None)

    def _reroute(self) -> None:
        """Bring every wanted channel to the shard the slot map now names."""
        moved = 0
        for wire, slot in self._slot_of.items():
            owner = self._slots.owner(slot)
            current = self._route.get(wire)
            if current == owner:
                continue
            if current is not None:
                self._shards[current].conn.unwant(wire)
                moved += 1
            self._assign(wire, owner)
        for address in list(self._shards):
            self._close_if_idle(address)
        for shard in self._shards.values():
            shard.conn.resync()
        if moved:
            self._metrics.slot_moves.inc(moved)
            log.info(
                "%d channel(s) moved to another shard (the slot map changed)",
                moved,
                extra={"event": "channels_rerouted", "channels": moved},
            )

    async def _read_map(self) -> None:
        try:
            await self._slots.read()
        except TopologyUnavailable as exc:
            self._metrics.topology_refreshes.labels("error").inc()
            if not self._map_failing:  # once per outage
                log.warning("cannot read the cluster's slot map: %s", exc)
            self._map_failing = True
            return
        self._metrics.topology_refreshes.labels("ok").inc()
        if self._map_failing:
            log.info("cluster slot map read again")
        self._map_failing = False
        self._reroute()

    async def _follow_topology(self) -> None:
        while True:
            self._stale.clear()
            try:
                await self._read_map()
            except Exception:  # a bug here must not end the task: failovers would go unseen
                self._metrics.topology_refreshes.labels("error").inc()
                log.exception("following the cluster's slot map failed; retrying")
            settled = self._slots.known and all(s.conn.live for s in self._shards.values())
            wait = self._settings.probe_interval if settled else UNSETTLED_REFRESH
            try:
                async with asyncio.timeout(wait):
                    await self._stale.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(STALE_REFRESH_GAP)


class ClusterPricePublisher:
    """The producer side of the ingestion contract in cluster form: SET ``price:last:{T}`` and
    SPUBLISH ``price:{T}``, one slot per ticker; one pipeline per batch (redis-py splits it
    per node)."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for ticker, payload in prices:
                pipe.set(cluster_last_price_key(ticker), payload)
                pipe.spublish(cluster_price_channel(ticker), payload)
            await pipe.execute()
