"""The one place that composes a pod: settings -> backends -> engine.

The engine knows its backends only through its ports (``engine.broker.Broker``,
``engine.sessions.SessionStore``, ``engine.backends.Backends``); which ones it gets, Redis
(standalone, sentinel or cluster) or process memory, is decided here, so neither the engine
nor the backends import each other's side of that choice.

Why the engine takes a factory (``Callable[[Engine], Backends]``) rather than finished
backends: building them needs three things the engine owns, its ``metrics`` (the brokers
count connections and reconnects into them), its ``pod_instance`` (the Redis store names
leases and the liveness key with it) and its ``on_closed`` (the memory store ends a closed
session's stream with it). Creating those here and handing them in would split the
engine's identity and callbacks between two places and need ``on_closed`` patched in after
construction; the factory is called once, from the engine's constructor, with the engine
as far as it is built, and ``build_backends`` below still takes each of those three
explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from pricestream.engine.backends import Backends
from pricestream.engine.engine import Engine
from pricestream.memory.broker import MemoryBroker
from pricestream.memory.sessions import MemorySessionStore
from pricestream.observability.metrics import Metrics
from pricestream.redis.batch import CommandBatcher
from pricestream.redis.broker import RedisBroker
from pricestream.redis.client import make_client, make_pool, redis_target
from pricestream.redis.cluster_client import make_cluster_client
from pricestream.redis.sentinel import MasterWatch, SentinelPool
from pricestream.redis.sessions import POD_ALIVE_INTERVAL, RedisSessionStore
from pricestream.redis.sharded_broker import ShardedBroker
from pricestream.settings import Settings


@dataclass(kw_only=True)
class RedisBackends(Backends):
    """Backends on Redis: the broker and store share one client (and, outside cluster mode,
    its connection pool) and one command batcher. Tests and tools reach the same Redis
    through ``redis`` and ``batcher``."""

    redis: Redis | RedisCluster
    batcher: CommandBatcher
    pool: ConnectionPool | None = None

    async def aclose(self) -> None:
        await self.batcher.aclose()  # its pending commands first, while the client is open
        await self.broker.aclose()
        await self.redis.aclose()
        if self.pool is not None:
            await self.pool.disconnect()


def build_backends(
    settings: Settings,
    metrics: Metrics,
    pod_instance: str,
    on_closed: Callable[[str], None],
    *,
    in_memory: bool,
) -> Backends:
    """The broker and session store ``settings`` ask for: in process memory (``in_memory``,
    the Redis-less demo), or on Redis in ``settings.redis_mode``."""
    s = settings
    if in_memory:
        return Backends(
            broker=MemoryBroker(),
            store=MemorySessionStore(s.session_ttl, s.lease_ttl, s.resume_grace, on_closed),
            keep_alive_interval=POD_ALIVE_INTERVAL,
        )
    if s.redis_mode == "cluster":
        cluster = make_cluster_client(s)
        cluster_batcher = CommandBatcher(cluster, cluster=True)
        return RedisBackends(
            broker=ShardedBroker(cluster, s, metrics, cluster_batcher),
            store=RedisSessionStore(
                cluster,
                cluster_batcher,
                s.session_ttl,
                s.lease_ttl,
                s.resume_grace,
                pod_instance,
                cluster=True,
            ),
            keep_alive_interval=POD_ALIVE_INTERVAL,
            redis_target=redis_target(s),
            redis=cluster,
            batcher=cluster_batcher,
        )
    pool = make_pool(s)
    client = make_client(pool)
    batcher = CommandBatcher(client)
    watch = MasterWatch(pool, s) if isinstance(pool, SentinelPool) else None
    return RedisBackends(
        broker=RedisBroker(pool, client, s, metrics, batcher, watch),
        store=RedisSessionStore(
            client, batcher, s.session_ttl, s.lease_ttl, s.resume_grace, pod_instance
        ),
        keep_alive_interval=POD_ALIVE_INTERVAL,
        redis_target=redis_target(s),
        redis=client,
        batcher=batcher,
        pool=pool,
    )


def build_engine(settings: Settings, *, in_memory: bool = False) -> Engine:
    """An engine of one pod on the backends ``settings`` ask for (see ``build_backends``)."""
    return Engine(
        settings,
        lambda engine: build_backends(
            settings, engine.metrics, engine.pod_instance, engine.on_closed, in_memory=in_memory
        ),
    )
