"""Prometheus metrics of one server: counters count events, gauges read live state at scrape time.

Names follow DESIGN.md. No label ever carries a ticker or a session id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from pricestream.observability.latency import BatchLatencyHistogram, TraceIdOf

if TYPE_CHECKING:
    from pricestream.observability.tracing import Tracing

# The OpenMetrics `_created` samples double the series count and confuse `_total` pairs.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0,
)  # fmt: skip
# The freshness SLO's threshold, flush interval + margin, is a bucket bound of the histogram. The
# margin is the setting freshness_margin (PRICESTREAM_FRESHNESS_MARGIN), which the chart sets
# from slo.freshness.marginSeconds, the value its SLO rules use for the bucket's `le`.
# An exemplar per bucket at most this often: Prometheus keeps what each scrape sees (the
# ServiceMonitor's default interval).
EXEMPLAR_INTERVAL = 15.0


def latency_buckets(flush_interval: float | None, margin: float) -> list[float]:
    """LATENCY_BUCKETS plus the freshness bound, flush interval + margin, rounded to the
    microsecond (the chart writes the same number as the SLO's `le`)."""
    if flush_interval is None:
        return list(LATENCY_BUCKETS)
    return sorted({*LATENCY_BUCKETS, round(flush_interval + margin, 6)})


def delivery_trace_ids(tracing: Tracing) -> TraceIdOf | None:
    """Trace ids of deliveries: each asked-for delivery becomes a span of its own,
    `pricestream.delivery`, from the publisher's timestamp to the batch's hand-over; its trace
    id if the sampler kept it. None when tracing is off."""
    if not tracing.enabled:
        return None
    tracer = tracing.tracer

    def trace_id_of(published_ns: int, now_ns: int) -> str | None:
        span = tracer.start_span(
            "pricestream.delivery",
            start_time=published_ns,
            attributes={"pricestream.delivery_latency_seconds": (now_ns - published_ns) / 1e9},
        )
        span.end(end_time=now_ns)
        context = span.get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return f"{context.trace_id:032x}"

    return trace_id_of


@dataclass(frozen=True)
class LiveGauges:
    """Callbacks that read the registries at scrape time."""

    sessions_active: Callable[[], int]
    streams_active: Callable[[], int]
    subscriptions_active: Callable[[], int]
    pubsub_connections_active: Callable[[], int]
    redis_up: Callable[[], bool]
    ready: Callable[[], bool]
    loop_lag: Callable[[], float]
    flush_backlog: Callable[[], float]
    # Shards = cluster masters owning a wanted channel (standalone: the one Redis); None: the
    # gauge is not exported (channels_unconfirmed exists in cluster mode only).
    shards_wanted: Callable[[], int] | None = None
    shards_live: Callable[[], int] | None = None
    channels_unconfirmed: Callable[[], int] | None = None


class _LiveCollector(Collector):
    def __init__(self, gauges: LiveGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = self._gauges
        yield GaugeMetricFamily(
            "pricestream_sessions_active",
            "Sessions this pod holds: created here and not yet streamed, or streaming here.",
            value=g.sessions_active(),
        )
        yield GaugeMetricFamily(
            "pricestream_streams_active",
            "StreamPriceUpdates calls in progress, counted at the RPC boundary.",
            value=g.streams_active(),
        )
        yield GaugeMetricFamily(
            "pricestream_pubsub_subscriptions_active",
            "Ticker channels this pod holds a Redis Pub/Sub subscription for.",
            value=g.subscriptions_active(),
        )
        yield GaugeMetricFamily(
            "pricestream_redis_pubsub_connections_active",
            "Open Redis Pub/Sub connections of this pod.",
            value=g.pubsub_connections_active(),
        )
        yield GaugeMetricFamily(
            "pricestream_redis_up",
            "1 when Redis answers commands and every Pub/Sub connection delivers, else 0.",
            value=1 if g.redis_up() else 0,
        )
        yield GaugeMetricFamily(
            "pricestream_ready",
            "1 when the pod accepts new streams (what /readyz reports), else 0.",
            value=1 if g.ready() else 0,
        )
        yield GaugeMetricFamily(
            "pricestream_flush_lag_seconds",
            "How late the flushes run (moving average): the event loop's overload.",
            value=g.loop_lag(),
        )
        yield GaugeMetricFamily(
            "pricestream_flush_backlog_ratio",
            "Share of streams with news busy with an earlier batch for over a flush interval, "
            "at least 250 ms (moving average): the pod writes fewer batches than its streams need.",
            value=g.flush_backlog(),
        )
        if g.shards_wanted is not None:
            yield GaugeMetricFamily(
                "pricestream_redis_shards_wanted",
                "Cluster masters that own at least one channel this pod wants (one Pub/Sub "
                "connection each); 1 outside cluster mode.",
                value=g.shards_wanted(),
            )
        if g.shards_live is not None:
            yield GaugeMetricFamily(
                "pricestream_redis_shards_live",
                "Of the wanted cluster masters, those whose Pub/Sub connection is up and "
                "answers; below shards_wanted means a shard is in trouble. Outside cluster "
                "mode: 1 while Pub/Sub delivers.",
                value=g.shards_live(),
            )
        if g.channels_unconfirmed is not None:
            yield GaugeMetricFamily(
                "pricestream_redis_channels_unconfirmed",
                "Wanted channels no cluster shard has confirmed a subscription for: tickers "
                "that get no prices right now (a slot moving, a shard failing over).",
                value=g.channels_unconfirmed(),
            )


class Metrics:
    """All event counters of one server, in a registry of its own."""

    def __init__(
        self,
        flush_interval: float | None = None,
        *,
        freshness_margin: float = 0.1,
        tracing: Callable[[], Tracing] | None = None,
        exemplar_interval: float = EXEMPLAR_INTERVAL,
    ) -> None:
        """``flush_interval`` and ``freshness_margin``: the server's settings (0.1 is the
        setting's default), for the freshness bucket bound at their sum. ``tracing``: the
        server's tracing, read at the first delivery (it may be built after the metrics); on,
        the latency histogram carries exemplars with trace ids."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Process CPU, RSS and open fds; Python platform and GC figures.
        prometheus_client.ProcessCollector(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        prometheus_client.GCCollector(registry=r)
        self.sessions_opened = Counter(
            "pricestream_sessions_opened", "Sessions that entered this pod's registry.", registry=r
        )
        self.sessions_closed = Counter(
            "pricestream_sessions_closed",
            "Sessions that left this pod's registry, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_opened = Counter(
            "pricestream_streams_opened", "StreamPriceUpdates calls started.", registry=r
        )
        self.streams_closed = Counter(
            "pricestream_streams_closed",
            "StreamPriceUpdates calls ended, by reason.",
            ["reason"],
            registry=r,
        )
        self.subscriptions_opened = Counter(
            "pricestream_pubsub_subscriptions_opened",
            "Ticker channel subscriptions this pod opened.",
            registry=r,
        )
        self.subscriptions_closed = Counter(
            "pricestream_pubsub_subscriptions_closed",
            "Ticker channel subscriptions this pod closed.",
            registry=r,
        )
        self.connections_opened = Counter(
            "pricestream_redis_pubsub_connections_opened",
            "Redis Pub/Sub connections opened.",
            registry=r,
        )
        self.connections_closed = Counter(
            "pricestream_redis_pubsub_connections_closed",
            "Redis Pub/Sub connections closed.",
            registry=r,
        )
        self.updates_received = Counter(
            "pricestream_price_updates_received",
            "Price updates received from Pub/Sub for a ticker this pod holds.",
            registry=r,
        )
        self.updates_dropped = Counter(
            "pricestream_price_updates_dropped",
            "Pub/Sub payloads dropped as invalid or oversized, by reason.",
            ["reason"],
            registry=r,
        )
        self.updates_sent = Counter(
            "pricestream_price_updates_sent", "Price updates handed to streams.", registry=r
        )
        self.updates_coalesced = Counter(
            "pricestream_price_updates_coalesced",
            "Price updates replaced by a newer one for the same ticker before a flush.",
            registry=r,
        )
        self.batches_sent = Counter(
            "pricestream_batches_sent", "PriceUpdateBatch messages handed to streams.", registry=r
        )
        self.delivery_latency = BatchLatencyHistogram(
            "pricestream_delivery_latency_seconds",
            "Seconds from the publisher's timestamp to the batch being handed to the stream.",
            latency_buckets(flush_interval, freshness_margin),
        )
        if tracing is not None:
            self.delivery_latency.enable_exemplars(
                lambda: delivery_trace_ids(tracing()), exemplar_interval
            )
        r.register(self.delivery_latency)
        self.redis_reconnects = Counter(
            "pricestream_redis_reconnects",
            "Redis Pub/Sub connections re-established after a failure.",
            registry=r,
        )
        self.slot_moves = Counter(
            "pricestream_redis_slot_moves",
            "Cluster mode: channels moved to another shard because the slot map changed "
            "(reshard, failover).",
            registry=r,
        )
        self.topology_refreshes = Counter(
            "pricestream_redis_topology_refreshes",
            "Cluster mode: reads of the slot map (CLUSTER SLOTS), by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.slow_consumer_disconnects = Counter(
            "pricestream_slow_consumer_disconnects",
            "Streams cut off because the client stopped reading.",
            registry=r,
        )

    def register_live_gauges(self, gauges: LiveGauges) -> None:
        self.registry.register(_LiveCollector(gauges))

    def exposition(self, openmetrics_format: bool = False) -> bytes:
        """The registry in Prometheus' text format, or OpenMetrics (with exemplars)."""
        if openmetrics_format:
            return openmetrics.generate_latest(self.registry)
        return prometheus_client.generate_latest(self.registry)

    def exposition_for(self, accept: str) -> tuple[bytes, str]:
        """(body, Content-Type) for a scrape's Accept header: OpenMetrics, which carries the
        exemplars, when the scraper asks for it (Prometheus does with exemplar storage on)."""
        if "application/openmetrics-text" in accept:
            return self.exposition(True), openmetrics.CONTENT_TYPE_LATEST
        return self.exposition(), prometheus_client.CONTENT_TYPE_LATEST
