"""`make bench`: the server pinned to one core against the load tester on the others.

For each case: a fresh redis-server (free loopback port, temporary folder), the feed, and
`pricestream serve` under `taskset -c 0`; `pricestream loadtest` (and the feed) under
`taskset -c 1-N`. The table goes to stdout and is appended to docs/benchmarks.md.

    python scripts/bench.py                 # the cases of issue 6
    python scripts/bench.py --quick         # shorter holds, for a first look
    python scripts/bench.py --cases a500    # one case
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pricestream.leak_check import samples

ROOT = Path(__file__).resolve().parents[1]
SEED_UPDATES_PER_CORE = 7_000  # the Go system: 14,000 updates/s on ~2 cores


@dataclass(frozen=True)
class Case:
    name: str
    streams: int
    tickers_per_session: int
    flush: float
    universe: int

    @property
    def feed_rate(self) -> float:
        """Round-robin feed: every ticker changes twice per flush window."""
        return 2 * self.universe / self.flush


CASES = {
    "a500": Case("5,000 streams x 5 tickers, flush 500 ms", 5_000, 5, 0.5, 500),
    "a100": Case("5,000 streams x 5 tickers, flush 100 ms", 5_000, 5, 0.1, 500),
    "b100": Case("10,000 streams x 5 tickers, flush 100 ms", 10_000, 5, 0.1, 500),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return samples(response.read().decode())


def wait_ready(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def run_case(case: Case, ramp: int, hold: int, workdir: Path, client_cpus: str) -> dict:
    pricestream = str(ROOT / ".venv/bin/pricestream")
    redis_port, grpc_port, http_port = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["taskset", "-c", client_cpus, "redis-server", "--port", str(redis_port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICESTREAM_")}
    env.update(
        PRICESTREAM_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        PRICESTREAM_GRPC_HOST="127.0.0.1",
        PRICESTREAM_GRPC_PORT=str(grpc_port),
        PRICESTREAM_HTTP_HOST="127.0.0.1",
        PRICESTREAM_HTTP_PORT=str(http_port),
        PRICESTREAM_FLUSH_INTERVAL=str(case.flush),
        PRICESTREAM_LOG_LEVEL="WARNING",
    )
    procs: list[subprocess.Popen[bytes]] = [redis]
    try:
        time.sleep(0.5)
        server = subprocess.Popen(
            ["taskset", "-c", "0", pricestream, "serve"], env=env, stderr=subprocess.DEVNULL
        )
        procs.append(server)
        feed = subprocess.Popen(
            ["taskset", "-c", client_cpus, pricestream, "feed",
             "--tickers", str(case.universe), "--rate", str(case.feed_rate)],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(feed)
        wait_ready(http_port)
        time.sleep(2)
        idle_rss = metrics(http_port)["process_resident_memory_bytes"]
        out = workdir / f"report-{case.streams}-{int(case.flush * 1000)}"
        workers = _cpu_count(client_cpus)
        command = [
            "taskset", "-c", client_cpus, pricestream, "loadtest",
            "--target", f"127.0.0.1:{grpc_port}",
            "--metrics-url", f"http://127.0.0.1:{http_port}/metrics",
            "--stages", f"{ramp}s:{case.streams},{hold}s:{case.streams},5s:0",
            "--keep-users", "--leave-mix", "cancel=1,close_session=1",
            "--tickers-per-session", str(case.tickers_per_session),
            "--universe", str(case.universe),
            "--workers", str(workers), "--channels", "8",
            "--leak-timeout", "60", "--out", str(out), "--quiet",
        ]  # fmt: skip
        # The server's CPU and RSS over the hold stage, read around it.
        loadtest = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2 + ramp + 3)
        before = metrics(http_port)
        t0 = time.monotonic()
        time.sleep(max(1, hold - 6))
        after = metrics(http_port)
        window = time.monotonic() - t0
        stdout, stderr = loadtest.communicate(timeout=ramp + hold + 200)
        report = json.loads((out / "report.json").read_text())
        hold_stage = report["stages"][1]
        sent = (
            after["pricestream_price_updates_sent_total"]
            - before["pricestream_price_updates_sent_total"]
        )
        cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
        return {
            "case": case.name,
            "streams": case.streams,
            "flush_ms": int(case.flush * 1000),
            "feed_rate": case.feed_rate,
            "delivered_per_s": hold_stage["updates_per_second"],
            "server_sent_per_s": round(sent / window, 1),
            "p50_ms": hold_stage["delivery_latency_ms"]["p50"],
            "p99_ms": hold_stage["delivery_latency_ms"]["p99"],
            "server_cores": round(cpu / window, 3),
            "cpu_s_per_million": round(cpu / max(sent, 1) * 1e6, 2),
            "rss_idle_mb": round(idle_rss / 2**20, 1),
            "rss_peak_mb": round(after["process_resident_memory_bytes"] / 2**20, 1),
            "rss_kb_per_stream": round(
                (after["process_resident_memory_bytes"] - idle_rss) / 1024 / case.streams, 2
            ),
            "client_cores": round(report["client_cpu_cores"], 2),
            "slow_consumer_cutoffs": after.get("pricestream_slow_consumer_disconnects_total", 0),
            "errors": report["total"]["errors"],
            "leak_verdict": "PASS" if report["leak_verdict"]["passed"] else "FAIL",
            "loadtest_exit": loadtest.returncode,
            "loadtest_tail": (stdout + stderr).decode(errors="replace").strip()[-300:],
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cpu_count(spec: str) -> int:
    first, _, last = spec.partition("-")
    return int(last or first) - int(first) + 1


def table(rows: list[dict]) -> str:
    head = (
        "| case | delivered updates/s | server sent updates/s | ratio to seed (7,000/s per core) "
        "| p50 / p99 ms "
        "| server cores | CPU s per 1M updates | RSS idle / loaded MB | KB per stream "
        "| client cores | slow-consumer cut-offs | client errors | leak verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['case']} | {r['delivered_per_s']:,.0f} | {r['server_sent_per_s']:,.0f} "
            f"| {r['delivered_per_s'] / SEED_UPDATES_PER_CORE:.1f}x "
            f"| {r['p50_ms']} / {r['p99_ms']} | {r['server_cores']:.2f} "
            f"| {r['cpu_s_per_million']} | {r['rss_idle_mb']} / {r['rss_peak_mb']} "
            f"| {r['rss_kb_per_stream']} | {r['client_cores']} | {r['slow_consumer_cutoffs']:.0f} "
            f"| {errors} | {r['leak_verdict']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="server on one core vs the load tester")
    parser.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    parser.add_argument("--ramp", type=int, default=25, help="seconds to ramp users up")
    parser.add_argument("--hold", type=int, default=30, help="seconds at the target")
    parser.add_argument("--quick", action="store_true", help="ramp 10 s, hold 15 s")
    parser.add_argument("--no-append", action="store_true", help="do not touch docs/")
    args = parser.parse_args(argv)
    if shutil.which("taskset") is None or shutil.which("redis-server") is None:
        print("bench: needs taskset and redis-server (make setup)", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    if cores < 2:
        print("bench: needs at least 2 cores (server on one, load on the others)", file=sys.stderr)
        return 2
    ramp, hold = (10, 15) if args.quick else (args.ramp, args.hold)
    client_cpus = f"1-{cores - 1}" if cores > 2 else "1"
    rows = []
    with tempfile.TemporaryDirectory(prefix="pricestream-bench-") as tmp:
        for key in args.cases.split(","):
            case = CASES[key]
            print(f"bench: {case.name} (feed {case.feed_rate:,.0f}/s) ...", file=sys.stderr)
            row = run_case(case, ramp, hold, Path(tmp), client_cpus)
            print(f"bench: {json.dumps(row)}", file=sys.stderr)
            rows.append(row)
    text = table(rows)
    print(text)
    if not args.no_append:
        command = "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(argv))}" if argv else "")
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## {now}\n\n`{command}` on {cores} cores (server pinned to core 0 with taskset; "
            f"load tester, feed and redis-server on cores {client_cpus}); ramp {ramp} s, hold "
            f"{hold} s; figures are over the hold.\n\n{text}"
        )
        path = ROOT / "docs/benchmarks.md"
        if not path.exists():
            path.write_text(
                "# Benchmarks\n\nAppended by `make bench` (scripts/bench.py). The seed (Go) "
                "delivered 14,000 updates/s on ~2 cores: about 7,000 updates/s per core.\n"
            )
        with path.open("a") as handle:
            handle.write(section)
    return 0 if all(r["leak_verdict"] == "PASS" and not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
