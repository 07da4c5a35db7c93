"""The delivery-latency histogram, filled per batch on the hot path.

prometheus_client's Histogram takes a lock and searches its buckets for every observation; with
one observation per delivered update that was the largest cost of ours in the server's profile
after gRPC's own write. This one stays on the event loop (no lock), works in integer
nanoseconds, and is read by the same /metrics scrape as a normal histogram family.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import mul

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

TALLY_FROM = 16  # updates per call from which tallying them beats a search per update


class BatchLatencyHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        self._bounds_ns = [round(b * 1e9) for b in buckets]
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum_ns = 0

    def observe_batch(self, now_ns: int, published_ns: list[int]) -> None:
        """One observation per update: now minus its publisher's timestamp."""
        count = len(published_ns)
        counts, bounds = self._counts, self._bounds_ns
        if count < TALLY_FROM:
            total = 0
            for published in published_ns:
                delay = now_ns - published
                counts[bisect_left(bounds, delay)] += 1
                total += delay
            self._sum_ns += total
            return
        # A flush hands over thousands at once, copies of a few Pub/Sub messages (each one
        # fanned out to every stream of its ticker), so they share few publish times: tally
        # them in C, sort the distinct ones, and search once per bucket bound instead of once
        # per update (sorting every update cost twice as much). delay <= bound  <=>
        # published >= now - bound.
        tally = Counter(published_ns)
        stamps = sorted(tally)
        before = [0, *accumulate(map(tally.__getitem__, stamps))]  # updates before stamps[i]
        below = 0  # updates whose delay is at most the previous bound
        for index, bound in enumerate(bounds):
            within = count - before[bisect_left(stamps, now_ns - bound)]
            counts[index] += within - below
            below = within
        counts[-1] += count - below
        # Summed per distinct time too: a sum of thousands of such big ints leaves C's fast path.
        self._sum_ns += count * now_ns - sum(map(mul, tally.keys(), tally.values()))

    def collect(self) -> Iterable[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum_ns / 1e9
        )
