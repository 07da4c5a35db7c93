"""The Redis ingestion contract: channel and key names, and the wire frames of a batch.

A ``PriceUpdateBatch`` is ``repeated PriceUpdate updates = 1``, so its encoding is the
concatenation of one length-delimited field-1 frame per update. The hub builds each frame
once per received message and every stream reuses it: no re-encoding per client.

Browsers get the same update as a JSON fragment (the proto3 JSON mapping of ``PriceUpdate``,
64-bit integers as strings), also built once per received message, each ending in a comma so
that a batch is the plain concatenation of its fragments, like the protobuf frames.
"""

from __future__ import annotations

import math

from pricestream.v1.pricestream_pb2 import PriceUpdate

CHANNEL_PREFIX = "price:"
LAST_PRICE_PREFIX = "price:last:"
# Service channels of pricestream itself (not part of the ingestion contract).
SESSION_CLOSED_CHANNEL = "pricestream:session-closed"
PROBE_CHANNEL_PREFIX = "pricestream:probe:"

_BATCH_UPDATES_TAG = b"\x0a"  # field 1, wire type 2 (length-delimited)


def price_channel(ticker: str) -> str:
    return CHANNEL_PREFIX + ticker


def last_price_key(ticker: str) -> str:
    return LAST_PRICE_PREFIX + ticker


# Cluster mode (sharded Pub/Sub): the ticker is the hash tag, so a ticker's channel and its
# last-price key share one slot, hence one shard: a producer writes both on one node.
def cluster_price_channel(ticker: str) -> str:
    return CHANNEL_PREFIX + "{" + ticker + "}"


def cluster_last_price_key(ticker: str) -> str:
    return LAST_PRICE_PREFIX + "{" + ticker + "}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def batch_frame(payload: bytes) -> bytes:
    """The bytes one serialized ``PriceUpdate`` occupies inside a ``PriceUpdateBatch``."""
    return _BATCH_UPDATES_TAG + _varint(len(payload)) + payload


def decode_update(payload: bytes) -> PriceUpdate | None:
    """Parse a payload from Redis; ``None`` when it is not a valid ``PriceUpdate``."""
    update = PriceUpdate()
    try:
        update.ParseFromString(payload)
    except Exception:  # protobuf raises DecodeError, but also others on some garbage
        return None
    return update


_JSON_FRAGMENT = b'{"ticker":"%s","price":%s,"publishedAtUnixNanos":"%d","sequence":"%d"},'
_NON_FINITE = {math.inf: b'"Infinity"', -math.inf: b'"-Infinity"'}


def json_price(price: float) -> bytes:
    """A double as the proto3 JSON mapping writes it: a number, or a string when not finite."""
    if math.isfinite(price):
        return repr(price).encode()  # the shortest text that reads back as the same double
    return _NON_FINITE.get(price, b'"NaN"')


def json_fragment(update: PriceUpdate) -> bytes:
    """``update`` in the proto3 JSON mapping, followed by a comma (see the module docstring).

    The ticker needs no escaping: the hub accepts an update only for the ticker of its
    channel, and tickers are validated to ``A-Z 0-9 . - _``."""
    return _JSON_FRAGMENT % (
        update.ticker.encode("ascii"),
        json_price(update.price),
        update.published_at_unix_nanos,
        update.sequence,
    )
