"""`pricestream health`: ask a server's gRPC health service; exit 0 only on SERVING.

Used by the container image's health check and the chart's `helm test` Pod.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricestream.api.tls import channel as tls_channel


async def check(target: str, service: str, timeout: float, **tls: str) -> tuple[bool, str]:
    """(serving, one sentence saying what the server answered); `tls`: see tls.channel."""
    async with tls_channel(target, **tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"{target}: health check failed with {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    label = service or "the server"
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {label} {status}"
