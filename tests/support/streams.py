"""Reading a gRPC price stream in a test: the next batch, or on to its end."""

from __future__ import annotations

import asyncio

import grpc
from pricestream.v1 import pricestream_pb2 as pb


async def next_batch(call, timeout: float = 3.0) -> pb.PriceUpdateBatch:
    batch = await asyncio.wait_for(call.read(), timeout)
    assert batch is not grpc.aio.EOF, "the stream ended"
    return batch


async def read_to_end(call, timeout: float = 3.0) -> grpc.StatusCode:
    """Read until the server ends the stream; its status code."""
    try:
        while await asyncio.wait_for(call.read(), timeout) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()
