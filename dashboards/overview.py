"""The pricestream overview dashboard: lifecycle (leaks), the browser path, prices, latency,
errors, Redis, saturation."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.models import dashboard as model

from dashboards.grafana import (
    AlertsAnnotation,
    build_model,
    builtin_annotation,
    datasource_variable,
    query_variable,
    to_json,
)
from dashboards.style import PanelBuilder, Steps, per_second, query, stat, timeseries

UID = "pricestream-overview"
SEL = 'namespace="$namespace", pod=~"$pod"'
RATE = "$__rate_interval"
FIRING_ALERTS = 'ALERTS{alertstate="firing", alertname=~"PriceStream.*", namespace="$namespace"}'
LIFECYCLE = (
    "pricestream_(sessions|streams|pubsub_subscriptions|redis_pubsub_connections"
    "|ws_connections|sse_connections)"
)

# Each row and the metrics its panels may query (full-match regular expressions): a panel whose
# queries name a metric outside its row's topic sits under the wrong row (tests check it).
NOW = "Now"
LIFECYCLE_ROW = "Lifecycle: opened must equal closed once clients are gone"
BROWSER = "Browser path: WebSocket, SSE, REST"
PRICES = "Prices"
ERRORS = "Errors and Redis"
SATURATION = "Saturation: flush lag, backlog, CPU, memory"
ROW_TOPICS = {
    NOW: rf"{LIFECYCLE}_active|pricestream_ready|ALERTS",
    LIFECYCLE_ROW: rf"{LIFECYCLE}_(active|opened_total|closed_total)",
    BROWSER: r"pricestream_(ws|sse)_connections_(active|opened_total|closed_total)"
    r"|pricestream_web_handshakes_refused_total|pricestream_http_requests_total",
    PRICES: r"pricestream_(price_updates_[a-z]+_total|batches_sent_total"
    r"|delivery_latency_seconds_bucket)",
    ERRORS: r"grpc_server_handled_total|pricestream_slow_consumer_disconnects_total"
    r"|pricestream_redis_(up|reconnects_total|shards_wanted|shards_live|slot_moves_total)",
    SATURATION: r"pricestream_flush_(lag_seconds|backlog_ratio)|process_[a-z_]+",
}
GREEN: Steps = [(None, "green")]


def per_pod_and_total(metric: str) -> list[Dataquery]:
    return [
        query(f"sum by (pod) ({metric}{{{SEL}}})", "{{pod}}"),
        query(f"sum({metric}{{{SEL}}})", "total"),
    ]


def rate(metric: str, by: str = "pod", extra: str = "") -> str:
    """Per-second rate summed by `by` (empty: over the selected pods)."""
    selector = f"{SEL}, {extra}" if extra else SEL
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{RATE}]))"


def drift(resource: str, closes_labelled: bool = False) -> Dataquery:
    """opened - closed - active of one resource over the selected pods: 0 when they agree,
    negative when more closed than opened (itself a bug signal). A closed counter with a label
    (a browser socket's close `code`) has no series before its first close: 0 until then."""

    def total(name: str) -> str:
        return f"sum({name}{{{SEL}}})"

    opened = total(f"pricestream_{resource}_opened_total")
    closed = total(f"pricestream_{resource}_closed_total")
    if closes_labelled:
        closed = f"({closed} or vector(0))"
    active = total(f"pricestream_{resource}_active")
    return query(f"{opened} - {closed} - {active}", resource.replace("_", " "))


def latency_quantile(q: float) -> Dataquery:
    buckets = f"sum by (le) (rate(pricestream_delivery_latency_seconds_bucket{{{SEL}}}[{RATE}]))"
    # Exemplars (OpenMetrics, trace ids of sampled deliveries) shown on the panel: with the
    # datasource's exemplar link to the tracing backend, a dot opens its trace (docs/slo.md).
    return query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}").exemplar(True)


def dashboard() -> model.Dashboard:
    """The overview as the SDK's dashboard model: panels placed left to right, row by row."""
    board = (
        builders.Dashboard("pricestream / overview")
        .uid(UID)
        .description(
            "Sessions, streams, browser sockets, Pub/Sub subscriptions and their drift; "
            "prices, latency."
        )
        .tags(["pricestream", "grpc", "redis"])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .version(1)
        .time("now-1h", "now")
        .with_variable(datasource_variable())
        .with_variable(
            query_variable(
                "namespace",
                "Namespace",
                "label_values(pricestream_sessions_active, namespace)",
                multi=False,
            )
        )
        .with_variable(
            query_variable(
                "pod",
                "Pod",
                'label_values(pricestream_sessions_active{namespace="$namespace"}, pod)',
                multi=True,
                all_value=".*",
            )
        )
        .annotation(builtin_annotation())
        .annotation(AlertsAnnotation(FIRING_ALERTS))
    )

    def add(panel: PanelBuilder, width: int, height: int) -> None:
        board.with_panel(panel.span(width).height(height))

    board.with_row(builders.Row(NOW))
    for title, metric, description, steps in [
        ("Sessions", "pricestream_sessions_active", "Sessions held by the selected pods.", GREEN),
        ("Streams", "pricestream_streams_active", "StreamPriceUpdates calls in progress.", GREEN),
        (
            "Pub/Sub subscriptions",
            "pricestream_pubsub_subscriptions_active",
            "Ticker channels subscribed; must be 0 when there are no streams.",
            GREEN,
        ),
        (
            "Redis Pub/Sub connections",
            "pricestream_redis_pubsub_connections_active",
            "Open Pub/Sub connections to Redis; 0 means no pod can deliver prices.",
            [(None, "red"), (1, "green")],
        ),
        (
            "Ready pods",
            "pricestream_ready",
            "Pods accepting new streams.",
            [(None, "red"), (1, "green")],
        ),
    ]:
        q = query(f"sum({metric}{{{SEL}}})")
        add(stat(title, "short", q, description, steps), 4, 4)
    firing = f"count({FIRING_ALERTS}) or vector(0)"
    add(
        stat(
            "Firing alerts",
            "short",
            query(firing),
            "PriceStream alerts firing.",
            [(None, "green"), (1, "red")],
        ),
        4,
        4,
    )

    board.with_row(builders.Row(LIFECYCLE_ROW))
    for title, metric in [
        ("Active sessions", "pricestream_sessions_active"),
        ("Active streams", "pricestream_streams_active"),
        ("Active Pub/Sub subscriptions", "pricestream_pubsub_subscriptions_active"),
        ("Redis Pub/Sub connections", "pricestream_redis_pubsub_connections_active"),
    ]:
        description = f"{metric} per pod and in total."
        add(timeseries(title, "short", per_pod_and_total(metric), description), 6, 8)
    add(
        timeseries(
            "Sessions opened vs closed",
            per_second("sessions"),
            [
                query(rate("pricestream_sessions_opened_total", ""), "opened"),
                query(rate("pricestream_sessions_closed_total", "reason"), "closed {{reason}}"),
            ],
            "Sessions entering and leaving the selected pods' registries per second, closes by "
            "reason.",
        ),
        8,
        8,
    )
    add(
        timeseries(
            "Subscriptions opened vs closed",
            per_second("subscriptions"),
            [
                query(rate("pricestream_pubsub_subscriptions_opened_total", ""), "opened"),
                query(rate("pricestream_pubsub_subscriptions_closed_total", ""), "closed"),
            ],
            "SUBSCRIBE and UNSUBSCRIBE of ticker channels per second on the selected pods.",
        ),
        8,
        8,
    )
    add(
        timeseries(
            "Net drift (opened - closed - active)",
            "short",
            [
                drift("sessions"),
                drift("streams"),
                drift("pubsub_subscriptions"),
                drift("redis_pubsub_connections"),
                drift("ws_connections", closes_labelled=True),
                drift("sse_connections", closes_labelled=True),
                query(
                    f"sum(pricestream_sessions_active{{{SEL}}})"
                    f" - sum(pricestream_streams_active{{{SEL}}})",
                    "sessions without stream",
                ),
            ],
            "Zero when counters and live gauges agree (below zero: more closed than opened); "
            "sessions without a stream stay near 0. Summed over the selected pods: pick one "
            "pod to see its own.",
            signed=True,
        ),
        8,
        8,
    )

    board.with_row(builders.Row(BROWSER))
    for title, metric, what in [
        ("WebSocket connections", "pricestream_ws_connections_active", "WebSocket"),
        ("SSE connections", "pricestream_sse_connections_active", "Server-Sent Events"),
    ]:
        description = f"Open {what} price streams of browsers ({metric}) per pod and in total."
        add(timeseries(title, "short", per_pod_and_total(metric), description), 6, 8)
    for title, kind, what in [
        ("WebSocket opened vs closed by code", "ws", "WebSockets"),
        ("SSE opened vs closed by code", "sse", "SSE streams"),
    ]:
        add(
            timeseries(
                title,
                per_second("connections"),
                [
                    query(rate(f"pricestream_{kind}_connections_opened_total", ""), "opened"),
                    query(
                        rate(f"pricestream_{kind}_connections_closed_total", "code"),
                        "closed {{code}}",
                    ),
                ],
                f"{what} accepted and ended per second over the selected pods, ends by close "
                "code: 1000 session closed, 1001 pod draining, 1006 connection dropped, 1008 "
                "origin, 1009 frame too big, 1011 internal error, 1013 pod at its limit, 4001 no "
                "pong, 4004 unknown session, 4008 slow consumer, 4009 already streaming.",
            ),
            6,
            8,
        )
    add(
        timeseries(
            "Refused handshakes by reason",
            per_second("handshakes"),
            [
                query(
                    rate("pricestream_web_handshakes_refused_total", "transport, reason"),
                    "{{transport}} {{reason}}",
                )
            ],
            "WebSocket and SSE requests refused before streaming, per second by transport and "
            "reason: origin (not in PRICESTREAM_WEB_ALLOWED_ORIGINS), unknown_session, busy "
            "(already streaming), limit (sessions per pod), rate (accept rate, reconnect "
            "storms), draining, overloaded, bad_request.",
        ),
        12,
        8,
    )
    add(
        timeseries(
            "REST requests by status",
            per_second("requests"),
            [
                query(
                    rate("pricestream_http_requests_total", "route, status"),
                    "{{route}} {{status}}",
                )
            ],
            "Requests of the browser port answered without a stream (sessions REST API, the "
            "live page), per second by route and HTTP status.",
        ),
        12,
        8,
    )

    board.with_row(builders.Row(PRICES))
    add(
        timeseries(
            "Price updates in / out",
            per_second("updates"),
            [
                query(rate("pricestream_price_updates_received_total", ""), "received"),
                query(rate("pricestream_price_updates_sent_total", ""), "sent"),
                query(rate("pricestream_batches_sent_total", ""), "batches"),
            ],
            "Updates received from Redis, updates and batches handed to streams, per second, "
            "over the selected pods.",
        ),
        8,
        8,
    )
    coalesced = rate("pricestream_price_updates_coalesced_total")
    sent = rate("pricestream_price_updates_sent_total")
    add(
        timeseries(
            "Coalescing ratio",
            "percentunit",
            [query(f"{coalesced} / ({coalesced} + {sent})", "{{pod}}")],
            "Share of updates replaced by a newer price of the same ticker before a flush.",
            max_value=1,
        ),
        8,
        8,
    )
    add(
        timeseries(
            "Delivery latency (publish to stream)",
            "s",
            [latency_quantile(0.5), latency_quantile(0.95), latency_quantile(0.99)],
            "pricestream_delivery_latency_seconds quantiles; includes the flush interval. The "
            "dots are exemplars: a sampled delivery each, linked to its trace.",
        ),
        8,
        8,
    )

    board.with_row(builders.Row(ERRORS))
    add(
        timeseries(
            "gRPC calls by code",
            per_second("calls"),
            [
                query(
                    rate(
                        "grpc_server_handled_total",
                        "grpc_method, grpc_code",
                        'grpc_service="pricestream.v1.PriceStreamService"',
                    ),
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            "Calls ended per second by method and status code.",
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Slow-consumer disconnects",
            per_second("disconnects"),
            [query(rate("pricestream_slow_consumer_disconnects_total"), "{{pod}}")],
            "Streams cut off because their client stopped reading.",
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Redis up",
            "none",
            [query(f"max by (pod) (pricestream_redis_up{{{SEL}}})", "{{pod}}")],
            "1 while Pub/Sub delivers (liveness probe included), 0 while it does not.",
            max_value=1,
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Redis reconnects",
            "short",
            [
                query(
                    f"sum by (pod) (increase(pricestream_redis_reconnects_total{{{SEL}}}[{RATE}]))",
                    "{{pod}}",
                )
            ],
            "Pub/Sub reconnects of each pod in the interval.",
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Redis shards: wanted - live",
            "short",
            [
                query(
                    f"sum by (pod) (pricestream_redis_shards_wanted{{{SEL}}})"
                    f" - sum by (pod) (pricestream_redis_shards_live{{{SEL}}})",
                    "{{pod}}",
                )
            ],
            "Redis shards (cluster masters; 1 outside cluster mode) a pod needs for its "
            "channels but has no live Pub/Sub connection to: above 0 for longer than a "
            "failover is a shard in trouble (below 0 would be a bookkeeping bug).",
            signed=True,
        ),
        12,
        8,
    )
    add(
        timeseries(
            "Channels moved between shards",
            "short",
            [
                query(
                    f"sum by (pod) (increase(pricestream_redis_slot_moves_total{{{SEL}}}[{RATE}]))",
                    "{{pod}}",
                )
            ],
            "Ticker channels each pod moved to another cluster master in the interval "
            "(reshard, failover).",
        ),
        12,
        8,
    )

    board.with_row(builders.Row(SATURATION))
    add(
        timeseries(
            "Flush lag (overload)",
            "s",
            [query(f"max by (pod) (pricestream_flush_lag_seconds{{{SEL}}})", "{{pod}}")],
            "How late the flushes run; above PRICESTREAM_OVERLOAD_LAG new sessions are refused.",
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Stream backlog (overload)",
            "percentunit",
            [query(f"max by (pod) (pricestream_flush_backlog_ratio{{{SEL}}})", "{{pod}}")],
            "Share of streams with news still writing the previous flush's batch: the pod "
            "writes fewer batches than its streams need. Above PRICESTREAM_OVERLOAD_BACKLOG "
            "new sessions are refused.",
            max_value=1,
        ),
        6,
        8,
    )
    add(
        timeseries(
            "CPU per pod",
            "percentunit",
            [query(rate("process_cpu_seconds_total"), "{{pod}}")],
            "CPU seconds per second (100% = one full core).",
        ),
        6,
        8,
    )
    add(
        timeseries(
            "Memory per pod (RSS)",
            "bytes",
            [query(f"sum by (pod) (process_resident_memory_bytes{{{SEL}}})", "{{pod}}")],
            "Resident memory of each server process.",
        ),
        6,
        8,
    )

    return build_model(board)


def build() -> dict[str, Any]:
    """The overview's JSON, as the chart ships it."""
    return to_json(dashboard())
