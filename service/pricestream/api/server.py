"""`pricestream serve`: the gRPC server, health, reflection, HTTP side and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from pricestream.api.auth import BearerAuth, load_tokens
from pricestream.api.http_api import HttpServer
from pricestream.api.rate_limit import PeerRateLimiter
from pricestream.api.reflection import add_reflection
from pricestream.api.service import SERVICE_NAME, PriceStreamService
from pricestream.api.sessions import SessionOps
from pricestream.api.tls import server_ssl_context
from pricestream.api.web import WebApi
from pricestream.errors import SHUTDOWN_MESSAGE
from pricestream.observability.grpc_metrics import GrpcMetrics
from pricestream.observability.web_metrics import WebMetrics
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait
from pricestream.transport.http2.limits import Limits
from pricestream.transport.http2.server import Gate, GrpcServer
from pricestream.transport.web.limits import WebLimits
from pricestream.transport.web.server import WebServer
from pricestream.wiring import build_engine

log = logging.getLogger("pricestream.server")

MAX_REQUEST_BYTES = 64 * 1024
# The cyclic garbage collector's thresholds for a serving process (CPython's: 700, 10, 10).
# Every stream keeps ~50 tracked objects (its call, h2 state, coroutines). Measured with make
# bench's d10k (ramp to 10,000 streams in 20 s, hold 20 s, leave): with the defaults, 11 full
# collections, 8 during the ramp growing to 0.3 s each and 3 as the clients left (up to 0.48 s),
# every flush and delivery paused with them, and 1,727 young collections; with these and the
# start-up objects frozen, 2 full ones (0.02 s at start-up, 0.35 s as the clients left), none
# during the ramp or the hold, 247 young ones (longest 33 ms) and 30 middle ones (longest
# 84 ms). Memory is unchanged: the streams' objects are freed by reference counting.
GC_THRESHOLDS = (10_000, 4, 10)
READINESS_POLL = 0.1  # seconds between looks at readiness for Watch streams and the log


class ReadinessHealth(HealthServicer):
    """grpc's health service, whose status for ``service`` is ``ready()`` at the moment it
    is asked: the engine's readiness, the one /readyz answers from, so the two never differ.
    Watch streams for that service wake on ``notify`` (called on every readiness change)
    and answer from ``ready()`` too. Other services (the server's "") keep grpc's table."""

    def __init__(self, service: str, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._service = service
        self._ready = ready
        self._changed = asyncio.Event()

    def status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        if self._ready():
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        if request.service == self._service:
            return health_pb2.HealthCheckResponse(status=self.status())
        return await super().Check(request, context)

    async def Watch(self, request, context):  # type: ignore[no-untyped-def]
        if request.service != self._service:
            await super().Watch(request, context)
            return
        last = None
        while True:
            changed = self._changed
            status = self.status()
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await changed.wait()

    def notify(self) -> None:
        """Readiness may have changed: every Watch of the service reads it again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def transport_limits(settings: Settings) -> Limits:
    return Limits(
        max_request_bytes=MAX_REQUEST_BYTES,
        max_send_message_bytes=settings.max_send_message_bytes,
        # One client connection may carry many streams (a gateway, a load tester).
        max_concurrent_streams=settings.max_sessions,
        # Long-lived channels move after a scale-up: GOAWAY after the age, streams ended
        # after the grace; clients resume their session on whichever pod they reach.
        max_connection_age=settings.max_connection_age,
        max_connection_age_grace=settings.max_connection_age_grace,
    )


def web_limits(settings: Settings) -> WebLimits:
    return WebLimits(
        ping_interval=settings.web_ping_interval, pong_timeout=settings.web_pong_timeout
    )


class Server:
    """Owns the engine, the gRPC server, the browser (web) server and the HTTP server of one
    pod."""

    def __init__(self, settings: Settings, *, in_memory: bool = False) -> None:
        self.settings = settings
        self.engine = build_engine(settings, in_memory=in_memory)
        # CreateSession's per-peer token buckets (the service prunes idle peers' ones).
        self.create_limiter = PeerRateLimiter(
            settings.session_create_rate, settings.session_create_burst
        )
        self.sessions = SessionOps(self.engine, self.create_limiter)
        self.health = ReadinessHealth(SERVICE_NAME, lambda: self.engine.ready)
        self.grpc_port = settings.grpc_port
        self.grpc_metrics = GrpcMetrics(self.engine.metrics.registry)
        tokens = load_tokens(settings)
        gates: list[Gate] = [BearerAuth(tokens)] if tokens else []
        self._ssl = server_ssl_context(settings) if settings.tls else None
        self._grpc = GrpcServer(transport_limits(settings), self.grpc_metrics, gates)
        self._http = HttpServer(self.engine, settings.http_host, settings.http_port)
        self.web_metrics = WebMetrics(self.engine.metrics.registry)
        self.web_api = WebApi(self.engine, self.sessions, self.web_metrics, settings, tokens)
        self._web = WebServer(self.web_api, web_limits(settings), self.web_metrics)
        self.web_metrics.register_live(
            lambda: len(self._web.websockets), lambda: len(self._web.event_streams)
        )
        self.web_port = settings.web_port
        self._health_task: asyncio.Task[None] | None = None
        self._drained = False

    @property
    def http_port(self) -> int:
        return self._http.port

    async def __aenter__(self) -> Server:
        if self.settings.faults:
            log.warning(
                "FAULT INJECTION ACTIVE (%s): this server leaks on purpose; never in production",
                self.settings.faults,
            )
        await self.engine.__aenter__()
        try:
            self._grpc.add_generic_rpc_handlers(
                (PriceStreamService(self.engine, self.sessions).generic_handler(),)
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
            add_reflection(
                self._grpc,
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
            )
            self.grpc_port = await self._grpc.start(
                self.settings.grpc_host, self.settings.grpc_port, self._ssl
            )
            self.web_port = await self._web.start(self.settings.web_host, self.settings.web_port)
            await self._http.__aenter__()
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            self._health_task = asyncio.create_task(self._track_readiness(), name="readiness")
        except BaseException:
            await self._grpc.stop(0, SHUTDOWN_MESSAGE)
            await self._web.stop(0)
            await self.engine.__aexit__(None, None, None)
            raise
        log.info(
            "serving gRPC on port %d, browsers on port %d, HTTP on port %d",
            self.grpc_port,
            self.web_port,
            self.http_port,
            extra={
                "event": "server_started",
                "grpc_port": self.grpc_port,
                "web_port": self.web_port,
                "http_port": self.http_port,
                "tls": self.settings.tls,
            },
        )
        return self

    async def _track_readiness(self) -> None:
        """Log readiness changes and wake health Watch streams; Check and /readyz need no
        copy of it: both read ``engine.ready`` when asked."""
        was_ready: bool | None = None
        while True:
            ready = self.engine.ready
            if ready != was_ready:
                self.health.notify()
                log.info(
                    "readiness changed: %s",
                    "ready" if ready else "not ready",
                    extra={"event": "readiness", "ready": ready},
                )
                was_ready = ready
            await asyncio.sleep(READINESS_POLL)

    async def drain(self) -> None:
        """Refuse new work, end every gRPC stream with UNAVAILABLE and every browser stream
        with 1001 (spread over ``web_drain_window``), wait for them to finish."""
        if self._drained:
            return
        self._drained = True
        engine = self.engine
        engine.draining = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        self.health.notify()  # engine.draining: NOT_SERVING from now on, Check and Watch
        log.info("draining %d streams", engine.streams_active, extra={"event": "drain_started"})
        # The web port keeps listening while it drains: a browser that still reaches it (before
        # its Service drops this pod) is told 1001 (reconnect elsewhere), not refused bare.
        self._web.close_idle()
        self.web_api.drain(self.settings.web_drain_window)
        engine.stop_all_streams(
            "shutdown", grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE, unless=self.web_api.owns
        )
        timeout = max(self.settings.drain_timeout, self.settings.web_drain_window + 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.streams_finished(), timeout)
        log.info(
            "drain finished with %d streams left",
            engine.streams_active,
            extra={"event": "drain_finished"},
        )

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.drain()
            await self._grpc.stop(1.0, SHUTDOWN_MESSAGE)
        finally:
            if self._health_task is not None:
                await cancel_and_wait([self._health_task])
            await self._web.stop(1.0)
            await self._http.__aexit__(None, None, None)
            await self.engine.__aexit__(None, None, None)
            log.info(
                "stopped: sessions_active=%d streams_active=%d subscriptions_active=%d",
                len(self.engine.registry),
                self.engine.streams_active,
                self.engine.hub.subscriptions_active,
                extra={"event": "server_stopped"},
            )


async def run_until_signalled(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop.

    The server is built here, inside the running loop it serves on.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.set_threshold(*GC_THRESHOLDS)
    async with Server(settings):
        # What start-up made (modules, descriptors, the server) lives as long as the process:
        # out of the collector's sight, so no collection walks it again.
        gc.freeze()
        await stop.wait()
        log.info("signal received, shutting down", extra={"event": "shutdown_requested"})
