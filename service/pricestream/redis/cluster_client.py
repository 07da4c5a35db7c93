"""Cluster mode: settings -> a redis-py ``RedisCluster`` for commands, and raw connections to
one node for Pub/Sub and topology queries; timeouts on everything, as in ``client.py``.

Credentials and TLS come from the first node of ``PRICESTREAM_REDIS_URL`` and apply to every
node (``settings.cluster_seed_nodes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pricestream.settings import Settings, cluster_seed_nodes

Address = tuple[str, int]
SLOTS_REFRESH_GAP = 0.25  # seconds between two slot map reads after failed pipelines


@dataclass(frozen=True)
class NodeOptions:
    """How to reach any node of the cluster: the seeds, credentials, TLS, timeouts."""

    seeds: tuple[Address, ...]
    username: str | None
    password: str | None
    tls: bool
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeOptions:
        seeds = cluster_seed_nodes(settings.redis_url)
        first = settings.redis_url.split(",", 1)[0]
        parsed = parse_url(first)
        return cls(
            seeds=tuple(seeds),
            username=parsed.get("username"),
            password=parsed.get("password"),
            tls=first.startswith("rediss://"),
            timeout=settings.redis_timeout,
        )

    def connection(self, address: Address) -> AbstractConnection:
        """A new, not yet connected RESP2 connection to one node (its caller owns it)."""
        kind: type[Connection] = SSLConnection if self.tls else Connection
        return kind(
            host=address[0],
            port=address[1],
            username=self.username,
            password=self.password,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # RESP2: Pub/Sub messages come back from read_response instead of a push handler.
            protocol=2,
        )


class ClusterUnreachable(RedisConnectionError):
    """No node gave redis-py a usable slot map. redis-py raises ``RedisClusterException``,
    which is no ``RedisError``; pricestream treats every ``RedisError`` as "Redis unavailable"
    (UNAVAILABLE to clients, retry in background tasks), so it is raised as one."""


class _Pipeline(ClusterPipeline):
    async def initialize(self) -> ClusterPipeline:
        try:
            return await super().initialize()
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError):
            client = self.cluster_client
            assert isinstance(client, ClusterClient)
            await client.refresh_slots()  # a failover may have moved the node's slots
            raise


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose "cannot reach the cluster" errors are ``RedisError``s, and whose
    pipelines do not retry. redis-py retries a failed cluster pipeline after closing every
    connection of the client (``aclose``), which also breaks the pipelines in flight to the
    healthy masters: with one master down, every command of the pod failed. Without the retry
    a failed pipeline fails alone (callers retry: clients on UNAVAILABLE, background tasks on
    their next round), and the slot map is read again (``refresh_slots``) so the commands
    follow the promoted replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots_lock = asyncio.Lock()
        self._slots_read_at = -math.inf

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("shard_hint is not supported in cluster mode")
        return _Pipeline(self, transaction)

    async def refresh_slots(self) -> None:
        """Re-read the slot map, at most every ``SLOTS_REFRESH_GAP`` seconds; a failure is left
        to the next one."""
        async with self._slots_lock:
            now = asyncio.get_running_loop().time()
            if now - self._slots_read_at < SLOTS_REFRESH_GAP:
                return
            self._slots_read_at = now
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self.nodes_manager.initialize()


def make_cluster_client(settings: Settings) -> ClusterClient:
    """Commands (sessions, leases, last prices, SPUBLISH): redis-py's cluster client follows
    MOVED/ASK and re-reads the slot map after a failover on its own."""
    options = NodeOptions.from_settings(settings)
    extra: dict[str, Any] = {"ssl": True} if options.tls else {}
    return ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in options.seeds],
        username=options.username,
        password=options.password,
        socket_timeout=options.timeout,
        socket_connect_timeout=options.timeout,
        retry=Retry(NoBackoff(), 0),  # see ClusterClient
        max_connections=32,
        protocol=2,
        **extra,
    )
