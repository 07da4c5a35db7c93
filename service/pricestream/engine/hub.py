"""Per-pod fan-out: ticker -> local subscribers, one broker subscription per ticker.

Bookkeeping is synchronous on the event loop: no await sits between deciding that a ticker
has its first (or lost its last) subscriber and recording it, so the two can never race.
The broker is told the desired set and reconciles on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import repeat
from operator import setitem
from typing import Literal, Protocol

from opentelemetry import trace

from pricestream.codec import batch_frame, decode_update, json_fragment, price_channel
from pricestream.engine.broker import Broker
from pricestream.observability.metrics import Metrics
from pricestream.v1.pricestream_pb2 import PriceUpdate

log = logging.getLogger("pricestream.hub")

# (batch frame, publisher timestamp in ns, sequence). The frame is the update's protobuf
# field of a PriceUpdateBatch for gRPC streams, its JSON fragment for browser streams.
Entry = tuple[bytes, int, int]


class Subscriber(Protocol):
    """What the hub delivers to: the latest entry per ticker, replaced by each newer one.
    Its owner empties ``pending`` as it sends (see ``flush.StreamWriter``)."""

    @property
    def pending(self) -> dict[str, Entry]: ...


# Runs an iterator to its end in C (a deque that keeps nothing): see Hub.on_message.
_exhaust = deque(maxlen=0).extend


class Topic:
    __slots__ = (
        "_last_json",
        "_last_update",
        "channel",
        "json_subscribers",
        "last",
        "linger",
        "subscribers",
        "ticker",
    )

    def __init__(self, ticker: str) -> None:
        self.ticker = ticker
        self.channel = price_channel(ticker)
        # Each subscriber -> its pending dict: gRPC streams (protobuf frames) and browser
        # streams (JSON fragments) apart, so each update is encoded once per form that has a
        # subscriber, and never as JSON on a pod without browsers.
        self.subscribers: dict[Subscriber, dict[str, Entry]] = {}
        self.json_subscribers: dict[Subscriber, dict[str, Entry]] = {}
        self.last: Entry | None = None
        self._last_update: PriceUpdate | None = None
        self._last_json: Entry | None = None  # built from _last_update when first asked for
        self.linger: asyncio.TimerHandle | None = None

    def remember(self, entry: Entry, update: PriceUpdate, json_entry: Entry | None) -> None:
        self.last = entry
        self._last_update = update
        self._last_json = json_entry

    def last_for(self, json: bool) -> Entry | None:
        """The last price in the form a subscriber of that kind takes, if one is known."""
        if not json:
            return self.last
        if self._last_json is None and self._last_update is not None:
            self._last_json = json_entry(self._last_update)
        return self._last_json


def json_entry(update: PriceUpdate) -> Entry:
    return (json_fragment(update), update.published_at_unix_nanos, update.sequence)


DropReason = Literal["oversized", "malformed", "wrong_ticker"]


@dataclass(frozen=True, slots=True)
class Dropped:
    """Why a payload was not taken: the ``reason`` label of the dropped-updates counter."""

    reason: DropReason


# One of each, shared: a dropped payload costs no allocation.
OVERSIZED, MALFORMED, WRONG_TICKER = (
    Dropped("oversized"),
    Dropped("malformed"),
    Dropped("wrong_ticker"),
)


def decode_entry(
    ticker: str, payload: bytes, *, max_bytes: int
) -> tuple[Entry, PriceUpdate] | Dropped:
    """Validate a payload for ``ticker``; its ``Entry`` (protobuf form) and the update, or why
    it is dropped.

    A payload over ``max_bytes`` is refused before it is parsed: a serialized PriceUpdate is
    under 100 bytes, and whatever is accepted is copied to every subscriber.
    """
    if len(payload) > max_bytes:
        return OVERSIZED
    update = decode_update(payload)
    if update is None:
        return MALFORMED
    if update.ticker != ticker:
        return WRONG_TICKER
    return (batch_frame(payload), update.published_at_unix_nanos, update.sequence), update


def entry_from_payload(
    ticker: str, payload: bytes, *, max_bytes: int, json: bool = False
) -> Entry | Dropped:
    """Validate a payload for ``ticker``; an ``Entry`` in the form asked for (JSON fragment or
    protobuf frame), or why it is dropped (see ``decode_entry``)."""
    decoded = decode_entry(ticker, payload, max_bytes=max_bytes)
    if isinstance(decoded, Dropped):
        return decoded
    return json_entry(decoded[1]) if json else decoded[0]


class Hub:
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        linger: float,
        tracer: trace.Tracer,
        *,
        max_update_bytes: int,
    ) -> None:
        self._broker = broker
        self._max_update_bytes = max_update_bytes
        self._tracer = tracer
        self._metrics = metrics
        self._linger = linger
        self._topics: dict[str, Topic] = {}
        self._by_channel: dict[bytes, Topic] = {}
        self._service_handlers: dict[bytes, Callable[[bytes], None]] = {}
        self.offered = 0  # entries stored into subscribers: each sent, coalesced or discarded
        broker.set_handler(self.on_message)

    @property
    def subscriptions_active(self) -> int:
        return len(self._topics)

    def on_service_channel(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Deliver every message of a non-price channel to ``handler``; kept for the hub's life."""
        self._service_handlers[channel.encode()] = handler
        self._broker.want(channel)

    def add(
        self, subscriber: Subscriber, tickers: Iterable[str], *, json: bool = False
    ) -> list[Topic]:
        """Subscribe to ``tickers``; ``json``: the subscriber takes JSON fragments (a browser
        stream) instead of protobuf frames."""
        topics = []
        for ticker in tickers:
            topic = self._topics.get(ticker)
            if topic is None:
                topic = self._open(ticker)
            elif topic.linger is not None:
                topic.linger.cancel()
                topic.linger = None
            (topic.json_subscribers if json else topic.subscribers)[subscriber] = subscriber.pending
            topics.append(topic)
        return topics

    def remove(self, subscriber: Subscriber, topics: Iterable[Topic]) -> None:
        for topic in topics:
            topic.subscribers.pop(subscriber, None)
            topic.json_subscribers.pop(subscriber, None)
            if topic.subscribers or topic.json_subscribers or topic.linger is not None:
                continue
            if self._topics.get(topic.ticker) is not topic:
                continue  # already released (hub closed)
            if self._linger <= 0:
                self._release(topic)
            else:
                loop = asyncio.get_running_loop()
                topic.linger = loop.call_later(self._linger, self._release_if_idle, topic)

    def close(self) -> None:
        """Release every subscription now (shutdown); subscribers must be gone already."""
        for topic in list(self._topics.values()):
            if topic.linger is not None:
                topic.linger.cancel()
                topic.linger = None
            self._release(topic)

    def on_message(self, channel: bytes, payload: bytes) -> None:
        topic = self._by_channel.get(channel)
        if topic is None:
            handler = self._service_handlers.get(channel)
            if handler is not None:
                handler(payload)
            return  # a late message for a ticker just released
        decoded = decode_entry(topic.ticker, payload, max_bytes=self._max_update_bytes)
        if isinstance(decoded, Dropped):
            self._metrics.updates_dropped.labels(decoded.reason).inc()
            log.debug("dropped %s payload on %s", decoded.reason, topic.channel)
            return
        entry, update = decoded
        self._metrics.updates_received.inc()
        pendings = topic.subscribers
        self.offered += len(pendings)
        # The fan-out, once per update per subscriber: a dict store each, all in C. A method
        # call per subscriber (store, count, queue the writer) was a fifth of the pod's CPU.
        _exhaust(map(setitem, pendings.values(), repeat(topic.ticker), repeat(entry)))
        browsers = topic.json_subscribers
        if browsers:
            jentry = json_entry(update)  # once per update, shared by every browser stream
            self.offered += len(browsers)
            _exhaust(map(setitem, browsers.values(), repeat(topic.ticker), repeat(jentry)))
            topic.remember(entry, update, jentry)
        else:
            topic.remember(entry, update, None)

    def seed(self, subscriber: Subscriber, ticker: str, entry: Entry) -> None:
        """Give a subscriber a last-known price unless a newer one is already pending."""
        pending = subscriber.pending
        current = pending.get(ticker)
        if current is None or current[2] < entry[2]:
            pending[ticker] = entry
            self.offered += 1

    def _open(self, ticker: str) -> Topic:
        topic = Topic(ticker)
        self._topics[ticker] = topic
        self._by_channel[topic.channel.encode()] = topic
        with self._tracer.start_as_current_span(
            "pubsub.subscribe", attributes={"messaging.destination.name": topic.channel}
        ):
            self._broker.want(topic.channel)
        self._metrics.subscriptions_opened.inc()
        log.info(
            "Created Redis PubSub subscription for %s",
            ticker,
            extra={"event": "subscription_created", "ticker": ticker},
        )
        return topic

    def _release_if_idle(self, topic: Topic) -> None:
        topic.linger = None
        if not topic.subscribers:
            self._release(topic)

    def _release(self, topic: Topic) -> None:
        del self._topics[topic.ticker]
        del self._by_channel[topic.channel.encode()]
        with self._tracer.start_as_current_span(
            "pubsub.unsubscribe", attributes={"messaging.destination.name": topic.channel}
        ):
            self._broker.unwant(topic.channel)
        self._metrics.subscriptions_closed.inc()
        log.info(
            "Closed Redis PubSub subscription for %s (no more subscribers)",
            topic.ticker,
            extra={"event": "subscription_closed", "ticker": topic.ticker},
        )
