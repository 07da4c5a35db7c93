"""Metrics of the browser port: WebSocket and SSE streams counted where their sockets start
and end, handshakes refused by reason, REST requests by route and status.

``pricestream_ws_connections_active`` is the original system's first gauge
(``bc11_active_ws_sessions``); like every gauge here it reads live state at scrape time, so
opened minus closed minus active is zero unless the bookkeeping is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

StreamKind = Literal["websocket", "sse"]
_PREFIX = {"websocket": "pricestream_ws_connections", "sse": "pricestream_sse_connections"}
_LABEL = {"websocket": "ws", "sse": "sse"}
# The close codes the server gives (and 1006, a dropped connection): exported at 0 from the
# start, so the first closes of a new pod are an increase like any other (a series that
# appears at 8 counts as no increase in Prometheus).
# A code a client closed with that is not one of these is counted as "other": the client
# picks it (any of 3000-4999 is valid), and each would be a series of its own.
KNOWN_CLOSE_CODES = (
    1000, 1001, 1002, 1006, 1007, 1008, 1009, 1011, 1013, 4001, 4004, 4008, 4009,
)  # fmt: skip
_KNOWN_LABELS = {code: str(code) for code in KNOWN_CLOSE_CODES}


class _LiveStreams(Collector):
    def __init__(self, websockets: Callable[[], int], event_streams: Callable[[], int]) -> None:
        self._websockets = websockets
        self._event_streams = event_streams

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "pricestream_ws_connections_active",
            "Open WebSocket price streams of browsers on this pod.",
            value=self._websockets(),
        )
        yield GaugeMetricFamily(
            "pricestream_sse_connections_active",
            "Open Server-Sent Events price streams of browsers on this pod.",
            value=self._event_streams(),
        )


class WebMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._opened = {
            kind: Counter(
                f"{prefix}_opened",
                f"{_LABEL[kind].upper()} price streams accepted (after the handshake).",
                registry=registry,
            )
            for kind, prefix in _PREFIX.items()
        }
        self._closed = {
            kind: Counter(
                f"{prefix}_closed",
                f"{_LABEL[kind].upper()} price streams ended, by WebSocket close code (SSE: the "
                "code a WebSocket would have carried; 1006: the connection dropped).",
                ["code"],
                registry=registry,
            )
            for kind, prefix in _PREFIX.items()
        }
        for closed in self._closed.values():
            for label in (*_KNOWN_LABELS.values(), "other"):
                closed.labels(label)
        self._refused = Counter(
            "pricestream_web_handshakes_refused",
            "Browser stream requests refused, by transport (ws, sse) and reason.",
            ["transport", "reason"],
            registry=registry,
        )
        self._requests = Counter(
            "pricestream_http_requests",
            "Requests of the browser port answered without a stream, by route and status.",
            ["route", "status"],
            registry=registry,
        )

    def register_live(
        self, websockets: Callable[[], int], event_streams: Callable[[], int]
    ) -> None:
        self._registry.register(_LiveStreams(websockets, event_streams))

    # --- transport.web.server.StreamObserver ------------------------------------------------

    def opened(self, kind: StreamKind) -> None:
        self._opened[kind].inc()

    def closed(self, kind: StreamKind, code: int) -> None:
        self._closed[kind].labels(_KNOWN_LABELS.get(code, "other")).inc()

    # --- the application's counts ------------------------------------------------------------

    def refused(self, kind: StreamKind, reason: str) -> None:
        self._refused.labels(_LABEL[kind], reason).inc()

    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()
