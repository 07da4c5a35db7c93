"""Cluster mode: settings -> a redis-py ``RedisCluster`` for commands, and raw connections to
one node for Pub/Sub and topology queries; timeouts on everything, as in ``client.py``.

Credentials and TLS come from the first node of ``PRICESTREAM_REDIS_URL`` and apply to every
node (``settings.cluster_seed_nodes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.retry import Retry

from pricestream.settings import Settings, cluster_seed_nodes

Address = tuple[str, int]


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


def make_cluster_client(settings: Settings) -> RedisCluster:
    """Commands (sessions, leases, last prices, SPUBLISH): redis-py's cluster client follows
    MOVED/ASK and re-reads the slot map after a failover on its own."""
    options = NodeOptions.from_settings(settings)
    extra: dict[str, Any] = {"ssl": True} if options.tls else {}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in options.seeds],
        username=options.username,
        password=options.password,
        socket_timeout=options.timeout,
        socket_connect_timeout=options.timeout,
        retry=Retry(NoBackoff(), 1),
        max_connections=32,
        protocol=2,
        **extra,
    )
