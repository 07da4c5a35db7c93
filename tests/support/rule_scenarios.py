"""Synthetic Prometheus series of pricestream pods, for `promtool test rules`.

A scenario describes each pod minute by minute (active streams, leaked sessions, subscriptions);
the model derives counters that agree with the gauges, exactly as the service keeps them, so a
healthy scenario has zero drift and a leak is only what the scenario puts in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JOB = "pricestream"
NAMESPACE = "prod"
SERVICE = "pricestream.v1.PriceStreamService"


def ramp(start: float, end: float, minutes: int) -> list[float]:
    """`minutes` values from start (exclusive) to end (inclusive)."""
    return [start + (end - start) * (i + 1) / minutes for i in range(minutes)]


def hold(value: float, minutes: int) -> list[float]:
    return [value] * minutes


@dataclass
class Pod:
    """One pod's minute-by-minute state; `None` in `streams` means the pod is not running."""

    name: str
    streams: list[float | None]
    churn: float = 20  # streams that end and are replaced each minute
    subscription_churn: float = 0  # tickers unsubscribed and subscribed again each minute
    tickers_per_stream: float = 0.5  # subscriptions per stream, capped by the universe
    universe: float = 500
    leaked_sessions: list[float] | None = None  # sessions kept after their stream ended
    leaked_subscriptions: list[float] | None = None
    restarts_at: list[int] = field(default_factory=list)  # counters reset on these minutes
    # shares of the streams that are browser sockets (they count as streams too); their closes
    # are split by close code: churn closes 1000, closes of a shrinking pod 1001
    ws_share: float = 0
    sse_share: float = 0
    stuck_ws: list[float] | None = None  # closed (and counted) WebSockets the gauge still counts
    job: str = JOB  # another release's pods carry its own job

    def labels(self) -> str:
        instance = f"{self.name}:9464"
        return f'job="{self.job}",namespace="{NAMESPACE}",pod="{self.name}",instance="{instance}"'

    def series(self) -> list[dict[str, str]]:
        out: dict[str, list[float | None]] = {}
        n = len(self.streams)
        leak_sessions = self.leaked_sessions or [0.0] * n
        leak_subs = self.leaked_subscriptions or [0.0] * n
        counters = {
            "sessions": [0.0, 0.0],
            "streams": [0.0, 0.0],
            "subscriptions": [0.0, 0.0],
            "updates": [0.0, 0.0],
            "handled": [0.0, 0.0],
        }
        sockets = {kind: dict.fromkeys(_SOCKET_COUNTERS, 0.0) for kind in ("ws", "sse")}
        previous: dict[str, float] = {"streams": 0, "sessions": 0, "subscriptions": 0}
        for minute in range(n):
            streams = self.streams[minute]
            if minute in self.restarts_at or streams is None:
                for pair in counters.values():
                    pair[0] = pair[1] = 0.0
                previous = {"streams": 0, "sessions": 0, "subscriptions": 0}
                sockets = {kind: dict.fromkeys(_SOCKET_COUNTERS, 0.0) for kind in sockets}
            if streams is None:
                for name in _ALL_SERIES + _SOCKET_SERIES:
                    out.setdefault(name, []).append(None)
                continue
            socket_values = self._sockets(sockets, streams, previous["streams"])
            if self.stuck_ws:
                socket_values["pricestream_ws_connections_active"] += self.stuck_ws[minute]
            subscriptions = min(self.universe, streams * self.tickers_per_stream)
            active = {
                "streams": streams,
                "sessions": streams + leak_sessions[minute],
                "subscriptions": subscriptions + leak_subs[minute],
            }
            for kind, now in active.items():
                churn = self.churn if kind != "subscriptions" else self.subscription_churn
                churn = churn if streams else 0
                opened, closed = counters[kind]
                # the sessions a leak keeps were opened and never closed
                opened += max(now - previous[kind], 0) + churn
                closed += max(previous[kind] - now, 0) + churn
                counters[kind] = [opened, closed]
                previous[kind] = now
            # a leaked subscription still receives prices; only streams are sent any
            counters["updates"][0] += 60_000 if active["subscriptions"] else 0
            counters["updates"][1] += 60_000 if streams else 0
            counters["handled"][0] += 2 * self.churn
            values = {
                "up": 1,
                "pricestream_ready": 1,
                "pricestream_redis_up": 1,
                "pricestream_sessions_active": active["sessions"],
                "pricestream_sessions_opened_total": counters["sessions"][0],
                'pricestream_sessions_closed_total{reason="closed"}': counters["sessions"][1],
                "pricestream_streams_active": active["streams"],
                "pricestream_streams_opened_total": counters["streams"][0],
                'pricestream_streams_closed_total{reason="client_gone"}': counters["streams"][1],
                "pricestream_pubsub_subscriptions_active": active["subscriptions"],
                "pricestream_pubsub_subscriptions_opened_total": counters["subscriptions"][0],
                "pricestream_pubsub_subscriptions_closed_total": counters["subscriptions"][1],
                "pricestream_redis_pubsub_connections_active": 2,
                "pricestream_redis_pubsub_connections_opened_total": 2,
                "pricestream_redis_pubsub_connections_closed_total": 0,
                "pricestream_redis_reconnects_total": 0,
                "pricestream_slow_consumer_disconnects_total": 0,
                "pricestream_price_updates_received_total": counters["updates"][0],
                "pricestream_price_updates_sent_total": counters["updates"][1],
                'pricestream_delivery_latency_seconds_bucket{le="0.1"}': counters["updates"][1],
                'pricestream_delivery_latency_seconds_bucket{le="1"}': counters["updates"][1],
                'pricestream_delivery_latency_seconds_bucket{le="+Inf"}': counters["updates"][1],
                f'grpc_server_handled_total{{grpc_service="{SERVICE}",grpc_code="OK"}}': (
                    counters["handled"][0]
                ),
            }
            values.update(socket_values)
            for name in _ALL_SERIES + _SOCKET_SERIES:
                out.setdefault(name, []).append(values[name])
        return [
            {"series": _with_labels(name, self.labels()), "values": _expand(points)}
            for name, points in out.items()
            if any(point is not None for point in points)
        ]

    def _sockets(
        self, counters: dict[str, dict[str, float]], streams: float, before: float
    ) -> dict[str, float | None]:
        """This minute's WebSocket and SSE series: a share of the streams, their counters
        agreeing with the gauge. A closed_total{code} series exists from its first close on."""
        values: dict[str, float | None] = {}
        for kind, share in (("ws", self.ws_share), ("sse", self.sse_share)):
            count = counters[kind]
            churn = self.churn * share if streams else 0
            count["opened"] += max(streams - before, 0) * share + churn
            count["1000"] += churn
            count["1001"] += max(before - streams, 0) * share
            prefix = f"pricestream_{kind}_connections"
            values[f"{prefix}_active"] = streams * share
            values[f"{prefix}_opened_total"] = count["opened"]
            for code in ("1000", "1001"):
                values[f'{prefix}_closed_total{{code="{code}"}}'] = count[code] or None
        return values


_ALL_SERIES = [
    "up",
    "pricestream_ready",
    "pricestream_redis_up",
    "pricestream_sessions_active",
    "pricestream_sessions_opened_total",
    'pricestream_sessions_closed_total{reason="closed"}',
    "pricestream_streams_active",
    "pricestream_streams_opened_total",
    'pricestream_streams_closed_total{reason="client_gone"}',
    "pricestream_pubsub_subscriptions_active",
    "pricestream_pubsub_subscriptions_opened_total",
    "pricestream_pubsub_subscriptions_closed_total",
    "pricestream_redis_pubsub_connections_active",
    "pricestream_redis_pubsub_connections_opened_total",
    "pricestream_redis_pubsub_connections_closed_total",
    "pricestream_redis_reconnects_total",
    "pricestream_slow_consumer_disconnects_total",
    "pricestream_price_updates_received_total",
    "pricestream_price_updates_sent_total",
    'pricestream_delivery_latency_seconds_bucket{le="0.1"}',
    'pricestream_delivery_latency_seconds_bucket{le="1"}',
    'pricestream_delivery_latency_seconds_bucket{le="+Inf"}',
    f'grpc_server_handled_total{{grpc_service="{SERVICE}",grpc_code="OK"}}',
]


_SOCKET_COUNTERS = ("opened", "1000", "1001")
_SOCKET_SERIES = [
    f"pricestream_{kind}_connections_{suffix}"
    for kind in ("ws", "sse")
    for suffix in (
        "active",
        "opened_total",
        'closed_total{code="1000"}',
        'closed_total{code="1001"}',
    )
]


def _with_labels(name: str, labels: str) -> str:
    if name.endswith("}"):
        return f"{name[:-1]},{labels}}}"
    return f"{name}{{{labels}}}"


def _expand(points: list[float | None]) -> str:
    """promtool's series notation: one value per minute, `stale` when a pod went away."""
    out = []
    for i, point in enumerate(points):
        if point is None:
            out.append("stale" if i and points[i - 1] is not None else "_")
        else:
            out.append(f"{point:g}")
    return " ".join(out)


@dataclass
class Expected:
    """An alert expected to fire at `minute`, with its labels and annotations."""

    alert: str
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass
class Scenario:
    name: str
    pods: list[Pod]
    check_minutes: list[int]
    firing: dict[int, list[Expected]] = field(default_factory=dict)
    extra_series: list[dict[str, str]] = field(default_factory=list)

    def promtool_test(self, rules_path: str, alert_names: list[str]) -> dict[str, Any]:
        """A promtool test document: every alert is checked at every minute, so anything
        that fires and is not listed in `firing` fails the test."""
        series = [s for pod in self.pods for s in pod.series()] + self.extra_series
        alert_tests = []
        for minute in self.check_minutes:
            expected = {e.alert: [] for e in self.firing.get(minute, [])}
            for e in self.firing.get(minute, []):
                expected[e.alert].append({"exp_labels": e.labels, "exp_annotations": e.annotations})
            for alert in alert_names:
                alert_tests.append(
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": expected.get(alert, []),
                    }
                )
        return {
            "rule_files": [rules_path],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "name": self.name,
                    "interval": "1m",
                    "input_series": series,
                    "alert_rule_test": alert_tests,
                }
            ],
        }
