"""The delivery-latency histogram, filled per batch on the hot path.

prometheus_client's Histogram takes a lock and searches its buckets for every observation; with
one observation per delivered update that was the largest cost of ours in the server's profile
after gRPC's own write. This one stays on the event loop (no lock), works in integer
nanoseconds, and is read by the same /metrics scrape as a normal histogram family.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

SORT_FROM = 16  # updates per call from which sorting them beats a search per update


class BatchLatencyHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        self._bounds_ns = [round(b * 1e9) for b in buckets]
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum_ns = 0

    def observe_batch(self, now_ns: int, published_ns: list[int]) -> None:
        """One observation per update: now minus its publisher's timestamp. Sorts
        ``published_ns`` in place (the caller's list is done with)."""
        count = len(published_ns)
        counts, bounds = self._counts, self._bounds_ns
        if count < SORT_FROM:
            total = 0
            for published in published_ns:
                delay = now_ns - published
                counts[bisect_left(bounds, delay)] += 1
                total += delay
            self._sum_ns += total
            return
        # A flush hands over thousands at once: one sort in C and a search per bucket bound
        # instead of a search per update. delay <= bound  <=>  published >= now - bound.
        published_ns.sort()
        below = 0  # updates whose delay is at most the previous bound
        for index, bound in enumerate(bounds):
            within = count - bisect_left(published_ns, now_ns - bound)
            counts[index] += within - below
            below = within
        counts[-1] += count - below
        self._sum_ns += count * now_ns - sum(published_ns)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum_ns / 1e9
        )
