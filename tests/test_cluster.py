"""Cluster mode against a real local Redis Cluster (3 masters + 3 replicas, started here):
sharded Pub/Sub over every shard, a reshard of slots that carry live tickers, a planned
failover, a killed master. After each: every stream gets fresh prices, each channel is
subscribed once per pod on its owner (PUBSUB SHARDNUMSUB), nothing is left on a node that
lost its slots, and invariant 1 holds once clients are gone.

Recovery times are printed (``-s`` shows them); asserts use loose bounds, the machine is
shared."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from pricestream.api.server import Server
from pricestream.codec import cluster_last_price_key, cluster_price_channel
from pricestream.observability.metrics import Metrics
from pricestream.redis.cluster_client import NodeOptions, make_cluster_client
from pricestream.redis.shard_connection import ShardConnection
from pricestream.redis.sharded_broker import ClusterPricePublisher
from pricestream.tasks import cancel_and_wait
from pricestream.tools.feed import RandomWalk
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisError
from support.invariants import samples, scrape, wait_invariant
from support.processes import ServeProcess, env_without_pricestream, pricestream_command
from support.redis_cluster import LocalCluster, sharded_subscribers, shardnumsub, wait_promoted
from support.servers import ready_server
from support.settings import fast_env, fast_settings
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path)
    try:
        local.start()
        yield local
    finally:
        local.stop()


def cluster_settings(cluster: LocalCluster, **overrides: object):
    # A shard failing over makes the pod unready for a few seconds; streams stay open.
    return fast_settings(
        cluster.url, redis_mode="cluster", **{"redis_outage_limit": 30.0, **overrides}
    )


def slot_of(ticker: str) -> int:
    return key_slot(cluster_price_channel(ticker).encode())


def tickers_on_every_shard(cluster: LocalCluster, per_shard: int) -> list[str]:
    """``per_shard`` tickers owned by each master."""
    owners = cluster.slots()
    by_master: dict[int, list[str]] = {port: [] for port in cluster.master_ports()}
    index = 0
    while any(len(found) < per_shard for found in by_master.values()):
        index += 1
        ticker = f"T{index:04d}"
        found = by_master[owners[slot_of(ticker)]]
        if len(found) < per_shard:
            found.append(ticker)
    return [t for found in by_master.values() for t in found]


class Feed:
    """Publishes every ticker every 50 ms the way `pricestream feed` does in cluster mode;
    keeps going through failovers (a failed batch is retried with the next one)."""

    def __init__(self, cluster: LocalCluster, tickers: list[str]) -> None:
        self.client = make_cluster_client(cluster_settings(cluster))
        self.publisher = ClusterPricePublisher(self.client)
        self.walk = RandomWalk(tickers, seed=7)
        self.tickers = tickers
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        await self.publisher.publish_prices([(t, self.walk.step(t)) for t in self.tickers])

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except (RedisError, OSError, TimeoutError):
                self.failures += 1
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Feed]:
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            # Repeated until it ends: redis-py's asyncio.wait_for can swallow a cancel on 3.11.
            await cancel_and_wait([self._task])
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # what it raised before the cancel, if anything
            await self.client.aclose()


class Stream:
    """One session's stream, read in the background: the newest publish time per ticker."""

    def __init__(self, stub: PriceStreamServiceStub, session: pb.Session) -> None:
        self.session_id = session.session_id
        self.tickers = list(session.tickers)
        self.latest: dict[str, int] = {}
        self.received: dict[str, float] = {}  # ticker -> when its last update arrived
        self.gaps: dict[str, float] = {}  # ticker -> longest wait between two of its updates
        self.call = stub.StreamPriceUpdates(
            pb.StreamPriceUpdatesRequest(session_id=session.session_id)
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (batch := await self.call.read()) is not grpc.aio.EOF:
            now = time.monotonic()
            for update in batch.updates:
                ticker = update.ticker
                self.latest[ticker] = max(
                    self.latest.get(ticker, 0), update.published_at_unix_nanos
                )
                if ticker in self.received:
                    gap = now - self.received[ticker]
                    self.gaps[ticker] = max(self.gaps.get(ticker, 0.0), gap)
                self.received[ticker] = now

    def fresh_since(self, after_ns: int) -> bool:
        return all(self.latest.get(t, 0) > after_ns for t in self.tickers)

    async def aclose(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


async def open_streams(
    server: Server, tickers: list[str], count: int, per_session: int
) -> tuple[grpc.aio.Channel, list[Stream]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = PriceStreamServiceStub(channel)
    streams = []
    for i in range(count):
        chosen = [tickers[(i * per_session + k) % len(tickers)] for k in range(per_session)]
        session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
        streams.append(Stream(stub, session))
    return channel, streams


async def all_fresh(streams: list[Stream], after_ns: int, timeout: float, what: str) -> float:
    """Seconds until every stream saw a price published after ``after_ns`` for each ticker."""
    started = time.monotonic()
    while not all(s.fresh_since(after_ns) for s in streams):
        if time.monotonic() - started > timeout:
            stale = sum(1 for s in streams if not s.fresh_since(after_ns))
            raise AssertionError(
                f"{what}: {stale} of {len(streams)} streams stale after {timeout}s"
            )
        for s in streams:
            if s.task.done():
                raise AssertionError(f"{what}: a stream ended: {s.task.exception()!r}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def assert_subscribed_once(cluster: LocalCluster, tickers: list[str], pods: int = 1) -> None:
    """Each ticker's channel has exactly one subscriber per pod on the master owning its slot."""
    owners = cluster.slots()
    wrong: dict[str, int | str] = {}
    for ticker in tickers:
        owner = owners.get(slot_of(ticker))
        if owner is None:  # mid-failover, the node asked may list no master for the slot yet
            wrong[ticker] = "no master"
            continue
        seen = shardnumsub(cluster.node(owner), cluster_price_channel(ticker))
        if seen != pods:
            wrong[ticker] = seen
    assert not wrong, f"SHARDNUMSUB != {pods} on the owner: {wrong}"


def gauges(server: Server) -> dict[str, float]:
    return samples(server.engine.metrics.exposition().decode())


async def close_all(channel: grpc.aio.Channel, streams: list[Stream]) -> None:
    for stream in streams:
        await stream.aclose()
    await channel.close()


async def test_streams_over_every_shard_on_two_pods(cluster: LocalCluster) -> None:
    tickers = tickers_on_every_shard(cluster, per_shard=5)
    feed = Feed(cluster, tickers)
    await feed.tick()
    async with (
        feed.running(),
        ready_server(cluster_settings(cluster, pod_name="pod-a")) as pod_a,
        ready_server(cluster_settings(cluster, pod_name="pod-b")) as pod_b,
    ):
        channel_a, on_a = await open_streams(pod_a, tickers, count=12, per_session=5)
        channel_b, on_b = await open_streams(pod_b, tickers, count=12, per_session=5)
        took = await all_fresh(on_a + on_b, time.time_ns(), 10, "first prices")
        print(f"24 streams over {len(tickers)} tickers on 3 shards fresh after {took:.2f}s")
        await wait_until(
            lambda: all(
                gauges(p)["pricestream_redis_channels_unconfirmed"] == 0 for p in (pod_a, pod_b)
            ),
            5,
            "every channel confirmed",
        )
        assert_subscribed_once(cluster, tickers, pods=2)
        for pod in (pod_a, pod_b):
            values = gauges(pod)
            assert values["pricestream_redis_shards_wanted"] == 3
            assert values["pricestream_redis_shards_live"] == 3
            assert values["pricestream_redis_pubsub_connections_active"] == 3
        for port in cluster.master_ports():  # one Pub/Sub connection per pod on every master
            assert sharded_subscribers(cluster.node(port)) == 2

        # CloseSession on pod B ends a stream of pod A: the notice crosses pods by SPUBLISH.
        victim = on_a[0]
        stub_b = PriceStreamServiceStub(channel_b)
        await stub_b.CloseSession(pb.CloseSessionRequest(session_id=victim.session_id))
        await asyncio.wait_for(victim.task, 5)  # read to its end
        assert await victim.call.code() == grpc.StatusCode.OK

        await close_all(channel_a, on_a)
        await close_all(channel_b, on_b)
        for pod in (pod_a, pod_b):
            await wait_invariant(pod, timeout=10)
            # Only the session-closed channel is left: one shard, one connection.
            assert gauges(pod)["pricestream_redis_shards_wanted"] == 1
            await wait_until(
                lambda p=pod: gauges(p)["pricestream_redis_pubsub_connections_active"] == 1,
                5,
                "connections of idle shards closed",
            )


def tickers_in_slots(slots: list[int], count: int, prefix: str) -> list[str]:
    """``count`` ticker names whose channel hashes into one of ``slots``."""
    wanted, found, index = set(slots), [], 0
    while len(found) < count:
        index += 1
        ticker = f"{prefix}{index:04d}"
        if slot_of(ticker) in wanted:
            found.append(ticker)
    return found


def longest_gap(streams: list[Stream], tickers: list[str]) -> float:
    return max((s.gaps.get(t, 0.0) for s in streams for t in tickers if t in s.tickers), default=0)


@contextlib.asynccontextmanager
async def live_streams(
    cluster: LocalCluster, tickers: list[str], count: int = 40
) -> AsyncIterator[tuple[Server, list[Stream]]]:
    """One pod streaming ``count`` sessions of 5 tickers each while a feed publishes every
    ticker every 50 ms; every stream fresh before the test goes on; every stream closed and
    invariant 1 checked after it."""
    feed = Feed(cluster, tickers)
    await feed.tick()
    async with feed.running(), ready_server(cluster_settings(cluster, pod_name="pod-a")) as pod:
        channel, streams = await open_streams(pod, tickers, count=count, per_session=5)
        await all_fresh(streams, time.time_ns(), 10, "first prices")
        try:
            yield pod, streams
        finally:
            await close_all(channel, streams)
        await wait_invariant(pod, timeout=10)


async def settled(pod: Server, cluster: LocalCluster, tickers: list[str], timeout: float) -> float:
    """Seconds until the pod is ready, every wanted shard live, every channel confirmed, and
    each channel subscribed exactly once on its owner."""
    started = time.monotonic()

    def done() -> bool:
        values = gauges(pod)
        if not pod.engine.ready or values["pricestream_redis_channels_unconfirmed"] != 0:
            return False
        if values["pricestream_redis_shards_live"] != values["pricestream_redis_shards_wanted"]:
            return False
        try:
            assert_subscribed_once(cluster, tickers)
        except AssertionError:
            return False
        return True

    await wait_until(done, timeout, "pod settled on the new topology")
    return time.monotonic() - started


async def test_reshard_slots_that_carry_live_tickers(cluster: LocalCluster) -> None:
    source, target = (cluster.node(port) for port in cluster.master_ports()[:2])
    moved_slots = cluster.slot_range(source)[:100]  # redis-cli moves a master's lowest first
    moving = tickers_in_slots(moved_slots, 5, "M")
    tickers = tickers_on_every_shard(cluster, per_shard=5) + moving
    async with live_streams(cluster, tickers) as (pod, streams):
        before = gauges(pod)["pricestream_redis_slot_moves_total"]
        started = time.monotonic()
        await asyncio.to_thread(cluster.reshard, source, target, len(moved_slots))
        resharded = time.monotonic()
        owners = cluster.slots()
        assert all(owners[slot_of(t)] == target.port for t in moving), "slots did not move"
        fresh = await all_fresh(streams, time.time_ns(), 15, "after the reshard")
        took = await settled(pod, cluster, tickers, 15)
        gap = longest_gap(streams, moving)
        print(
            f"reshard of {len(moved_slots)} slots (redis-cli) took {resharded - started:.2f}s; "
            f"every stream fresh {fresh:.2f}s after it; settled after {took:.2f}s; longest "
            f"gap in a moved ticker's prices {gap:.2f}s"
        )
        assert gauges(pod)["pricestream_redis_slot_moves_total"] - before >= len(moving)
        for ticker in moving:  # nothing left on the node that gave the slots away
            assert shardnumsub(source, cluster_price_channel(ticker)) == 0
        assert gap < 10


async def test_planned_failover_of_a_master(cluster: LocalCluster) -> None:
    tickers = tickers_on_every_shard(cluster, per_shard=5)
    old = cluster.owner(cluster_price_channel(tickers[0]))
    replica = cluster.replica_of(old)
    async with live_streams(cluster, tickers) as (pod, streams):
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        started, started_ns = time.monotonic(), time.time_ns()
        await asyncio.to_thread(wait_promoted, cluster, replica)
        promoted = time.monotonic() - started
        assert cluster.owner(cluster_price_channel(tickers[0])).port == replica.port
        fresh = await all_fresh(streams, started_ns, 15, "after CLUSTER FAILOVER")
        took = await settled(pod, cluster, tickers, 15)
        print(
            f"CLUSTER FAILOVER: replica promoted after {promoted:.2f}s; every stream fresh "
            f"{fresh:.2f}s after the command; settled after {took:.2f}s; longest gap "
            f"{longest_gap(streams, tickers):.2f}s"
        )
        assert sharded_subscribers(old) == 0  # no subscription left on the demoted master
        assert gauges(pod)["pricestream_redis_pubsub_connections_active"] == 3


async def test_killed_master_fails_over(cluster: LocalCluster) -> None:
    tickers = tickers_on_every_shard(cluster, per_shard=5)
    victim = cluster.owner(cluster_price_channel(tickers[0]))
    replica = cluster.replica_of(victim)
    async with live_streams(cluster, tickers) as (pod, streams):
        victim.kill()  # SIGKILL
        started, started_ns = time.monotonic(), time.time_ns()
        await wait_until(lambda: not pod.engine.ready, 10, "readiness drops with a shard")
        unready = time.monotonic() - started
        # Before the replica takes over: sessions whose keys live on the other shards can still
        # be created, even when created together with ones on the dead shard (one batch).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{pod.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            request = pb.CreateSessionRequest(tickers=tickers[:2])
            creates = [stub.CreateSession(request, timeout=2) for _ in range(12)]
            outcomes = await asyncio.gather(*creates, return_exceptions=True)
        created = sum(1 for o in outcomes if not isinstance(o, BaseException))
        created_after = time.monotonic() - started
        assert created >= 1, f"no session created while one shard was down: {outcomes[0]!r}"
        # Commands of one batch (one event-loop turn) over every shard: those of the live
        # shards do not fail with the dead one's connection error (redis-py's own retry closed
        # every connection of the client). They may get CLUSTERDOWN: with the default
        # cluster-require-full-coverage, Redis refuses commands once a master is marked failed.
        dead = {t for t in tickers if cluster.slots()[slot_of(t)] == victim.port}
        batcher = pod.engine.backends.batcher
        assert batcher is not None
        reads = [batcher.get(cluster_last_price_key(t)) for t in tickers]
        results = await asyncio.gather(*reads, return_exceptions=True)
        for ticker, result in zip(tickers, results, strict=True):
            if ticker not in dead:
                assert isinstance(result, bytes | ClusterDownError), (ticker, result)
        fresh = await all_fresh(streams, started_ns, 30, "after kill -9 of a master")
        took = await settled(pod, cluster, tickers, 20)
        print(
            f"kill -9 of a master (cluster-node-timeout {cluster.node_timeout_ms} ms): pod "
            f"unready after {unready:.2f}s; {created} of 12 sessions created by "
            f"{created_after:.2f}s; every stream fresh {fresh:.2f}s after the kill; "
            f"settled after {took:.2f}s; longest gap {longest_gap(streams, tickers):.2f}s, "
            f"{longest_gap(streams, [t for t in tickers if t not in dead]):.2f}s on the other "
            "shards"
        )
        assert cluster.owner(cluster_price_channel(tickers[0])).port == replica.port
        values = gauges(pod)
        assert values["pricestream_redis_pubsub_connections_active"] == 3
        assert values["pricestream_redis_shards_live"] == 3


async def test_new_master_gets_slots_with_live_tickers(cluster: LocalCluster) -> None:
    """A node added to the cluster and given slots by a reshard: the pod opens a connection to
    it as soon as it owns a wanted channel."""
    tickers = tickers_on_every_shard(cluster, per_shard=4)
    source = cluster.node(cluster.master_ports()[0])
    moved_slots = cluster.slot_range(source)[:50]
    moving = tickers_in_slots(moved_slots, 4, "N")
    async with live_streams(cluster, tickers + moving) as (pod, streams):
        added = await asyncio.to_thread(cluster.add_master)
        assert gauges(pod)["pricestream_redis_shards_wanted"] == 3
        started = time.monotonic()
        await asyncio.to_thread(cluster.reshard, source, added, len(moved_slots))
        resharded = time.monotonic()
        assert all(cluster.slots()[slot_of(t)] == added.port for t in moving)
        fresh = await all_fresh(streams, time.time_ns(), 15, "after the reshard to a new node")
        took = await settled(pod, cluster, tickers + moving, 15)
        print(
            f"reshard of {len(moved_slots)} slots to a new master took "
            f"{resharded - started:.2f}s; every stream fresh {fresh:.2f}s after it; settled "
            f"after {took:.2f}s; longest gap {longest_gap(streams, moving):.2f}s"
        )
        values = gauges(pod)
        assert values["pricestream_redis_shards_wanted"] == 4
        assert values["pricestream_redis_pubsub_connections_active"] == 4
        assert sharded_subscribers(added) == 1


def start_cluster_feed(url: str, tickers: int, rate: float) -> subprocess.Popen[bytes]:
    """`pricestream feed` in cluster mode, publishing until stopped."""
    env = {
        **env_without_pricestream(),
        "PRICESTREAM_REDIS_URL": url,
        "PRICESTREAM_REDIS_MODE": "cluster",
    }
    return subprocess.Popen(
        pricestream_command("feed", "--tickers", str(tickers), "--rate", str(rate)),
        env=env,
        stderr=subprocess.DEVNULL,
    )


async def test_serve_and_feed_processes_in_cluster_mode(cluster: LocalCluster, tmp_path) -> None:
    """`pricestream serve` and `pricestream feed` as processes with PRICESTREAM_REDIS_MODE=
    cluster: the feed SPUBLISHes, the server streams it; the feed's keys hold the last price."""
    env = fast_env(cluster.url, redis_mode="cluster", pod_name="pod-p")
    serve = ServeProcess(env, tmp_path / "serve.log")
    feed = start_cluster_feed(cluster.url, tickers=30, rate=300)
    try:
        tickers = ["AAPL", "MSFT", "T0025", "T0030"]
        async with grpc.aio.insecure_channel(serve.target) as channel:
            stub = PriceStreamServiceStub(channel)
            deadline = time.monotonic() + 20
            while True:  # until the server is ready
                try:
                    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            stream = Stream(stub, session)
            await all_fresh([stream], time.time_ns(), 10, "prices from the feed process")
            await stream.aclose()
        for ticker in tickers:
            with cluster.owner(cluster_price_channel(ticker)).client() as client:
                assert client.get(f"price:last:{{{ticker}}}") is not None
        values = samples(scrape(serve.http_port))
        assert values["pricestream_redis_shards_wanted"] >= 2
        assert serve.terminate() == 0
    finally:
        feed.kill()
        feed.wait()
        serve.stop()


async def test_cluster_unreachable_at_start_then_appears(tmp_path) -> None:
    cluster = LocalCluster(tmp_path)  # its ports are chosen, nothing listens yet
    try:
        async with Server(cluster_settings(cluster)) as server:
            await asyncio.sleep(1.0)
            assert not server.engine.ready
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]), timeout=5)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.to_thread(cluster.start)
                await wait_until(lambda: server.engine.ready, 20, "ready once the cluster is up")
                session = await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                assert session.session_id
    finally:
        cluster.stop()


async def test_ssubscribe_refused_by_a_master_that_does_not_own_the_slot(
    cluster: LocalCluster,
) -> None:
    """MOVED: a shard connection to the wrong master stays live, leaves the channel
    unconfirmed and asks for the slot map to be read again; its socket is closed and counted."""
    settings = cluster_settings(cluster)
    channel = cluster_price_channel("AAPL")
    owner = cluster.owner(channel)
    other = next(port for port in cluster.master_ports() if port != owner.port)
    metrics = Metrics()
    stale = asyncio.Event()
    conn = ShardConnection(
        ("127.0.0.1", other),
        NodeOptions.from_settings(settings),
        settings,
        metrics,
        lambda channel, payload: None,
        stale.set,
    )
    task = asyncio.create_task(conn.run())
    try:
        conn.want(channel.encode())
        await asyncio.wait_for(stale.wait(), 5)
        assert conn.live
        assert channel.encode() not in conn.confirmed
        assert shardnumsub(owner, channel) == 0
        assert shardnumsub(cluster.node(other), channel) == 0
    finally:
        await cancel_and_wait([task])
    assert metrics.connections_opened._value.get() == 1
    assert metrics.connections_closed._value.get() == 1


async def test_an_idle_shard_whose_cancel_is_lost_still_closes(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last stream wanting a shard's tickers ends, and the cancel that should end the
    shard's Pub/Sub task is lost (as Python 3.11's ``asyncio.wait_for`` inside redis-py loses
    one that lands as its operation completes): the task goes on and connects again. The
    broker cancels it again until it has ended, so the idle connection is closed within a
    second instead of staying open (and a new one being opened beside it for the shard's next
    stream) until the pod stops."""
    lost: list[str] = []
    real_run = ShardConnection.run

    async def run_losing_one_cancel(self: ShardConnection) -> None:
        try:
            await real_run(self)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(self.name)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await real_run(self)  # as if the cancel had never come

    monkeypatch.setattr(ShardConnection, "run", run_losing_one_cancel)
    tickers = tickers_on_every_shard(cluster, per_shard=1)
    feed = Feed(cluster, tickers)
    await feed.tick()
    async with feed.running(), ready_server(cluster_settings(cluster)) as server:
        channel, streams = await open_streams(server, tickers, count=1, per_session=3)
        await all_fresh(streams, time.time_ns(), 10, "first prices")
        assert gauges(server)["pricestream_redis_pubsub_connections_active"] == 3
        await close_all(channel, streams)
        await wait_invariant(server, timeout=10)
        await wait_until(lambda: len(lost) == 1, 5, "a shard's cancel was lost")
        # Only the session-closed channel's shard is wanted now: one connection.
        assert gauges(server)["pricestream_redis_shards_wanted"] == 1
        await wait_until(
            lambda: gauges(server)["pricestream_redis_pubsub_connections_active"] == 1,
            5,
            "the idle shards' connections closed, the one whose cancel was lost too",
        )
