"""Slow and stalled readers against a real `pricestream serve` process: a stalled client keeps the
server's memory flat for 40 s at a high tick rate, is cut off after the stall timeout, and
does not slow the others; a server whose Pub/Sub reading stalls is disconnected by Redis's
output-buffer limit and repairs itself."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import grpc
import pytest
from pricestream.tools.feed import ticker_universe
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.invariants import samples, scrape, wait_invariant
from support.processes import ServeProcess, start_feed
from support.redis_server import RedisProcess
from support.settings import fast_env
from support.streams import next_batch, read_to_end

UNIVERSE = ticker_universe(50)
TINY_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def metric(server: ServeProcess, name: str) -> float:
    return samples(scrape(server.http_port)).get(name, 0.0)


async def healthy_reader(
    stub: PriceStreamServiceStub, latencies: list[tuple[float, float]], stop: asyncio.Event
) -> None:
    """Reads its stream and records (receipt time, delivery latency) of every update."""
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=UNIVERSE[:10]))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
    try:
        while not stop.is_set():
            batch = await next_batch(call)
            now = time.time()
            for update in batch.updates:
                latencies.append((now, now - update.published_at_unix_nanos / 1e9))
    finally:
        call.cancel()


def pubsub_client_ids(admin) -> set[str]:
    return {c["id"] for c in admin.client_list() if int(c.get("sub", 0)) > 0}


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.mark.timeout(180)
async def test_stalled_client_keeps_memory_flat_is_cut_off_and_slows_nobody(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    stall_timeout = 30.0
    feed = start_feed(own_redis.url, tickers=len(UNIVERSE), rate=5000)  # 100 ticks/s per ticker
    server = await asyncio.to_thread(
        ServeProcess,
        fast_env(own_redis.url, stall_timeout=stall_timeout, flush_interval=0.05),
        tmp_path / "serve.log",
    )
    stop = asyncio.Event()
    received: list[list[tuple[float, float]]] = [[] for _ in range(20)]  # per healthy reader
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = PriceStreamServiceStub(channel)
            readers = [asyncio.create_task(healthy_reader(stub, mine, stop)) for mine in received]
            await asyncio.sleep(5)  # the others' latency without a stalled client
            stall_started = time.time()
            async with grpc.aio.insecure_channel(server.target, options=TINY_WINDOW) as slow:
                slow_stub = PriceStreamServiceStub(slow)
                session = await slow_stub.CreateSession(
                    pb.CreateSessionRequest(tickers=UNIVERSE)  # every ticker: big batches
                )
                stalled = slow_stub.StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session.session_id)
                )
                await next_batch(stalled)  # then never read again
                rss: list[float] = []
                while time.time() - stall_started < stall_timeout + 10:
                    rss.append(
                        await asyncio.to_thread(metric, server, "process_resident_memory_bytes")
                    )
                    await asyncio.sleep(5)
                cut_off = await asyncio.to_thread(
                    metric, server, "pricestream_slow_consumer_disconnects_total"
                )
                assert cut_off == 1, "the stalled client was not cut off by the stall timeout"
                assert await read_to_end(stalled, timeout=10) is grpc.StatusCode.RESOURCE_EXHAUSTED
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
        # Slowing nobody, without comparing latencies (they depend on how busy the machine
        # is): every healthy reader got updates in every second of the stall, from 5 s in
        # (the stalled stream's window is full) until the cut-off at 30 s.
        stall_seconds = range(5, int(stall_timeout))
        for index, updates in enumerate(received):
            seconds = {int(at - stall_started) for at, _ in updates}
            silent = [s for s in stall_seconds if s not in seconds]
            assert not silent, f"healthy reader {index} got nothing in second(s) {silent}"
        latencies = [update for updates in received for update in updates]
        before = [lat for at, lat in latencies if at < stall_started]
        during = [
            lat for at, lat in latencies if stall_started + 5 < at < stall_started + stall_timeout
        ]
        growth_mb = (max(rss) - rss[1]) / 2**20
        print(
            f"\nRSS MB every 5 s while stalled: {[round(r / 2**20, 1) for r in rss]} "
            f"(growth after warm-up {growth_mb:.1f} MB); others' p99 before "
            f"{p99(before) * 1000:.0f} ms, during {p99(during) * 1000:.0f} ms "
            f"({len(before)} / {len(during)} updates; shown, not asserted)"
        )
        assert growth_mb < 8, rss
        await wait_invariant(server.http_port, timeout=10)
    finally:
        server.stop()
        feed.kill()
        feed.wait()


@pytest.mark.timeout(120)
async def test_pubsub_output_buffer_limit_trip_is_repaired(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """SIGSTOP the server while the feed floods its channels: Redis drops the subscriber over
    `client-output-buffer-limit pubsub`; after SIGCONT the pod notices, reconnects and streams."""
    admin = own_redis.client()
    admin.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
    server = await asyncio.to_thread(
        ServeProcess, fast_env(own_redis.url, redis_outage_limit=30.0), tmp_path / "serve.log"
    )
    feed = start_feed(own_redis.url, tickers=5, rate=20000)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=UNIVERSE[:5]))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            await next_batch(call)
            reconnects_before = await asyncio.to_thread(
                metric, server, "pricestream_redis_reconnects_total"
            )
            subscribers_before = pubsub_client_ids(admin)
            os.kill(server.proc.pid, signal.SIGSTOP)
            # 16 MB for a subscriber that reads nothing: more than the kernel's socket
            # buffers absorb, so Redis's own output buffer passes the limit
            pipe = admin.pipeline(transaction=False)
            for _ in range(4000):
                pipe.publish(f"price:{UNIVERSE[0]}", b"x" * 4096)
            pipe.execute()
            await asyncio.sleep(1.5)
            os.kill(server.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while (
                await asyncio.to_thread(metric, server, "pricestream_redis_reconnects_total")
                <= reconnects_before
            ):
                assert time.monotonic() < deadline, (
                    "the dropped Pub/Sub connection was not replaced"
                )
                await asyncio.sleep(0.2)
            while await asyncio.to_thread(metric, server, "pricestream_ready") != 1:
                assert time.monotonic() < deadline, "not ready again"
                await asyncio.sleep(0.2)
            # Redis dropped at least one of the pod's Pub/Sub connections, the pod replaced it
            assert subscribers_before - pubsub_client_ids(admin), "Redis dropped no subscriber"
            assert len(pubsub_client_ids(admin)) == len(subscribers_before)
            # the stream lived through it and receives fresh prices again
            fresh_after = time.time()
            for _ in range(50):
                batch = await next_batch(call, timeout=5)
                if any(u.published_at_unix_nanos / 1e9 > fresh_after for u in batch.updates):
                    break
            else:
                raise AssertionError("no fresh price after the repair")
            call.cancel()
        feed.kill()
        await wait_invariant(server.http_port, timeout=10)
    finally:
        server.stop()
        if feed.poll() is None:
            feed.kill()
        feed.wait()
        admin.close()
