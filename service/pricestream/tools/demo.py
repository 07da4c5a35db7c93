"""`pricestream demo`: server + feed + watcher in one process, with or without Redis."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from pricestream.api.server import Server
from pricestream.redis.broker import RedisPricePublisher
from pricestream.redis.client import redacted
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait
from pricestream.tools.feed import PricePublisher, run_feed, ticker_universe
from pricestream.tools.watch import watch


async def redis_reachable(url: str, mode: str = "standalone") -> bool:
    client: Any
    if mode == "cluster":
        from pricestream.redis.cluster_client import make_cluster_client
        from pricestream.settings import load_settings

        quick = load_settings(redis_url=url, redis_mode="cluster", redis_timeout=0.5)
        client = make_cluster_client(quick)
    else:
        client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def run_demo(
    settings: Settings,
    *,
    tickers: list[str],
    universe_size: int,
    rate: float,
    duration: float | None,
    clear: bool = True,
) -> int:
    use_redis = await redis_reachable(settings.redis_url, settings.redis_mode)
    if use_redis:
        print(f"demo: using Redis at {redacted(settings.redis_url)}", file=sys.stderr)
    else:
        print(
            f"demo: no Redis at {redacted(settings.redis_url)}; "
            "using the in-memory broker and session store",
            file=sys.stderr,
        )
    async with Server(settings, in_memory=not use_redis) as server:
        redis_client: Redis | None = None
        publisher: PricePublisher
        if use_redis and settings.redis_mode == "cluster":
            publisher = server.engine.broker  # SET price:last:{T} + SPUBLISH price:{T}
        elif use_redis:
            redis_client = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout)
            publisher = RedisPricePublisher(redis_client)
        else:
            publisher = server.engine.broker
        universe = ticker_universe(universe_size)
        feed = asyncio.create_task(run_feed(publisher, universe, rate))
        page = f"http://localhost:{server.web_port}/?tickers={','.join(tickers)}"
        print(f"demo: the live page is at {page}", file=sys.stderr)
        try:
            target = f"127.0.0.1:{server.grpc_port}"
            return await watch(target, tickers, duration=duration, clear=clear)
        finally:
            await cancel_and_wait([feed])
            if redis_client is not None:
                await redis_client.aclose()
