"""The streaming engine of one pod: broker, hub, flush clock, session store and registry.

``Engine`` is the single owner of every background task and backend connection; entering it
starts them and leaving it stops them in reverse order, whatever happened in between. It is
given its backends (``pricestream.wiring`` builds them from the settings) and knows them only
through their ports (``Broker``, ``SessionStore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Callable

import grpc
from redis.exceptions import RedisError

from pricestream.codec import SESSION_CLOSED_CHANNEL
from pricestream.engine.backends import Backends
from pricestream.engine.flush import FlushClock, StreamWriter
from pricestream.engine.hub import Hub
from pricestream.engine.registry import SessionRegistry
from pricestream.engine.sessions import LeaseLoss
from pricestream.errors import describe
from pricestream.observability.metrics import LiveGauges, Metrics
from pricestream.observability.tracing import Tracing
from pricestream.settings import Settings
from pricestream.tasks import cancel_and_wait

log = logging.getLogger("pricestream.engine")

LEASE_REFRESH_SLICE = 200  # leases per refresh call: ~2 ms of Redis time each


class Engine:
    def __init__(self, settings: Settings, make_backends: Callable[[Engine], Backends]) -> None:
        """``make_backends`` is called once, here, with the engine as far as it is built: its
        ``settings``, ``metrics`` and ``pod_instance`` are set, and ``on_closed`` may be bound
        (it is only called once the engine runs). See ``pricestream.wiring.build_engine``."""
        self.settings = settings
        # This process among the pod's restarts: the liveness key and every lease name it.
        self.pod_instance = f"{settings.pod_name}:{secrets.token_hex(4)}"
        self.metrics = Metrics(
            settings.flush_interval,
            freshness_margin=settings.freshness_margin,
            tracing=lambda: self.tracing,
        )
        self.tracing = Tracing(settings.pod_name)
        self.registry = SessionRegistry(self.metrics, settings.max_sessions)
        self.backends = make_backends(self)
        self.broker = self.backends.broker
        self.store = self.backends.store
        self.hub = Hub(
            self.broker,
            self.metrics,
            settings.linger,
            self.tracing.tracer,
            max_update_bytes=settings.max_update_bytes,
        )
        self.clock = FlushClock(
            settings.flush_interval,
            settings.stall_timeout,
            self.metrics,
            self._cut_off,
            overload_lag=settings.overload_lag,
            overload_backlog=settings.overload_backlog,
            offered=lambda: self.hub.offered,
        )
        self._streams_active = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.draining = False
        self.redis_unhealthy_since: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Sessions with a stream's claim waiting for Redis -> claims waiting, and those of them
        # closed meanwhile: a close notice for a session not registered yet would be lost.
        self._claiming: dict[str, int] = {}
        self._closed_while_claiming: set[str] = set()
        # A broker that does not track confirmations (one Redis, memory) never will: then the
        # gauge is not exported at all.
        tracks_confirmations = self.broker.channels_unconfirmed is not None
        self.metrics.register_live_gauges(
            LiveGauges(
                sessions_active=lambda: len(self.registry),
                streams_active=lambda: self.streams_active,
                subscriptions_active=lambda: self.hub.subscriptions_active,
                pubsub_connections_active=lambda: self.broker.connections_active,
                redis_up=lambda: self.broker.healthy,
                ready=lambda: self.ready,
                loop_lag=lambda: self.clock.lag,
                flush_backlog=lambda: self.clock.backlog,
                shards_wanted=lambda: self.broker.shards_wanted,
                shards_live=lambda: self.broker.shards_live,
                channels_unconfirmed=(
                    (lambda: self.broker.channels_unconfirmed or 0)
                    if tracks_confirmations
                    else None
                ),
            )
        )

    @property
    def streams_active(self) -> int:
        return self._streams_active

    def stream_started(self) -> None:
        self._streams_active += 1
        self._no_streams.clear()
        self.metrics.streams_opened.inc()

    def stream_finished(self, reason: str) -> None:
        self._streams_active -= 1
        self.metrics.streams_closed.labels(reason).inc()
        if self._streams_active == 0:
            self._no_streams.set()

    async def streams_finished(self) -> None:
        """Return once no StreamPriceUpdates call is in progress."""
        await self._no_streams.wait()

    @property
    def ready(self) -> bool:
        return not self.draining and self.broker.healthy and not self.overloaded

    @property
    def overloaded(self) -> bool:
        """Past an overload limit of the flush clock (lag or write backlog): refuse new sessions,
        turn not ready."""
        return self.clock.overloaded

    async def __aenter__(self) -> Engine:
        if self.backends.redis_target is not None:
            log.info("using Redis (%s) at %s", self.settings.redis_mode, self.backends.redis_target)
        self.hub.on_service_channel(SESSION_CLOSED_CHANNEL, self._on_closed_message)
        await self.broker.start()
        self._tasks = [
            asyncio.create_task(self.clock.run(), name="flush-clock"),
            asyncio.create_task(self._maintain(), name="session-maintenance"),
            asyncio.create_task(self._refresh_leases_forever(), name="lease-refresh"),
            asyncio.create_task(self._keep_alive(), name="pod-liveness"),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for session in self.registry.streaming():
            log.warning("stream of session %s still registered at shutdown", session.session_id)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.store.forget_pod(), self.settings.redis_timeout)
        self.hub.close()
        await self.backends.aclose()
        await asyncio.to_thread(self.tracing.close)  # flushing must not block the loop

    def claim_started(self, session_id: str) -> None:
        """A stream of the session is about to claim it (before the claim's await)."""
        self._claiming[session_id] = self._claiming.get(session_id, 0) + 1

    def claim_ended(self, session_id: str, *, claimed: bool) -> bool:
        """The claim of ``claim_started`` returned (``claimed``: the stream starts now) or
        failed: whether the session was closed meanwhile (then its stream must end as
        closed). The pending entry of a session closed during its last claim, kept for that
        claim's stream (``on_closed``), ends here if no stream starts."""
        closed = session_id in self._closed_while_claiming
        left = self._claiming.pop(session_id) - 1
        if left:
            self._claiming[session_id] = left
        else:
            self._closed_while_claiming.discard(session_id)
            session = self.registry.get(session_id)
            if closed and not claimed and session is not None and session.writer is None:
                self.registry.end(session_id, "closed")
        return closed

    def on_closed(self, session_id: str) -> None:
        """A session was closed (here or on another pod): end it here too."""
        claiming = session_id in self._claiming
        if claiming:
            self._closed_while_claiming.add(session_id)
        session = self.registry.get(session_id)
        if session is None:
            return
        if session.writer is not None:
            session.writer.stop("closed", grpc.StatusCode.OK, "session closed")
        elif not claiming:
            self.registry.end(session_id, "closed")
        # else: pending here, and a stream is claiming it: that stream holds no slot of its
        # own (it takes the pending session's), so the entry stays until the claim ends.

    def _on_closed_message(self, payload: bytes) -> None:
        with contextlib.suppress(UnicodeDecodeError):
            self.on_closed(payload.decode("ascii"))

    def stop_all_streams(
        self,
        reason: str,
        code: grpc.StatusCode,
        message: str,
        *,
        unless: Callable[[StreamWriter], bool] | None = None,
    ) -> None:
        """Stop every stream of this pod, but those ``unless`` keeps (ended their own way)."""
        for session in self.registry.streaming():
            writer = session.writer
            assert writer is not None
            if unless is None or not unless(writer):
                writer.stop(reason, code, message)

    def _cut_off(self, writer: StreamWriter) -> None:
        self.metrics.slow_consumer_disconnects.inc()
        writer.stop(
            "slow_consumer",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"client did not read for {self.settings.stall_timeout:g}s; stream cut off",
        )

    async def _maintain(self) -> None:
        """Expire pending sessions, watch for a Redis outage."""
        loop = asyncio.get_running_loop()
        period = min(1.0, self.settings.lease_ttl / 3)
        while True:
            await asyncio.sleep(period)
            self.registry.expire_pending(self._claiming)
            self._check_redis_outage(loop.time())

    async def _refresh_leases_forever(self) -> None:
        """Refresh every lease once per ``lease_ttl / 3``, spread over the first half of that
        period in slices of ``LEASE_REFRESH_SLICE`` (so each lease is refreshed at most 1.5
        periods apart, half its TTL)."""
        loop = asyncio.get_running_loop()
        period = self.settings.lease_ttl / 3
        while True:
            started = loop.time()
            await self._refresh_leases(spread=period / 2)
            await asyncio.sleep(max(0.0, started + period - loop.time()))

    async def _refresh_leases(self, spread: float = 0.0) -> None:
        """One round over the streams open now. Refreshing 10,000 leases in one burst (chunks
        of 1,000 in one Lua script each) blocked Redis ~10 ms per script, every Pub/Sub
        delivery of every pod with it, and this loop for tens of milliseconds while it encoded
        them; in slices of 200 spread over ``spread`` seconds neither notices."""
        loop = asyncio.get_running_loop()
        sessions = [
            s
            for s in self.registry.streaming()
            if s.writer is not None and s.writer.end_reason is None
        ]
        if not sessions:
            return
        slices = math.ceil(len(sessions) / LEASE_REFRESH_SLICE)
        started, failed, error = loop.time(), 0, None
        for index in range(slices):
            if index:
                await asyncio.sleep(max(0.0, started + index * spread / slices - loop.time()))
            part = {
                s.session_id: (s.owner, s.tickers)
                for s in sessions[index * LEASE_REFRESH_SLICE : (index + 1) * LEASE_REFRESH_SLICE]
                if s.writer is not None and s.writer.end_reason is None
            }
            if not part:
                continue
            try:
                lost = await self.store.refresh(part)
            except (RedisError, OSError, TimeoutError) as exc:
                failed, error = failed + len(part), exc
                continue
            self._end_lost(lost)
        if error is not None:
            log.warning(
                "could not refresh %d of %d stream leases: %s",
                failed,
                len(sessions),
                describe(error),
            )

    def _end_lost(self, lost: dict[str, LeaseLoss]) -> None:
        for session_id, why in lost.items():
            if why == "closed":
                self.on_closed(session_id)  # the Pub/Sub notice may not have arrived yet
                continue
            session = self.registry.get(session_id)
            if session is not None and session.writer is not None:
                session.writer.stop(
                    "session_lost",
                    grpc.StatusCode.NOT_FOUND,
                    "session was taken over by another stream",
                )

    async def _keep_alive(self) -> None:
        """Refresh this pod instance's liveness key, which keeps its leases its own."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(self.store.keep_alive(), self.settings.redis_timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not every half second
                    log.warning("could not refresh this pod's liveness key: %s", describe(exc))
                failing = True
            else:
                failing = False
            await asyncio.sleep(self.backends.keep_alive_interval)

    def _check_redis_outage(self, now: float) -> None:
        if self.broker.healthy:
            self.redis_unhealthy_since = None
            return
        if self.redis_unhealthy_since is None:
            self.redis_unhealthy_since = now
        elif now - self.redis_unhealthy_since > self.settings.redis_outage_limit:
            self.stop_all_streams(
                "redis_unavailable",
                grpc.StatusCode.UNAVAILABLE,
                f"Redis unreachable for over {self.settings.redis_outage_limit:g}s; "
                "resume the session later",
            )
