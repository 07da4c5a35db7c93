"""What the hub and the engine need from a Pub/Sub backend; implemented for Redis and in memory."""

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

    # What the shard gauges read (pricestream_redis_shards_wanted, _shards_live and
    # _channels_unconfirmed). A shard is a Redis master owning at least one channel this pod
    # wants; a broker on one Redis (standalone, sentinel) or in memory has exactly one.

    @property
    def shards_wanted(self) -> int:
        """Shards this pod needs a Pub/Sub connection to (one Redis: always 1)."""
        ...

    @property
    def shards_live(self) -> int:
        """Of those, the ones whose Pub/Sub connection is up and answered its probe (one
        Redis: 1 while ``healthy``, else 0)."""
        ...

    @property
    def channels_unconfirmed(self) -> int | None:
        """Wanted channels no shard has confirmed a subscription for (yet, or any more); None
        from a broker that does not track confirmations (then the gauge is not exported).
        A broker answers None always or never."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def last_prices(self, tickers: Sequence[str]) -> list[bytes | None]:
        """The payload stored at ``price:last:{TICKER}`` for each ticker."""
        ...

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        """Store each (ticker, payload) as the last price, then publish it on ``price:{TICKER}``."""
        ...
