"""A first data point until `pricestream loadtest` exists: N streams against one server.

Starts its own redis-server (free loopback port, temporary folder), `pricestream feed
--tickers 50 --rate 2000` and `pricestream serve`, opens N streams of 3 tickers each over 8
channels from this one process, and prints updates/s received, the server's CPU (cores) and
RSS over 5 s. Traffic stays on loopback and stops by itself.

    .venv/bin/python scripts/probe_streams.py 1000 0.1     # streams, flush interval (s)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import RedisProcess, fast_env
from invariants import samples, scrape
from pricestream.tools.feed import ticker_universe
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from processes import ServeProcess, pricestream_command


async def measure(target: str, http_port: int, streams: int, flush: str) -> str:
    tickers = ticker_universe(50)
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    stubs = [PriceStreamServiceStub(channel) for channel in channels]
    received = 0

    async def one(index: int) -> None:
        nonlocal received
        stub = stubs[index % len(stubs)]
        chosen = [tickers[(index * 7 + k) % len(tickers)] for k in range(3)]
        session = await stub.CreateSession(pb.CreateSessionRequest(tickers=chosen))
        call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=session.session_id))
        while (batch := await call.read()) is not grpc.aio.EOF:
            count = len(batch.updates)  # read first: `+=` would read `received` before
            received += count

    readers = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(3)  # everyone connected and streaming
    before, started = received, time.monotonic()
    cpu_before = samples(await asyncio.to_thread(scrape, http_port))["process_cpu_seconds_total"]
    await asyncio.sleep(5)
    after = samples(await asyncio.to_thread(scrape, http_port))
    elapsed = time.monotonic() - started
    for reader in readers:
        reader.cancel()
    for channel in channels:
        await channel.close()
    return (
        f"{streams} streams, flush {flush}s: {(received - before) / elapsed:,.0f} updates/s "
        f"received, server CPU {(after['process_cpu_seconds_total'] - cpu_before) / elapsed:.2f}"
        f" cores, RSS {after['process_resident_memory_bytes'] / 2**20:.0f} MB, slow-consumer "
        f"cut-offs {after.get('pricestream_slow_consumer_disconnects_total', 0):.0f}"
    )


def main(streams: int, flush: str) -> None:
    with TemporaryDirectory() as workdir:
        redis = RedisProcess(Path(workdir))
        redis.start()
        feed = subprocess.Popen(
            pricestream_command("feed", "--tickers", "50", "--rate", "2000"),
            env=fast_env(redis.url),
            stderr=subprocess.DEVNULL,
        )
        env = fast_env(redis.url, flush_interval=flush, stall_timeout=10.0, session_ttl=60.0)
        server = ServeProcess(env, Path(workdir) / "serve.log")
        try:
            print(asyncio.run(measure(server.target, server.http_port, streams, flush)))
        finally:
            server.stop()
            feed.kill()
            feed.wait()
            redis.kill()


if __name__ == "__main__":
    stream_count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    flush_interval = sys.argv[2] if len(sys.argv) > 2 else "0.1"
    main(stream_count, flush_interval)
