"""Metrics: gRPC server metrics by the go-grpc-prometheus names; no per-ticker or per-session
label; counters and live gauges agree after a mixed scenario."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from prometheus_client.parser import text_string_to_metric_families
from support.invariants import samples, wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch, read_to_end

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
    unary = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "CreateSession"}
    stream = {
        "grpc_type": "server_stream",
        "grpc_service": SERVICE,
        "grpc_method": "StreamPriceUpdates",
    }
    live = server.engine.metrics.exposition().decode()
    assert value(live, "grpc_server_msg_sent_total", **stream) == 2  # counted as they go
    assert value(live, "grpc_server_msg_received_total", **stream) == 1  # its request
    await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    await call.code()
    await market.aclose()
    await wait_invariant(server)

    text = server.engine.metrics.exposition().decode()
    assert value(text, "grpc_server_started_total", **unary) == 2
    assert value(text, "grpc_server_handled_total", **unary, grpc_code="OK") == 1
    assert value(text, "grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT") == 1
    assert value(text, "grpc_server_msg_sent_total", **unary) == 1  # the refused call sent none
    assert value(text, "grpc_server_msg_received_total", **unary) == 2
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


async def test_counters_and_gauges_agree_after_a_mixed_scenario(own_redis) -> None:
    """Normal ends, cancels, a vanished client, send errors and a Redis restart."""
    # 128-byte sends: 1-3 ticker batches fit, a 5-ticker first batch fails to send.
    settings = fast_settings(own_redis.url, max_send_message_bytes=128, redis_outage_limit=30.0)
    tickers = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA"]
    market = Market(own_redis.url, tickers)
    await market.tick(*tickers)
    async with ready_server(settings) as server:
        engine = server.engine

        def check_pairs() -> dict[str, float]:
            """opened - closed == active for each pair, and == a fresh look at the registries."""
            values = samples(engine.metrics.exposition().decode())
            for prefix, live in (
                ("pricestream_sessions", len(engine.registry)),
                ("pricestream_streams", engine.streams_active),
                ("pricestream_pubsub_subscriptions", engine.hub.subscriptions_active),
                ("pricestream_redis_pubsub_connections", engine.broker.connections_active),
            ):
                net = values.get(f"{prefix}_opened_total", 0) - values.get(
                    f"{prefix}_closed_total", 0
                )
                assert net == values[f"{prefix}_active"] == live, prefix
            return values

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            calls = []
            for i in range(12):
                chosen = tickers[: 1 + i % 3]
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
                call = stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                await next_batch(call)
                calls.append((session, call))
            for _ in range(2):  # send errors
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
                failing = stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                assert await read_to_end(failing) == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.2)
            check_pairs()

            own_redis.kill()  # Redis restart mid-stream
            own_redis.start()
            for _ in range(200):  # both Pub/Sub connections noticed, reconnected, probed
                reconnects = engine.metrics.redis_reconnects._value.get()
                if reconnects >= 2 and engine.broker.healthy:
                    break
                await asyncio.sleep(0.05)
            assert engine.broker.healthy
            values = check_pairs()
            assert values["pricestream_redis_reconnects_total"] >= 2
            assert values["pricestream_streams_active"] == 12  # streams rode it out

            for session, _ in calls[:4]:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            for _, call in calls[4:8]:
                call.cancel()
            await asyncio.sleep(0.2)
            check_pairs()
        # The channel closed with calls[8:] still open: the client went away.
        values = await wait_invariant(server)
        check_pairs()
        assert values["pricestream_streams_opened_total"] == 14
        text = engine.metrics.exposition().decode()
        assert 'pricestream_streams_closed_total{reason="send_error"} 2.0' in text
    await market.aclose()


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


def test_batch_latency_histogram_matches_prometheus_client() -> None:
    """The hot-path histogram exposes what prometheus_client's Histogram would."""
    import random

    from pricestream.observability.latency import BatchLatencyHistogram
    from pricestream.observability.metrics import LATENCY_BUCKETS
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchLatencyHistogram("x_seconds", "doc", LATENCY_BUCKETS)
    ours_registry.register(ours)
    reference = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=reference_registry)
    rng = random.Random(3)
    delays = [rng.choice([*LATENCY_BUCKETS, 0.0004, 0.07, 42.0]) for _ in range(2000)]
    delays += [-0.001, 0.0]  # a publisher clock ahead of ours, and a delay of exactly 0
    now_ns = 1_800_000_000 * 10**9
    # Small calls take the search per update, large ones (a whole flush) the tallied path.
    sizes = [5, 1, 700, 3, 16, 1277]
    start = 0
    for size in sizes:
        batch = delays[start : start + size]
        start += size
        ours.observe_batch(now_ns, [now_ns - round(d * 1e9) for d in batch])
        for delay in batch:
            reference.observe(delay)

    def bucket_lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_bucket" in line or "_count" in line)

    assert start == len(delays)
    assert bucket_lines(ours_registry) == bucket_lines(reference_registry)
    assert abs(ours._sum_ns / 1e9 - sum(delays)) < 1e-6


async def test_the_freshness_margin_setting_moves_the_latency_bucket(redis) -> None:
    """flush_interval 0.05 + freshness_margin 0.3: the server's histogram has a bucket at
    0.35 (the freshness SLO's `le`), which is none of the standard bounds."""
    from pricestream.observability.metrics import LATENCY_BUCKETS

    assert 0.35 not in LATENCY_BUCKETS
    settings = fast_settings(redis.url, freshness_margin=0.3)
    async with ready_server(settings) as server:
        text = server.engine.metrics.exposition().decode()
    bounds = {
        sample.labels["le"]
        for family in text_string_to_metric_families(text)
        if family.name == "pricestream_delivery_latency_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    assert "0.35" in bounds, sorted(bounds)
