"""Bearer-token authentication and the maximum connection age."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch, read_to_end

GOOD = (("authorization", "Bearer tok-good"),)


@pytest.mark.parametrize("source", ["env", "file"])
async def test_every_call_needs_a_valid_bearer_token(redis, tmp_path: Path, source: str) -> None:
    if source == "env":
        settings = fast_settings(redis.url, auth_tokens="tok-other, tok-good")
    else:
        path = tmp_path / "tokens"
        path.write_text("tok-other\ntok-good\n")
        settings = fast_settings(redis.url, auth_tokens_file=str(path))
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            for metadata in ((), (("authorization", "Bearer tok-bad"),), (("authorization", ""),)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateSession(request, metadata=metadata)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert raised.value.details() == "missing or invalid bearer token"
            session = await stub.CreateSession(request, metadata=GOOD)
            stream_request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            unauthenticated = stub.StreamPriceUpdates(stream_request)
            assert await read_to_end(unauthenticated) == grpc.StatusCode.UNAUTHENTICATED
            call = stub.StreamPriceUpdates(stream_request, metadata=GOOD)
            assert (await next_batch(call)).updates[0].ticker == "AAPL"
            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await stub.CloseSession(
                pb.CloseSessionRequest(session_id=session.session_id), metadata=GOOD
            )
        await wait_invariant(server)
    await market.aclose()


async def test_old_connection_is_moved_off_and_the_session_resumes(redis) -> None:
    settings = fast_settings(redis.url, max_connection_age=1.0, max_connection_age_grace=0.5)
    market = Market(redis.url, ["MSFT"])
    await market.tick("MSFT")
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["MSFT"]))
            request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            call = stub.StreamPriceUpdates(request)
            await next_batch(call)
            # Past age + grace the connection is closed under the stream.
            code = await read_to_end(call, timeout=10)
            assert code == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.2)
            resumed = stub.StreamPriceUpdates(request)  # the channel reconnects by itself
            assert (await next_batch(resumed)).updates[0].ticker == "MSFT"
            resumed.cancel()
        await wait_invariant(server)
    await market.aclose()
