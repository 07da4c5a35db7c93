"""DESIGN.md invariant 1, checked on a Prometheus exposition."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import defaultdict

from pricestream.server import Server
from prometheus_client.parser import text_string_to_metric_families

PAIRS = (
    ("pricestream_sessions_opened_total", "pricestream_sessions_closed_total"),
    ("pricestream_streams_opened_total", "pricestream_streams_closed_total"),
    (
        "pricestream_pubsub_subscriptions_opened_total",
        "pricestream_pubsub_subscriptions_closed_total",
    ),
)
MUST_BE_ZERO = (
    "pricestream_sessions_active",
    "pricestream_streams_active",
    "pricestream_pubsub_subscriptions_active",
)


def samples(exposition: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def violations(values: dict[str, float]) -> list[str]:
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


def scrape(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        return response.read().decode()


def read_metrics(source: Server | int) -> str:
    """The exposition of an in-process server, or of a server's HTTP port."""
    if isinstance(source, int):
        return scrape(source)
    return source.engine.metrics.exposition().decode()


async def wait_invariant(source: Server | int, timeout: float = 10.0) -> dict[str, float]:
    """Poll until invariant 1 holds; the final values, or AssertionError with what is off."""
    deadline = time.monotonic() + timeout
    while True:
        values = samples(read_metrics(source))
        problems = violations(values)
        if not problems:
            return values
        if time.monotonic() > deadline:
            raise AssertionError("invariant 1 does not hold: " + "; ".join(problems))
        await asyncio.sleep(0.1)
