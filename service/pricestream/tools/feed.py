"""A simulated market: random-walk prices for N tickers at R updates/s.

It follows the ingestion contract any real producer can follow: each update is a serialized
``PriceUpdate`` (publish timestamp, per-ticker increasing sequence) stored at
``price:last:{TICKER}`` and published on ``price:{TICKER}``; in cluster mode the braces are
literal (the ticker is the hash tag) and the publish is SPUBLISH (docs/redis-modes.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Protocol

from redis.exceptions import RedisError

from pricestream.redis.pubsub_base import backoff_delay
from pricestream.v1.pricestream_pb2 import PriceUpdate

log = logging.getLogger("pricestream.feed")

WELL_KNOWN = (
    "AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "BKR", "JPM", "V",
    "XOM", "JNJ", "WMT", "PG", "MA", "HD", "CVX", "KO", "PEP", "NFLX",
)  # fmt: skip
TICK_SECONDS = 0.01


class PricePublisher(Protocol):
    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None: ...


class Pingable(Protocol):
    async def ping(self) -> object: ...


async def wait_for_redis(client: Pingable, max_backoff: float) -> int:
    """Ping until Redis answers, with the server's reconnect backoff (exponential, jittered) and
    one log line per failed attempt: a feed started before its Redis (a fresh install, Redis
    still pending) waits instead of exiting. Returns the attempts it took."""
    attempt = 0
    while True:
        attempt += 1
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            delay = backoff_delay(attempt, max_backoff)
            log.warning(
                "feed: Redis not reachable (%s); attempt %d, retrying in %.2fs",
                exc or type(exc).__name__,
                attempt,
                delay,
                extra={"event": "feed_redis_unreachable", "attempt": attempt},
            )
            await asyncio.sleep(delay)
        else:
            if attempt > 1:
                log.info(
                    "feed: Redis reachable after %d attempts",
                    attempt,
                    extra={"event": "feed_redis_reachable", "attempt": attempt},
                )
            return attempt


def ticker_universe(count: int) -> list[str]:
    """``count`` ticker symbols: well-known ones first, then T0021, T0022, ..."""
    if count <= len(WELL_KNOWN):
        return list(WELL_KNOWN[:count])
    return list(WELL_KNOWN) + [f"T{i:04d}" for i in range(len(WELL_KNOWN) + 1, count + 1)]


class RandomWalk:
    """Prices and sequence numbers of a set of tickers; each step is a small log-normal move."""

    def __init__(self, tickers: Sequence[str], seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self.tickers = list(tickers)
        self.prices = {t: round(self._rng.uniform(20, 500), 2) for t in self.tickers}
        self.sequences = dict.fromkeys(self.tickers, 0)

    def step(self, ticker: str) -> bytes:
        price = self.prices[ticker] * math.exp(self._rng.gauss(0.0, 0.002))
        self.prices[ticker] = price
        self.sequences[ticker] += 1
        return PriceUpdate(
            ticker=ticker,
            price=round(price, 4),
            published_at_unix_nanos=time.time_ns(),
            sequence=self.sequences[ticker],
        ).SerializeToString()


async def run_feed(
    publisher: PricePublisher,
    tickers: Sequence[str],
    rate: float,
    duration: float | None = None,
    seed: int | None = None,
    max_backoff: float = 5.0,
) -> int:
    """Publish ``rate`` updates/s spread over ``tickers`` round-robin; returns how many.

    A batch Redis refuses (restart, failover) is dropped, not retried: the next batch carries
    newer prices. The feed waits with backoff and goes on, one log line per outage."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    walk = RandomWalk(tickers, seed)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = None if duration is None else start + duration
    published = 0
    paced = 0  # updates since ``start``, the pace's reference point
    cursor = 0
    next_tick = start
    failures = 0
    while end is None or loop.time() < end:
        next_tick += TICK_SECONDS
        due = int((next_tick - start) * rate) - paced
        if due > 0:
            batch = []
            for _ in range(due):
                ticker = walk.tickers[cursor % len(walk.tickers)]
                cursor += 1
                batch.append((ticker, walk.step(ticker)))
            try:
                await publisher.publish_prices(batch)
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "feed: publishing failed (%s); dropping batches until Redis answers",
                        exc or type(exc).__name__,
                        extra={"event": "feed_publish_failed"},
                    )
                await asyncio.sleep(backoff_delay(failures, max_backoff))
                start = next_tick = loop.time()  # restart the pace; do not burst to catch up
                paced = 0
                continue
            if failures:
                log.info(
                    "feed: publishing again after %d failed attempts",
                    failures,
                    extra={"event": "feed_publish_restored"},
                )
                failures = 0
            published += due
            paced += due
        delay = next_tick - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return published
