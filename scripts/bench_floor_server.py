"""A bare grpc.aio server with pricestream's wire shape and nothing else: the floor.

`make bench` runs it under the same load as `pricestream serve` to show what grpc-python
itself costs per streamed message on one core, so a reader can tell the server's own overhead
from the library's. It answers CreateSession with a random id, and StreamPriceUpdates with one
PriceUpdateBatch of ``--tickers-per-session`` updates per flush, stamped at write time; it
has no Redis, no sessions store, no coalescing, no metrics. CloseSession ends the stream.

    python scripts/bench_floor_server.py --port 50061 --flush 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import grpc
import uvloop
from pricestream.v1.pricestream_pb2 import (
    CloseSessionRequest,
    PriceUpdate,
    PriceUpdateBatch,
    Session,
    StreamPriceUpdatesRequest,
)

SERVICE = "pricestream.v1.PriceStreamService"


class Stream:
    """One open stream: woken by the clock, writes when due (like pricestream's writers)."""

    def __init__(self) -> None:
        self.due = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self.due = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class FloorService:
    def __init__(self, flush: float, updates_per_batch: int) -> None:
        self._flush = flush
        self._updates = updates_per_batch
        self._streams: dict[str, Stream] = {}

    async def clock(self) -> None:
        loop = asyncio.get_running_loop()
        next_flush = loop.time()
        while True:
            next_flush = max(next_flush + self._flush, loop.time())
            await asyncio.sleep(next_flush - loop.time())
            for stream in list(self._streams.values()):
                stream.wake()

    async def create(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return Session(session_id=secrets.token_hex(8)).SerializeToString()

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        session_id = StreamPriceUpdatesRequest.FromString(request).session_id
        stream = self._streams[session_id] = Stream()
        loop = asyncio.get_running_loop()
        try:
            while not stream.closed:
                while not stream.due and not stream.closed:
                    stream.waiter = loop.create_future()
                    await stream.waiter
                stream.due = False
                if stream.closed:
                    break
                stamp = time.time_ns()
                batch = PriceUpdateBatch(
                    updates=[
                        PriceUpdate(ticker="AAPL", price=1.0, published_at_unix_nanos=stamp)
                        for _ in range(self._updates)
                    ]
                )
                await context.write(batch.SerializeToString())
        finally:
            del self._streams[session_id]

    async def close(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        stream = self._streams.get(CloseSessionRequest.FromString(request).session_id)
        if stream is not None:
            stream.closed = True
            stream.wake()
        return b""

    def handler(self) -> grpc.GenericRpcHandler:
        def same(payload: bytes) -> bytes:
            return payload

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateSession": grpc.unary_unary_rpc_method_handler(self.create, same, same),
                "StreamPriceUpdates": grpc.unary_stream_rpc_method_handler(self.stream, same, same),
                "CloseSession": grpc.unary_unary_rpc_method_handler(self.close, same, same),
            },
        )


async def serve(port: int, flush: float, updates_per_batch: int) -> None:
    service = FloorService(flush, updates_per_batch)
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 20_000)])
    server.add_generic_rpc_handlers((service.handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    clock = asyncio.create_task(service.clock())
    try:
        await server.wait_for_termination()
    finally:
        clock.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--flush", type=float, default=0.5, help="seconds between batches")
    parser.add_argument("--tickers-per-session", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.flush, args.tickers_per_session))


if __name__ == "__main__":
    main()
