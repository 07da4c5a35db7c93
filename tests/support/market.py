"""Prices published to Redis the way `pricestream feed` does."""

from __future__ import annotations

from pricestream.redis.broker import RedisPricePublisher
from pricestream.redis.client import make_client, make_pool
from pricestream.tools.feed import RandomWalk

from support.settings import fast_settings


class Market:
    """Publishes prices to Redis the way `pricestream feed` does."""

    def __init__(self, redis_url: str, tickers: list[str]) -> None:
        self.client = make_client(make_pool(fast_settings(redis_url)))
        self.publisher = RedisPricePublisher(self.client)
        self.walk = RandomWalk(tickers, seed=1)

    async def tick(self, *tickers: str) -> None:
        await self.publisher.publish_prices([(t, self.walk.step(t)) for t in tickers])

    async def aclose(self) -> None:
        await self.client.aclose()
