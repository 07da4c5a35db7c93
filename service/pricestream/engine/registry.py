"""This pod's sessions: what `pricestream_sessions_active` counts and each close's reason.

A session enters when it is created here (pending) or when a stream of it starts here
(streaming); it leaves exactly once, through ``end``, with one of ``CLOSE_REASONS``.

A CreateSession holds a slot (``reserve``) from before its Redis write until the session is
registered (``add_pending``) or the write failed (``unreserve``), and so does a stream of a
session new to this pod during its claim, so concurrent creates and claims cannot pass
``max_sessions`` between the check and the registration. Held slots count towards ``full``
but not towards ``len`` (the `pricestream_sessions_active` gauge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field

from pricestream.engine.flush import StreamWriter
from pricestream.observability.metrics import Metrics

log = logging.getLogger("pricestream.sessions")

CLOSE_REASONS = (
    "closed",  # CloseSession
    "unclaimed",  # created here, not streamed here before its TTL ran out
    "stream_ended",  # its stream here ended; the session stays resumable in the store
)


@dataclass(eq=False)
class LocalSession:
    session_id: str
    tickers: tuple[str, ...]
    deadline: float  # monotonic; only meaningful while pending
    owner: str = ""
    writer: StreamWriter | None = field(default=None, repr=False)

    @property
    def streaming(self) -> bool:
        return self.writer is not None


class SessionRegistry:
    def __init__(self, metrics: Metrics, max_sessions: int) -> None:
        self._metrics = metrics
        self._max_sessions = max_sessions
        self._sessions: dict[str, LocalSession] = {}
        self._reserved = 0  # slots held by creates and claims waiting for Redis

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> LocalSession | None:
        return self._sessions.get(session_id)

    @property
    def full(self) -> bool:
        return len(self._sessions) + self._reserved >= self._max_sessions

    def reserve(self) -> bool:
        """Hold a slot for a session about to be created; False when none is left."""
        if self.full:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        """Give back a slot of ``reserve`` whose session was not created."""
        assert self._reserved > 0, "unreserve without reserve"
        self._reserved -= 1

    def add_pending(self, session_id: str, tickers: tuple[str, ...], ttl: float) -> None:
        """Register a created session in the slot its ``reserve`` held."""
        self.unreserve()
        self._open(LocalSession(session_id, tickers, time.monotonic() + ttl))

    def start_streaming(
        self, session_id: str, tickers: tuple[str, ...], owner: str, writer: StreamWriter
    ) -> LocalSession:
        session = self._sessions.get(session_id)
        if session is None:
            session = LocalSession(session_id, tickers, 0.0)
            self._open(session)
        session.owner = owner
        session.writer = writer
        return session

    def end(self, session_id: str, reason: str) -> bool:
        if self._sessions.pop(session_id, None) is None:
            return False
        self._metrics.sessions_closed.labels(reason).inc()
        log.info(
            "session closed %s (%s)",
            session_id,
            reason,
            extra={"event": "session_closed", "session_id": session_id, "reason": reason},
        )
        return True

    def streaming(self) -> list[LocalSession]:
        return [s for s in self._sessions.values() if s.writer is not None]

    def expire_pending(self, claiming: Container[str] = ()) -> list[str]:
        """End pending sessions whose TTL passed, except those a stream is ``claiming`` (it
        holds no slot of its own: it takes the session's); their ids."""
        now = time.monotonic()
        expired = [
            s.session_id
            for s in self._sessions.values()
            if s.writer is None and s.deadline <= now and s.session_id not in claiming
        ]
        for session_id in expired:
            self.end(session_id, "unclaimed")
        return expired

    def _open(self, session: LocalSession) -> None:
        self._sessions[session.session_id] = session
        self._metrics.sessions_opened.inc()
        log.info(
            "session opened %s for %d tickers",
            session.session_id,
            len(session.tickers),
            extra={"event": "session_opened", "session_id": session.session_id},
        )
