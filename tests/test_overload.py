"""Overload: when the event loop runs late, the pod refuses new sessions with
RESOURCE_EXHAUSTED and turns not ready, then recovers; real server, real gRPC channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from conftest import fast_settings, ready_server
from invariants import samples, wait_invariant
from pricestream.flush import FlushClock
from pricestream.metrics import Metrics
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub


def test_lag_is_a_moving_average_of_lateness() -> None:
    clock = FlushClock(0.1, 10.0, Metrics(), on_stall=lambda writer: None)
    for _ in range(20):
        clock.observe_lag(0.5)
    assert clock.lag == pytest.approx(0.5, rel=0.02)
    clock.observe_lag(-1.0)  # early wake-ups count as on time, not as negative lateness
    assert clock.lag == pytest.approx(0.4, rel=0.02)
    assert not clock.overloaded  # no limit configured


def test_overload_has_hysteresis() -> None:
    clock = FlushClock(0.1, 10.0, Metrics(), on_stall=lambda writer: None, overload_lag=0.2)
    while not clock.overloaded:
        clock.observe_lag(0.5)
    assert clock.lag > 0.2
    while clock.lag > 0.15:  # below the limit, above half of it: still overloaded
        clock.observe_lag(0.12)
        assert clock.overloaded
    while clock.overloaded:
        clock.observe_lag(0.0)
    assert clock.lag <= 0.1


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
