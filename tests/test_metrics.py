"""Metrics: gRPC server metrics by the go-grpc-prometheus names; no per-ticker or per-session
label; counters and live gauges agree after a mixed scenario."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from invariants import samples, wait_invariant
from pricestream.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from prometheus_client.parser import text_string_to_metric_families
from test_api import Market, next_batch

SERVICE = "pricestream.v1.PriceStreamService"


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_grpc_server_metrics_and_label_cardinality(
    stub: PriceStreamServiceStub, server: Server, redis
) -> None:
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateSession(pb.CreateSessionRequest(tickers=[]))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    await next_batch(call)
    await market.tick("AAPL")
    await next_batch(call)
    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    await call.code()
    await market.aclose()
    await wait_invariant(server)

    text = server.engine.metrics.exposition().decode()
    unary = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "CreateSession"}
    stream = {
        "grpc_type": "server_stream",
        "grpc_service": SERVICE,
        "grpc_method": "StreamPriceUpdates",
    }
    assert value(text, "grpc_server_started_total", **unary) == 2
    assert value(text, "grpc_server_handled_total", **unary, grpc_code="OK") == 1
    assert value(text, "grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT") == 1
    assert value(text, "grpc_server_started_total", **stream) == 1
    assert value(text, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert value(text, "grpc_server_msg_sent_total", **stream) == 2
    assert value(text, "grpc_server_handling_seconds_count", **stream) == 1
    assert value(text, "pricestream_delivery_latency_seconds_count") == 2

    # Cardinality: no label value anywhere is a ticker or a session id.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label_value in sample.labels.values():
                assert label_value not in ("AAPL", session.session_id), sample


async def test_counters_and_gauges_agree_after_a_mixed_scenario(server: Server, redis) -> None:
    market = Market(redis.url, ["AAPL", "MSFT", "GOOG"])
    await market.tick("AAPL", "MSFT", "GOOG")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = PriceStreamServiceStub(channel)
        calls = []
        for i in range(12):
            tickers = ["AAPL", "MSFT", "GOOG"][: 1 + i % 3]
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            await next_batch(call)
            calls.append((session, call))
        # Mid-scenario: every opened - closed pair equals its live gauge.
        values = samples(server.engine.metrics.exposition().decode())
        assert values["pricestream_streams_active"] == 12 == len(server.engine.registry)
        sessions_net = values["pricestream_sessions_opened_total"] - values.get(
            "pricestream_sessions_closed_total", 0
        )
        assert sessions_net == values["pricestream_sessions_active"]
        subscriptions_net = (
            values["pricestream_pubsub_subscriptions_opened_total"]
            - values["pricestream_pubsub_subscriptions_closed_total"]
        )
        assert subscriptions_net == values["pricestream_pubsub_subscriptions_active"] == 3
        assert server.engine.hub.subscriptions_active == 3
        for session, _ in calls[:4]:
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        for _, call in calls[4:8]:
            call.cancel()
    # The channel closed with calls[8:] still open: the client went away.
    await market.aclose()
    values = await wait_invariant(server)
    assert values["pricestream_streams_opened_total"] == 12


async def test_scrape_with_1000_streams(server: Server, redis) -> None:
    """A data point for the note (not a timed assertion): scrape time at 1,000 streams."""
    market = Market(redis.url, ["AAPL", "MSFT"])
    await market.tick("AAPL", "MSFT")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = PriceStreamServiceStub(channel)

        async def one():
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL", "MSFT"]))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            await next_batch(call, timeout=20)
            return call

        calls = await asyncio.gather(*(one() for _ in range(1000)))
        started = time.perf_counter()
        for _ in range(20):
            text = server.engine.metrics.exposition()
        per_scrape_ms = (time.perf_counter() - started) / 20 * 1000
        print(f"\nscrape with 1,000 streams: {per_scrape_ms:.2f} ms, {len(text)} bytes")
        assert samples(text.decode())["pricestream_streams_active"] == 1000
        for call in calls:
            call.cancel()
    await market.aclose()
    await wait_invariant(server, timeout=20)
