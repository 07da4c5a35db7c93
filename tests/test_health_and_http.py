"""gRPC health and reflection, and the HTTP /metrics, /healthz and /readyz endpoints."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pricestream.api.server import Server
from pricestream.api.service import SERVICE_NAME


async def get(port: int, path: str) -> tuple[int, bytes]:
    """GET from a thread: the server under test runs on this test's event loop."""
    return await asyncio.to_thread(_get, port, path)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _get_with(port: int, path: str, accept: str | None) -> tuple[str, bytes]:
    """(Content-Type, body) of a GET sending ``accept`` (None: no Accept header, as urllib)."""
    headers = {} if accept is None else {"Accept": accept}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read()


# What Prometheus 2.42 sends with every scrape (scrape/scrape.go, scrapeAcceptHeader).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def test_grpc_health_and_reflection(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            for _ in range(20):  # readiness reaches the health service within 250 ms
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names

        await server.drain()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_http_endpoints(server: Server) -> None:
    status, body = await get(server.http_port, "/healthz")
    assert status == 200
    status, body = await get(server.http_port, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = await get(server.http_port, "/metrics")
    assert status == 200
    text = body.decode()
    for name in (
        "pricestream_sessions_active",
        "pricestream_streams_active",
        "pricestream_pubsub_subscriptions_active",
        "pricestream_redis_pubsub_connections_active 2.0",
        "pricestream_redis_pubsub_connections_opened_total 2.0",
        "pricestream_redis_up 1.0",
        "process_resident_memory_bytes",
    ):
        assert name in text
    assert "_created" not in text  # no OpenMetrics _created series

    await server.drain()
    status, body = await get(server.http_port, "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "redis_pubsub_healthy": True,
        "draining": True,
        "overloaded": False,
    }


async def test_health_command_answers_like_the_probes(server: Server) -> None:
    """`pricestream health` (image HEALTHCHECK, helm test): exit 0 only on SERVING."""
    import subprocess
    import sys

    async def health(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pricestream", "health", *args]
        return await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=30
        )

    target = f"127.0.0.1:{server.grpc_port}"
    api = await health("--target", target)
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == f"{target}: {SERVICE_NAME} SERVING"
    process = await health("--target", target, "--service", "")
    assert process.returncode == 0
    assert process.stdout.strip() == f"{target}: the server SERVING"
    unknown = await health("--target", target, "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().startswith(f"{target}: health check failed with NOT_FOUND")
    closed = await health("--target", "127.0.0.1:1", "--timeout", "1")
    assert closed.returncode == 1
    assert "health check failed with UNAVAILABLE" in closed.stderr


async def test_metrics_answers_openmetrics_to_prometheus_and_text_to_others(
    server: Server,
) -> None:
    """Prometheus asks for OpenMetrics (the format that carries exemplars) and gets it; a
    scraper sending no Accept header (urllib), `*/*` (aiohttp, curl) or text/plain gets the
    text format that prometheus_client's text parser reads."""
    content_type, body = await asyncio.to_thread(
        _get_with, server.http_port, "/metrics", PROMETHEUS_ACCEPT
    )
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "pricestream_redis_pubsub_connections_opened_total 2.0" in text
    assert "_created" not in text
    for accept in (None, "*/*", "text/plain"):
        content_type, body = await asyncio.to_thread(
            _get_with, server.http_port, "/metrics", accept
        )
        assert content_type.startswith("text/plain;"), (accept, content_type)
        assert "# EOF" not in body.decode()
