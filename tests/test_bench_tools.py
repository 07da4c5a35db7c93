"""The benchmark's own tools, run for real: the Go load client (bench/loadclient) against a
real `pricestream serve`, against the bare grpc.aio floor server and against Centrifugo fed
through Redis in its own broker's format (scripts/bench_feed.py), and their error paths."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import RedisProcess, fast_env, free_port, require_binary
from invariants import wait_invariant
from pricestream.tools.feed import ticker_universe
from processes import ServeProcess, start_feed

from scripts import bench_centrifugo

ROOT = Path(__file__).resolve().parents[1]
LOADCLIENT = ROOT / "bench/loadclient"
# The wire helpers both Go clients import (a local module, by a replace in their go.mod).
GRPCWIRE = ROOT / "bench/grpcwire"
GRPCGO = ROOT / "tests/grpcgo"


@pytest.fixture(scope="module")
def loadclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_binary("go")
    binary = tmp_path_factory.mktemp("loadclient") / "loadclient"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=LOADCLIENT, check=True)
    return binary


def run_client(binary: Path, target: str, *args: str) -> dict:
    result = subprocess.run(
        [str(binary), "-target", target, *args], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loadclient: hold started" in result.stderr
    return json.loads(result.stdout)


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@pytest.mark.parametrize("module", [LOADCLIENT, GRPCWIRE, GRPCGO], ids=lambda p: p.name)
def test_go_sources_are_formatted_and_vetted(module: Path) -> None:
    go = require_binary("go")
    unformatted = subprocess.run(
        ["gofmt", "-l", "."], cwd=module, capture_output=True, text=True, check=True
    )
    assert unformatted.stdout == ""
    subprocess.run([go, "vet", "./..."], cwd=module, check=True)


def test_grpcwire_lean_readers_and_full_decoders_agree() -> None:
    """bench/grpcwire, the one Go source of the wire helpers of the load client and of
    tests/grpcgo: its own Go tests."""
    go = require_binary("go")
    subprocess.run([go, "test", "-count=1", "./..."], cwd=GRPCWIRE, check=True)


@pytest.mark.timeout(150)
def test_loadclient_against_a_real_server_leaves_nothing_behind(
    loadclient: Path, own_redis: RedisProcess, tmp_path: Path
) -> None:
    feed = start_feed(own_redis.url, tickers=40, rate=800)
    server = ServeProcess(fast_env(own_redis.url), tmp_path / "serve.log")
    try:
        report = run_client(
            loadclient, server.target,
            "-streams", "60", "-tickers", ",".join(ticker_universe(40)),
            "-tickers-per-session", "4", "-connections", "4",
            "-ramp", "1s", "-settle", "1s", "-hold", "3s",
        )  # fmt: skip
        assert report["errors"] == {}
        assert report["streams_at_hold_start"] == report["streams_at_hold_end"] == 60
        assert report["left_by_close_session"] + report["left_by_cancel"] == 60
        assert report["left_by_close_session"] == 30
        # 800 updates/s over 40 tickers, 4 tickers per stream: ~80 per stream per second,
        # coalesced to at most 4 per flush.
        assert report["updates_per_second"] > 1000
        assert report["updates"] >= report["batches"] > 0
        latency = report["delivery_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 2000
        values = asyncio.run(wait_invariant(server.http_port, timeout=15))
        assert values["pricestream_sessions_opened_total"] == 60
        assert values["pricestream_streams_closed_total"] == 60
    finally:
        server.stop()
        feed.kill()
        feed.wait()


@pytest.mark.timeout(120)
def test_floor_server_streams_one_batch_per_flush(loadclient: Path) -> None:
    port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/bench_floor_server.py"),
         "--port", str(port), "--flush", "0.2", "--tickers-per-session", "3"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_listening(port)
        report = run_client(
            loadclient, f"127.0.0.1:{port}",
            "-streams", "40", "-tickers", "AAPL,MSFT,GOOG",
            "-tickers-per-session", "3", "-connections", "2",
            "-ramp", "1s", "-settle", "1s", "-hold", "4s",
        )  # fmt: skip
        assert report["errors"] == {}
        assert report["updates"] == 3 * report["batches"]
        # 40 streams x 5 flushes per second x 4 s
        assert 600 <= report["batches"] <= 840
    finally:
        floor.terminate()
        floor.wait(timeout=10)


def wait_http_ok(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not answering 200 after {timeout} s")


@pytest.mark.timeout(60)
def test_loadclient_receives_centrifugo_publications_fed_through_redis(
    loadclient: Path, own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Centrifugo (make centrifugo) on its Redis engine, fed by bench_feed.py in its broker's
    wire format; 20 uni-directional gRPC streams get every tick of their channels."""
    binary = require_binary("centrifugo", ROOT / Path(bench_centrifugo.CENTRIFUGO_BIN).parent)
    grpc_port, http_port = free_port(), free_port()
    config = bench_centrifugo.write_config(
        tmp_path / "centrifugo.json",
        redis_port=own_redis.port, grpc_port=grpc_port, http_port=http_port,
        prefix="pstest", log_level="info",
    )  # fmt: skip
    log = (tmp_path / "centrifugo.log").open("wb")
    centrifugo = subprocess.Popen(
        bench_centrifugo.command(Path(binary), config), stdout=log, stderr=subprocess.STDOUT
    )
    feed = None
    try:
        wait_http_ok(f"http://127.0.0.1:{http_port}/health")
        tickers = ticker_universe(10)
        feed = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/bench_feed.py"), "--format", "centrifugo",
             "--redis-url", own_redis.url, "--prefix", "pstest",
             "--channel-prefix", bench_centrifugo.CHANNEL_PREFIX,
             "--tickers", "10", "--rate", "200"],
            stderr=(tmp_path / "feed.log").open("wb"),
        )  # fmt: skip
        report = run_client(
            loadclient, f"127.0.0.1:{grpc_port}", "-protocol", "centrifugo",
            "-channel-prefix", bench_centrifugo.CHANNEL_PREFIX,
            "-streams", "20", "-tickers", ",".join(tickers),
            "-tickers-per-session", "3", "-connections", "2",
            "-ramp", "1s", "-settle", "1s", "-hold", "3s",
        )  # fmt: skip
        log.flush()
        assert report["errors"] == {}, (tmp_path / "centrifugo.log").read_text()[-2000:]
        assert report["streams_at_hold_start"] == report["streams_at_hold_end"] == 20
        assert report["left_by_cancel"] == 20 and report["left_by_close_session"] == 0
        # 10 tickers at 20 Hz each, 3 channels per stream: ~60 publications per stream per
        # second, one Push each (Centrifugo does not coalesce).
        assert report["updates"] == report["batches"]
        assert 20 * 60 * 0.6 < report["updates_per_second"] < 20 * 60 * 1.2
        latency = report["delivery_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 2000
        assert feed.poll() is None, "the feed stopped"
    finally:
        if feed is not None:
            feed.terminate()
            feed.wait(timeout=10)
        centrifugo.terminate()
        centrifugo.wait(timeout=15)
        log.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "loadclient: -tickers is required"),
        (["-protocol", "mqtt", "-tickers", "A"], "-protocol must be pricestream or centrifugo"),
        (["-tickers", "A,B", "-tickers-per-session", "3"], "-tickers-per-session must be 1..2"),
        (
            ["-tickers", "A", "-tickers-per-session", "1", "-streams", "0"],
            "-streams, -connections and -hold must be positive",
        ),
    ],
)
def test_loadclient_bad_flags_get_one_line_and_exit_2(
    loadclient: Path, args: list[str], message: str
) -> None:
    result = subprocess.run([str(loadclient), *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_reports_the_hosts_steal_share_over_the_hold() -> None:
    """scripts/bench.py samples /proc/stat with the server's counters: the host's CPU seconds
    grow, its steal seconds are a part of them, and the table shows the share (— when the
    sample had none)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench  # scripts/bench.py, as `make bench` runs it
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    first = bench.with_host_steal(lambda: {"process_cpu_seconds_total": 1.0})()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # some CPU time for the host's counters to count
        pass
    second = bench.host_cpu()
    assert first["process_cpu_seconds_total"] == 1.0
    assert second["host_cpu_seconds"] - first["host_cpu_seconds"] >= 0.2
    steal = second["host_steal_seconds"] - first["host_steal_seconds"]
    assert 0 <= steal <= second["host_cpu_seconds"] - first["host_cpu_seconds"]
    row = {
        "case": "c", "client": "go", "streams_held": 1, "delivered_per_s": 1.0,
        "batches_per_s": 1.0, "server_sent_per_s": 1.0, "p50_ms": 1, "p99_ms": 2,
        "server_p99_ms": None, "server_cores": 0.1, "cpu_us_per_batch": 1, "cpu_us_per_update": 1,
        "cpu_s_per_million": 1, "rss_idle_mb": 1, "rss_peak_mb": 2, "rss_kb_per_stream": 1,
        "client_cores": 0.1, "slow_consumer_cutoffs": 0.0, "errors": {}, "leak_verdict": "PASS",
        "server": "pricestream", "workload": [1, 1, 1, 1],
    }  # fmt: skip
    head, rule, *lines = bench.table([{**row, "host_steal_pct": 12.5}, row]).splitlines()
    steal_column = head.split(" | ").index("host steal %")
    assert rule.count("---") == head.count("|") - 1
    assert [line.split(" | ")[steal_column] for line in lines] == ["12.5", "—"]
