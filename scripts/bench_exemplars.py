"""What the delivery-latency exemplars cost: observe_batch timed with exemplars off and on.

A micro-benchmark of the hot path only (not `make bench`): the batches a flush hands over
(a single update, as at a short flush interval, and 2,000 updates sharing a few publish times),
with no exemplar source, and with a source that makes a real (sampled, not exported) span as
the server's does. Appends a section to docs/benchmarks.md unless --no-write.

    python scripts/bench_exemplars.py [--seconds 4] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from pricestream.observability.latency import BatchLatencyHistogram
from pricestream.observability.metrics import EXEMPLAR_INTERVAL, LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parents[1]
CASES = {"1 update": 1, "2,000 updates, 20 publish times": 2000}


def source_with_spans():
    tracer = TracerProvider().get_tracer("bench")  # sampled, no exporter: the span's own cost

    def trace_id_of(published_ns: int, now_ns: int) -> str | None:
        span = tracer.start_span("pricestream.delivery", start_time=published_ns)
        span.end(end_time=now_ns)
        return f"{span.get_span_context().trace_id:032x}"

    return trace_id_of


def batch(size: int, now_ns: int) -> list[int]:
    stamps = [now_ns - (i % 20 + 1) * 7_000_000 for i in range(20)]
    return [stamps[i % 20] for i in range(size)]


def run(size: int, exemplars: bool, seconds: float) -> tuple[float, int]:
    """ns per observe_batch call over `seconds`, and the exemplars taken."""
    histogram = BatchLatencyHistogram("x", "x", LATENCY_BUCKETS)
    taken = 0
    if exemplars:
        make = source_with_spans()

        def counting(published_ns: int, now_ns: int) -> str | None:
            nonlocal taken
            taken += 1
            return make(published_ns, now_ns)

        histogram.enable_exemplars(lambda: counting, EXEMPLAR_INTERVAL)
    calls = 0
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    now = time.time_ns()
    published = batch(size, now)
    while True:
        for _ in range(200):
            now += 2_000_000  # 2 ms between flushes of simulated time
            histogram.observe_batch(now, published)
        calls += 200
        if time.perf_counter_ns() >= deadline:
            break
        published = batch(size, now)
    return (time.perf_counter_ns() - start) / calls, taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per case and mode")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name, size in CASES.items():
        off, _ = run(size, False, args.seconds)
        on, taken = run(size, True, args.seconds)
        rows.append((name, off, on, taken))
        print(f"{name}: off {off:.0f} ns, on {on:.0f} ns per call ({taken} exemplars)")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python scripts/bench_exemplars.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        f"\n## {when}: delivery-latency exemplars\n",
        f"`{command.strip()}` on {os.cpu_count()} cores (one used; other work ran on the "
        f"machine), {args.seconds:g} s per case and mode; observe_batch per call, a flush "
        "every 2 ms of simulated time, an exemplar per bucket per 15 s at most, each from a "
        "real sampled span (no exporter).\n",
        "| batch | exemplars off, ns/call | on, ns/call | difference | exemplars taken |",
        "|---|---|---|---|---|",
    ]
    for name, off, on, taken in rows:
        lines.append(f"| {name} | {off:.0f} | {on:.0f} | {(on - off) / off:+.1%} | {taken} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "docs/benchmarks.md", "a") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
