"""The delivery-latency histogram, filled per batch on the hot path.

prometheus_client's Histogram takes a lock and searches its buckets for every observation; with
one observation per delivered update that was the largest cost of ours in the server's profile
after gRPC's own write. This one stays on the event loop (no lock), works in integer
nanoseconds, and is read by the same /metrics scrape as a normal histogram family.

Exemplars (OpenMetrics): given a source of trace ids, a bucket keeps the trace id of one of its
deliveries, replaced at most once per `exemplar_interval` (a scrape interval: Prometheus keeps
what it scrapes). The hot path pays one integer comparison per batch for them; the sampling
itself runs at most a few times per interval and asks the source for at most one trace id per
bucket per interval.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from operator import mul

from prometheus_client.core import Exemplar, HistogramMetricFamily
from prometheus_client.registry import Collector

TALLY_FROM = 16  # updates per call from which tallying them beats a search per update
NEVER = 1 << 62  # a time (ns) no clock reaches: exemplars off
EXEMPLAR_STAMPS = 256  # distinct publish times looked at per sampling, at most
# Trace id of one delivery (published at, handed over at; ns), or None (e.g. not sampled).
TraceIdOf = Callable[[int, int], str | None]


class BatchLatencyHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        self._bounds_ns = [round(b * 1e9) for b in buckets]
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum_ns = 0
        self._exemplars: list[Exemplar | None] = [None] * (len(buckets) + 1)
        self._exemplar_at = [-NEVER] * (len(buckets) + 1)
        self._exemplar_gate = NEVER  # next time (ns) a batch is looked at for exemplars
        self._exemplar_interval = 0
        self._resolve_source: Callable[[], TraceIdOf | None] | None = None
        self._trace_id_of: TraceIdOf | None = None

    def enable_exemplars(
        self, source: Callable[[], TraceIdOf | None], interval_seconds: float
    ) -> None:
        """Take exemplars from ``source()`` (called once, at the first batch: None means no
        tracing, and exemplars stay off), one per bucket per ``interval_seconds``."""
        self._resolve_source = source
        self._exemplar_interval = round(interval_seconds * 1e9)
        self._exemplar_gate = 0

    def observe_batch(self, now_ns: int, published_ns: list[int]) -> None:
        """One observation per update: now minus its publisher's timestamp."""
        if now_ns >= self._exemplar_gate:
            self._sample_exemplars(now_ns, published_ns)
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

    def _sample_exemplars(self, now_ns: int, published_ns: list[int]) -> None:
        if self._resolve_source is not None:
            self._trace_id_of, self._resolve_source = self._resolve_source(), None
        trace_id_of = self._trace_id_of
        if trace_id_of is None:
            self._exemplar_gate = NEVER
            return
        interval = self._exemplar_interval
        # A few looks per interval: a bucket whose deliveries are rare still gets its exemplar.
        self._exemplar_gate = now_ns + interval // 8
        bounds, taken_at, exemplars = self._bounds_ns, self._exemplar_at, self._exemplars
        for published in list(dict.fromkeys(published_ns))[:EXEMPLAR_STAMPS]:
            delay = now_ns - published
            index = bisect_left(bounds, delay)
            if now_ns - taken_at[index] < interval:
                continue
            taken_at[index] = now_ns  # asked once per interval, sampled or not
            trace_id = trace_id_of(published, now_ns)
            if trace_id is not None:
                exemplars[index] = Exemplar({"trace_id": trace_id}, delay / 1e9, now_ns / 1e9)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        bounds = [*self._bounds, float("inf")]
        for bound, count, exemplar in zip(bounds, self._counts, self._exemplars, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            buckets.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum_ns / 1e9
        )
