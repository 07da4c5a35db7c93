"""Sessions in process memory, same semantics as the Redis store, for the Redis-less demo."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pricestream.engine.sessions import (
    LeaseLoss,
    SessionBusy,
    SessionInfo,
    SessionNotFound,
    new_session_id,
)


@dataclass
class _Record:
    tickers: tuple[str, ...]
    expires: float  # monotonic
    owner: str | None = None
    lease_expires: float = 0.0


class MemorySessionStore:
    def __init__(
        self,
        session_ttl: float,
        lease_ttl: float,
        resume_grace: float,
        on_close: Callable[[str], None],
    ) -> None:
        self._session_ttl = session_ttl
        self._lease_ttl = lease_ttl
        self._grace = resume_grace
        self._on_close = on_close
        self._records: dict[str, _Record] = {}

    def _live(self, session_id: str) -> _Record | None:
        record = self._records.get(session_id)
        if record is not None and record.expires <= time.monotonic():
            del self._records[session_id]
            return None
        return record

    async def create(self, tickers: Sequence[str]) -> SessionInfo:
        self._purge_expired()
        session_id = new_session_id()
        self._records[session_id] = _Record(tuple(tickers), time.monotonic() + self._session_ttl)
        return SessionInfo(session_id, tuple(tickers), time.time() + self._session_ttl)

    async def get(self, session_id: str) -> SessionInfo | None:
        record = self._live(session_id)
        if record is None:
            return None
        now = time.monotonic()
        streaming = record.owner is not None and record.lease_expires > now
        return SessionInfo(
            session_id, record.tickers, time.time() + record.expires - now, streaming=streaming
        )

    async def claim(self, session_id: str, owner: str) -> tuple[str, ...]:
        record = self._live(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        now = time.monotonic()
        if record.owner not in (None, owner) and record.lease_expires > now:
            raise SessionBusy(session_id)
        record.owner = owner
        record.lease_expires = now + self._lease_ttl
        record.expires = now + self._lease_ttl + self._grace
        return record.tickers

    async def refresh(
        self, claims: Mapping[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, LeaseLoss]:
        lost: dict[str, LeaseLoss] = {}
        for session_id, (owner, _tickers) in claims.items():
            try:
                await self.claim(session_id, owner)
            except SessionNotFound:
                lost[session_id] = "closed"
            except SessionBusy:
                lost[session_id] = "taken"
        return lost

    async def release(self, session_id: str, owner: str) -> None:
        record = self._live(session_id)
        if record is not None and record.owner == owner:
            record.owner = None
            record.expires = time.monotonic() + self._grace

    async def close(self, session_id: str) -> bool:
        existed = self._live(session_id) is not None
        self._records.pop(session_id, None)
        if existed:
            self._on_close(session_id)
        return existed

    def _purge_expired(self) -> None:
        now = time.monotonic()
        for session_id in [k for k, r in self._records.items() if r.expires <= now]:
            del self._records[session_id]

    async def keep_alive(self) -> None:
        """One process: its owner is always alive."""

    async def forget_pod(self) -> None:
        """One process: nobody else takes its leases."""
