"""gRPC server metrics under the go-grpc-prometheus names, for every kind of call.

Counters `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
`grpc_server_msg_received_total`, `grpc_server_msg_sent_total` and the histogram
`grpc_server_handling_seconds`, each labelled `grpc_type` (`unary`, `server_stream`,
`client_stream`, `bidi_stream`), `grpc_service`, `grpc_method`. The transport counts a call
when it starts and when it ends; messages are counted as plain integers read at scrape time,
so a stream's hot path pays no metric update per message: a message sent is added to its
method's total (``MethodStats.sent``) as it goes, a message received to its call's count
(folded into the method's total when the call ends, live calls summed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LABELS = ("grpc_type", "grpc_service", "grpc_method")
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class MethodStats:
    """The metric children of one method, and its message totals: every message sent by its
    calls (counted as they go), and the messages received by its ended calls."""

    __slots__ = ("_handled", "_handling", "labels", "received", "sent", "started")

    def __init__(self, metrics: GrpcMetrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        self._handled = metrics.handled
        self._handling = metrics.handling.labels(*labels)
        self.sent = 0
        self.received = 0

    def finished(self, messages_received: int, code: grpc.StatusCode, seconds: float) -> None:
        self.received += messages_received
        self._handled.labels(*self.labels, code.name).inc()
        self._handling.observe(seconds)


# Messages received by the calls in progress: (method, received) per call.
LiveCounts = Callable[[], Iterable[tuple[MethodStats, int]]]


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from the start of an RPC to its end on the server.",
            LABELS,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self._methods: dict[tuple[str, str, str], MethodStats] = {}
        self._live: LiveCounts = lambda: ()
        registry.register(_MessageCounts(self))

    def method(self, grpc_type: str, service: str, method: str) -> MethodStats:
        labels = (grpc_type, service, method)
        stats = self._methods.get(labels)
        if stats is None:
            stats = self._methods[labels] = MethodStats(self, labels)
        return stats

    def count_live_messages(self, live: LiveCounts) -> None:
        """Where the received-message counts of calls in progress are read at scrape time."""
        self._live = live

    def message_totals(self) -> Iterator[tuple[tuple[str, str, str], int, int]]:
        received = {stats: stats.received for stats in self._methods.values()}
        for stats, live_received in self._live():
            received[stats] += live_received
        for stats in self._methods.values():
            yield stats.labels, stats.sent, received[stats]


class _MessageCounts(Collector):
    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[CounterMetricFamily]:
        received = CounterMetricFamily(
            "grpc_server_msg_received", "Request messages received by the server.", labels=LABELS
        )
        sent = CounterMetricFamily(
            "grpc_server_msg_sent", "Response messages sent by the server.", labels=LABELS
        )
        for labels, sent_count, received_count in self._metrics.message_totals():
            received.add_metric(labels, received_count)
            sent.add_metric(labels, sent_count)
        yield received
        yield sent
