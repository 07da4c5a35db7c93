"""Redis failures against real processes: restarts, absence at start, killed Pub/Sub
connections, a Redis that accepts TCP but never answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import RedisProcess, fast_settings, free_port, ready_server
from invariants import samples, wait_invariant
from pricestream.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from test_api import Market, next_batch

TICKERS = ["AAPL", "MSFT", "GOOG"]


async def wait_until(predicate, timeout: float, what: str) -> float:
    """Seconds it took for ``predicate()`` to hold; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def pubsub_clients(redis: RedisProcess) -> int:
    client = redis.client()
    try:
        return sum(1 for c in client.client_list() if int(c.get("sub", 0)) > 0)
    finally:
        client.close()


def numsub(redis: RedisProcess, channel: str) -> int:
    client = redis.client()
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


async def test_redis_restarted_five_times_mid_stream(own_redis: RedisProcess) -> None:
    settings = fast_settings(own_redis.url, redis_outage_limit=30.0)
    async with ready_server(settings) as server:
        engine = server.engine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            market = Market(own_redis.url, TICKERS)
            await market.tick(*TICKERS)
            await market.aclose()
            calls = []
            for _ in range(4):
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=TICKERS))
                call = stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                await next_batch(call)  # streaming before the first restart
                calls.append(call)
            for round_ in range(5):
                own_redis.kill()
                took = await wait_until(lambda: not engine.ready, 5, "readiness drops")
                assert took < 3, f"round {round_}: readiness dropped after {took:.2f}s"
                assert samples(engine.metrics.exposition().decode())["pricestream_redis_up"] == 0
                own_redis.start()  # same port, empty: no persistence
                await wait_until(lambda: engine.ready, 15, "readiness returns")
                market = Market(own_redis.url, TICKERS)
                await market.tick(*TICKERS)
                for call in calls:  # every stream is still open and gets the current price
                    seen: set[str] = set()
                    while seen != set(TICKERS):
                        batch = await next_batch(call, timeout=5)
                        seen |= {u.ticker for u in batch.updates}
                await market.aclose()
                # One subscription per ticker and one client per Pub/Sub connection: no dupes,
                # no orphaned connection left behind by the reconnect.
                for ticker in TICKERS:
                    assert numsub(own_redis, f"price:{ticker}") == 1
                assert pubsub_clients(own_redis) == settings.pubsub_connections
            assert engine.streams_active == 4
            values = samples(engine.metrics.exposition().decode())
            assert values["pricestream_redis_reconnects_total"] >= 5 * settings.pubsub_connections
            for call in calls:
                call.cancel()
        await wait_invariant(server)


async def test_redis_unreachable_at_start_then_appears(tmp_path) -> None:
    redis = RedisProcess(tmp_path)  # its port is chosen, nothing listens yet
    async with Server(fast_settings(redis.url)) as server:
        await asyncio.sleep(1.0)
        assert not server.engine.ready
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            redis.start()
            try:
                await wait_until(lambda: server.engine.ready, 10, "ready once Redis is up")
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                assert session.session_id
            finally:
                redis.kill()


async def test_killed_pubsub_connection_is_repaired(own_redis: RedisProcess) -> None:
    async with ready_server(fast_settings(own_redis.url)) as server:
        engine = server.engine
        client = own_redis.client()
        killed = 0
        for info in client.client_list():
            if int(info.get("sub", 0)) > 0:
                client.client_kill_filter(_id=info["id"])
                killed += 1
        client.close()
        assert killed == 2
        await wait_until(
            lambda: engine.metrics.redis_reconnects._value.get() >= 2 and engine.ready,
            10,
            "both Pub/Sub connections replaced",
        )
        assert pubsub_clients(own_redis) == 2
        values = samples(engine.metrics.exposition().decode())
        assert values["pricestream_redis_pubsub_connections_active"] == 2
        assert values["pricestream_redis_pubsub_connections_closed_total"] == 2


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    port = free_port()
    server = await asyncio.start_server(hold, "127.0.0.1", port)
    try:
        yield port
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_silent_redis_hangs_nothing() -> None:
    async with silent_redis() as port:
        settings = fast_settings(f"redis://127.0.0.1:{port}/0", redis_timeout=0.5)
        started = time.monotonic()
        async with Server(settings) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                call_started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]), timeout=10)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - call_started < 3  # bounded by the Redis timeout
            assert not server.engine.ready
        assert time.monotonic() - started < 10  # and shutdown did not hang either
