"""The session store contract shared by the Redis and in-memory implementations.

A session is created with a TTL (``session_ttl``) and expires if never streamed. A stream
claims it with a lease that only its owner refreshes; while leased, the session lives for
``lease_ttl + resume_grace``. When a stream ends without ``CloseSession`` the lease is
dropped and the session stays resumable for ``resume_grace``, on any pod. ``close`` deletes
it and leaves a tombstone for ``resume_grace`` so a refresh never resurrects it. A lease whose
owner's pod is no longer alive (crashed: no liveness key) may be claimed at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pricestream.validation import SESSION_ID_LENGTH


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    tickers: tuple[str, ...]
    expires_at: float  # unix seconds; when the session expires if nobody streams it
    streaming: bool = False  # a stream holds its lease now (on any pod)


# Why a stream lost its session: closed (CloseSession on any pod) or taken by another stream.
LeaseLoss = Literal["closed", "taken"]


class SessionNotFound(Exception):
    """No such session: never created, expired, or closed."""


class SessionBusy(Exception):
    """Another stream holds the session's lease."""


def new_session_id() -> str:
    session_id = secrets.token_urlsafe(16)
    assert len(session_id) == SESSION_ID_LENGTH
    return session_id


class SessionStore(Protocol):
    async def create(self, tickers: Sequence[str]) -> SessionInfo: ...

    async def get(self, session_id: str) -> SessionInfo | None:
        """The session as it is now (``expires_at``: when it expires unless streamed or
        refreshed), or None when it does not exist, has expired or was closed."""
        ...

    async def claim(self, session_id: str, owner: str) -> tuple[str, ...]:
        """Take the session's lease; its tickers, or SessionNotFound / SessionBusy."""
        ...

    async def refresh(
        self, claims: Mapping[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, LeaseLoss]:
        """Extend leases {session_id: (owner, tickers)}; the ids that were closed or taken."""
        ...

    async def release(self, session_id: str, owner: str) -> None:
        """Drop the lease; the session stays resumable for the grace period."""
        ...

    async def close(self, session_id: str) -> bool:
        """Delete the session and end its stream anywhere; False if it did not exist."""
        ...

    async def keep_alive(self) -> None:
        """Say this pod instance is alive (called every ``POD_ALIVE_INTERVAL``): while it is,
        its leases are busy for other pods; once it stops, they are taken over quickly."""
        ...

    async def forget_pod(self) -> None:
        """This pod instance is leaving: its leases need not wait for the liveness key."""
        ...
