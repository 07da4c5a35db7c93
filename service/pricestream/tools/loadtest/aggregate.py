"""Adds the workers' per-second lines up: a time series and per-stage totals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pricestream.tools.loadtest.histogram import Histogram
from pricestream.tools.loadtest.stages import Schedule

COUNTERS = (
    "sessions_attempted",
    "sessions_created",
    "streams_started",
    "updates",
    "batches",
    "slow_cut_off",
)


@dataclass
class Bucket:
    """Totals over some span (one second, one stage, the whole run)."""

    seconds: float = 0.0
    counters: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)
    create_latency: Histogram = field(default_factory=Histogram)
    start_latency: Histogram = field(default_factory=Histogram)
    delivery: Histogram = field(default_factory=Histogram)

    def add(self, line: dict[str, Any]) -> None:
        for name in COUNTERS:
            self.counters[name] += line[name]
        self.errors.update(line["errors"])
        self.leaves.update(line["leaves"])
        self.create_latency.merge(Histogram.from_json(line["create_latency"]))
        self.start_latency.merge(Histogram.from_json(line["start_latency"]))
        self.delivery.merge(Histogram.from_json(line["delivery"]))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        attempted = self.counters["sessions_attempted"]

        def ms(h: Histogram, q: float) -> float | None:
            value = h.quantile(q)
            return None if value is None else round(value * 1000, 1)

        return {
            "seconds": round(self.seconds, 1),
            "sessions_attempted": attempted,
            "sessions_created": self.counters["sessions_created"],
            "session_success_rate": (
                round(self.counters["sessions_created"] / attempted, 5) if attempted else None
            ),
            "create_latency_ms": {
                "p50": ms(self.create_latency, 0.5),
                "p99": ms(self.create_latency, 0.99),
            },
            "stream_start_latency_ms": {
                "p50": ms(self.start_latency, 0.5),
                "p99": ms(self.start_latency, 0.99),
            },
            "delivery_latency_ms": {
                "p50": ms(self.delivery, 0.5),
                "p95": ms(self.delivery, 0.95),
                "p99": ms(self.delivery, 0.99),
                "max": None
                if self.delivery.max() is None
                else round(self.delivery.max() * 1000, 1),
            },
            "updates_per_second": round(self.counters["updates"] / seconds, 1),
            "batches_per_second": round(self.counters["batches"] / seconds, 1),
            "updates": self.counters["updates"],
            "errors": dict(self.errors),
            "slow_cut_off": self.counters["slow_cut_off"],
            "leaves": dict(self.leaves),
        }


@dataclass
class Aggregate:
    schedule: Schedule
    workers: int
    per_second: dict[int, Bucket] = field(default_factory=dict)
    users: dict[int, dict[int, int]] = field(default_factory=dict)  # second -> worker -> users
    stages: list[Bucket] = field(default_factory=list)
    total: Bucket = field(default_factory=Bucket)
    cpu_seconds: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stages = [Bucket(seconds=s.seconds) for s in self.schedule.stages]
        self.total.seconds = self.schedule.seconds

    def add(self, line: dict[str, Any]) -> None:
        second = max(round(line["t"]), 1)
        bucket = self.per_second.setdefault(second, Bucket(seconds=1.0))
        bucket.add(line)
        self.users.setdefault(second, {})[line["worker"]] = line["users"]
        self.stages[self.schedule.stage_at(line["t"] - 0.5)].add(line)
        self.total.add(line)
        self.cpu_seconds[line["worker"]] = line["cpu_seconds"]

    def users_at(self, second: int) -> int:
        return sum(self.users.get(second, {}).values())

    def series(self) -> list[dict[str, Any]]:
        out = []
        for second in sorted(self.per_second):
            bucket = self.per_second[second]
            quantiles = {f"p{int(q * 100)}": bucket.delivery.quantile(q) for q in (0.5, 0.95, 0.99)}
            out.append(
                {
                    "t": second,
                    "users_target": round(self.schedule.users_at(second)),
                    "users": self.users_at(second),
                    "updates": bucket.counters["updates"],
                    "batches": bucket.counters["batches"],
                    "errors": bucket.error_count,
                    **{k: (None if v is None else round(v, 4)) for k, v in quantiles.items()},
                }
            )
        return out
