"""DESIGN.md invariant 1, checked on a Prometheus exposition."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from pricestream.api.server import Server
from pricestream.tools.leak_check import MUST_BE_ZERO, PAIRS, samples, violations

__all__ = ["MUST_BE_ZERO", "PAIRS", "read_metrics", "samples", "violations", "wait_invariant"]


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
