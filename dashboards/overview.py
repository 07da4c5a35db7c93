"""The pricestream overview dashboard: lifecycle (leaks), prices, latency, errors, Redis."""

from __future__ import annotations

from typing import Any

from dashboards.grafana import (
    Layout,
    Query,
    alerts_annotation,
    datasource_variable,
    query_variable,
    stat,
    timeseries,
)

UID = "pricestream-overview"
SEL = 'namespace="$namespace", pod=~"$pod"'
RATE = "$__rate_interval"
FIRING_ALERTS = 'ALERTS{alertstate="firing", alertname=~"PriceStream.*", namespace="$namespace"}'


def per_pod_and_total(metric: str) -> list[Query]:
    return [
        Query(f"sum by (pod) ({metric}{{{SEL}}})", "{{pod}}"),
        Query(f"sum({metric}{{{SEL}}})", "total"),
    ]


def rate(metric: str, by: str = "pod", extra: str = "") -> str:
    selector = f"{SEL}, {extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def drift(resource: str) -> Query:
    def total(name: str) -> str:
        return f"sum by (pod) ({name}{{{SEL}}})"

    opened = total(f"pricestream_{resource}_opened_total")
    closed = total(f"pricestream_{resource}_closed_total")
    active = total(f"pricestream_{resource}_active")
    return Query(f"{opened} - {closed} - {active}", f"{{{{pod}}}} {resource}")


def latency_quantile(q: float) -> Query:
    buckets = f"sum by (le) (rate(pricestream_delivery_latency_seconds_bucket{{{SEL}}}[{RATE}]))"
    return Query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}")


def build() -> dict[str, Any]:
    layout = Layout()

    layout.row("Now")
    for title, metric, description in [
        ("Sessions", "pricestream_sessions_active", "Sessions held by the selected pods."),
        ("Streams", "pricestream_streams_active", "StreamPriceUpdates calls in progress."),
        (
            "Pub/Sub subscriptions",
            "pricestream_pubsub_subscriptions_active",
            "Ticker channels subscribed; must be 0 when there are no streams.",
        ),
        (
            "Redis Pub/Sub connections",
            "pricestream_redis_pubsub_connections_active",
            "Open Pub/Sub connections to Redis.",
        ),
        ("Ready pods", "pricestream_ready", "Pods accepting new streams."),
    ]:
        layout.add(stat(title, "short", Query(f"sum({metric}{{{SEL}}})"), description), 4, 4)
    firing = f"count({FIRING_ALERTS}) or vector(0)"
    layout.add(stat("Firing alerts", "short", Query(firing), "PriceStream alerts firing."), 4, 4)

    layout.row("Lifecycle: opened must equal closed once clients are gone")
    for title, metric in [
        ("Active sessions", "pricestream_sessions_active"),
        ("Active streams", "pricestream_streams_active"),
        ("Active Pub/Sub subscriptions", "pricestream_pubsub_subscriptions_active"),
        ("Redis Pub/Sub connections", "pricestream_redis_pubsub_connections_active"),
    ]:
        description = f"{metric} per pod and in total."
        layout.add(timeseries(title, "short", per_pod_and_total(metric), description), 6, 8)
    layout.add(
        timeseries(
            "Sessions opened vs closed",
            "ops",
            [
                Query(rate("pricestream_sessions_opened_total"), "{{pod}} opened"),
                Query(
                    rate("pricestream_sessions_closed_total", "pod, reason"), "{{pod}} {{reason}}"
                ),
            ],
            "Sessions entering and leaving each pod's registry per second, closes by reason.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Subscriptions opened vs closed",
            "ops",
            [
                Query(rate("pricestream_pubsub_subscriptions_opened_total"), "{{pod}} opened"),
                Query(rate("pricestream_pubsub_subscriptions_closed_total"), "{{pod}} closed"),
            ],
            "SUBSCRIBE and UNSUBSCRIBE of ticker channels per second.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Net drift (opened - closed - active)",
            "short",
            [
                drift("sessions"),
                drift("streams"),
                drift("pubsub_subscriptions"),
                drift("redis_pubsub_connections"),
                Query(
                    f"sum by (pod) (pricestream_sessions_active{{{SEL}}})"
                    f" - sum by (pod) (pricestream_streams_active{{{SEL}}})",
                    "{{pod}} sessions without stream",
                ),
            ],
            "Zero when counters and live gauges agree; sessions without a stream stay near 0.",
        ),
        8,
        8,
    )

    layout.row("Prices")
    layout.add(
        timeseries(
            "Price updates in / out",
            "cps",
            [
                Query(rate("pricestream_price_updates_received_total"), "{{pod}} received"),
                Query(rate("pricestream_price_updates_sent_total"), "{{pod}} sent"),
                Query(rate("pricestream_batches_sent_total"), "{{pod}} batches"),
            ],
            "Updates received from Redis, updates and batches handed to streams, per second.",
        ),
        8,
        8,
    )
    coalesced = rate("pricestream_price_updates_coalesced_total")
    sent = rate("pricestream_price_updates_sent_total")
    layout.add(
        timeseries(
            "Coalescing ratio",
            "percentunit",
            [Query(f"{coalesced} / ({coalesced} + {sent})", "{{pod}}")],
            "Share of updates replaced by a newer price of the same ticker before a flush.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Delivery latency (publish to stream)",
            "s",
            [latency_quantile(0.5), latency_quantile(0.95), latency_quantile(0.99)],
            "pricestream_delivery_latency_seconds quantiles; includes the flush interval.",
        ),
        8,
        8,
    )

    layout.row("Errors and Redis")
    layout.add(
        timeseries(
            "gRPC calls by code",
            "reqps",
            [
                Query(
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
        8,
        8,
    )
    layout.add(
        timeseries(
            "Slow-consumer disconnects",
            "ops",
            [Query(rate("pricestream_slow_consumer_disconnects_total"), "{{pod}}")],
            "Streams cut off because their client stopped reading.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Redis up / reconnects",
            "short",
            [
                Query(f"max by (pod) (pricestream_redis_up{{{SEL}}})", "{{pod}} up"),
                Query(
                    f"sum by (pod) (increase(pricestream_redis_reconnects_total{{{SEL}}}[{RATE}]))",
                    "{{pod}} reconnects",
                ),
            ],
            "1 while Pub/Sub delivers (liveness probe included); reconnects in the interval.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Flush lag (overload)",
            "s",
            [Query(f"max by (pod) (pricestream_flush_lag_seconds{{{SEL}}})", "{{pod}}")],
            "How late the flushes run; above PRICESTREAM_OVERLOAD_LAG new sessions are refused.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "CPU per pod",
            "percentunit",
            [Query(rate("process_cpu_seconds_total"), "{{pod}}")],
            "CPU seconds per second (1 = one full core).",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Memory per pod (RSS)",
            "bytes",
            [Query(f"sum by (pod) (process_resident_memory_bytes{{{SEL}}})", "{{pod}}")],
            "Resident memory of each server process.",
        ),
        8,
        8,
    )
    layout.add(
        timeseries(
            "Stream backlog (overload)",
            "percentunit",
            [Query(f"max by (pod) (pricestream_flush_backlog_ratio{{{SEL}}})", "{{pod}}")],
            "Share of streams with news still writing the previous flush's batch: the pod "
            "writes fewer batches than its streams need. Above PRICESTREAM_OVERLOAD_BACKLOG "
            "new sessions are refused.",
        ),
        8,
        8,
    )

    return {
        "uid": UID,
        "title": "pricestream / overview",
        "description": "Sessions, streams, Pub/Sub subscriptions and their drift; prices, latency.",
        "tags": ["pricestream", "grpc", "redis"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                datasource_variable(),
                query_variable(
                    "namespace",
                    "Namespace",
                    "label_values(pricestream_sessions_active, namespace)",
                    multi=False,
                ),
                query_variable(
                    "pod",
                    "Pod",
                    'label_values(pricestream_sessions_active{namespace="$namespace"}, pod)',
                    multi=True,
                    all_value=".*",
                ),
            ]
        },
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                alerts_annotation(FIRING_ALERTS),
            ]
        },
        "panels": layout.panels,
    }
