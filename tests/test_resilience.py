"""Redis failures against real processes: restarts, absence at start, killed Pub/Sub
connections, a Redis that accepts TCP but never answers, a Pub/Sub socket that works one way
(a TCP proxy stalls one direction)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from pricestream.api.server import Server
from pricestream.tasks import cancel_and_wait
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, wait_invariant
from support.market import Market
from support.redis_server import RedisProcess
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch
from support.tcp_proxy import stalling_proxy
from support.waiting import free_port, wait_until

TICKERS = ["AAPL", "MSFT", "GOOG"]


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


async def http_status(session: aiohttp.ClientSession, port: int) -> tuple[int, float]:
    """/readyz's status code and pricestream_redis_up, both over HTTP."""
    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
        ready = response.status
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        redis_up = samples(await response.text())["pricestream_redis_up"]
    return ready, redis_up


async def wait_http(session, port: int, wanted: tuple[int, float], timeout: float) -> float:
    started = time.monotonic()
    while (seen := await http_status(session, port)) != wanted:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"/readyz and redis_up {seen}, not {wanted} within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def fresh_update(call, ticker: str, after_ns: int, timeout: float) -> pb.PriceUpdate:
    """The first update of ``ticker`` published after ``after_ns`` on the stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await next_batch(call, timeout=max(0.1, deadline - time.monotonic()))
        for update in batch.updates:
            if update.ticker == ticker and update.published_at_unix_nanos > after_ns:
                return update
    raise AssertionError(f"no fresh {ticker} price within {timeout}s")


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_one_way_pubsub_stall_turns_unready_and_recovers(
    own_redis: RedisProcess, direction: str
) -> None:
    """A TCP proxy between the server and Redis stalls one direction of the Pub/Sub sockets
    (upstream: the pod's SUBSCRIBEs and PINGs wait, Redis's messages still arrive; downstream:
    a black hole for what Redis sends). Readiness and redis_up turn false within probe interval
    + timeout, the connections are replaced, and after the stall new tickers get subscribed
    and every stream gets fresh prices."""
    interval, probe_timeout = 1.0, 0.5
    async with (
        stalling_proxy(own_redis.port) as proxy,
        ready_server(
            fast_settings(proxy.url, probe_interval=interval, probe_timeout=probe_timeout)
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        aiohttp.ClientSession() as http,
    ):
        stub = PriceStreamServiceStub(channel)
        market = Market(own_redis.url, ["AAPL", "NEWT"])  # straight to Redis, not the proxy
        await market.tick("AAPL", "NEWT")

        async def feed() -> None:
            while True:
                await market.tick("AAPL")
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(feed())
        try:
            old = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
            old_call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=old.session_id)
            )
            await fresh_update(old_call, "AAPL", time.time_ns(), 3)
            assert await http_status(http, server.http_port) == (200, 1.0)
            opened = server.engine.metrics.connections_opened._value.get()

            proxy.stall(direction)
            took = await wait_http(
                http, server.http_port, (503, 0.0), interval + probe_timeout + 1.5
            )
            print(f"{direction} stall: /readyz 503 and redis_up 0 after {took:.2f}s")
            # The stalled sockets were given up and new ones opened (they stall too, so the
            # pod stays unready for as long as the stall lasts).
            await wait_until(
                lambda: server.engine.metrics.connections_opened._value.get() > opened,
                5,
                "a replacement Pub/Sub connection",
            )
            await asyncio.sleep(interval + probe_timeout)
            assert await http_status(http, server.http_port) == (503, 0.0)

            # A session for a ticker nobody held yet: only its stored price until the stall ends.
            new = await stub.CreateSession(pb.CreateSessionRequest(tickers=["NEWT"]))
            new_call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=new.session_id)
            )
            seeded = await next_batch(new_call)
            assert [u.ticker for u in seeded.updates] == ["NEWT"]

            proxy.resume(direction)
            resumed_ns = time.time_ns()
            await wait_http(http, server.http_port, (200, 1.0), 10)
            await wait_until(lambda: numsub(own_redis, "price:NEWT") == 1, 5, "NEWT subscribed")
            await market.tick("NEWT")
            await fresh_update(new_call, "NEWT", resumed_ns, 3)
            await fresh_update(old_call, "AAPL", resumed_ns, 3)
            # The given-up sockets are gone from Redis too: just the two live ones subscribed.
            await wait_until(lambda: pubsub_clients(own_redis) == 2, 10, "2 Pub/Sub clients")
            assert server.engine.metrics.redis_reconnects._value.get() >= 1
            old_call.cancel()
            new_call.cancel()
        finally:
            # Repeated until it ends: redis-py's asyncio.wait_for can swallow a cancel on 3.11.
            await cancel_and_wait([feeder])
            with contextlib.suppress(asyncio.CancelledError):
                await feeder  # what it raised before the cancel, if anything
            await market.aclose()
        await wait_invariant(server, timeout=10)
