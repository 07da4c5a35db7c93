"""`pricestream loadtest`: load shapes, latency histogram, and a real smoke run against a real
server (a few hundred users) whose leak verdict and error count are asserted."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pricestream.tools.loadtest.histogram import Histogram
from pricestream.tools.loadtest.stages import (
    Schedule,
    Stage,
    StageError,
    parse_duration,
    parse_stages,
    profile_stages,
)
from pricestream.tools.loadtest.webuser import WebVirtualUser
from pricestream.tools.loadtest.worker import Stats, WorkerConfig
from support.processes import ServeProcess, pricestream_command, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env


def test_stages_parse_and_ramp_linearly() -> None:
    stages = parse_stages("30s:100,1m:100,1m30s:1000,10s:0")
    assert stages == [Stage(30, 100), Stage(60, 100), Stage(90, 1000), Stage(10, 0)]
    schedule = Schedule(tuple(stages))
    assert schedule.seconds == 190 and schedule.peak == 1000
    assert schedule.users_at(0) == 0
    assert schedule.users_at(15) == 50
    assert schedule.users_at(60) == 100
    assert schedule.users_at(90 + 45) == 550
    assert schedule.users_at(185) == 500
    assert schedule.users_at(500) == 0
    assert [schedule.stage_at(t) for t in (0, 29.9, 30, 179, 180, 999)] == [0, 0, 1, 2, 3, 3]
    for t in (15, 77, 135):
        parts = [schedule.share(t, w, 3) for w in range(3)]
        assert sum(parts) == round(schedule.users_at(t)) and max(parts) - min(parts) <= 1
    assert parse_duration("1h") == 3600 and parse_duration("2.5s") == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30s", "is not DURATION:USERS"),
        ("30s:lots", "is not a whole number"),
        ("30:10", "is not a duration"),
        ("0s:10", "must be positive"),
        ("5s:-1", "cannot be negative"),
    ],
)
def test_bad_stages_say_why(text: str, message: str) -> None:
    with pytest.raises(StageError, match=message):
        parse_stages(text)


def test_profiles_scale_users() -> None:
    spike = profile_stages("spike", scale=0.5)
    assert max(s.target for s in spike) == 500
    assert any(b.target >= 10 * a.target > 0 for a, b in itertools.pairwise(spike))
    with pytest.raises(StageError, match="unknown profile"):
        profile_stages("nope")


def test_histogram_quantiles_and_merge() -> None:
    a, b = Histogram(), Histogram()
    for ms in range(1, 101):
        (a if ms % 2 else b).add(ms / 1000)
    a.merge(Histogram.from_json(json.loads(json.dumps(b.to_json()))))
    assert a.total == 100
    assert a.quantile(0.5) == pytest.approx(0.0501, abs=2e-4)
    assert a.quantile(0.99) == pytest.approx(0.0991, abs=2e-4)
    assert a.max() == pytest.approx(0.1001, abs=2e-4)
    assert Histogram().quantile(0.5) is None


@pytest.mark.timeout(120)
def test_smoke_run_against_a_real_server(own_redis: RedisProcess, tmp_path: Path) -> None:
    feed = start_feed(own_redis.url, tickers=50, rate=1000)
    server = ServeProcess(fast_env(own_redis.url, stall_timeout=3.0), tmp_path / "serve.log")
    try:
        out = tmp_path / "report"
        command = pricestream_command(
            "loadtest",
            "--target", server.target,
            "--metrics-url", f"http://127.0.0.1:{server.http_port}/metrics",
            "--stages", "2s:300,3s:300,2s:0",
            "--workers", "2",
            "--slow-fraction", "0.02",
            "--slow-read-delay", "5",
            "--max-error-rate", "0",
            "--leak-timeout", "15",
            "--out", str(out),
            "--quiet",
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["leak_verdict"]["passed"], report["leak_verdict"]
        assert report["total"]["errors"] == {}
        assert report["total"]["sessions_created"] == report["total"]["sessions_attempted"] >= 600
        assert report["total"]["updates_per_second"] > 1000
        assert report["total"]["delivery_latency_ms"]["p99"] < 1000
        assert sum(report["total"]["leaves"].values()) == report["total"]["sessions_created"]
        final = report["leak_verdict"]["final"]
        assert final["pricestream_sessions_opened_total"] >= 600
        assert final["pricestream_sessions_active"] == 0
        for name in ("summary.md", "users.png", "throughput.png", "latency.png", "server.png"):
            assert (out / name).stat().st_size > 0
        assert "Leak verdict: PASS" in (out / "summary.md").read_text()
        usable = min(2, len(os.sched_getaffinity(0)))
        assert report["client_cores_available"] == usable
        assert f"of the {usable} it could use" in (out / "summary.md").read_text()
        busy = report["client_cpu_cores"] >= 0.8 * usable
        assert ("warning: the load generator averaged" in result.stderr) is busy
        assert "leak verdict PASS" in result.stdout
    finally:
        server.stop()
        feed.kill()
        feed.wait()


def run_web_loadtest(
    server: ServeProcess, transport: str, out: Path, *, stages: str, workers: int,
    max_error_rate: float, leak_timeout: float,
) -> tuple[subprocess.CompletedProcess[str], dict]:  # fmt: skip
    """`pricestream loadtest --transport ws|sse` against ``server``: how it ended, and its
    report (written to ``out``)."""
    command = pricestream_command(
        "loadtest", "--transport", transport,
        "--web-target", f"127.0.0.1:{server.web_port}",
        "--metrics-url", f"http://127.0.0.1:{server.http_port}/metrics",
        "--stages", stages,
        "--workers", str(workers),
        "--max-error-rate", str(max_error_rate),
        "--leak-timeout", str(leak_timeout),
        "--out", str(out),
        "--no-plots",
        "--quiet",
    )  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    return result, json.loads((out / "report.json").read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_browser_path_smoke_run_against_a_real_server(
    own_redis: RedisProcess, tmp_path: Path, transport: str
) -> None:
    """`--transport ws|sse`: sessions created over REST, streamed over a WebSocket or SSE,
    every leave way taken (ws: close frame, dropped connection, DELETE; sse: the last two), and
    the leak verdict clean once they are all gone."""
    feed = start_feed(own_redis.url, tickers=50, rate=1000)
    server = ServeProcess(fast_env(own_redis.url), tmp_path / "serve.log")
    try:
        result, report = run_web_loadtest(
            server, transport, tmp_path / "report", stages="2s:60,3s:60,2s:0", workers=2,
            max_error_rate=0, leak_timeout=20,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert report["run"]["transport"] == transport
        assert report["leak_verdict"]["passed"], report["leak_verdict"]
        total = report["total"]
        assert total["errors"] == {}
        assert total["sessions_created"] == total["sessions_attempted"] >= 120
        assert total["updates_per_second"] > 200
        assert 0 < total["delivery_latency_ms"]["p99"] < 1000
        ways = {"ws": {"close", "drop", "delete"}, "sse": {"drop", "delete"}}[transport]
        assert set(total["leaves"]) == ways
        assert sum(total["leaves"].values()) == total["sessions_created"]
        final = report["leak_verdict"]["final"]
        assert final["pricestream_sessions_opened_total"] >= 120
        assert final["pricestream_sessions_active"] == 0
        assert final[f"pricestream_{transport}_connections_active"] == 0
        opened = final[f"pricestream_{transport}_connections_opened_total"]
        assert opened == final[f"pricestream_{transport}_connections_closed_total"] >= 120
        assert "leak verdict PASS" in result.stdout
    finally:
        server.stop()
        feed.kill()
        feed.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_refused_browser_streams_back_off_and_leave_no_session_behind(
    own_redis: RedisProcess, tmp_path: Path, transport: str
) -> None:
    """A pod that admits 2 new streams a second refuses most of 20 users' (1013 / 503). Each
    refused user deletes its session, which never streamed, and its slot waits 0.5-1.5 s:
    the leak verdict stays clean and the users make tens of sessions, not a thousand."""
    server = ServeProcess(
        fast_env(own_redis.url, web_accept_rate=2, web_accept_burst=5, session_ttl=60),
        tmp_path / "serve.log",
    )
    try:
        result, report = run_web_loadtest(
            server, transport, tmp_path / "report", stages="1s:20,4s:20,1s:0", workers=1,
            max_error_rate=1, leak_timeout=15,
        )  # fmt: skip
        assert report["leak_verdict"]["passed"], report["leak_verdict"]
        total = report["total"]
        refused = "stream:1013" if transport == "ws" else "stream:HTTP503"
        assert total["errors"].get(refused, 0) >= 10, total["errors"]
        assert set(total["errors"]) == {refused}, total["errors"]
        # 20 slots, each at least 0.5 s per refused attempt, for about 6 s.
        assert 20 < total["sessions_created"] <= 300
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    finally:
        server.stop()


def test_a_leave_way_of_another_transport_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricestream", "loadtest", "--transport", "sse",
         "--leave-mix", "close=1"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(
        "pricestream: --leave-mix part 'close=1' is not WAY=WEIGHT with WAY one of drop, delete"
    )


def test_bad_flags_get_one_sentence_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricestream", "loadtest", "--leave-mix", "vanish=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("pricestream: --leave-mix part 'vanish=1' is not WAY=WEIGHT")


async def test_a_browser_users_frames_are_checked_for_order_and_form() -> None:
    """The snapshot is seq 1 and comes once, each later frame is the next seq; a frame out of
    order, a second snapshot, prices before the snapshot or a frame that is not the protocol's
    JSON are each counted (decode:seq, decode:frame), the last without ending the user."""
    config = WorkerConfig(
        targets=[], worker=0, workers=1, start_at=0.0, stages=[], tickers=["A"], transport="ws"
    )
    stats = Stats()
    user = WebVirtualUser(
        None,  # type: ignore[arg-type]  # no REST call: frames only
        None, "x", "close", False, 0, ["A"], config, stats,
    )  # fmt: skip
    update = {"ticker": "A", "publishedAtUnixNanos": str(time.time_ns())}

    async def frame(kind: str, seq: int) -> None:
        await user._frame(json.dumps({"type": kind, "seq": seq, "updates": [update]}), 0.0)

    await frame("prices", 1)  # before the snapshot
    assert stats.errors == {"decode:seq": 1}
    await frame("snapshot", 1)
    await frame("prices", 2)
    await frame("prices", 3)
    assert stats.errors == {"decode:seq": 1} and stats.streams_started == 1
    await frame("prices", 5)  # one missed
    await frame("snapshot", 1)  # a second snapshot on one stream
    await user._frame("{not json", 0.0)
    await user._frame('{"type":"prices","seq":2}', 0.0)  # no updates
    assert stats.errors == {"decode:seq": 3, "decode:frame": 2}
    assert stats.updates == 4  # every well-formed prices frame's update was counted
