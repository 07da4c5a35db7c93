"""One place that turns settings into a redis-py client with timeouts on everything."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pricestream.redis.packing import with_hiredis_packing
from pricestream.redis.sentinel import make_sentinel_pool
from pricestream.settings import Settings


def make_pool(settings: Settings) -> ConnectionPool:
    """A connection pool whose every connect, read and write times out after ``redis_timeout``;
    in sentinel mode its connections go to the master the sentinels name."""
    # Blocking: a burst of requests waits (up to the timeout) for a free connection
    # instead of failing at once with "Too many connections".
    options = dict(
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        # One immediate retry covers a pooled socket that went stale across a Redis restart.
        retry=Retry(NoBackoff(), 1),
        max_connections=32,
        # RESP2: Pub/Sub messages come back from read_response instead of a push handler.
        protocol=2,
    )
    if settings.redis_mode == "sentinel":
        pool: ConnectionPool = make_sentinel_pool(settings, **options)
    else:
        pool = BlockingConnectionPool.from_url(settings.redis_url, **options)
    pool.connection_class = with_hiredis_packing(pool.connection_class)
    return pool


def make_client(pool: ConnectionPool) -> Redis:
    return Redis(connection_pool=pool)


def redacted(url: str) -> str:
    """The URL with any password replaced, fit for a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://***@{host}"


def redis_target(settings: Settings) -> str:
    """Where the Redis connections go, for a log line."""
    if settings.redis_mode == "sentinel":
        return (
            f"the master {settings.redis_sentinel_master!r} of sentinels "
            f"{settings.redis_sentinels} (credentials, TLS, db of {redacted(settings.redis_url)})"
        )
    return redacted(settings.redis_url)
