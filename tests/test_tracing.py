"""Traces reach a real OTLP gRPC receiver (run in-process) with the caller's trace continued."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import wait_invariant
from support.market import Market
from support.monitoring import Prometheus
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch, read_to_end

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = value.string_value or value.int_value or value.bool_value
    return out


async def test_spans_reach_the_otlp_receiver(receiver, redis, monkeypatch) -> None:
    servicer, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pricestream-test")
    market = Market(redis.url, ["AAPL"])
    await market.tick("AAPL")
    async with ready_server(fast_settings(redis.url)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(
                pb.CreateSessionRequest(tickers=["AAPL"]), metadata=TRACEPARENT
            )
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id), metadata=TRACEPARENT
            )
            await next_batch(call)
            await stub.CloseSession(
                pb.CloseSessionRequest(session_id=session.session_id), metadata=TRACEPARENT
            )
            assert await read_to_end(call) == grpc.StatusCode.OK
        await wait_invariant(server)
    await market.aclose()  # leaving the server flushed its spans to the receiver
    for _ in range(50):
        if len({s.name for s in servicer.spans}) >= 4:
            break
        await asyncio.sleep(0.1)
    by_name = {span.name: span for span in servicer.spans}
    service = "pricestream.v1.PriceStreamService"
    create = by_name[f"{service}/CreateSession"]
    stream = by_name[f"{service}/StreamPriceUpdates"]
    close = by_name[f"{service}/CloseSession"]
    subscribe = by_name["pubsub.subscribe"]
    for span in (create, stream, close):
        assert span.trace_id.hex() == CALLER_TRACE  # the caller's trace continued
        assert span.parent_span_id.hex() == CALLER_SPAN
    assert subscribe.parent_span_id == stream.span_id  # subscribed while the stream started
    stream_attributes = attributes(stream)
    assert stream_attributes["pricestream.close_reason"] == "closed"
    assert stream_attributes["pricestream.batches_sent"] >= 1
    assert stream_attributes["pricestream.updates_sent"] >= 1
    assert attributes(subscribe)["messaging.destination.name"] == "price:AAPL"
    assert stream.end_time_unix_nano > stream.start_time_unix_nano
    assert os.environ["OTEL_SERVICE_NAME"] == "pricestream-test"


async def test_tracing_off_without_an_endpoint(redis, monkeypatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    async with Server(fast_settings(redis.url)) as server:
        assert not server.engine.tracing.enabled


async def test_json_logs_carry_trace_ids_and_never_the_password(
    receiver, own_redis, tmp_path
) -> None:
    from support.processes import ServeProcess
    from support.settings import fast_env

    _, port = receiver
    password = "s3cr3t-Pa55w0rd"
    client = own_redis.client()
    client.config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{own_redis.port}/0"
    env = fast_env(url, log_level="INFO")
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    server = await asyncio.to_thread(ServeProcess, env, tmp_path / "serve.log")
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(
                pb.CreateSessionRequest(tickers=["AAPL"]), metadata=TRACEPARENT
            )
        await asyncio.to_thread(server.terminate)
    finally:
        server.stop()
    records = server.records()
    opened = [r for r in records if r.get("event") == "session_opened"]
    assert opened[0]["session_id"] == session.session_id
    assert opened[0]["trace_id"] == CALLER_TRACE
    assert len(opened[0]["span_id"]) == 16
    assert all("unparsed" not in r for r in records)  # one JSON object per line
    text = (tmp_path / "serve.log").read_text()
    assert password not in text
    assert "redis://:***@127.0.0.1" in text  # the URL is logged, redacted


EXEMPLAR = re.compile(
    r'^pricestream_delivery_latency_seconds_bucket\{le="([^"]+)"\} \S+ '
    r'# \{trace_id="([0-9a-f]{32})"\} (\S+) (\S+)$'
)


async def test_latency_exemplars_carry_trace_ids_the_receiver_got(receiver, redis, monkeypatch):
    """The OpenMetrics exposition (what Prometheus with exemplar storage asks for) has
    exemplars on the delivery-latency buckets: each a trace id of a `pricestream.delivery`
    span that reached the OTLP receiver, its value within its bucket; the plain text format
    has none."""
    servicer, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    market = Market(redis.url, ["AAPL", "MSFT"])
    async with ready_server(fast_settings(redis.url)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL", "MSFT"]))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            for _ in range(5):
                await market.tick("AAPL", "MSFT")
                await next_batch(call)
            body, content_type = server.engine.metrics.exposition_for(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )
            plain, plain_type = server.engine.metrics.exposition_for("text/plain")
            call.cancel()
    await market.aclose()
    assert content_type.startswith("application/openmetrics-text")
    assert plain_type.startswith("text/plain") and b"trace_id" not in plain
    exemplars = [m.groups() for m in map(EXEMPLAR.match, body.decode().splitlines()) if m]
    assert exemplars, body.decode()[-3000:]
    bounds = [float(le) for le, *_ in exemplars]
    for le, _, value, _ in exemplars:
        assert float(value) <= float(le)
    assert len(set(bounds)) == len(bounds)  # one exemplar per bucket
    for _ in range(50):
        delivered = {s.trace_id.hex() for s in servicer.spans if s.name == "pricestream.delivery"}
        if delivered:
            break
        await asyncio.sleep(0.1)
    assert {trace_id for _, trace_id, _, _ in exemplars} <= delivered


async def test_prometheus_stores_exemplars_with_trace_ids_the_receiver_got(
    receiver, redis, monkeypatch, tmp_path
) -> None:
    """A real Prometheus (exemplar storage on) scraping a real pricestream's /metrics with
    tracing on: it asks for OpenMetrics, gets the latency histogram's exemplars and stores
    them; `query_exemplars` answers trace ids of `pricestream.delivery` spans that reached the
    OTLP receiver."""
    servicer, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    market = Market(redis.url, ["AAPL", "MSFT"])
    start = time.time() - 5
    stored: list[dict] = []
    async with ready_server(fast_settings(redis.url)) as server:
        prometheus = await asyncio.to_thread(
            Prometheus, tmp_path, {"pod-a": f"127.0.0.1:{server.http_port}"}, {}
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                session = await stub.CreateSession(
                    pb.CreateSessionRequest(tickers=["AAPL", "MSFT"])
                )
                call = stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                deadline = time.monotonic() + 30
                while not stored and time.monotonic() < deadline:
                    await market.tick("AAPL", "MSFT")
                    await next_batch(call)
                    await asyncio.sleep(0.5)
                    stored = await asyncio.to_thread(
                        prometheus.exemplars,
                        "pricestream_delivery_latency_seconds_bucket",
                        start,
                        time.time() + 5,
                    )
                call.cancel()
        finally:
            prometheus.stop()
    await market.aclose()
    assert stored, "Prometheus stored no exemplar within 30 s"
    trace_ids = set()
    for series in stored:
        assert series["seriesLabels"]["__name__"] == "pricestream_delivery_latency_seconds_bucket"
        assert series["seriesLabels"]["pod"] == "pod-a"
        for exemplar in series["exemplars"]:
            assert float(exemplar["value"]) <= float(series["seriesLabels"]["le"])
            trace_ids.add(exemplar["labels"]["trace_id"])
    assert trace_ids and all(re.fullmatch("[0-9a-f]{32}", t) for t in trace_ids), trace_ids
    for _ in range(50):
        delivered = {s.trace_id.hex() for s in servicer.spans if s.name == "pricestream.delivery"}
        if trace_ids <= delivered:
            break
        await asyncio.sleep(0.1)
    assert trace_ids <= delivered, (trace_ids, len(delivered))
    print(f"\nPrometheus stored {len(trace_ids)} exemplar trace ids, all received over OTLP")
