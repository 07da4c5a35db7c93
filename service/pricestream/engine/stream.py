"""One StreamPriceUpdates call, from claim to cleanup.

``StreamLifecycle`` is the one place a stream's resources are taken and given back: lease,
registry entry, hub subscriptions and flush-clock registration. Every way out (normal end,
client cancel or disappearance, deadline, send error, CloseSession elsewhere, shutdown,
Redis outage, slow consumer) leaves through ``__aexit__``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol

import grpc
from redis.exceptions import RedisError

from pricestream.engine.engine import Engine
from pricestream.engine.flush import BatchSink, StreamWriter
from pricestream.engine.hub import Dropped, Topic, entry_from_payload
from pricestream.engine.sessions import SessionBusy, SessionNotFound
from pricestream.errors import (
    DRAINING_MESSAGE,
    backend_unavailable,
    describe,
    failed_precondition,
    not_found,
    resource_exhausted,
    unavailable,
)

log = logging.getLogger("pricestream.stream")

RECONNECT_HINT = ("pricestream-reconnect", "resume-session")
_CLIENT_GONE_REASONS = frozenset({"send_error", "client_gone"})
# Streams the server ends so that the client resumes its session elsewhere.
RESUMABLE_REASONS = frozenset({"shutdown", "redis_unavailable", "max_connection_age"})


def _retrieve(future: asyncio.Future[object]) -> None:
    """Take a finished future's outcome nobody waits for any more (no "never retrieved")."""
    if not future.cancelled():
        future.exception()


class StreamContext(Protocol):
    """What a stream needs of its call: the transport's side of it."""

    def time_remaining(self) -> float | None: ...

    def batch_sink(self) -> BatchSink: ...

    def on_terminate(self, callback: Callable[[grpc.StatusCode, str, str], None]) -> None: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None: ...


class StreamLifecycle:
    def __init__(self, engine: Engine, context: StreamContext, *, json: bool = False) -> None:
        """``json``: the stream's batches are JSON fragments (a browser stream), not protobuf."""
        self._engine = engine
        self._json = json
        self.session_id = ""
        self._context = context
        self._owner = f"{engine.pod_instance}/{secrets.token_hex(6)}"
        self._topics: list[Topic] = []
        self.writer: StreamWriter | None = None
        self.tickers: tuple[str, ...] = ()
        self.reason = "rejected"  # until the stream is registered

    async def __aenter__(self) -> StreamLifecycle:
        engine = self._engine
        registry = engine.registry
        # A session new to this pod holds a slot from before its claim until it is registered
        # (or refused): the streams of a reconnect storm all claim at once, and a check of
        # ``full`` before the claim would let every one of them through.
        reserved = self.session_id not in registry
        if reserved and not registry.reserve():
            raise resource_exhausted(
                f"this server holds its maximum of {engine.settings.max_sessions} sessions",
                "pod_full",
            )
        engine.claim_started(self.session_id)
        claimed = False
        try:
            await self._claim()
            claimed = True
        finally:
            closed = engine.claim_ended(self.session_id, claimed=claimed)
            if reserved:
                registry.unreserve()  # the slot becomes the session's in start_streaming below
        # From here on nothing awaits until the stream is fully registered.
        writer = StreamWriter(
            engine.clock, self._context.batch_sink(), engine.settings.max_send_message_bytes
        )
        # The server ending the call (shutdown, connection age) stops the stream like the
        # engine does, so it ends with its status and resume hint.
        self._context.on_terminate(lambda code, message, reason: writer.stop(reason, code, message))
        registry.start_streaming(self.session_id, self.tickers, self._owner, writer)
        engine.clock.register(writer)
        self._topics = engine.hub.add(writer, self.tickers, json=self._json)
        self.writer = writer
        if closed:
            # Deleted after the claim took the lease, its close notice here before the claim's
            # answer: ended as the notice ends a registered stream, before its first batch.
            writer.stop("closed", grpc.StatusCode.OK, "session closed")
        log.info(
            "stream started for session %s",
            self.session_id,
            extra={"event": "stream_started", "session_id": self.session_id},
        )
        return self

    async def _claim(self) -> None:
        """Take the session's lease, or raise why the stream is refused (the lease given back
        if it was taken)."""
        engine = self._engine
        # Shielded: the claim goes on in Redis whatever happens to this task (its batch is
        # sent anyway), so a cancel must not lose its answer, which says whether the lease is
        # this stream's. (A cancel is then also never swallowed by redis-py's wait_for here.)
        claim = asyncio.ensure_future(engine.store.claim(self.session_id, self._owner))
        try:
            self.tickers = await asyncio.shield(claim)
        except SessionNotFound:
            raise not_found(f"session {self.session_id} does not exist or has expired") from None
        except SessionBusy:
            raise failed_precondition(
                f"session {self.session_id} is already streaming; one stream per session"
            ) from None
        except (RedisError, OSError, TimeoutError) as exc:
            raise backend_unavailable(exc) from None
        except asyncio.CancelledError:
            await self._give_back(claim)  # the stream stays "rejected": it never started
            raise
        if engine.draining:
            # The pod began draining while the session was claimed: refused like a stream
            # that comes after (the drain stops the streams registered when it began; this one
            # would have run on, and the drain waited its whole timeout for it).
            await self._release_lease()
            raise unavailable(DRAINING_MESSAGE, "draining")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        writer = self.writer
        assert writer is not None
        self.reason, suppress = self._classify(writer, exc)
        fault = self._fault()
        if fault:
            log.warning(
                "FAULT %s: leaving session %s and its subscriptions",
                fault,
                self.session_id,
                extra={"event": "fault_injected", "session_id": self.session_id},
            )
            return suppress
        self._release_local(writer)
        await self._release_lease()
        return suppress

    def _fault(self) -> str:
        """The injected fault (detection tests only) that skips this stream's cleanup, if any:
        the original system's bug, on a send error (gRPC) or a WebSocket's close."""
        if self.reason not in _CLIENT_GONE_REASONS:
            return ""
        settings = self._engine.settings
        if settings.has_fault("skip_cleanup_on_send_error"):
            return "skip_cleanup_on_send_error"
        if self._json and settings.has_fault("skip_cleanup_on_ws_close"):
            return "skip_cleanup_on_ws_close"
        return ""

    def _classify(self, writer: StreamWriter, exc: BaseException | None) -> tuple[str, bool]:
        """Why the stream ended, and whether its exception is handled here."""
        if writer.end_reason is not None:
            return writer.end_reason, exc is None
        if isinstance(exc, asyncio.CancelledError):
            remaining = self._context.time_remaining()
            deadline_passed = remaining is not None and remaining <= 0
            return ("deadline" if deadline_passed else "client_gone"), False
        if exc is not None and isinstance(exc, Exception):
            return "send_error", True
        return "ended", False

    def _release_local(self, writer: StreamWriter) -> None:
        engine = self._engine
        engine.hub.remove(writer, self._topics)
        engine.clock.unregister(writer)
        registry_reason = "closed" if self.reason == "closed" else "stream_ended"
        engine.registry.end(self.session_id, registry_reason)
        log.info(
            "stream ended for session %s: %s",
            self.session_id,
            self.reason,
            extra={"event": "stream_ended", "session_id": self.session_id, "reason": self.reason},
        )

    async def _give_back(self, claim: asyncio.Future[tuple[str, ...]]) -> None:
        """The stream was cancelled while its claim ran (its client left): once Redis has
        answered the claim, give back the lease it took. Strictly after the answer: a release
        sent at once could overtake the claim (another pipeline), and the client's next stream
        would be told "already streaming" until the lease expired."""
        try:
            await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Cancelled again: the lease, if taken, expires by itself.
            claim.add_done_callback(_retrieve)
            raise
        except Exception:
            return  # refused or failed: no lease was taken
        await self._release_lease()

    async def _release_lease(self) -> None:
        if self.reason == "closed":
            return  # the session is gone already
        # The release rides in the next pipeline. Its timer is the lease's own TTL: past that
        # the lease has expired anyway, and a shorter one (the Redis timeout) fired in bulk
        # when thousands of streams ended at once on a busy loop.
        try:
            await asyncio.wait_for(
                self._engine.store.release(self.session_id, self._owner),
                self._engine.settings.lease_ttl,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "could not release lease of session %s (it expires by itself): %s",
                self.session_id,
                describe(exc),
            )

    async def pump(self) -> None:
        """Send the last known prices at once, then leave the batches to the flush clock
        until the stream is stopped (or the call cancelled)."""
        await self.start()
        assert self.writer is not None
        await self.writer.ended()

    async def start(self) -> None:
        """Send the last known prices at once (the stream's first batch, if any is known);
        the flush clock sends the rest."""
        writer = self.writer
        assert writer is not None
        await self._seed_last_prices(writer)
        self._engine.clock.flush_now(writer)

    @property
    def batches_sent(self) -> int:
        return self.writer.batches_sent if self.writer is not None else 0

    @property
    def updates_sent(self) -> int:
        return self.writer.updates_sent if self.writer is not None else 0

    async def _seed_last_prices(self, writer: StreamWriter) -> None:
        hub = self._engine.hub
        missing = []
        for topic in self._topics:
            last = topic.last_for(self._json)
            if last is not None:
                hub.seed(writer, topic.ticker, last)
            else:
                missing.append(topic.ticker)
        if not missing:
            return
        try:
            payloads = await self._engine.broker.last_prices(missing)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not read last prices: %s", describe(exc))
            return
        max_bytes = self._engine.settings.max_update_bytes  # a stored price obeys it too
        for ticker, payload in zip(missing, payloads, strict=True):
            if payload is None:
                continue
            entry = entry_from_payload(ticker, payload, max_bytes=max_bytes, json=self._json)
            if not isinstance(entry, Dropped):
                hub.seed(writer, ticker, entry)


def finish_status(lifecycle: StreamLifecycle, context: StreamContext) -> None:
    """Put the stream's end status on the call when the server ended it."""
    writer = lifecycle.writer
    if writer is None or writer.end_reason is None:
        return
    if writer.end_code != grpc.StatusCode.OK:
        context.set_code(writer.end_code)
        context.set_details(writer.end_message)
    if writer.end_reason in RESUMABLE_REASONS:
        context.set_trailing_metadata((RECONNECT_HINT,))
