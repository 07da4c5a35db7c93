"""The API's happy paths against a real redis-server and a real gRPC channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, wait_invariant
from support.market import Market
from support.servers import ready_server, wait_ready
from support.settings import fast_settings
from support.streams import next_batch, read_to_end


async def test_create_stream_close(stub: PriceStreamServiceStub, server: Server, redis) -> None:
    market = Market(redis.url, ["AAPL", "MSFT"])
    await market.tick("AAPL", "MSFT")  # last prices exist before the session
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["aapl", "MSFT", "AAPL"]))
    assert list(session.tickers) == ["AAPL", "MSFT"]
    assert len(session.session_id) == 22
    assert session.expires_at.seconds > time.time()

    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    first = await next_batch(call)
    assert sorted(u.ticker for u in first.updates) == ["AAPL", "MSFT"]
    assert all(u.sequence == 1 and u.price > 0 for u in first.updates)

    await market.tick("MSFT")
    second = await next_batch(call)
    assert [(u.ticker, u.sequence) for u in second.updates] == [("MSFT", 2)]

    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    assert await read_to_end(call) == grpc.StatusCode.OK  # CloseSession ends the stream
    await market.aclose()
    values = await wait_invariant(server, timeout=5)
    assert values["pricestream_sessions_closed_total"] == 1


async def test_coalescing_keeps_latest_per_ticker(redis) -> None:
    settings = fast_settings(redis.url, flush_interval=0.5)
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            market = Market(redis.url, ["AAPL", "MSFT"])
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL", "MSFT"]))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            await asyncio.sleep(0.3)  # subscribed; no last price yet, so nothing was sent
            for _ in range(20):
                await market.tick("AAPL", "MSFT")
            batch = await next_batch(call)
            while len(batch.updates) < 2 or any(u.sequence < 20 for u in batch.updates):
                batch = await next_batch(call)  # a flush may split the burst once
            assert sorted((u.ticker, u.sequence) for u in batch.updates) == [
                ("AAPL", 20),
                ("MSFT", 20),
            ]
            # Nothing changed since: no batch comes.
            with pytest.raises(asyncio.TimeoutError):
                await next_batch(call, timeout=1.2)
            values = samples(server.engine.metrics.exposition().decode())
            assert values["pricestream_price_updates_received_total"] == 40
            # One stream, nothing pending: every update it did not send was coalesced.
            sent = values["pricestream_price_updates_sent_total"]
            assert values["pricestream_price_updates_coalesced_total"] == 40 - sent >= 30
            call.cancel()
            await market.aclose()


async def test_session_streams_on_another_pod_and_only_once(redis) -> None:
    async with (
        Server(fast_settings(redis.url, pod_name="pod-a")) as pod_a,
        Server(fast_settings(redis.url, pod_name="pod-b")) as pod_b,
    ):
        await wait_ready(pod_a)
        await wait_ready(pod_b)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{pod_a.grpc_port}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{pod_b.grpc_port}") as channel_b,
        ):
            stub_a, stub_b = PriceStreamServiceStub(channel_a), PriceStreamServiceStub(channel_b)
            market = Market(redis.url, ["NVDA"])
            await market.tick("NVDA")
            session = await stub_a.CreateSession(pb.CreateSessionRequest(tickers=["NVDA"]))
            request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            call_b = stub_b.StreamPriceUpdates(request)
            assert (await next_batch(call_b)).updates[0].ticker == "NVDA"

            second = stub_a.StreamPriceUpdates(request)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await next_batch(second)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already streaming" in raised.value.details()

            # CloseSession on pod A ends the stream on pod B.
            await stub_a.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            assert await read_to_end(call_b) == grpc.StatusCode.OK
            await market.aclose()
        for pod in (pod_a, pod_b):
            await wait_invariant(pod, timeout=5)


async def test_session_resumable_after_stream_ends_then_expires(redis) -> None:
    settings = fast_settings(redis.url, resume_grace=1.5)
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            market = Market(redis.url, ["TSLA"])
            await market.tick("TSLA")
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["TSLA"]))
            request = pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            call = stub.StreamPriceUpdates(request)
            await next_batch(call)
            call.cancel()
            await asyncio.sleep(0.3)
            resumed = stub.StreamPriceUpdates(request)  # within the grace: same session
            assert (await next_batch(resumed)).updates[0].ticker == "TSLA"
            resumed.cancel()
            await asyncio.sleep(2.5)  # past the grace
            expired = stub.StreamPriceUpdates(request)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await next_batch(expired)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            await market.aclose()
        values = await wait_invariant(server, timeout=5)
        assert values["pricestream_sessions_closed_total"] == 2


async def test_never_streamed_session_expires(redis) -> None:
    settings = fast_settings(redis.url, session_ttl=1.0)
    async with ready_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["KO"]))
            assert len(server.engine.registry) == 1
            await asyncio.sleep(2.2)
            assert len(server.engine.registry) == 0  # zombie sweep
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await next_batch(call)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        text = server.engine.metrics.exposition().decode()
        assert 'pricestream_sessions_closed_total{reason="unclaimed"} 1.0' in text
