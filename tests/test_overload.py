"""Overload: when the event loop runs late, the pod refuses new sessions with
RESOURCE_EXHAUSTED and turns not ready, then recovers; real server, real gRPC channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pricestream.engine.flush import FlushClock
from pricestream.observability.metrics import Metrics
from pricestream.tools.feed import ticker_universe
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, wait_invariant
from support.processes import start_feed
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch
from support.web_clients import rest


def new_clock(**limits: float) -> FlushClock:
    return FlushClock(0.1, 10.0, Metrics(), on_stall=lambda writer: None, **limits)


def test_lag_is_a_moving_average_of_lateness() -> None:
    clock = new_clock()
    for _ in range(20):
        clock.observe(0.5, 0.0)
    assert clock.lag == pytest.approx(0.5, rel=0.02)
    clock.observe(-1.0, 0.0)  # early wake-ups count as on time, not as negative lateness
    assert clock.lag == pytest.approx(0.4, rel=0.02)
    assert not clock.overloaded  # no limit configured


def test_overload_has_hysteresis() -> None:
    clock = new_clock(overload_lag=0.2)
    while not clock.overloaded:
        clock.observe(0.5, 0.0)
    assert clock.lag > 0.2
    while clock.lag > 0.15:  # below the limit, above half of it: still overloaded
        clock.observe(0.12, 0.0)
        assert clock.overloaded
    while clock.overloaded:
        clock.observe(0.0, 0.0)
    assert clock.lag <= 0.1


def test_backlog_overloads_a_punctual_clock_and_both_signs_must_calm_down() -> None:
    clock = new_clock(overload_lag=0.5, overload_backlog=0.5)
    while not clock.overloaded:
        clock.observe(0.01, 0.9)  # on time, but 90% of the writers are still writing
    assert clock.backlog > 0.5 and clock.lag < 0.25
    assert clock.overload_reason().endswith(
        "% of its streams with news are still writing their previous batch"
    )
    for _ in range(10):
        clock.observe(0.45, 0.9)  # then the clock runs late too
    for _ in range(30):
        clock.observe(0.45, 0.0)  # backlog gone, lag above half its limit: still overloaded
    assert clock.backlog < 0.01 and clock.overloaded
    assert clock.overload_reason() == "its flushes run 450 ms late"
    while clock.overloaded:
        clock.observe(0.0, 0.0)
    assert clock.lag <= 0.25 and clock.backlog <= 0.25


def test_backlog_limit_zero_turns_that_sign_off() -> None:
    clock = new_clock(overload_lag=0.5, overload_backlog=0.0)
    for _ in range(50):
        clock.observe(0.0, 1.0)
    assert clock.backlog == pytest.approx(1.0, rel=0.01) and not clock.overloaded


async def block_the_loop(seconds: float, chunk: float) -> None:
    """CPU-bound work on the event loop, in chunks, like a saturated pod."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(chunk)  # noqa: ASYNC251 - blocking on purpose: this is the overload
        await asyncio.sleep(0)


async def test_overloaded_pod_refuses_sessions_and_recovers(redis) -> None:
    async with ready_server(fast_settings(redis.url, overload_lag=0.2)) as server:
        engine = server.engine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=["AAPL"])
            first = await stub.CreateSession(request)
            await block_the_loop(2.0, chunk=0.4)
            assert engine.overloaded and not engine.ready
            values = samples(engine.metrics.exposition().decode())
            assert values["pricestream_flush_lag_seconds"] > 0.2
            assert values["pricestream_ready"] == 0
            # The readiness probe's body says why (not Redis, not a drain).
            status, _, readyz = await rest(server.http_port, "GET", "/readyz")
            assert status == 503
            assert readyz["overloaded"] is True and readyz["redis_pubsub_healthy"] is True
            assert readyz["overload_reason"].startswith("its flushes run")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateSession(request)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details().startswith("this server is overloaded (its flushes run")
            assert refused.value.details().endswith("ms late); retry on another server")
            deadline = time.monotonic() + 5
            while engine.overloaded:
                assert time.monotonic() < deadline, "did not recover"
                await asyncio.sleep(0.05)
            assert engine.ready
            second = await stub.CreateSession(request)
            for session in (first, second):
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        await wait_invariant(server)


STALLING_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


async def open_stalled_streams(stub: PriceStreamServiceStub, count: int, tickers: list[str]):
    """Streams that read their first batch and then nothing: their writes stop completing.
    Sessions are created first: once enough streams are stalled the pod is overloaded and
    refuses new sessions (which is what the test is after), so they must exist by then."""
    sessions = [
        await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers)) for _ in range(count)
    ]
    calls = []
    for session in sessions:
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
        await next_batch(call)
        calls.append(call)
    return calls


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_write_backlog_overloads_a_pod_whose_clock_is_on_time(redis) -> None:
    """Most streams with news unable to finish their previous write is overload even when the
    flush clock is punctual; a handful of stalled clients is not."""
    universe = ticker_universe(50)
    feed = start_feed(redis.url, tickers=len(universe), rate=5000)
    settings = fast_settings(
        redis.url, overload_backlog=0.5, flush_interval=0.05, stall_timeout=60.0
    )
    try:
        async with ready_server(settings) as server:
            engine = server.engine
            target = f"127.0.0.1:{server.grpc_port}"
            async with (
                grpc.aio.insecure_channel(target) as channel,
                grpc.aio.insecure_channel(target, options=STALLING_WINDOW) as stalling,
            ):
                stub = PriceStreamServiceStub(channel)
                few = await open_stalled_streams(PriceStreamServiceStub(stalling), 10, universe)
                await asyncio.sleep(3)
                assert not engine.overloaded, "10 stalled clients made the pod overloaded"
                many = await open_stalled_streams(PriceStreamServiceStub(stalling), 60, universe)
                await wait_for(lambda: engine.overloaded, 20, "70 stalled streams: no overload")
                assert engine.clock.lag < 0.25 and not engine.ready
                values = samples(engine.metrics.exposition().decode())
                assert values["pricestream_flush_backlog_ratio"] > 0.5
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert refused.value.details().endswith(
                    "of its streams with news are still writing their previous batch); "
                    "retry on another server"
                )
                for call in few + many:
                    call.cancel()
                await wait_for(lambda: not engine.overloaded, 20, "did not recover")
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            await wait_invariant(server)
    finally:
        feed.kill()
        feed.wait()
