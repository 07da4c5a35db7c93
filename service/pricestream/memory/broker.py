"""In-process broker with the Redis broker's interface, for `pricestream demo` without Redis."""

from __future__ import annotations

from collections.abc import Sequence

from pricestream.codec import price_channel
from pricestream.engine.broker import MessageHandler


def _drop(channel: bytes, payload: bytes) -> None:
    """Handler until one is set: nobody listens yet."""


class MemoryBroker:
    def __init__(self) -> None:
        self._wanted: set[bytes] = set()
        self._last: dict[str, bytes] = {}
        self._handler: MessageHandler = _drop
        self._open = False

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    def want(self, channel: str) -> None:
        self._wanted.add(channel.encode())

    def unwant(self, channel: str) -> None:
        self._wanted.discard(channel.encode())

    @property
    def healthy(self) -> bool:
        return self._open

    @property
    def connections_active(self) -> int:
        return 0

    @property
    def shards_wanted(self) -> int:
        return 1  # like a standalone Redis: one "shard", live when the broker delivers

    @property
    def shards_live(self) -> int:
        return int(self.healthy)

    @property
    def channels_unconfirmed(self) -> int | None:
        return None

    async def start(self) -> None:
        self._open = True

    async def aclose(self) -> None:
        self._open = False
        self._wanted.clear()

    async def last_prices(self, tickers: Sequence[str]) -> list[bytes | None]:
        return [self._last.get(ticker) for ticker in tickers]

    async def publish(self, channel: str, payload: bytes) -> None:
        key = channel.encode()
        if key in self._wanted:
            self._handler(key, payload)

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        for ticker, payload in prices:
            self._last[ticker] = payload
            await self.publish(price_channel(ticker), payload)
