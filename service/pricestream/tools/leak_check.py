"""DESIGN.md invariant 1 on a Prometheus exposition: once clients are gone, every gauge is zero
and every opened counter equals its closed counter. Used by the tests and by `loadtest`."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

PAIRS = (
    ("pricestream_sessions_opened_total", "pricestream_sessions_closed_total"),
    ("pricestream_streams_opened_total", "pricestream_streams_closed_total"),
    (
        "pricestream_pubsub_subscriptions_opened_total",
        "pricestream_pubsub_subscriptions_closed_total",
    ),
    ("pricestream_ws_connections_opened_total", "pricestream_ws_connections_closed_total"),
    ("pricestream_sse_connections_opened_total", "pricestream_sse_connections_closed_total"),
)
MUST_BE_ZERO = (
    "pricestream_sessions_active",
    "pricestream_streams_active",
    "pricestream_pubsub_subscriptions_active",
    "pricestream_ws_connections_active",
    "pricestream_sse_connections_active",
)


def samples(exposition: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def violations(values: dict[str, float]) -> list[str]:
    """What breaks invariant 1, one phrase each; empty when it holds."""
    found = [f"{name} = {values.get(name)}" for name in MUST_BE_ZERO if values.get(name) != 0]
    for opened, closed in PAIRS:
        if values.get(opened, 0) != values.get(closed, 0):
            found.append(
                f"{opened} = {values.get(opened, 0)} != {closed} = {values.get(closed, 0)}"
            )
    conn_open = values.get("pricestream_redis_pubsub_connections_opened_total", 0)
    conn_closed = values.get("pricestream_redis_pubsub_connections_closed_total", 0)
    conn_active = values.get("pricestream_redis_pubsub_connections_active", 0)
    if conn_open - conn_closed != conn_active:
        found.append(
            f"connections opened {conn_open} - closed {conn_closed} != active {conn_active}"
        )
    return found
