"""gRPC health of pricestream.v1.PriceStreamService and /readyz change together (issue 29,
item 3): both answer from ``engine.ready`` when asked, so at every transition (start, Redis
down, Redis back, drain) a Check and a /readyz asked while readiness holds agree with it, with
no copy in between to lag; a Watch stream hears every change."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pricestream.api.server import ReadinessHealth, Server
from pricestream.api.service import SERVICE_NAME
from support.redis_server import RedisProcess
from support.settings import fast_settings
from support.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Probe:
    """Check, /readyz and a Watch stream on one server, compared with ``engine.ready``."""

    def __init__(self, server: Server, channel: grpc.aio.Channel, http: aiohttp.ClientSession):
        self.server = server
        self.health = health_pb2_grpc.HealthStub(channel)
        self.http = http
        self.agreed = 0

    async def sample(self) -> bool | None:
        """Check and /readyz, each sandwiched between two looks at readiness: where it held,
        they must agree with it. The readiness they agreed on, or None where it moved."""
        ready = self.server.engine.ready
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        url = f"http://127.0.0.1:{self.server.http_port}/readyz"
        async with self.http.get(url) as response:
            readyz = response.status
        if self.server.engine.ready != ready:
            return None
        assert reply.status == (SERVING if ready else NOT_SERVING), (
            f"health says {reply.status} while engine.ready is {ready}"
        )
        assert readyz == (200 if ready else 503), f"/readyz {readyz} while ready is {ready}"
        self.agreed += 1
        return ready

    async def through(self, wanted: bool, what: str, timeout: float = 15.0) -> float:
        """Sample until readiness is ``wanted``: every sample on the way agrees. Seconds."""
        started = time.monotonic()
        while await self.sample() is not wanted:
            assert time.monotonic() - started < timeout, f"not {what} within {timeout}s"
            await asyncio.sleep(0.005)
        for _ in range(5):  # and right after, again
            assert await self.sample() in (wanted, None)
        return time.monotonic() - started


async def test_health_and_readyz_agree_at_every_transition(own_redis: RedisProcess) -> None:
    server = Server(fast_settings(own_redis.url, redis_outage_limit=30.0))
    async with server:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            aiohttp.ClientSession() as http,
        ):
            probe = Probe(server, channel, http)
            took = await probe.through(True, "ready after start")
            print(f"start: ready after {took:.2f}s")
            own_redis.kill()
            took = await probe.through(False, "not ready with Redis down")
            print(f"Redis down: not ready after {took:.2f}s")
            own_redis.start()
            took = await probe.through(True, "ready with Redis back")
            print(f"Redis back: ready after {took:.2f}s")
            await server.drain()
            assert await probe.sample() is False  # at once: no copy to wait for
            await probe.through(False, "not ready once draining")
            print(f"{probe.agreed} samples of Check and /readyz agreed with readiness")


async def test_watch_streams_every_readiness_change() -> None:
    """Watch of the service answers from the same readiness, woken by ``notify`` (the
    server's readiness tracker calls it on every change)."""
    state = {"ready": False}
    health = ReadinessHealth(SERVICE_NAME, lambda: state["ready"])
    written: list[int] = []

    class Context:
        async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
            written.append(reply.status)

    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    watch = asyncio.create_task(health.Watch(request, Context()))
    await wait_until(lambda: written == [NOT_SERVING], 1, "the first status")
    for ready in (True, False, True):
        state["ready"] = ready
        health.notify()
        wanted = SERVING if ready else NOT_SERVING
        await wait_until(lambda w=wanted: written[-1] == w, 1, f"Watch hears {wanted}")
    health.notify()  # no change: nothing written
    await asyncio.sleep(0.01)
    assert written == [NOT_SERVING, SERVING, NOT_SERVING, SERVING]
    reply = await health.Check(request, Context())
    assert reply.status == SERVING
    watch.cancel()


async def test_watch_over_the_wire_hears_the_drain(own_redis: RedisProcess) -> None:
    """A grpcio client's Watch over our HTTP/2 transport gets SERVING, then NOT_SERVING as
    soon as the drain begins."""
    server = Server(fast_settings(own_redis.url))
    async with server:
        await wait_until(lambda: server.engine.ready, 10, "ready")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert (await asyncio.wait_for(call.read(), 5)).status == SERVING
            drain = asyncio.create_task(server.drain())
            assert (await asyncio.wait_for(call.read(), 2)).status == NOT_SERVING
            call.cancel()
            await drain
