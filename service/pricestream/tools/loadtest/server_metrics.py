"""The server's /metrics during and after a load test: gauges over time and the leak verdict."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pricestream.tools.leak_check import samples, violations

GAUGES = {
    "sessions": "pricestream_sessions_active",
    "streams": "pricestream_streams_active",
    "subscriptions": "pricestream_pubsub_subscriptions_active",
    "cpu_seconds": "process_cpu_seconds_total",
    "rss_bytes": "process_resident_memory_bytes",
    "updates_sent": "pricestream_price_updates_sent_total",
}


@dataclass
class Verdict:
    passed: bool
    problems: list[str]
    waited_seconds: float
    final: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        keys = [
            "pricestream_sessions_active",
            "pricestream_streams_active",
            "pricestream_pubsub_subscriptions_active",
            "pricestream_sessions_opened_total",
            "pricestream_sessions_closed_total",
            "pricestream_streams_opened_total",
            "pricestream_streams_closed_total",
            "pricestream_pubsub_subscriptions_opened_total",
            "pricestream_pubsub_subscriptions_closed_total",
            # the browser path's sockets (--transport ws|sse)
            "pricestream_ws_connections_active",
            "pricestream_ws_connections_opened_total",
            "pricestream_ws_connections_closed_total",
            "pricestream_sse_connections_active",
            "pricestream_sse_connections_opened_total",
            "pricestream_sse_connections_closed_total",
        ]
        return {
            "passed": self.passed,
            "problems": self.problems,
            "waited_seconds": round(self.waited_seconds, 1),
            "final": {k: self.final.get(k, 0) for k in keys},
        }


class ServerMetrics:
    def __init__(self, url: str) -> None:
        self.url = url
        self.points: list[dict[str, float]] = []
        self.failures = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServerMetrics:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def read(self) -> dict[str, float]:
        assert self._session is not None
        async with self._session.get(self.url) as response:
            response.raise_for_status()
            return samples(await response.text())

    async def sample_every(self, seconds: float, start_at: float) -> None:
        """Record the gauges every `seconds` until cancelled."""
        while True:
            try:
                values = await self.read()
            except (aiohttp.ClientError, TimeoutError):
                self.failures += 1
            else:
                point = {"t": round(time.time() - start_at, 2)}
                point.update({name: values.get(metric, 0.0) for name, metric in GAUGES.items()})
                self.points.append(point)
            await asyncio.sleep(seconds)

    async def verdict(self, timeout: float) -> Verdict:
        """Poll until invariant 1 holds (gauges zero, opened == closed) or `timeout` passes."""
        started = time.monotonic()
        problems = ["/metrics was not readable"]
        values: dict[str, float] = {}
        while True:
            try:
                values = await self.read()
                problems = violations(values)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems = [f"/metrics was not readable: {exc}"]
            waited = time.monotonic() - started
            if not problems:
                return Verdict(True, [], waited, values)
            if waited > timeout:
                return Verdict(False, problems, waited, values)
            await asyncio.sleep(0.5)
