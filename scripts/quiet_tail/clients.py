"""N streams of K tickers each (out of a universe of U) over C channels; latency of every update
after the first batch = receive time - published_at; p50/p99/max per 10 s window."""

import asyncio
import os
import random
import sys
import time
import urllib.request

import grpc
import uvloop
from pricestream.tools.feed import ticker_universe
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub

lat: list[float] = []

errors = {}


async def stream(stub, tickers, go):
    try:
        await _stream(stub, tickers, go)
    except grpc.aio.AioRpcError as e:
        errors[e.code().name] = errors.get(e.code().name, 0) + 1


async def _stream(stub, tickers, go):
    s = await stub.CreateSession(pb.CreateSessionRequest(tickers=tickers))
    call = stub.StreamPriceUpdates(pb.StreamPriceUpdatesRequest(session_id=s.session_id))
    await call.read()  # first batch: stored prices
    while True:
        batch = await call.read()
        if batch is grpc.aio.EOF:
            return
        now = time.time_ns()
        if go[0]:
            for u in batch.updates:
                lat.append((now - u.published_at_unix_nanos) / 1e6)


def server_hist():
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{os.environ['HTTP']}/metrics", timeout=5)
        .read()
        .decode()
    )
    out = {}
    for line in text.splitlines():
        if line.startswith("pricestream_delivery_latency_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def server_quantiles(a, b):
    d = {k: b[k] - a.get(k, 0) for k in b}
    total = d[float("inf")]
    res = {}
    for q in (0.5, 0.99):
        for le in sorted(d):
            if d[le] >= q * total:
                res[q] = le
                break
    share150 = d.get(0.15, 0) / total if total else float("nan")
    return (
        f"server-side: {int(total)} updates, p50 <= {res.get(0.5)} s, "
        f"p99 <= {res.get(0.99)} s, within 150 ms {share150:.4f}"
    )


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def main(target, n, k, u, c, secs):
    universe = ticker_universe(u)
    chans = [grpc.aio.insecure_channel(target) for _ in range(c)]
    stubs = [PriceStreamServiceStub(ch) for ch in chans]
    rnd = random.Random(1)
    go = [False]
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(stream(stubs[i % c], rnd.sample(universe, k), go)))
        if i % 50 == 49:
            await asyncio.sleep(0.1)
    await asyncio.sleep(5)
    go[0] = True
    print(f"{n} streams started, errors {errors}, measuring {secs}s", flush=True)
    allv = []
    h0 = server_hist()
    for w in range(secs // 10):
        await asyncio.sleep(10)
        window, lat[:] = lat[:], []
        allv += window
        print(
            f"window {w}: {len(window)} updates p50 {pct(window, 0.5):.0f} "
            f"p99 {pct(window, 0.99):.0f} max {max(window, default=0):.0f} ms",
            flush=True,
        )
    print(server_quantiles(h0, server_hist()))
    print(f"errors {errors}")
    print(
        f"ALL: {len(allv)} updates p50 {pct(allv, 0.5):.0f} p95 {pct(allv, 0.95):.0f} "
        f"p99 {pct(allv, 0.99):.0f} max {max(allv, default=0):.0f} ms",
        flush=True,
    )
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in chans:
        await ch.close()


uvloop.run(
    main(
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        int(sys.argv[6]),
    )
)
