"""Time RedisSessionStore.refresh of N claims against a real redis-server: wall time, the longest
event-loop block seen by a 5 ms ticker, and Redis's own time per EVALSHA (INFO commandstats)."""

import asyncio
import sys
import time

import uvloop
from pricestream.redis.sessions import RedisSessionStore
from redis.asyncio import Redis


async def main(url: str, n: int) -> None:
    client = Redis.from_url(url, protocol=2)
    store = RedisSessionStore(client, 300, 10, 30, "pod-x:1")
    claims = {f"s{i:021d}": (f"pod-x:1/{i:012x}", ("AAPL", "MSFT", "GOOG")) for i in range(n)}
    await store.refresh(claims)  # warm: sessions written, script loaded
    worst = 0.0
    stop = False

    async def ticker():
        nonlocal worst
        loop = asyncio.get_running_loop()
        while not stop:
            t = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - t - 0.005)

    for round_ in range(3):
        await client.config_resetstat()
        worst = 0.0
        stop = False
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await store.refresh(claims)
        wall = time.perf_counter() - t0
        stop = True
        await task
        stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
        print(
            f"n={n} round {round_}: wall {wall * 1000:.1f} ms, "
            f"longest loop block {worst * 1000:.1f} ms, "
            f"redis evalsha calls {stats.get('calls')} usec/call {stats.get('usec_per_call')}"
        )
    await client.flushall()
    await client.aclose()


uvloop.run(main(sys.argv[1], int(sys.argv[2])))
