"""Session operations every API offers (gRPC and REST): the same validation, limits and
failures, whichever door a client came in by."""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from pricestream.api.rate_limit import PeerRateLimiter
from pricestream.engine.engine import Engine
from pricestream.engine.sessions import SessionInfo
from pricestream.errors import (
    DRAINING_MESSAGE,
    backend_unavailable,
    not_found,
    resource_exhausted,
    unavailable,
)
from pricestream.validation import check_session_id, normalise_tickers

# Idle peers' buckets are dropped at most this often, on the way of a create.
LIMITER_PRUNE_INTERVAL = 1.0


class SessionOps:
    def __init__(self, engine: Engine, create_limiter: PeerRateLimiter) -> None:
        self._engine = engine
        self._create_limiter = create_limiter
        self._limiter_pruned_at = time.monotonic()

    def refuse_if_draining(self) -> None:
        if self._engine.draining:
            raise unavailable(DRAINING_MESSAGE, "draining")

    def _allow_create(self, peer: str) -> bool:
        """A token from ``peer``'s bucket, if it has one; idle peers' buckets are pruned on
        the way, at most every ``LIMITER_PRUNE_INTERVAL``."""
        now = time.monotonic()
        if now - self._limiter_pruned_at >= LIMITER_PRUNE_INTERVAL:
            self._limiter_pruned_at = now
            self._create_limiter.prune(now)
        return self._create_limiter.allow(peer, now)

    async def create(self, raw_tickers: list[str], peer: str) -> SessionInfo:
        """Create a session for ``raw_tickers`` asked by ``peer`` (the client's IP address: the
        TCP peer's, or behind trusted proxies the one they forwarded for), or raise the
        RequestError that says why not. Redis failures propagate as they are."""
        self.refuse_if_draining()
        engine = self._engine
        tickers = normalise_tickers(raw_tickers, engine.settings.max_tickers_per_session)
        # The slot is held from here, before any await, so calls waiting for their Redis write
        # cannot together overfill the pod; every refusal or failure below gives it back.
        if not engine.registry.reserve():
            raise resource_exhausted(
                f"this server holds its maximum of {engine.settings.max_sessions} sessions",
                "pod_full",
            )
        try:
            if engine.overloaded:
                raise resource_exhausted(
                    f"this server is overloaded ({engine.clock.overload_reason()}); "
                    "retry on another server",
                    "overloaded",
                )
            if not self._allow_create(peer):
                raise resource_exhausted(
                    f"too many sessions created from {peer}: at most "
                    f"{engine.settings.session_create_rate:g} per second; retry later",
                    "rate_limited",
                )
            info = await engine.store.create(tickers)
        except BaseException:
            engine.registry.unreserve()
            raise
        engine.registry.add_pending(info.session_id, info.tickers, engine.settings.session_ttl)
        return info

    async def get(self, raw_session_id: str) -> SessionInfo:
        session_id = check_session_id(raw_session_id)
        try:
            info = await self._engine.store.get(session_id)
        except (RedisError, OSError, TimeoutError) as exc:
            raise backend_unavailable(exc) from None
        if info is None:
            raise not_found(f"session {session_id} does not exist or has expired")
        return info

    async def close(self, raw_session_id: str) -> None:
        """Close a session wherever it streams; NOT_FOUND when it does not exist. Redis
        failures propagate as they are."""
        session_id = check_session_id(raw_session_id)
        engine = self._engine
        existed = await engine.store.close(session_id)
        # A session this pod holds counts even if Redis lost it (a restart without
        # persistence); the lease refresh would have written it back moments later.
        if not existed and session_id not in engine.registry:
            raise not_found(f"session {session_id} does not exist or has expired")
        engine.on_closed(session_id)  # at once here; other pods hear it via Pub/Sub
