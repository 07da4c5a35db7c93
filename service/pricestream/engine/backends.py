"""What an engine is given: its broker and session store, built outside it (``pricestream.wiring``).

The engine depends on these ports only; which implementation sits behind them (Redis,
standalone, sentinel or cluster, or process memory) is decided by the one module that
composes settings into backends and backends into an engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from pricestream.engine.broker import Broker
from pricestream.engine.sessions import SessionStore


@dataclass(kw_only=True)
class Backends:
    """A broker and a session store; from the engine's construction on, the engine owns them:
    it starts the broker on entry and closes everything on exit (``aclose``)."""

    broker: Broker
    store: SessionStore
    # How often the engine calls ``store.keep_alive()`` (the store's liveness key is alive
    # a few such periods).
    keep_alive_interval: float
    # Where the Redis connections go, for the start-up log line; None: no Redis (in memory).
    redis_target: str | None = None

    async def aclose(self) -> None:
        """Close the broker and whatever it and the store share. Called once, after the hub
        has closed; a backend with connections of its own closes them here too."""
        await self.broker.aclose()
