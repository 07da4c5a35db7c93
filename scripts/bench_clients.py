"""The two receiving sides `make bench` can run against the pinned server.

``GoClient`` (default) is bench/loadclient: one light Go process holding every stream, so on a
small machine the figures are the server's. ``PythonLoadtest`` is `pricestream loadtest`, the
full-featured tester, whose Python receivers need about as much CPU as the server they measure.
Both sample the server (its /metrics, or /proc for the floor server) at the start and end of
their hold window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench_centrifugo import CHANNEL_PREFIX as CENTRIFUGO_CHANNEL_PREFIX
from pricestream.tools.feed import ticker_universe
from pricestream.tools.leak_check import samples
from prometheus_client.parser import text_string_to_metric_families

LOADCLIENT_DIR = "bench/loadclient"
LOADCLIENT_BIN = ".tools/bin/pricestream-loadclient"


Sampler = Callable[[], dict[str, float]]  # the server's counters: CPU seconds, RSS, sent


def server_metrics(http_port: int) -> dict[str, float]:
    """The server's /metrics; a pod busy ramping tens of thousands of streams may answer late,
    so this waits up to 30 s (three tries) before the case fails."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    for attempt in range(3):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            return samples(text) | latency_buckets(text)
        except TimeoutError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


LATENCY_BUCKET = "pricestream_delivery_latency_seconds_bucket"


def latency_buckets(exposition: str) -> dict[str, float]:
    """The server's delivery-latency histogram, one sample per bucket: ``name{le}`` -> count."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == LATENCY_BUCKET:
                out[f"{LATENCY_BUCKET}{{{sample.labels['le']}}}"] = sample.value
    return out


def histogram_quantile(q: float, before: dict[str, float], after: dict[str, float]) -> float | None:
    """Prometheus's histogram_quantile over the buckets' increase between two scrapes, in
    seconds (linear within a bucket); None when nothing was observed."""
    prefix = LATENCY_BUCKET + "{"
    bounds = sorted(
        (float(key[len(prefix) : -1]), after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith(prefix)
    )
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(count - lower_count, 1e-9)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True)
class Measured:
    delivered_per_s: float
    batches_per_s: float
    p50_ms: float
    p99_ms: float
    streams_held: int
    client_cores: float
    errors: dict[str, int]
    server_before: dict[str, float]
    server_after: dict[str, float]
    server_window: float
    storm: dict[str, Any] | None = None  # the storm case: the client's "storm" report


class BenchCase(Protocol):
    streams: int
    tickers_per_session: int
    universe: int
    centrifugo: bool
    transport: str  # grpc, ws or sse
    storm: bool


def go_protocol(case: BenchCase) -> str:
    """The Go client's -protocol for a case."""
    if case.centrifugo:
        return "centrifugo" if case.transport == "grpc" else "centrifugo-ws"
    return "pricestream" if case.transport == "grpc" else case.transport


class GoClient:
    def __init__(self, root: Path) -> None:
        self._root = root
        self.binary = root / LOADCLIENT_BIN

    def build(self) -> None:
        """go build is incremental: quick when nothing changed."""
        subprocess.run(
            ["go", "build", "-o", str(self.binary), "."],
            cwd=self._root / LOADCLIENT_DIR,
            check=True,
        )

    def run(
        self,
        case: BenchCase,
        port: int,
        sample: Sampler,
        ramp: int,
        hold: int,
        client_cpus: str,
    ) -> Measured:
        """``port``: the server's gRPC port, or its HTTP port for the browser cases."""
        self.build()
        command = [
            "taskset", "-c", client_cpus, str(self.binary),
            "-protocol", go_protocol(case),
            "-target", f"127.0.0.1:{port}",
            "-streams", str(case.streams),
            "-tickers", ",".join(ticker_universe(case.universe)),
            "-tickers-per-session", str(case.tickers_per_session),
            "-ramp", f"{ramp}s", "-settle", "5s", "-hold", f"{hold}s",
        ]  # fmt: skip
        if case.centrifugo:  # Centrifugo's uni-directional stream or socket, a channel per ticker
            command += ["-channel-prefix", CENTRIFUGO_CHANNEL_PREFIX]
        if case.storm:  # a third into the hold: two thirds left to resume and be measured
            command += ["-storm-at", f"{max(1.0, hold / 3):g}s"]
        # The receiver is the instrument: with Go's default GOGC=100 its own collections, on the
        # core it shares with Redis and the feed, added to the p99 it reports (d10k: 254 ms with
        # 100, 182 ms with 400, the server's side 147 ms in both). The same for every server.
        env = {**os.environ, "GOGC": os.environ.get("GOGC", "400")}
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert proc.stderr is not None and proc.stdout is not None
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        started = 0.0
        window = 0.0
        for line in proc.stderr:
            if line.startswith("loadclient: hold started"):
                before, started = sample(), time.monotonic()
            elif line.startswith("loadclient: hold ended"):
                after, window = sample(), time.monotonic() - started
                break
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0 or not after:
            raise RuntimeError(f"loadclient failed ({proc.returncode}): {stderr.strip()[-500:]}")
        report = json.loads(stdout)
        return Measured(
            delivered_per_s=round(report["updates_per_second"], 1),
            batches_per_s=round(report["batches_per_second"], 1),
            p50_ms=report["delivery_latency_ms"]["p50"],
            p99_ms=report["delivery_latency_ms"]["p99"],
            streams_held=min(report["streams_at_hold_start"], report["streams_at_hold_end"]),
            client_cores=round(report["client_cores"], 2),
            errors=report["errors"],
            server_before=before,
            server_after=after,
            server_window=window,
            storm=report.get("storm"),
        )


class PythonLoadtest:
    def __init__(self, root: Path, http_port: int, workdir: Path) -> None:
        self._pricestream = [sys.executable, "-m", "pricestream"]
        self._http_port = http_port
        self._workdir = workdir

    def run(
        self,
        case: BenchCase,
        port: int,
        sample: Sampler,
        ramp: int,
        hold: int,
        client_cpus: str,
    ) -> Measured:
        """``port``: the server's gRPC port, or its web port for ws/sse cases."""
        http_port, workdir = self._http_port, self._workdir
        out = workdir / f"report-{case.streams}-{port}"
        if case.transport == "grpc":
            target = ["--target", f"127.0.0.1:{port}", "--channels", "8"]
            leave_mix = "cancel=1,close_session=1"
        else:
            target = ["--transport", case.transport, "--web-target", f"127.0.0.1:{port}"]
            leave_mix = "drop=1,delete=1"
        first, _, last = client_cpus.partition("-")
        workers = int(last or first) - int(first) + 1
        command = [
            "taskset", "-c", client_cpus, *self._pricestream, "loadtest",
            *target,
            "--metrics-url", f"http://127.0.0.1:{http_port}/metrics",
            "--stages", f"{ramp}s:{case.streams},{hold}s:{case.streams},5s:0",
            "--keep-users", "--leave-mix", leave_mix,
            "--tickers-per-session", str(case.tickers_per_session),
            "--universe", str(case.universe),
            "--workers", str(workers),
            "--leak-timeout", "60", "--out", str(out), "--quiet",
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The hold stage's start and end, from the stage plan (the tester starts in ~2 s).
        time.sleep(2 + ramp + 3)
        before, started = sample(), time.monotonic()
        time.sleep(max(1, hold - 6))
        after, window = sample(), time.monotonic() - started
        proc.communicate(timeout=ramp + hold + 200)
        report = json.loads((out / "report.json").read_text())
        hold_stage = report["stages"][1]
        return Measured(
            delivered_per_s=hold_stage["updates_per_second"],
            batches_per_s=hold_stage["batches_per_second"],
            p50_ms=hold_stage["delivery_latency_ms"]["p50"],
            p99_ms=hold_stage["delivery_latency_ms"]["p99"],
            streams_held=case.streams,
            client_cores=round(report["client_cpu_cores"], 2),
            errors=report["total"]["errors"],
            server_before=before,
            server_after=after,
            server_window=window,
        )
