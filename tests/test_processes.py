"""Whole processes: `pricestream serve`, `feed`, `watch` and `demo`, with signals and kills."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from pricestream.engine.stream import RECONNECT_HINT
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, scrape, wait_invariant
from support.processes import ServeProcess, env_without_pricestream, pricestream_command, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env
from support.streams import next_batch, read_to_end

CLIENT_SCRIPT = Path(__file__).parent / "clients" / "stream_forever.py"
ALL_RELEASED = "stopped: sessions_active=0 streams_active=0 subscriptions_active=0"


@pytest.fixture
def serve(redis, tmp_path: Path):
    started: list[ServeProcess] = []

    def start(**overrides: object) -> ServeProcess:
        proc = ServeProcess(fast_env(redis.url, **overrides), tmp_path / f"serve{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def feed(redis):
    proc = start_feed(redis.url, tickers=50, rate=2000)
    yield proc
    proc.kill()
    proc.wait()


async def test_thousand_streams_a_third_killed_abruptly(serve, feed, redis) -> None:
    from pricestream.tools.feed import ticker_universe

    tickers = ticker_universe(50)
    # The seed's 500 ms window keeps this one test process able to read all 1,000 streams.
    server = serve(log_level="INFO", session_ttl=60.0, flush_interval=0.5, stall_timeout=10.0)
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(10)]
    stubs = [PriceStreamServiceStub(c) for c in channels]

    async def open_one(index: int, stub: PriceStreamServiceStub):
        chosen = [tickers[(index * 7 + k) % 50] for k in range(3)]
        session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
        await next_batch(call, timeout=20)
        return session, call

    # 778 streams on channels 0-7 (667 end normally, 111 are cancelled), 111 on channels 8-9
    # (closed abruptly), 111 in a client process killed with SIGKILL.
    main = await asyncio.gather(*(open_one(i, stubs[i % 8]) for i in range(778)))
    dropped = await asyncio.gather(*(open_one(i, stubs[8 + i % 2]) for i in range(778, 889)))
    killed = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENT_SCRIPT), server.target, "111", *tickers,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert killed.stdout is not None
    assert (await asyncio.wait_for(killed.stdout.readline(), 30)).strip() == b"streaming 111"

    values = samples(scrape(server.http_port))
    assert values["pricestream_streams_active"] == 1000
    assert values["pricestream_sessions_active"] == 1000
    assert values["pricestream_pubsub_subscriptions_active"] == 50

    # A first data point for the closing note: updates/s received and server RSS.
    received = 0
    started = time.monotonic()

    async def drain_for(call, seconds: float) -> None:
        nonlocal received
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batch = await next_batch(call)  # read first: `+=` would read `received` before
            received += len(batch.updates)

    await asyncio.gather(*(drain_for(call, 3.0) for _, call in main))
    rate = received / (time.monotonic() - started)
    rss_mb = samples(scrape(server.http_port))["process_resident_memory_bytes"] / 2**20
    print(
        f"\n1000 streams: {rate:,.0f} updates/s received by 778 readers, server RSS {rss_mb:.0f} MB"
    )

    for _, call in main[667:]:
        call.cancel()
    for channel in channels[8:]:
        await channel.close(grace=None)
    killed.kill()
    await killed.wait()
    for session, _ in main[:667]:
        await stubs[0].CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    codes = await asyncio.gather(*(read_to_end(call) for _, call in main[:667]))
    assert set(codes) == {grpc.StatusCode.OK}

    values = await wait_invariant(server.http_port, timeout=20)
    assert values["pricestream_sessions_opened_total"] == 1000
    assert values["pricestream_slow_consumer_disconnects_total"] == 0
    for channel in channels[:8]:
        await channel.close()
    assert dropped  # kept open until the abrupt close above

    assert server.terminate() == 0
    created = collections.Counter()
    closed = collections.Counter()
    for record in server.records():
        message = record.get("msg", "")
        if match := re.fullmatch(r"Created Redis PubSub subscription for (\S+)", message):
            created[match[1]] += 1
        elif match := re.fullmatch(
            r"Closed Redis PubSub subscription for (\S+) \(no more subscribers\)", message
        ):
            closed[match[1]] += 1
    assert set(created) == set(tickers)
    assert created == closed
    audit = await asyncio.to_thread(
        subprocess.run,
        pricestream_command("audit-logs", str(server.log_path)),
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0, audit.stdout
    assert "sessions: opened 1,000, closed 1,000, still open 0" in audit.stdout


async def test_sigterm_drains_streams_and_exits(serve, feed) -> None:
    server = serve(drain_timeout=5.0)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = PriceStreamServiceStub(channel)
        calls = []
        for i in range(50):
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL", "MSFT"]))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            await next_batch(call)
            calls.append(call)
            del i
        started = time.monotonic()
        code = await asyncio.to_thread(server.terminate, 15)
        assert code == 0
        assert time.monotonic() - started < 5.0 + 2.0  # within drain timeout + stop grace
        for call in calls:
            assert await read_to_end(call) == grpc.StatusCode.UNAVAILABLE
            assert RECONNECT_HINT in tuple(await call.trailing_metadata())
    stopped = [r for r in server.records() if r.get("event") == "server_stopped"]
    assert stopped and stopped[-1]["msg"] == ALL_RELEASED


@pytest.mark.parametrize(
    ("args", "env", "phrase"),
    [
        (["--flush-interval", "0"], {}, "flush_interval"),
        (["--grpc-port", "70000"], {}, "grpc_port"),
        ([], {"PRICESTREAM_PUBSUB_CONNECTIONS": "lots"}, "pubsub_connections"),
        ([], {"PRICESTREAM_FAULTS": "crash_everything"}, "unknown fault"),
        ([], {"PRICESTREAM_REDIS_URL": "http://example"}, "redis_url"),
        ([], {"PRICESTREAM_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_settings_fail_with_one_line(args: list[str], env: dict[str, str], phrase: str) -> None:
    result = subprocess.run(
        pricestream_command("serve", *args),
        env={**env_without_pricestream(), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pricestream: invalid setting") or "unknown fault" in lines[0]
    assert phrase in lines[0]


@pytest.mark.parametrize("command", ["serve", "feed"])
def test_unknown_setting_stops_the_start_but_service_links_do_not(command: str) -> None:
    env = {
        **env_without_pricestream(),
        "PRICESTREAM_REDIS_URL": "redis://127.0.0.1:1/0",
        "PRICESTREAM_GRPC_HOST": "127.0.0.1",
        "PRICESTREAM_GRPC_PORT": "0",
        "PRICESTREAM_HTTP_HOST": "127.0.0.1",
        "PRICESTREAM_HTTP_PORT": "0",
        "PRICESTREAM_WEB_HOST": "127.0.0.1",
        "PRICESTREAM_WEB_PORT": "0",
        "PRICESTREAM_SERVICE_HOST": "10.96.14.2",  # a Service "pricestream" in the namespace
        "PRICESTREAM_PORT": "tcp://10.96.14.2:50051",
        "PRICESTREAM_PORT_50051_TCP_ADDR": "10.96.14.2",
        "PRICESTREAM_REDIS_PORT": "tcp://10.96.200.17:6379",  # and one "pricestream-redis"
        "PRICESTREAM_METRICS_PORT": "9000",
    }
    result = subprocess.run(
        pricestream_command(command), env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "pricestream: unknown setting PRICESTREAM_METRICS_PORT; did you mean PRICESTREAM_HTTP_PORT?"
    ]


async def test_feed_publishes_per_ingestion_contract(redis) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        pricestream_command("feed", "--tickers", "5", "--rate", "100", "--duration", "1"),
        env=fast_env(redis.url),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    client = redis.client()
    for ticker in ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA"]:
        update = pb.PriceUpdate.FromString(client.get(f"price:last:{ticker}"))
        assert update.ticker == ticker
        assert 15 <= update.sequence <= 25  # 100/s over 5 tickers for 1 s
        assert update.price > 0
        assert abs(update.published_at_unix_nanos / 1e9 - time.time()) < 10
    client.close()


def test_feed_stops_on_sigterm(redis) -> None:
    """In a pod the feed is PID 1, which ignores a signal it has no handler for: it handles
    SIGTERM itself (exit 0), or every stop of its pod waits out the grace period for SIGKILL."""
    feed = start_feed(redis.url, tickers=5, rate=100)
    try:
        client = redis.client()
        deadline = time.monotonic() + 20
        while client.get("price:last:AAPL") is None:  # publishing: the handler is in place
            assert time.monotonic() < deadline and feed.poll() is None, "the feed never published"
            time.sleep(0.05)
        client.close()
        feed.terminate()
        assert feed.wait(timeout=10) == 0
    finally:
        if feed.poll() is None:
            feed.kill()


def test_feed_started_before_redis_retries_until_it_connects(tmp_path: Path) -> None:
    """A fresh install starts the feed while Redis is pending: it retries with the server's
    backoff (exponential, jittered), one log line per attempt, instead of exiting."""
    redis = RedisProcess(tmp_path)  # its port is chosen; the server starts later
    log_path = tmp_path / "feed.log"
    env = fast_env(redis.url, reconnect_max_backoff=0.4, redis_timeout=0.5)
    with log_path.open("wb") as log:
        feed = subprocess.Popen(
            pricestream_command("feed", "--tickers", "5", "--rate", "100"), env=env, stderr=log
        )
    try:
        # Until the feed has failed a few times (its start-up alone may take seconds on a busy
        # machine, so no fixed sleep), then Redis comes up.
        deadline = time.monotonic() + 30
        while log_path.read_bytes().count(b'"feed_redis_unreachable"') < 5:
            assert feed.poll() is None, "the feed exited while Redis was unreachable"
            assert time.monotonic() < deadline, "the feed logged no failed attempts"
            time.sleep(0.05)
        assert feed.poll() is None, "the feed exited while Redis was unreachable"
        redis.start()
        client = redis.client()
        deadline = time.monotonic() + 10
        while client.get("price:last:AAPL") is None:
            assert time.monotonic() < deadline, "no price published after Redis started"
            assert feed.poll() is None
            time.sleep(0.1)
        client.close()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        failed = [r for r in records if r.get("event") == "feed_redis_unreachable"]
        assert len(failed) >= 4, failed
        assert [r["attempt"] for r in failed] == list(range(1, len(failed) + 1))
        delays = [float(re.search(r"retrying in ([0-9.]+)s", r["msg"])[1]) for r in failed]
        assert delays[0] <= 0.1 and max(delays) <= 0.4, delays
        assert delays[-1] >= 0.2, f"no exponential growth: {delays}"
        (reached,) = [r for r in records if r.get("event") == "feed_redis_reachable"]
        assert reached["attempt"] == len(failed) + 1
    finally:
        feed.terminate()
        feed.wait(timeout=10)
        redis.stop()


async def test_watch_shows_prices_and_exits_cleanly_on_ctrl_c(serve, feed) -> None:
    server = serve()
    watch = await asyncio.create_subprocess_exec(
        *pricestream_command("watch", "AAPL", "msft", "--target", server.target),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watch.stdout is not None
    seen = b""
    deadline = time.monotonic() + 20
    while not re.search(rb"MSFT\s+\d+\.\d\d\s+[+-]\d+\.\d\d%\s+\d+ms", seen):
        assert time.monotonic() < deadline, seen[-500:]
        seen += await asyncio.wait_for(watch.stdout.read(4096), 20)
    assert b"AAPL" in seen
    watch.send_signal(2)  # SIGINT, as Ctrl-C
    _, stderr = await asyncio.wait_for(watch.communicate(), 20)
    assert watch.returncode == 0, stderr
    await wait_invariant(server.http_port, timeout=10)
    closes = [r for r in server.records() if r.get("event") == "session_closed"]
    assert len(closes) == 1  # watch closed its session on the way out


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_demo_shows_live_prices(redis, backend: str) -> None:
    url = redis.url if backend == "redis" else "redis://127.0.0.1:1/0"
    env = env_without_pricestream()
    args = ["demo", "AAPL", "--duration", "3", "--no-clear", "--redis-url", url]
    args += ["--grpc-port", "0", "--http-port", "0", "--web-port", "0"]
    result = await asyncio.to_thread(
        subprocess.run, pricestream_command(*args), env=env, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = "using Redis" if backend == "redis" else "using the in-memory broker"
    assert expected in result.stderr.decode()
    assert re.search(rb"the live page is at http://localhost:\d+/\?tickers=AAPL", result.stderr)
    prices = re.findall(rb"AAPL\s+(\d+\.\d\d)\s", result.stdout)
    assert len(prices) >= 5
    assert len(set(prices)) >= 2  # the price moves


async def test_drain_1000_streams_and_resume_on_another_replica(serve, feed) -> None:
    from pricestream.tools.feed import ticker_universe

    tickers = ticker_universe(50)
    pod_a = serve(log_level="INFO", session_ttl=60.0, flush_interval=0.5, drain_timeout=8.0)
    pod_b = serve(log_level="INFO", session_ttl=60.0, flush_interval=0.5)
    channels_a = [grpc.aio.insecure_channel(pod_a.target) for _ in range(8)]
    channel_b = grpc.aio.insecure_channel(pod_b.target)
    stubs_a = [PriceStreamServiceStub(c) for c in channels_a]
    stub_b = PriceStreamServiceStub(channel_b)

    async def open_one(index: int):
        stub = stubs_a[index % 8]
        chosen = [tickers[(index * 7 + k) % 50] for k in range(3)]
        session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
        await next_batch(call, timeout=20)
        return session, call

    opened = await asyncio.gather(*(open_one(i) for i in range(1000)))
    started = time.monotonic()
    code = await asyncio.to_thread(pod_a.terminate, 30)
    assert code == 0
    assert time.monotonic() - started < 8.0 + 2.0  # drain timeout + stop grace
    codes = await asyncio.gather(*(read_to_end(call, timeout=10) for _, call in opened))
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    hints = await asyncio.gather(*(call.trailing_metadata() for _, call in opened))
    assert all(RECONNECT_HINT in tuple(hint) for hint in hints)
    stopped = [r for r in pod_a.records() if r.get("event") == "server_stopped"]
    assert stopped[-1]["msg"] == ALL_RELEASED

    # The same sessions resume on the other replica and keep receiving prices.
    async def resume(session):
        call = stub_b.StreamPriceUpdates(
            pb.StreamPriceUpdatesRequest(session_id=session.session_id)
        )
        first = await next_batch(call, timeout=20)
        assert {u.ticker for u in first.updates} == set(session.tickers)
        await next_batch(call, timeout=10)  # and a fresh one after that
        return call

    resumed = await asyncio.gather(*(resume(session) for session, _ in opened))
    assert samples(scrape(pod_b.http_port))["pricestream_streams_active"] == 1000
    for call in resumed:
        call.cancel()
    await wait_invariant(pod_b.http_port, timeout=20)
    for channel in [*channels_a, channel_b]:
        await channel.close()


async def test_resume_after_kill_9_is_quick_on_another_pod(serve, redis) -> None:
    """Streams on pod A, A killed with SIGKILL: its leases (10 s TTL, as in production) are
    taken over on pod B as soon as A's liveness key has expired, not after the lease TTL."""
    from support.market import Market

    count, lease_ttl = 100, 10.0
    pod_a = serve(pod_name="pod-a", lease_ttl=lease_ttl)
    pod_b = serve(pod_name="pod-b", lease_ttl=lease_ttl)
    tickers = ["AAPL", "MSFT", "GOOG"]
    market = Market(redis.url, tickers)
    await market.tick(*tickers)  # every stream's first batch comes at once
    async with (
        grpc.aio.insecure_channel(pod_a.target) as channel_a,
        grpc.aio.insecure_channel(pod_b.target) as channel_b,
    ):
        stub_a, stub_b = PriceStreamServiceStub(channel_a), PriceStreamServiceStub(channel_b)
        sessions = [
            (await stub_a.CreateSession(pb.CreateSessionRequest(tickers=tickers))).session_id
            for _ in range(count)
        ]
        on_a = [
            stub_a.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=s)) for s in sessions
        ]
        for call in on_a:
            await next_batch(call, timeout=10)

        pod_a.proc.kill()  # SIGKILL: no drain, no lease released
        pod_a.proc.wait()
        killed_at = time.monotonic()
        codes: collections.Counter[str] = collections.Counter()

        async def resume(session_id: str):
            """What a client does: retry the same session on FAILED_PRECONDITION / UNAVAILABLE."""
            while True:
                call = stub_b.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session_id)
                )
                try:
                    await next_batch(call, timeout=5)
                    return time.monotonic() - killed_at, call
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    assert exc.code() in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.UNAVAILABLE,
                    ), exc
                    await asyncio.sleep(0.1)

        resumed = await asyncio.wait_for(asyncio.gather(*(resume(s) for s in sessions)), 30)
        took = max(t for t, _ in resumed)
        print(
            f"{count} sessions resumed on pod B within {took:.2f}s of kill -9 of pod A "
            f"(lease TTL {lease_ttl:g}s; retries {dict(codes)})"
        )
        assert took <= 3.0 + 1.0, f"resume took {took:.2f}s after the kill"
        for call in on_a:
            call.cancel()
        for _, call in resumed:
            call.cancel()
    await market.aclose()
    await wait_invariant(pod_b.http_port, timeout=15)
