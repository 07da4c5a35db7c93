"""A client process that runs COUNT sessions, CONCURRENCY at a time; each reads for a moment and
leaves in a random way: cancel, CloseSession, channel drop or an expiring deadline.

Usage: churn.py TARGET COUNT CONCURRENCY SEED TICKER [TICKER ...]
Prints one JSON line with the number of sessions per way of leaving and the unexpected errors.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter

import grpc
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub

WAYS = ("cancel", "close_session", "channel_drop", "deadline")


async def one(target: str, shared: grpc.aio.Channel, rng: random.Random, tickers: list[str],
              ways: Counter[str], errors: Counter[str]) -> None:  # fmt: skip
    way = rng.choice(WAYS)
    own = grpc.aio.insecure_channel(target) if way == "channel_drop" else None
    stub = PriceStreamServiceStub(own or shared)
    try:
        session = await stub.CreateSession(
            pb.CreateSessionRequest(tickers=rng.sample(tickers, 3)), timeout=20
        )
        timeout = rng.uniform(0.3, 1.0) if way == "deadline" else None
        call = stub.StreamPriceUpdates(
            pb.StreamPriceUpdatesRequest(session_id=session.session_id), timeout=timeout
        )
        leave_at = asyncio.get_running_loop().time() + rng.uniform(0.2, 1.2)
        try:
            while asyncio.get_running_loop().time() < leave_at:
                if await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF:
                    errors["ended"] += 1
                    return
        except grpc.aio.AioRpcError as exc:
            if not (way == "deadline" and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED):
                errors[exc.code().name] += 1
                return
        ways[way] += 1
        if way == "cancel" or way == "deadline":
            call.cancel()
        elif way == "close_session":
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        errors[exc.code().name] += 1
    except TimeoutError:
        errors["read_timeout"] += 1
    finally:
        if own is not None:
            await own.close()


async def main(target: str, count: int, concurrency: int, seed: int, tickers: list[str]) -> None:
    rng = random.Random(seed)
    ways: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as shared:

        async def gated() -> None:
            async with gate:
                await one(target, shared, rng, tickers, ways, errors)

        await asyncio.gather(*(gated() for _ in range(count)))
    print(json.dumps({"ways": dict(ways), "errors": dict(errors)}), flush=True)


if __name__ == "__main__":
    target, count, concurrency, seed, *tickers = sys.argv[1:]
    asyncio.run(main(target, int(count), int(concurrency), int(seed), tickers))
