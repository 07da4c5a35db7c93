"""The bench's feed: the product's random walk (pricestream.tools.feed.run_feed), published in the
wire format of the server under test, so that every server only receives from Redis.

    --format pricestream   the ingestion contract: SET price:last:{T} + PUBLISH price:{T}, a
                           serialized PriceUpdate (pricestream's own RedisPricePublisher)
    --format centrifugo    what Centrifugo's Redis broker itself publishes for a channel without
                           history: PUBLISH {prefix}.client.{channel} carrying a
                           protocol.Publication whose data (field 4) is the same serialized
                           PriceUpdate and whose time (field 9) is the publish time in ms
    --format centrifugo-json   the same, the data being the update's proto3 JSON (the object
                           pricestream's browser frames carry, pricestream.codec.json_fragment):
                           what Centrifugo's JSON transports (uni_websocket) embed as is

Bench-only: the Centrifugo format is not part of the product. Same ticks, same schedule, same
payload bytes for both formats; only the envelope and the channel differ.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from pricestream.codec import decode_update, json_fragment
from pricestream.redis.broker import RedisPricePublisher
from pricestream.tools.feed import run_feed, ticker_universe
from redis.asyncio import Redis

# protocol.Publication (github.com/centrifugal/protocol, client.proto): bytes data = 4;
# int64 time = 9 (Unix ms). Tags are (field << 3) | wire type: 4 << 3 | 2, 9 << 3 | 0.
PUBLICATION_DATA_TAG = b"\x22"
PUBLICATION_TIME_TAG = b"\x48"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def centrifugo_publication(data: bytes, time_ms: int) -> bytes:
    """A serialized protocol.Publication{data, time}: what Centrifugo's Redis broker publishes.
    It starts with the data field's tag, never with "__" (the broker's metadata prefix)."""
    return (
        PUBLICATION_DATA_TAG + _varint(len(data)) + data + PUBLICATION_TIME_TAG + _varint(time_ms)
    )


def centrifugo_redis_channel(prefix: str, channel: str) -> str:
    """The Redis channel Centrifugo's broker (standalone Redis, no sharded Pub/Sub) uses."""
    return f"{prefix}.client.{channel}"


class CentrifugoPublisher:
    """Publishes each tick as Centrifugo's Redis broker would, in one pipeline per batch."""

    def __init__(
        self, client: Redis, prefix: str, channel_prefix: str, *, json_data: bool = False
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._channel_prefix = channel_prefix
        self._json_data = json_data

    async def publish_prices(self, prices: Sequence[tuple[str, bytes]]) -> None:
        now_ms = time.time_ns() // 1_000_000
        async with self._client.pipeline(transaction=False) as pipe:
            for ticker, payload in prices:
                channel = centrifugo_redis_channel(self._prefix, self._channel_prefix + ticker)
                pipe.publish(channel, centrifugo_publication(self._data(payload), now_ms))
            await pipe.execute()

    def _data(self, payload: bytes) -> bytes:
        if not self._json_data:
            return payload
        update = decode_update(payload)
        assert update is not None, "run_feed publishes serialized PriceUpdates"
        return json_fragment(update)[:-1]  # without the fragment's trailing comma


async def _main(args: argparse.Namespace) -> int:
    client = Redis.from_url(args.redis_url)
    try:
        if args.format.startswith("centrifugo"):
            publisher = CentrifugoPublisher(
                client, args.prefix, args.channel_prefix, json_data=args.format == "centrifugo-json"
            )
        else:
            publisher = RedisPricePublisher(client)
        tickers = ticker_universe(args.tickers)
        published = await run_feed(publisher, tickers, args.rate, args.duration)
    finally:
        await client.aclose()
    print(f"bench_feed: published {published} updates", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the bench's feed, in a server's wire format")
    parser.add_argument(
        "--format", choices=("pricestream", "centrifugo", "centrifugo-json"), default="pricestream"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tickers", type=int, default=50, help="how many tickers")
    parser.add_argument("--rate", type=float, default=1000.0, help="updates per second in total")
    parser.add_argument("--duration", type=float, default=None, help="seconds; default: forever")
    parser.add_argument(
        "--prefix", default="centrifugo", help="centrifugo: the Redis engine's prefix"
    )
    parser.add_argument(
        "--channel-prefix",
        default="prices:",
        help="centrifugo: each ticker's channel is this + the ticker (namespace prices)",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.tickers < 1:
        parser.error("--rate and --tickers must be positive")
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
