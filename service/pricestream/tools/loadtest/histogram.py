"""Latency histogram with 0.1 ms resolution up to 60 s; cheap to fill, merge and ship as JSON."""

from __future__ import annotations

from collections import Counter

RESOLUTION = 1e-4  # seconds per bucket
MAX_BUCKET = 600_000  # 60 s


class Histogram:
    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0

    def add(self, seconds: float) -> None:
        bucket = min(max(int(seconds / RESOLUTION), 0), MAX_BUCKET)
        self.counts[bucket] += 1
        self.total += 1

    def add_bucket(self, bucket: int, count: int = 1) -> None:
        self.counts[min(max(bucket, 0), MAX_BUCKET)] += count
        self.total += count

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """Upper edge of the bucket holding the q-quantile, in seconds; None when empty."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return (bucket + 1) * RESOLUTION
        return (max(self.counts) + 1) * RESOLUTION

    def max(self) -> float | None:
        return (max(self.counts) + 1) * RESOLUTION if self.total else None

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Histogram:
        histogram = cls()
        for key, count in data.items():
            histogram.add_bucket(int(key), count)
        return histogram

    def take(self) -> Histogram:
        """This histogram's contents, leaving it empty (for per-interval reports)."""
        out = Histogram()
        out.counts, out.total = self.counts, self.total
        self.counts, self.total = Counter(), 0
        return out
