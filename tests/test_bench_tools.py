"""The benchmark's own tools, run for real: the Go load client (bench/loadclient) against a
real `pricestream serve` (gRPC, and the browser path: REST + WebSocket or SSE), against the bare
grpc.aio floor server and against Centrifugo (uni-directional gRPC and uni_websocket) fed
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
from pricestream.tools.feed import ticker_universe
from support.invariants import wait_invariant
from support.processes import ServeProcess, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env
from support.waiting import free_port, require_binary

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
def test_go_sources_are_formatted_vetted_and_build(module: Path) -> None:
    """Every Go file of the module: the load client's gRPC modes (main.go, centrifugo.go) and its
    browser modes (web.go: ws and sse; centrifugo_ws.go: centrifugo-ws) alike."""
    go = require_binary("go")
    unformatted = subprocess.run(
        ["gofmt", "-l", "."], cwd=module, capture_output=True, text=True, check=True
    )
    assert unformatted.stdout == ""
    subprocess.run([go, "vet", "./..."], cwd=module, check=True)
    subprocess.run([go, "build", "./..."], cwd=module, check=True)


def test_loadclient_has_every_mode_and_a_kept_websocket_library() -> None:
    sources = {p.name: p.read_text() for p in LOADCLIENT.glob("*.go")}
    assert {"web.go", "centrifugo_ws.go"} <= set(sources)
    assert '"pricestream", "centrifugo", "ws", "sse", "centrifugo-ws"' in sources["main.go"]
    go_mod = (LOADCLIENT / "go.mod").read_text()
    assert "github.com/coder/websocket v1." in go_mod


@pytest.mark.parametrize("module", [GRPCWIRE, LOADCLIENT], ids=lambda p: p.name)
def test_go_modules_own_tests_pass(module: Path) -> None:
    """bench/grpcwire (the one Go source of the wire helpers of the load client and of
    tests/grpcgo: lean readers and full decoders agree) and bench/loadclient (its latency
    histogram: no quantile above the maximum): their own Go tests."""
    go = require_binary("go")
    subprocess.run([go, "test", "-count=1", "./..."], cwd=module, check=True)


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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["ws", "sse"])
def test_loadclient_browser_modes_against_a_real_server(
    loadclient: Path, own_redis: RedisProcess, tmp_path: Path, protocol: str
) -> None:
    """-protocol ws / sse: 20 sessions created over REST, streamed over a WebSocket or SSE,
    frames read and their publishedAtUnixNanos measured; every user leaves its way and the
    server's books balance."""
    feed = start_feed(own_redis.url, tickers=40, rate=800)
    server = ServeProcess(fast_env(own_redis.url), tmp_path / "serve.log")
    try:
        report = run_client(
            loadclient, f"127.0.0.1:{server.web_port}", "-protocol", protocol,
            "-streams", "20", "-tickers", ",".join(ticker_universe(40)),
            "-tickers-per-session", "4",
            "-ramp", "1s", "-settle", "1s", "-hold", "3s",
        )  # fmt: skip
        assert report["errors"] == {}
        assert report["streams_at_hold_start"] == report["streams_at_hold_end"] == 20
        assert report["snapshots"] == 20  # one per stream, never counted as deliveries
        # 800 updates/s over 40 tickers, 4 per session: ~80 per socket per second, coalesced to
        # at most 4 per 50 ms flush
        assert report["updates_per_second"] > 20 * 20
        assert report["updates"] >= report["batches"] > 0
        latency = report["delivery_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 2000
        if protocol == "ws":  # index % 3: DELETE, close frame, dropped connection
            left = (report["left_by_close_session"], report["left_by_close_frame"])
            assert (*left, report["left_by_cancel"]) == (7, 7, 6)
        else:  # index % 2: DELETE, dropped connection
            assert (report["left_by_close_session"], report["left_by_cancel"]) == (10, 10)
        values = asyncio.run(wait_invariant(server.http_port, timeout=15))
        assert values["pricestream_sessions_opened_total"] == 20
        assert values[f"pricestream_{protocol}_connections_opened_total"] == 20
    finally:
        server.stop()
        feed.kill()
        feed.wait()


@pytest.mark.timeout(120)
def test_loadclient_storm_drops_every_socket_and_each_resumes_its_session(
    loadclient: Path, own_redis: RedisProcess, tmp_path: Path
) -> None:
    """-storm-at: every WebSocket dropped at once (1006 on the server), each reconnecting to its
    own session with jittered backoff; none lost, and the report says when all were back."""
    feed = start_feed(own_redis.url, tickers=40, rate=800)
    server = ServeProcess(fast_env(own_redis.url), tmp_path / "serve.log")
    try:
        report = run_client(
            loadclient, f"127.0.0.1:{server.web_port}", "-protocol", "ws",
            "-streams", "20", "-tickers", ",".join(ticker_universe(40)),
            "-tickers-per-session", "4",
            "-ramp", "1s", "-settle", "1s", "-hold", "4s", "-storm-at", "1s",
        )  # fmt: skip
        assert report["errors"] == {}
        storm = report["storm"]
        assert storm["dropped"] == storm["resumed"] == 20 and storm["sessions_lost"] == 0
        assert 0 < storm["seconds_until_all_resumed"] < 3
        assert report["streams_at_hold_end"] == 20
        assert report["snapshots"] == 40  # a fresh snapshot on each reconnect
        values = asyncio.run(wait_invariant(server.http_port, timeout=15))
        # 20 sockets, then 20 more on the same sessions (the server counts a resumed session
        # as opened again on the pod that resumes it; no 4004 said none was lost), and each
        # refused retry (a reconnect quicker than the server's sight of the drop gets 4009)
        opened = values["pricestream_ws_connections_opened_total"]
        assert opened == 40 + storm["reconnect_retries"], (opened, storm)
    finally:
        server.stop()
        feed.kill()
        feed.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("join", [False, True], ids=["pushes", "joined"])
def test_loadclient_receives_centrifugo_uni_websocket_pushes(
    loadclient: Path, own_redis: RedisProcess, tmp_path: Path, join: bool
) -> None:
    """Centrifugo's uni_websocket (with and without join_push_messages) fed the updates' JSON
    through Redis (bench_feed.py --format centrifugo-json): 20 sockets get every tick of their
    channels, latency read from publishedAtUnixNanos."""
    binary = require_binary("centrifugo", ROOT / Path(bench_centrifugo.CENTRIFUGO_BIN).parent)
    grpc_port, http_port = free_port(), free_port()
    config = bench_centrifugo.write_config(
        tmp_path / "centrifugo.json",
        redis_port=own_redis.port, grpc_port=grpc_port, http_port=http_port,
        prefix="pstest", log_level="info", join_push_messages=join,
    )  # fmt: skip
    log = (tmp_path / "centrifugo.log").open("wb")
    centrifugo = subprocess.Popen(
        bench_centrifugo.command(Path(binary), config), stdout=log, stderr=subprocess.STDOUT
    )
    feed = None
    try:
        wait_http_ok(f"http://127.0.0.1:{http_port}/health")
        feed = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/bench_feed.py"), "--format", "centrifugo-json",
             "--redis-url", own_redis.url, "--prefix", "pstest",
             "--channel-prefix", bench_centrifugo.CHANNEL_PREFIX,
             "--tickers", "10", "--rate", "200"],
            stderr=(tmp_path / "feed.log").open("wb"),
        )  # fmt: skip
        report = run_client(
            loadclient, f"127.0.0.1:{http_port}", "-protocol", "centrifugo-ws",
            "-channel-prefix", bench_centrifugo.CHANNEL_PREFIX,
            "-streams", "20", "-tickers", ",".join(ticker_universe(10)),
            "-tickers-per-session", "3",
            "-ramp", "1s", "-settle", "1s", "-hold", "3s",
        )  # fmt: skip
        log.flush()
        assert report["errors"] == {}, (tmp_path / "centrifugo.log").read_text()[-2000:]
        assert report["streams_at_hold_start"] == report["streams_at_hold_end"] == 20
        assert report["left_by_cancel"] == 20
        # 10 tickers at 20 Hz, 3 channels per socket: ~60 pushes per socket per second
        assert 20 * 60 * 0.6 < report["updates_per_second"] < 20 * 60 * 1.2
        if join:
            assert report["batches"] <= report["updates"]
        else:
            assert report["batches"] == report["updates"]  # one push per frame
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


def test_bench_has_the_browser_cases_beside_centrifugo() -> None:
    """Issue 27's cases: a browser row compares with the cheapest Centrifugo uni_websocket row
    of its workload, never with a gRPC one, and the storm row with nothing."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cases = bench.CASES
    assert {"w5k", "cw5k", "cw5kj", "w10k", "wstorm"} <= set(bench.DEFAULT_CASES.split(","))
    assert cases["w5k"].workload == cases["cw5k"].workload == cases["cw5kj"].workload
    assert cases["w5k"].workload != cases["d100"].workload != cases["wstorm"].workload
    assert cases["cw5kj"].join_push and not cases["cw5k"].join_push
    assert cases["w10k"].flush == 0.25 and cases["w10k"].streams == 10_000
    rows = [
        {"server": "centrifugo", "workload": ["w"], "cpu_us_per_update": 10.0},
        {"server": "centrifugo", "workload": ["w"], "cpu_us_per_update": 8.0},
        {"server": "centrifugo", "workload": ["g"], "cpu_us_per_update": 2.0},
    ]
    assert bench.centrifugo_ratio({"workload": ["w"], "cpu_us_per_update": 4.0}, rows) == "0.50x"
    assert bench.centrifugo_ratio({"workload": ["s"], "cpu_us_per_update": 4.0}, rows) == "n/a"
    config = bench.bench_centrifugo.centrifugo_config(
        redis_port=1, grpc_port=2, http_port=3, prefix="p", join_push_messages=True
    )
    assert config["uni_websocket"] == {"enabled": True, "join_push_messages": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "loadclient: -tickers is required"),
        (
            ["-protocol", "mqtt", "-tickers", "A"],
            "-protocol must be one of pricestream, centrifugo, ws, sse, centrifugo-ws",
        ),
        (
            ["-protocol", "sse", "-tickers", "A", "-tickers-per-session", "1", "-storm-at", "1s"],
            "-storm-at needs -protocol ws and must fall within -hold",
        ),
        (
            ["-protocol", "ws", "-tickers", "A", "-tickers-per-session", "1", "-storm-at", "1m"],
            "-storm-at needs -protocol ws and must fall within -hold",
        ),
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
