"""What the hub needs from a Pub/Sub backend; implemented for Redis and in memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

# Called with (channel, payload) for every message on a wanted channel, on the event loop.
MessageHandler = Callable[[bytes, bytes], None]


class Broker(Protocol):
    """Pub/Sub with declarative subscriptions.

    ``want``/``unwant`` only change the desired set and return at once; the broker brings
    its connections in line with it (batched), and again after every reconnect. That keeps
    the hub's bookkeeping synchronous, so "last one left" and "first one arrived" for the
    same channel can never interleave around an await.
    """

    def set_handler(self, handler: MessageHandler) -> None: ...

    def want(self, channel: str) -> None: ...

    def unwant(self, channel: str) -> None: ...

    @property
    def healthy(self) -> bool:
        """True when commands work and every Pub/Sub connection is known to deliver."""
        ...

    @property
    def connections_active(self) -> int: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def last_prices(self, tickers: Sequence[str]) -> list[bytes | None]:
        """The payload stored at ``price:last:{TICKER}`` for each ticker."""
        ...

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        """Store each (ticker, payload) as the last price, then publish it on ``price:{TICKER}``."""
        ...
