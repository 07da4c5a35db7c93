"""A client process that opens N streams and reads them until it is killed.

Usage: stream_forever.py TARGET N TICKER [TICKER ...]
Prints "streaming N" once every stream has received its first batch.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub


async def main(target: str, count: int, tickers: list[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = PriceStreamServiceStub(channel)
        first = asyncio.Event()
        started = 0

        async def one(index: int) -> None:
            nonlocal started
            chosen = [tickers[(index + k) % len(tickers)] for k in range(3)]
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            async for _ in call:
                if index >= 0:
                    started += 1
                    index = -1
                    if started == count:
                        first.set()

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await first.wait()
        print(f"streaming {count}", flush=True)
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
