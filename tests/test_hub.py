"""Hub bookkeeping under churn against a real Redis: no lost or doubled subscriptions."""

from __future__ import annotations

import asyncio
import random

from pricestream.wiring import build_engine
from support.invariants import samples
from support.settings import fast_settings


class Sink:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[bytes, int, int]] = {}


async def numsub(redis, channel: str) -> int:
    client = redis.client()
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


async def wait_numsub(redis, channel: str, expected: int) -> int:
    for _ in range(100):
        found = await numsub(redis, channel)
        if found == expected:
            return found
        await asyncio.sleep(0.05)
    return found


async def test_first_and_last_subscriber_churn_never_races(redis) -> None:
    rng = random.Random(7)
    async with build_engine(fast_settings(redis.url, linger=0.05)) as engine:
        hub = engine.hub
        sinks = [Sink() for _ in range(20)]
        held: dict[Sink, list] = {}
        for _ in range(2000):
            sink = rng.choice(sinks)
            if sink in held:
                hub.remove(sink, held.pop(sink))
            else:
                held[sink] = hub.add(sink, ["BKR"])
            if rng.random() < 0.1:
                await asyncio.sleep(rng.choice([0, 0.01, 0.06]))  # around the linger
        # Some subscribers remain: exactly one subscription in Redis for the pod.
        assert held
        assert hub.subscriptions_active == 1
        assert await wait_numsub(redis, "price:BKR", 1) == 1
        for sink, topics in held.items():
            hub.remove(sink, topics)
        await asyncio.sleep(0.2)  # past the linger
        assert hub.subscriptions_active == 0
        assert await wait_numsub(redis, "price:BKR", 0) == 0
        values = samples(engine.metrics.exposition().decode())
        opened = values["pricestream_pubsub_subscriptions_opened_total"]
        assert opened == values["pricestream_pubsub_subscriptions_closed_total"]
        assert opened >= 1


async def test_linger_keeps_subscription_through_a_quick_return(redis) -> None:
    async with build_engine(fast_settings(redis.url, linger=0.5)) as engine:
        sink = Sink()
        topics = engine.hub.add(sink, ["KO"])
        engine.hub.remove(sink, topics)
        await asyncio.sleep(0.1)
        topics = engine.hub.add(sink, ["KO"])  # back within the linger: no resubscribe
        values = samples(engine.metrics.exposition().decode())
        assert values["pricestream_pubsub_subscriptions_opened_total"] == 1
        assert values["pricestream_pubsub_subscriptions_closed_total"] == 0
        engine.hub.remove(sink, topics)
        await asyncio.sleep(0.7)
        values = samples(engine.metrics.exposition().decode())
        assert values["pricestream_pubsub_subscriptions_closed_total"] == 1
        assert await wait_numsub(redis, "price:KO", 0) == 0
