"""Sentinel mode against a real deployment (support/sentinel_setup.py: master, replica, 3 sentinels,
down-after-milliseconds 2000): a master killed during 500 live streams, a planned failover,
a demoted master that keeps running (the "health green, no messages" trap), a sentinel that
is down at start. Timings are printed (run with -s to see them) and bounded loosely: the
machine is shared."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from pricestream.api.server import Server
from pricestream.redis.broker import RedisPricePublisher
from pricestream.redis.client import make_pool
from pricestream.redis.packing import with_hiredis_packing
from pricestream.redis.sentinel import SentinelPool
from pricestream.settings import load_settings
from pricestream.tasks import cancel_and_wait
from pricestream.tools.feed import RandomWalk
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.exceptions import RedisError
from support.invariants import read_metrics, samples, wait_invariant
from support.processes import ServeProcess, env_without_pricestream, pricestream_command
from support.sentinel_setup import SentinelDeployment, sockets_to
from support.servers import ready_server
from support.settings import fast_env, fast_settings
from support.waiting import wait_until

# The URL gives credentials, TLS and db in sentinel mode; its host and port are not used.
URL = "redis://127.0.0.1:1/0"
FEED_TICKERS = 50


@contextlib.contextmanager
def running(deployment: SentinelDeployment) -> Iterator[SentinelDeployment]:
    """The deployment started, and stopped on the way out (a failed start included)."""
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    with running(SentinelDeployment(tmp_path)) as deployment:
        yield deployment


@contextlib.contextmanager
def feed(deployment: SentinelDeployment, rate: float) -> Iterator[subprocess.Popen[bytes]]:
    """`pricestream feed` in sentinel mode, the settings as env vars."""
    env = {
        **env_without_pricestream(),
        "PRICESTREAM_REDIS_URL": URL,
        "PRICESTREAM_RECONNECT_MAX_BACKOFF": "0.5",
        "PRICESTREAM_REDIS_TIMEOUT": "1",
        **{f"PRICESTREAM_{k.upper()}": str(v) for k, v in deployment.settings().items()},
    }
    args = ["feed", "--tickers", str(FEED_TICKERS), "--rate", str(rate)]
    with open(deployment.workdir / "feed.log", "ab") as log:
        proc = subprocess.Popen(pricestream_command(*args), env=env, stderr=log)
        try:
            wait_publishing(deployment, proc)
            yield proc
        finally:
            proc.kill()
            proc.wait()


def wait_publishing(deployment: SentinelDeployment, proc: subprocess.Popen[bytes]) -> None:
    """Until the feed has stored a price on the master (a busy machine starts it slowly)."""
    master = deployment.node_at(deployment.named_master())
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the feed exited"
        with master.client() as client:
            if client.exists("price:last:AAPL"):
                return
        assert time.monotonic() < deadline, "the feed published nothing within 60 s"
        time.sleep(0.1)


def sentinel_settings(deployment: SentinelDeployment, **overrides: object):
    return fast_settings(URL, redis_outage_limit=30.0, **deployment.settings(), **overrides)


@dataclass
class Streams:
    """Live streams, each read by its own task that notes when it first sees a price
    published after ``since_ns``."""

    calls: list = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    first_batch: list[float | None] = field(default_factory=list)
    fresh_at: list[float | None] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    since_ns: int = 2**63
    tasks: list[asyncio.Task] = field(default_factory=list)

    def expect_fresh_after(self, since_ns: int) -> None:
        self.since_ns = since_ns
        self.fresh_at = [None] * len(self.calls)

    def fresh(self) -> int:
        return sum(1 for t in self.fresh_at if t is not None)

    async def read(self, index: int) -> None:
        call = self.calls[index]
        try:
            async for batch in call:
                if self.first_batch[index] is None:
                    self.first_batch[index] = time.monotonic()
                if self.fresh_at[index] is None and any(
                    u.published_at_unix_nanos > self.since_ns for u in batch.updates
                ):
                    self.fresh_at[index] = time.monotonic()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.ended.append(f"stream {index}: {exc.code().name} {exc.details()}")
            return
        self.ended.append(f"stream {index}: ended OK")


@contextlib.asynccontextmanager
async def open_streams(
    target: str, count: int, tickers_of, channels: int = 4
) -> AsyncIterator[Streams]:
    """``count`` sessions and streams over ``channels`` connections; on the way out every
    stream is cancelled and every session closed."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            PriceStreamServiceStub(
                await stack.enter_async_context(grpc.aio.insecure_channel(target))
            )
            for _ in range(channels)
        ]
        streams = Streams()
        try:
            for i in range(count):
                stub = stubs[i % channels]
                session = await stub.CreateSession(
                    pb.CreateSessionRequest(tickers=tickers_of(i)), timeout=10
                )
                streams.sessions.append(session.session_id)
                streams.calls.append(
                    stub.StreamPriceUpdates(
                        pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                    )
                )
                streams.first_batch.append(None)
                streams.fresh_at.append(None)
            streams.tasks = [asyncio.create_task(streams.read(i)) for i in range(count)]
            yield streams
        finally:
            for call in streams.calls:
                call.cancel()
            await asyncio.gather(*streams.tasks, return_exceptions=True)
            for i, session_id in enumerate(streams.sessions):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stubs[i % channels].CloseSession(
                        pb.CloseSessionRequest(session_id=session_id), timeout=10
                    )


@contextlib.asynccontextmanager
async def streaming_pod(
    deployment: SentinelDeployment, pod_name: str, count: int, tickers_of, channels: int = 1
) -> AsyncIterator[tuple[Server, Streams]]:
    """`pricestream feed` at 200 prices/s, an in-process pod in sentinel mode, and ``count``
    streams on it (``open_streams``), each past its first batch; once the streams are gone,
    invariant 1 holds."""
    with feed(deployment, rate=200):
        async with ready_server(sentinel_settings(deployment, pod_name=pod_name)) as server:
            target = f"127.0.0.1:{server.grpc_port}"
            async with open_streams(target, count, tickers_of, channels) as streams:
                await wait_until(
                    lambda: all(t is not None for t in streams.first_batch), 30, "streaming"
                )
                yield server, streams
            await wait_invariant(server, timeout=15)


def feed_tickers(count: int) -> list[str]:
    from pricestream.tools.feed import ticker_universe

    return ticker_universe(count)


def report(what: str, started: float, streams: Streams) -> list[float]:
    took = sorted(t - started for t in streams.fresh_at if t is not None)
    if took:
        print(
            f"{what}: {len(took)}/{len(streams.calls)} streams fresh; "
            f"first {took[0]:.2f}s, median {statistics.median(took):.2f}s, "
            f"last {took[-1]:.2f}s after the event"
        )
    return took


async def wait_all_fresh(streams: Streams, timeout: float) -> None:
    await wait_until(
        lambda: streams.fresh() == len(streams.calls) or bool(streams.ended),
        timeout,
        f"every stream gets a fresh price ({streams.fresh()}/{len(streams.calls)})",
    )
    assert streams.ended == [], streams.ended[:5]


class Readiness:
    """Samples /readyz every 0.1 s: when it was not ready, relative to ``origin``."""

    def __init__(self, http_port: int) -> None:
        self.url = f"http://127.0.0.1:{http_port}/readyz"
        self.origin = time.monotonic()
        self.unready: list[float] = []

    async def run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(
                        self.url, timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        ready = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ready = False
                if not ready:
                    self.unready.append(time.monotonic() - self.origin)
                await asyncio.sleep(0.1)

    def summary(self) -> str:
        if not self.unready:
            return "never seen unready"
        return f"unready from {self.unready[0]:.2f}s to {self.unready[-1]:.2f}s"


@pytest.mark.timeout(240)
async def test_master_killed_during_500_streams(deployment: SentinelDeployment, tmp_path) -> None:
    """kill -9 of the master under 500 live streams of a `pricestream serve` process: every
    stream gets prices published after the kill (so through the new master) within the bound,
    none ends, each ticker is subscribed once on the new master; after the clients leave
    invariant 1 holds; the old master, restarted, gets no connection from the pod."""
    old, new = deployment.master, deployment.replica
    env = fast_env(
        URL,
        **deployment.settings(),
        redis_outage_limit=30.0,
        flush_interval=0.25,
        lease_ttl=3.0,
        pod_name="pod-sentinel",
    )
    server = ServeProcess(env, tmp_path / "serve.log")
    tickers = feed_tickers(FEED_TICKERS)
    try:
        await wait_until(lambda: ready(server.http_port), 15, "serve ready via the sentinels")
        with feed(deployment, rate=150):

            def pair(i: int) -> list[str]:
                return [tickers[i % FEED_TICKERS], tickers[(i * 7 + 1) % FEED_TICKERS]]

            async with open_streams(server.target, 500, pair) as streams:
                await wait_until(
                    lambda: all(t is not None for t in streams.first_batch), 60, "500 streaming"
                )
                readiness = Readiness(server.http_port)
                sampler = asyncio.create_task(readiness.run())
                try:
                    old.kill()  # returns once the process is gone: later prices are on the new
                    streams.expect_fresh_after(time.time_ns())
                    try:
                        await wait_all_fresh(streams, 60)
                    except AssertionError as exc:
                        received = metric(
                            server.http_port, "pricestream_price_updates_received_total"
                        )
                        feed_log = (deployment.workdir / "feed.log").read_text()[-1500:]
                        raise AssertionError(f"{exc}; pod received {received:g} updates; "
                                             f"feed log: {feed_log}") from None  # fmt: skip
                    took = report("kill -9 of the master, 500 streams", readiness.origin, streams)
                    await wait_until(lambda: ready(server.http_port), 10, "ready again")
                finally:
                    await cancel_and_wait([sampler])
                print(f"kill -9: /readyz {readiness.summary()} after the kill")
                # No socket of the pod left to the dead master (a reconnect that forgot to
                # close the old one would leave it in CLOSE_WAIT).
                assert sockets_to(server.proc.pid, old.port) == []
                assert sockets_to(server.proc.pid, new.port) != []
                assert deployment.named_master() == new.address
                assert len(took) == 500
                assert readiness.unready, "readiness never dropped while no master answered"
                assert metric(server.http_port, "pricestream_streams_active") == 500
                for ticker in tickers:
                    assert new.numsub(f"price:{ticker}") == 1
                assert new.pubsub_clients() == 2
            # Clients gone (streams cancelled, sessions closed): invariant 1.
            await wait_invariant(server.http_port, timeout=20)
        # The old master comes back (the sentinels make it a replica of the new one): nothing
        # of the pod goes to it.
        old.start()
        await asyncio.sleep(3)  # three probe intervals of the pod
        assert old.pod_clients() == []
        assert new.pubsub_clients() == 2
    finally:
        server.stop()


def metric(http_port: int, name: str) -> float:
    return samples(read_metrics(http_port))[name]


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def test_planned_failover_moves_every_connection(deployment: SentinelDeployment) -> None:
    """SENTINEL FAILOVER: the pod follows to the new master (streams get fresh prices, each
    ticker is subscribed once there), keeps nothing on the demoted one, and the lease refresh
    writes back sessions and leases the new master lacks."""
    old, new = deployment.master, deployment.replica
    tickers = feed_tickers(FEED_TICKERS)
    pod = streaming_pod(deployment, "pod-planned", 20, lambda i: tickers[i : i + 3], channels=2)
    async with pod as (server, streams):
        engine = server.engine
        assert old.pubsub_clients() == 2
        started = time.monotonic()
        deployment.failover()
        deployment.wait_master(new.address, 20)
        agreed = time.monotonic() - started
        # Neither the pod nor the feed keeps a connection to the old master, so a price
        # published from now on can only have come through the new one.
        left = await wait_until(lambda: old.pod_clients() == [], 10, "old master left")
        print(f"planned: sentinels agreed after {agreed:.2f}s, old master left by "
              f"pod and feed {left:.2f}s later")  # fmt: skip
        streams.expect_fresh_after(time.time_ns())
        await wait_all_fresh(streams, 30)
        report("SENTINEL FAILOVER, 20 streams", started, streams)
        await wait_until(lambda: engine.ready, 10, "ready on the new master")
        assert new.pubsub_clients() == 2
        # The sentinels demote the old master later (a replica of the new one now);
        # nothing of ours went back to it.
        await wait_until(lambda: old.role() == "slave", 20, "old master demoted")
        assert old.pod_clients() == []
        for ticker in tickers[:22]:
            assert new.numsub(f"price:{ticker}") == 1

        # Writes the new master lacks (asynchronous replication loses the last ones):
        # the refresh puts sessions and leases back from what the streams know.
        with new.client() as client:
            keys = [f"pricestream:{kind}:{s}" for s in streams.sessions
                    for kind in ("session", "lease")]  # fmt: skip
            client.delete(*keys)  # (a lease may have lapsed already on a busy machine)
            await wait_until(
                lambda: client.exists(*keys) == 40, 5, "sessions and leases written back"
            )
        assert streams.ended == []


@pytest.fixture
def stubborn_deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    """The master refuses REPLICAOF: after a failover it keeps running as a master that the
    sentinels no longer name, as when they cannot reach it to demote it."""
    with running(SentinelDeployment(tmp_path, master_obeys_sentinels=False)) as deployment:
        yield deployment


async def test_pubsub_leaves_a_master_the_sentinels_no_longer_name(
    stubborn_deployment: SentinelDeployment, caplog: pytest.LogCaptureFixture
) -> None:
    """The trap: after the failover the old master still answers PING (the liveness probe
    alone stays green) and still holds our subscriptions, but prices go to the new master.
    The pod must notice the switch and move its Pub/Sub connections."""
    deployment = stubborn_deployment
    old, new = deployment.master, deployment.replica
    tickers = feed_tickers(FEED_TICKERS)
    pod = streaming_pod(deployment, "pod-trap", 10, lambda i: tickers[i : i + 2])
    async with pod as (server, streams):
        assert old.pubsub_clients() == 2
        started = time.monotonic()
        deployment.failover()
        deployment.wait_master(new.address, 20)
        # The pod and the feed leave the old master although it is up, still a master
        # and answers PING (which is all the liveness probe asks): only the switch of
        # master told them. Prices published from then on are on the new master only.
        left = await wait_until(lambda: old.pod_clients() == [], 10, "old master left")
        print(f"old master left {left:.2f}s after the sentinels agreed on the new one")
        assert old.role() == "master"
        with old.client() as client:
            assert client.ping()
        streams.expect_fresh_after(time.time_ns())
        await wait_all_fresh(streams, 20)
        report("failover away from a master that stays up", started, streams)
        await wait_until(lambda: new.pubsub_clients() == 2, 5, "2 Pub/Sub on new master")
        assert server.engine.ready
        # One switch seen (by the +switch-master event, or the poll if it came first),
        # and it was the master check that ended the Pub/Sub connections, not a probe.
        (switched,) = [r for r in caplog.records if r.__dict__.get("event") ==
                       "redis_master_switched"]  # fmt: skip
        print(f"trap: the pod learnt the switch from {switched.args[-1]}")
        lost = [r.getMessage() for r in caplog.records
                if r.__dict__.get("event") == "redis_connection_lost"]  # fmt: skip
        assert len(lost) == 2
        assert all("is no longer the master" in m for m in lost)


async def test_one_sentinel_down_at_start(deployment: SentinelDeployment) -> None:
    """The first sentinel of the list is down when the pod starts: it finds the master
    through the others, streams, and follows a failover that the other two carry out."""
    deployment.sentinels[0].stop()
    tickers = feed_tickers(FEED_TICKERS)
    pod = streaming_pod(deployment, "pod-one-down", 10, lambda i: tickers[i : i + 2])
    async with pod as (_, streams):
        streams.expect_fresh_after(time.time_ns())
        started = time.monotonic()
        deployment.master.kill()
        await wait_all_fresh(streams, 45)
        report("kill -9 with one sentinel down, 10 streams", started, streams)
        assert deployment.named_master() == deployment.replica.address


def test_url_gives_credentials_tls_and_db_to_the_master_and_the_sentinels() -> None:
    """Built, not connected: the URL's user, password, TLS options and db reach the master's
    connections; user, password and TLS (not the db) reach the sentinels; host and port of
    the URL are not used."""
    settings = load_settings(
        redis_mode="sentinel",
        redis_sentinels="127.0.0.1:26379,[::1]:26380",
        redis_sentinel_master="prices",
        redis_url="rediss://app:pw@unused:1/3?ssl_ca_certs=/etc/ca.pem",
    )
    pool = make_pool(settings)
    assert isinstance(pool, SentinelPool)
    assert pool.connection_class is with_hiredis_packing(SentinelManagedSSLConnection)
    master = pool.connection_kwargs
    assert (master["username"], master["password"], master["db"]) == ("app", "pw", 3)
    assert master["ssl_ca_certs"] == "/etc/ca.pem"
    assert "host" not in master and "port" not in master
    sentinels = pool.sentinel_manager.sentinels
    addresses = [(s.connection_pool.connection_kwargs["host"],
                  s.connection_pool.connection_kwargs["port"]) for s in sentinels]  # fmt: skip
    assert addresses == [("127.0.0.1", 26379), ("::1", 26380)]
    for sentinel in sentinels:
        assert sentinel.connection_pool.connection_class is SSLConnection
        options = sentinel.connection_pool.connection_kwargs
        assert (options["username"], options["password"]) == ("app", "pw")
        assert options["ssl_ca_certs"] == "/etc/ca.pem"
        assert options.get("db", 0) == 0
        # Asked once: a sentinel that is down costs no retries (discover moves on at once).
        assert sentinel.get_retry().get_retries() == 0


@pytest.fixture
def password_deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    with running(SentinelDeployment(tmp_path, password="s3cret")) as deployment:
        yield deployment


async def test_password_of_the_url_opens_master_and_sentinels(
    password_deployment: SentinelDeployment,
) -> None:
    """Master, replica and sentinels all ask for a password: the URL's is used with each, and
    a failover is followed with it."""
    deployment = password_deployment
    settings = fast_settings(
        "redis://:s3cret@unused/0", redis_outage_limit=30.0, **deployment.settings()
    )
    tickers = feed_tickers(4)
    async with ready_server(settings) as server:
        market = RedisPricePublisher(server.engine.backends.redis)
        walk = RandomWalk(tickers, seed=2)
        target = f"127.0.0.1:{server.grpc_port}"
        async with open_streams(target, 2, lambda i: tickers, 1) as streams:
            await market.publish_prices([(t, walk.step(t)) for t in tickers])
            await wait_until(lambda: all(streams.first_batch), 30, "streaming")
            deployment.failover()
            deployment.wait_master(deployment.replica.address, 20)
            await wait_until(lambda: deployment.master.pod_clients() == [], 10, "old master left")
            streams.expect_fresh_after(time.time_ns())

            async def publish_until_fresh() -> None:
                while streams.fresh() < len(streams.calls):
                    with contextlib.suppress(RedisError):
                        await market.publish_prices([(t, walk.step(t)) for t in tickers])
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(publish_until_fresh(), 20)
            assert streams.ended == []
        await wait_invariant(server, timeout=15)


async def test_all_sentinels_down_leaves_working_connections_alone(
    deployment: SentinelDeployment,
) -> None:
    """With every sentinel gone the master still works: the pod keeps its connections, stays
    ready and streams; it learns nothing new until a sentinel answers again."""
    settings = sentinel_settings(deployment, pod_name="pod-no-sentinels")
    tickers = feed_tickers(3)
    async with ready_server(settings) as server:
        market = RedisPricePublisher(server.engine.backends.redis)
        walk = RandomWalk(tickers, seed=3)
        target = f"127.0.0.1:{server.grpc_port}"
        async with open_streams(target, 3, lambda i: tickers, 1) as streams:
            await market.publish_prices([(t, walk.step(t)) for t in tickers])
            await wait_until(lambda: all(streams.first_batch), 30, "streaming")
            opened = server.engine.metrics.connections_opened._value.get()
            for sentinel in deployment.sentinels:
                sentinel.stop()
            await asyncio.sleep(3 * settings.probe_interval + settings.probe_timeout)
            assert server.engine.ready
            assert server.engine.metrics.connections_opened._value.get() == opened
            assert deployment.master.pubsub_clients() == 2
            streams.expect_fresh_after(time.time_ns())
            await market.publish_prices([(t, walk.step(t)) for t in tickers])
            await wait_all_fresh(streams, 10)
        await wait_invariant(server, timeout=15)
