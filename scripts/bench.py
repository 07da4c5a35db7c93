"""`make bench`: the server pinned to one core against the load tester on the others.

For each case: a fresh redis-server (free loopback port, temporary folder), the feed
(scripts/bench_feed.py), and the server under `taskset -c 0`: `pricestream serve`, the bare
grpc.aio floor, or Centrifugo v6.9.1 (built by `make centrifugo`) with its uni-directional gRPC
transport and Redis engine, fed the same ticks in its own broker's wire format; the receiving
side (the Go load client by default, `pricestream loadtest` with --client python), the feed and
redis-server under `taskset -c 1-N`. The table goes to stdout and is appended to
docs/benchmarks.md; each row's CPU per delivered update is compared with the Centrifugo row of
the same workload in the same run.

    python scripts/bench.py                     # the cases of issues 6 and 12
    python scripts/bench.py --quick             # shorter holds, for a first look
    python scripts/bench.py --cases a500,c500   # ours and Centrifugo on one workload
    python scripts/bench.py --cases hot100,chot --streams 100 --ramp 3 --hold 5   # a smoke run
    python scripts/bench.py --cases w5k,cw5k,cw5kj,w10k,wstorm      # the browser path (issue 27)

The browser cases (issue 27) run the same way: pricestream's WebSocket (REST create, then a
socket per user: the Go client's -protocol ws) beside Centrifugo's uni_websocket (-protocol
centrifugo-ws, fed the update's JSON), with and without its join_push_messages; wstorm drops
every socket at once a third into the hold and reports how long until all resumed, the sessions
lost and the pod's readiness (/readyz polled every 250 ms) throughout.

d100x is d100 with tracing on (OTLP to scripts/bench_otlp_sink.py, on the load cores), so the
delivery-latency histogram takes exemplars: the notes under the table give its CPU per update
against d100's in the same run, and the buckets that carried an exemplar (issue 28).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import bench_centrifugo
import bench_shards
from bench_clients import GoClient, PythonLoadtest, Sampler, histogram_quantile, server_metrics
from pricestream.tools.leak_check import violations
from prometheus_client.process_collector import ProcessCollector

ROOT = Path(__file__).resolve().parents[1]
SEED_UPDATES_PER_CORE = 7_000  # the Go system: 14,000 updates/s on ~2 cores
CLIENT_NAMES = {"go": "Go load client (bench/loadclient)", "python": "`pricestream loadtest`"}


@dataclass(frozen=True)
class Case:
    name: str
    streams: int
    tickers_per_session: int
    flush: float
    universe: int
    floor: bool = False  # the bare grpc.aio server (scripts/bench_floor_server.py)
    quiet_feed: bool = False  # one update per ticker every 10 s: memory, not throughput
    ticker_hz: float | None = None  # updates per ticker per second, when not set by the flush
    centrifugo: bool = False  # Centrifugo (bench_centrifugo.py) instead of pricestream
    transport: str = "grpc"  # "ws" / "sse": the browser path (Centrifugo: its uni_websocket)
    join_push: bool = False  # Centrifugo's uni_websocket.join_push_messages
    storm: bool = False  # ws: every socket dropped at once during the hold, then reconnecting
    # tracing on (OTLP to scripts/bench_otlp_sink.py): the delivery-latency histogram takes
    # exemplars, one trace id per bucket per 15 s; compared with the same case untraced
    tracing: bool = False

    @property
    def feed_rate(self) -> float:
        """Round-robin feed: every ticker changes twice per flush window (or once in 10 s),
        or ticker_hz times a second."""
        if self.ticker_hz is not None:
            return self.universe * self.ticker_hz
        return self.universe / 10 if self.quiet_feed else 2 * self.universe / self.flush

    @property
    def workload(self) -> tuple[int, int, int, float, str]:
        """What the server is given: rows with the same workload are compared (a browser
        socket with a browser socket, a gRPC stream with a gRPC stream)."""
        path = "grpc" if self.transport == "grpc" else "web storm" if self.storm else "web"
        return (self.streams, self.tickers_per_session, self.universe, self.feed_rate, path)


CASES = {
    "a500": Case("5,000 streams x 5 tickers, flush 500 ms", 5_000, 5, 0.5, 500),
    "a100": Case("5,000 streams x 5 tickers, flush 100 ms", 5_000, 5, 0.1, 500),
    "b100": Case("10,000 streams x 5 tickers, flush 100 ms", 10_000, 5, 0.1, 500),
    "floor500": Case(
        "floor: bare grpc.aio, 5,000 streams x 5 updates, flush 500 ms", 5_000, 5, 0.5, 500, True
    ),
    "m10k": Case(
        "memory: 10,000 streams x 5 tickers, quiet feed", 10_000, 5, 0.5, 500, quiet_feed=True
    ),
}
CENTRIFUGO = f"Centrifugo {bench_centrifugo.CENTRIFUGO_VERSION} uni gRPC"
CASES |= {
    # a500's workload (500 tickers at 4 Hz): Centrifugo sends every tick, one Push each.
    "c500": Case(
        f"{CENTRIFUGO}: 5,000 streams x 5 tickers (a500's feed)", 5_000, 5, 0, 500,
        ticker_hz=4, centrifugo=True,
    ),
    # a100's workload (500 tickers at 20 Hz): 500,000 Pushes/s for Centrifugo, which does not
    # coalesce, beyond one core and beyond the receiver's core. Not a default case.
    "c100": Case(
        f"{CENTRIFUGO}: 5,000 streams x 5 tickers (a100's feed)", 5_000, 5, 0, 500,
        ticker_hz=20, centrifugo=True,
    ),
    # Hot tickers: every stream watches the same 5 tickers, each ticking at 20 Hz. pricestream
    # coalesces to one update per ticker per flush; Centrifugo delivers every tick.
    "hot100": Case(
        "hot: 500 streams x the same 5 tickers at 20 Hz, flush 100 ms", 500, 5, 0.1, 5,
        ticker_hz=20,
    ),
    "chot": Case(
        f"{CENTRIFUGO}: hot, 500 streams x the same 5 tickers at 20 Hz", 500, 5, 0, 5,
        ticker_hz=20, centrifugo=True,
    ),
    # Issue 12's workload: 2 Hz per ticker, 5 tickers per stream (50,000 updates/s at 5,000
    # streams), the same feed for both servers.
    "d100": Case("5,000 streams x 5 tickers at 2 Hz, flush 100 ms", 5_000, 5, 0.1, 500,
                 ticker_hz=2),
    # d100 with tracing and exemplars on (issue 28): what they cost, against d100 in one run.
    "d100x": Case("5,000 streams x 5 tickers at 2 Hz, flush 100 ms, tracing and exemplars on",
                  5_000, 5, 0.1, 500, ticker_hz=2, tracing=True),
    "cd": Case(f"{CENTRIFUGO}: 5,000 streams x 5 tickers at 2 Hz", 5_000, 5, 0, 500,
               ticker_hz=2, centrifugo=True),
    "d10k": Case("10,000 streams x 5 tickers at 2 Hz, flush 100 ms", 10_000, 5, 0.1, 500,
                 ticker_hz=2),
    "cd10k": Case(f"{CENTRIFUGO}: 10,000 streams x 5 tickers at 2 Hz", 10_000, 5, 0, 500,
                  ticker_hz=2, centrifugo=True),
    # Past one core's capacity on purpose: admission control must answer the surplus with
    # RESOURCE_EXHAUSTED (never CANCELLED from below).
    "s100": Case("saturation: 25,000 streams x 5 tickers at 2 Hz, flush 100 ms", 25_000, 5,
                 0.1, 500, ticker_hz=2),
    # Issue 15's quiet-feed tail: 10,000 streams, 0.05 Hz per ticker, flush 100 ms.
    "q10k": Case("quiet: 10,000 streams x 5 tickers at 0.05 Hz, flush 100 ms", 10_000, 5, 0.1,
                 500, ticker_hz=0.05),
    "m50k": Case("memory: 50,000 streams x 5 tickers, flush 500 ms, quiet feed", 50_000, 5,
                 0.5, 500, quiet_feed=True),
}  # fmt: skip
CENTRIFUGO_WS = f"Centrifugo {bench_centrifugo.CENTRIFUGO_VERSION} uni_websocket"
CASES |= {
    # Issue 27: the browser path. Each user creates its session over REST, then holds one
    # WebSocket (its own TCP connection); Centrifugo's uni_websocket on the same feed (JSON
    # pushes), without and with join_push_messages (its pushes queued for a socket share one
    # frame: fewer send() calls). Issue 12's workload: 5 tickers per socket at 2 Hz.
    "w5k": Case("ws: 5,000 sockets x 5 tickers at 2 Hz, flush 100 ms", 5_000, 5, 0.1, 500,
                ticker_hz=2, transport="ws"),
    "cw5k": Case(f"{CENTRIFUGO_WS}: 5,000 sockets x 5 tickers at 2 Hz", 5_000, 5, 0, 500,
                 ticker_hz=2, centrifugo=True, transport="ws"),
    "cw5kj": Case(f"{CENTRIFUGO_WS} + join_push_messages: 5,000 sockets x 5 tickers at 2 Hz",
                  5_000, 5, 0, 500, ticker_hz=2, centrifugo=True, transport="ws", join_push=True),
    "w10k": Case("ws: 10,000 sockets x 5 tickers at 2 Hz, flush 250 ms", 10_000, 5, 0.25, 500,
                 ticker_hz=2, transport="ws"),
    "cw10k": Case(f"{CENTRIFUGO_WS}: 10,000 sockets x 5 tickers at 2 Hz", 10_000, 5, 0, 500,
                  ticker_hz=2, centrifugo=True, transport="ws"),
    # SSE: the same workload over Server-Sent Events (for proxies that break Upgrade).
    "e5k": Case("sse: 5,000 streams x 5 tickers at 2 Hz, flush 100 ms", 5_000, 5, 0.1, 500,
                ticker_hz=2, transport="sse"),
    # The reconnect storm: every socket dropped at once (an ingress reload), reconnecting to its
    # session with jittered backoff, admitted at the pod's web_accept_rate (its default).
    "wstorm": Case("ws storm: 5,000 sockets dropped at once, flush 100 ms", 5_000, 5, 0.1, 500,
                   ticker_hz=2, transport="ws", storm=True),
}  # fmt: skip
BROWSER_CASES = "w5k,cw5k,cw5kj,w10k,cw10k,wstorm"
# "shards": not a server case; Redis Cluster capacity with 1 and 3 masters (bench_shards.py).
SHARDS_CASE = "shards"
DEFAULT_CASES = (
    "d100,d100x,cd,d10k,cd10k,a500,c500,floor500,hot100,chot,s100,q10k,m50k,"
    + BROWSER_CASES
    + ",shards"
)


def proc_sampler(pid: int) -> Sampler:
    """CPU seconds and RSS of a process without /metrics (the floor server), read from /proc by
    prometheus_client's own process collector."""
    collector = ProcessCollector(pid=lambda: pid, registry=None)

    def sample() -> dict[str, float]:
        return {s.name: s.value for family in collector.collect() for s in family.samples}

    return sample


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leak_verdict(http_port: int, timeout: float = 60) -> list[str]:
    """Invariant 1 once every user has left: [] or what is still open, polled until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        problems = violations(server_metrics(http_port))
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(1)


def wait_ready(port: int, timeout: float = 20, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


class ReadinessProbe:
    """The pod's /readyz polled every ``interval`` seconds from start to stop, in a thread: how
    many probes answered 200 (the storm case: the pod must stay ready while it is hit)."""

    def __init__(self, port: int, interval: float = 0.25) -> None:
        self._url, self._interval = f"http://127.0.0.1:{port}/readyz", interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.probes = self.ready = 0

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self.probes += 1
            try:
                with urllib.request.urlopen(self._url, timeout=1) as response:
                    self.ready += response.status == 200
            except OSError:
                pass

    def __enter__(self) -> ReadinessProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def host_cpu() -> dict[str, float]:
    """All CPUs' time and its steal share, in seconds, from /proc/stat's first line."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return {"host_cpu_seconds": sum(ticks[:8]) / hz, "host_steal_seconds": ticks[7] / hz}


def with_host_steal(sample: Sampler) -> Sampler:
    """The server's sample plus the host's CPU and steal seconds, taken at the same moment."""
    return lambda: {**sample(), **host_cpu()}


def run_case(
    case: Case, client: str, ramp: int, hold: int, workdir: Path, client_cpus: str
) -> dict:
    grpc_port, http_port, web_port = free_port(), free_port(), free_port()
    # The client's target: the gRPC port, or the web port (Centrifugo: its HTTP port)
    if case.transport == "grpc":
        target_port = grpc_port
    else:
        target_port = http_port if case.centrifugo else web_port
    procs: list[subprocess.Popen[bytes]] = []
    readiness: ReadinessProbe | None = None
    spans_file = workdir / f"spans-{grpc_port}.txt"
    exemplars: int | None = None
    try:
        if case.floor:
            server = _start(
                procs, "0", sys.executable, str(ROOT / "scripts/bench_floor_server.py"),
                "--port", str(grpc_port), "--flush", str(case.flush),
                "--tickers-per-session", str(case.tickers_per_session),
            )  # fmt: skip
            sample = proc_sampler(server.pid)
            wait_serving(grpc_port)
        else:
            redis_port = free_port()
            _start(
                procs, client_cpus, "redis-server", "--port", str(redis_port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
            )  # fmt: skip
            time.sleep(0.5)
            if case.centrifugo:
                prefix = f"bench{redis_port}"
                config = bench_centrifugo.write_config(
                    workdir / f"centrifugo-{grpc_port}.json",
                    redis_port=redis_port, grpc_port=grpc_port, http_port=http_port,
                    prefix=prefix, join_push_messages=case.join_push,
                )  # fmt: skip
                binary = ROOT / bench_centrifugo.CENTRIFUGO_BIN
                server = _start(procs, "0", *bench_centrifugo.command(binary, config))
                sample = proc_sampler(server.pid)
                # its JSON transport embeds the data as is: the update's JSON, not protobuf
                feed_format = [
                    "--format", "centrifugo-json" if case.transport != "grpc" else "centrifugo",
                    "--prefix", prefix,
                    "--channel-prefix", bench_centrifugo.CHANNEL_PREFIX,
                ]  # fmt: skip
            else:
                env = {k: v for k, v in os.environ.items() if not k.startswith("PRICESTREAM_")}
                env.update(
                    PRICESTREAM_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                    PRICESTREAM_GRPC_HOST="127.0.0.1",
                    PRICESTREAM_GRPC_PORT=str(grpc_port),
                    PRICESTREAM_HTTP_HOST="127.0.0.1",
                    PRICESTREAM_HTTP_PORT=str(http_port),
                    PRICESTREAM_WEB_HOST="127.0.0.1",
                    PRICESTREAM_WEB_PORT=str(web_port),
                    PRICESTREAM_FLUSH_INTERVAL=str(case.flush),
                    PRICESTREAM_LOG_LEVEL="WARNING",
                    # The pod's session limit is not what a case measures (CPU and memory are).
                    PRICESTREAM_MAX_SESSIONS=str(max(20_000, case.streams)),
                )
                if case.transport != "grpc" and not case.storm:
                    # The steady-state cases measure delivery, not admission: the ramp (up to
                    # 400 new sockets/s; 1,000 at w10k) must not meet the pod's web_accept_rate. The
                    # storm keeps the default: admission is what bounds its recovery.
                    env["PRICESTREAM_WEB_ACCEPT_RATE"] = "0"
                if case.tracing:
                    # the receiver first: stopped after the server, which exports on its way out
                    otlp_port = free_port()
                    sink = str(ROOT / "scripts/bench_otlp_sink.py")
                    _start(
                        procs, client_cpus, sys.executable, sink,
                        "--port", str(otlp_port), "--count-file", str(spans_file),
                    )  # fmt: skip
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{otlp_port}"
                    env["OTEL_SERVICE_NAME"] = "pricestream-bench"
                _start(procs, "0", sys.executable, "-m", "pricestream", "serve", env=env)

                def sample() -> dict[str, float]:
                    return server_metrics(http_port)

                feed_format = ["--format", "pricestream"]
            _start(
                procs, client_cpus, sys.executable, str(ROOT / "scripts/bench_feed.py"),
                "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                "--tickers", str(case.universe), "--rate", str(case.feed_rate), *feed_format,
            )  # fmt: skip
            wait_ready(http_port, path="/health" if case.centrifugo else "/readyz")

        time.sleep(2)
        sample = with_host_steal(sample)
        before_run = sample()
        runner = GoClient(ROOT) if client == "go" else PythonLoadtest(ROOT, http_port, workdir)
        if case.storm:
            readiness = ReadinessProbe(http_port).__enter__()
        try:
            measured = runner.run(case, target_port, sample, ramp, hold, client_cpus)
        finally:
            if readiness is not None:
                readiness.__exit__()
        verdict = "n/a" if case.floor or case.centrifugo else leak_verdict(http_port)
        if case.tracing:
            exemplars = exemplar_buckets(http_port)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    before, after, window = measured.server_before, measured.server_after, measured.server_window

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    if case.floor or case.centrifugo:  # no counters we read: what was received was sent
        sent_per_s, batches_per_s = measured.delivered_per_s, measured.batches_per_s
    else:
        sent_per_s = delta("pricestream_price_updates_sent_total") / window
        batches_per_s = delta("pricestream_batches_sent_total") / window
    cores = delta("process_cpu_seconds_total") / window
    host = delta("host_cpu_seconds")
    steal = delta("host_steal_seconds") / host if host > 0 else None
    idle_rss = before_run["process_resident_memory_bytes"]
    loaded_rss = after["process_resident_memory_bytes"]
    server = "centrifugo" if case.centrifugo else "floor" if case.floor else "pricestream"
    handed = histogram_quantile(0.99, before, after)
    return {
        "case": case.name,
        "server": server,
        "workload": list(case.workload),
        "client": client,
        "streams": case.streams,
        "streams_held": measured.streams_held,
        "flush_ms": int(case.flush * 1000),
        "feed_rate": 0 if case.floor else case.feed_rate,
        "cpu_us_per_update": round(cores / max(measured.delivered_per_s, 1) * 1e6, 2),
        "delivered_per_s": measured.delivered_per_s,
        "batches_per_s": measured.batches_per_s,
        "server_sent_per_s": round(sent_per_s, 1),
        "p50_ms": measured.p50_ms,
        "p99_ms": measured.p99_ms,
        # The server's own view: publish to the batch handed to its socket (the client's p99
        # adds the kernel and the client's own queueing); None for servers without it.
        "server_p99_ms": None if handed is None else round(handed * 1000, 1),
        "server_cores": round(cores, 3),
        "cpu_s_per_million": round(cores / max(sent_per_s, 1) * 1e6, 2),
        "cpu_us_per_batch": round(cores / max(batches_per_s, 1) * 1e6, 1),
        "rss_idle_mb": round(idle_rss / 2**20, 1),
        "rss_peak_mb": round(loaded_rss / 2**20, 1),
        "rss_kb_per_stream": round(
            (loaded_rss - idle_rss) / 1024 / max(measured.streams_held, 1), 1
        ),
        "client_cores": measured.client_cores,
        # The hypervisor's share of this VM's CPU time over the hold (/proc/stat's steal):
        # a noisy host inflates every server's CPU per update, so compare within one run.
        "host_steal_pct": None if steal is None else round(steal * 100, 1),
        "slow_consumer_cutoffs": delta("pricestream_slow_consumer_disconnects_total"),
        "errors": measured.errors,
        "leak_verdict": verdict if isinstance(verdict, str) else _verdict_text(verdict),
        "transport": case.transport,
        "tracing": None
        if not case.tracing
        else {
            "exemplar_buckets": exemplars,
            "spans_exported": int(spans_file.read_text()) if spans_file.exists() else None,
        },
        "storm": None
        if measured.storm is None
        else {
            **measured.storm,
            "ready_probes": None if readiness is None else readiness.ready,
            "probes": None if readiness is None else readiness.probes,
        },
    }


def exemplar_buckets(http_port: int) -> int:
    """Latency buckets carrying an exemplar in the OpenMetrics exposition (as Prometheus asks)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return sum(
        1
        for line in text.splitlines()
        if line.startswith("pricestream_delivery_latency_seconds_bucket") and " # {" in line
    )


def tracing_notes(rows: list[dict]) -> str:
    """Each traced case against the untraced rows of its workload in the same run (their
    mean, when a case was run more than once to see the noise)."""
    lines = []
    for r in rows:
        if not r.get("tracing"):
            continue
        base = [
            b["cpu_us_per_update"]
            for b in rows
            if b["workload"] == r["workload"] and b["server"] == r["server"] and not b["tracing"]
        ]
        if not base:
            versus = "no untraced row of the same workload in this run"
        else:
            mean = sum(base) / len(base)
            versus = (
                f"{r['cpu_us_per_update']} against {mean:.2f} µs per delivered update untraced "
                f"({r['cpu_us_per_update'] / mean - 1:+.1%}; untraced rows: "
                f"{', '.join(map(str, base))})"
            )
        t = r["tracing"]
        lines.append(
            f"- {r['case']}: {versus}; {t['exemplar_buckets']} latency buckets with an exemplar "
            f"at the end, {t['spans_exported']} spans exported in all"
        )
    return ("\nTracing and exemplars:\n\n" + "\n".join(lines) + "\n") if lines else ""


def _verdict_text(problems: list[str]) -> str:
    return "PASS" if not problems else "FAIL: " + "; ".join(problems)


def _start(
    procs: list[subprocess.Popen[bytes]], cpus: str, *command: str, env: dict | None = None
) -> subprocess.Popen[bytes]:
    """Start a process on the given cores (taskset execs it: the pid is the command's)."""
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(proc)
    return proc


def wait_serving(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def centrifugo_ratio(row: dict, rows: list[dict]) -> str:
    """The row's CPU per delivered update over Centrifugo's on the same workload in this run
    (its cheapest row there: uni_websocket with or without join_push_messages)."""
    references = [
        other["cpu_us_per_update"]
        for other in rows
        if other["server"] == "centrifugo" and other["workload"] == row["workload"]
    ]
    if not references or not min(references):
        return "n/a"
    return f"{row['cpu_us_per_update'] / min(references):.2f}x"


def storm_notes(rows: list[dict]) -> str:
    """One line per storm case: how long until every dropped socket streamed again, the
    sessions lost, and the pod's readiness while it was hit."""
    lines = []
    for r in rows:
        storm = r.get("storm")
        if not storm:
            continue
        until = storm["seconds_until_all_resumed"]
        resumed = (
            f"all resumed within {until:.1f} s"
            if until >= 0
            else f"{storm['resumed']:,} of {storm['dropped']:,} resumed"
        )
        lines.append(
            f"- {r['case']}: {storm['dropped']:,} sockets dropped at once; {resumed} "
            f"(resume p50 {storm['resume_ms']['p50']:.0f} ms, p99 {storm['resume_ms']['p99']:.0f}"
            f" ms); {storm['reconnect_retries']:,} reconnects refused or failed first; sessions "
            f"lost {storm['sessions_lost']}; /readyz 200 in {storm['ready_probes']} of "
            f"{storm['probes']} probes"
        )
    return ("\nReconnect storm:\n\n" + "\n".join(lines) + "\n") if lines else ""


def table(rows: list[dict]) -> str:
    head = (
        "| case | client | streams held | delivered updates/s | batches/s "
        "| server sent updates/s | ratio to seed (7,000/s per core) | p50 / p99 ms "
        "| server-side p99 ms "
        "| server cores | server CPU µs per batch | CPU µs per delivered update "
        "| ratio to Centrifugo (same workload) | CPU s per 1M updates "
        "| RSS idle / loaded MB | KB per stream "
        "| client cores | host steal % | slow-consumer cut-offs | client errors | leak verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['case']} | {r['client']} | {r['streams_held']:,} "
            f"| {r['delivered_per_s']:,.0f} | {r['batches_per_s']:,.0f} "
            f"| {r['server_sent_per_s']:,.0f} "
            f"| {r['delivered_per_s'] / SEED_UPDATES_PER_CORE:.1f}x "
            f"| {r['p50_ms']} / {r['p99_ms']} | {r.get('server_p99_ms') or '—'} "
            f"| {r['server_cores']:.2f} "
            f"| {r['cpu_us_per_batch']} | {r['cpu_us_per_update']} "
            f"| {centrifugo_ratio(r, rows)} | {r['cpu_s_per_million']} "
            f"| {r['rss_idle_mb']} / {r['rss_peak_mb']} "
            f"| {r['rss_kb_per_stream']} | {r['client_cores']} "
            f"| {'—' if r.get('host_steal_pct') is None else r['host_steal_pct']} "
            f"| {r['slow_consumer_cutoffs']:.0f} "
            f"| {errors} | {r['leak_verdict']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="server on one core vs the load tester")
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"from {', '.join([*CASES, SHARDS_CASE])}"
    )
    parser.add_argument("--ramp", type=int, default=25, help="seconds to ramp users up")
    parser.add_argument("--hold", type=int, default=30, help="seconds at the target")
    parser.add_argument("--quick", action="store_true", help="ramp 10 s, hold 15 s")
    parser.add_argument(
        "--client",
        choices=("go", "python"),
        default="go",
        help="receiving side: the light Go client (default) or `pricestream loadtest`",
    )
    parser.add_argument(
        "--streams", type=int, default=None, help="every case with this many streams (smoke runs)"
    )
    parser.add_argument("--no-append", action="store_true", help="do not touch docs/")
    args = parser.parse_args(argv)
    keys = args.cases.split(",")
    unknown = [key for key in keys if key not in CASES and key != SHARDS_CASE]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; from {', '.join([*CASES, SHARDS_CASE])}")
    cases = [CASES[key] for key in keys if key != SHARDS_CASE]
    if args.streams is not None:
        if args.streams < 1:
            parser.error("--streams must be positive")
        smoke = f" [{args.streams:,} streams]"
        cases = [dataclasses.replace(c, name=c.name + smoke, streams=args.streams) for c in cases]
    needed = ["taskset", "redis-server"] + (["go"] if args.client == "go" else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        print(f"bench: needs {', '.join(missing)} (make setup)", file=sys.stderr)
        return 2
    if args.client != "go" and any(c.storm or c.transport == "sse" for c in cases):
        print("bench: the storm and SSE cases need --client go", file=sys.stderr)
        return 2
    if any(c.centrifugo for c in cases):
        if args.client != "go":
            print("bench: the Centrifugo cases need --client go", file=sys.stderr)
            return 2
        if not (ROOT / bench_centrifugo.CENTRIFUGO_BIN).exists():
            binary = bench_centrifugo.CENTRIFUGO_BIN
            print(f"bench: needs {binary} (make centrifugo)", file=sys.stderr)
            return 2
    cores = os.cpu_count() or 1
    if cores < 2:
        print("bench: needs at least 2 cores (server on one, load on the others)", file=sys.stderr)
        return 2
    ramp, hold = (10, 15) if args.quick else (args.ramp, args.hold)
    client_cpus = f"1-{cores - 1}" if cores > 2 else "1"
    rows = []
    with tempfile.TemporaryDirectory(prefix="pricestream-bench-") as tmp:
        for case in cases:
            print(f"bench: {case.name} (feed {case.feed_rate:,.0f}/s) ...", file=sys.stderr)
            row = run_case(case, args.client, ramp, hold, Path(tmp), client_cpus)
            print(f"bench: {json.dumps(row)}", file=sys.stderr)
            rows.append(row)
    text = (table(rows) + storm_notes(rows) + tracing_notes(rows)) if rows else ""
    if SHARDS_CASE in keys:
        seconds = float(hold)  # each (masters, pods) pair publishes for one hold
        text += (
            "\nRedis Cluster sharded Pub/Sub (scripts/bench_shards.py: masters on core 0, "
            f"subscriber pods and feed on cores {client_cpus}; 500 tickers at 5,000 updates/s, "
            f"{seconds:g} s each):\n\n" + bench_shards.run([1, 3], [1, 4, 16], 500, 5000, seconds)
        )
    print(text)
    if not args.no_append:
        command = "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(argv))}" if argv else "")
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## {now}\n\n`{command}` on {cores} cores (server, ours or Centrifugo, pinned to "
            "core 0 with taskset; "
            f"{CLIENT_NAMES[args.client]}, feed and redis-server on cores {client_cpus}); "
            f"ramp {ramp} s, hold {hold} s; figures are over the hold.\n\n{text}"
        )
        path = ROOT / "docs/benchmarks.md"
        if not path.exists():
            path.write_text(
                "# Benchmarks\n\nAppended by `make bench` (scripts/bench.py). The seed (Go) "
                "delivered 14,000 updates/s on ~2 cores: about 7,000 updates/s per core.\n"
            )
        with path.open("a") as handle:
            handle.write(section)
    return 0 if all(r["leak_verdict"] in ("PASS", "n/a") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
