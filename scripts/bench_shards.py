"""Sharded Pub/Sub capacity (issue 14, part 3): Redis CPU per delivered update, and the publish
rate one Redis sustains with N pods subscribed, on a cluster of 1 and of 3 masters.

For each (shards, pods) pair: a fresh Redis Cluster of ``shards`` masters (no replicas; free
loopback ports, temporary folder; every redis-server pinned to core 0 with taskset), a
subscriber process standing in for ``pods`` pods (each "pod" holds one connection per master
and SSUBSCRIBEs every ticker's channel, as a pod whose streams cover every ticker does; it only
counts what arrives), and the product's feed (``run_feed`` + ``ClusterPricePublisher``: SET
``price:last:{T}`` + SPUBLISH ``price:{T}``) at ``rate`` updates/s; subscriber and feed on the
other cores. Measured over ``seconds``: updates published and delivered, CPU seconds of every
redis-server (/proc), hence

- Redis CPU per delivered update (all masters together),
- the busiest master's share of one core,
- (the CPU includes each master's idle cluster-bus chatter, ~1% of a core here: a short or
  slow run overstates the per-update cost; compare runs of the same length and rate)
- the publish rate one master would sustain at 100% of a core with these pods subscribed:
  (its share of the publish rate) / (its core share), a linear projection from the measured
  point, marked as such. It holds while the cost is linear in the rate (it is, far from
  saturation), and is an upper bound: replicas, persistence and bigger payloads cost more.

    python scripts/bench_shards.py --shards 1,3 --pods 1,4 --rate 2000 --seconds 5
    python scripts/bench.py --cases shards   # the same from `make bench`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The tests' local Redis Cluster (tests/support/redis_cluster.py), reused here.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from support.redis_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
SMESSAGE = b"$8\r\nsmessage\r\n"


def cpu_seconds(cluster: LocalCluster) -> list[float]:
    """utime + stime of each redis-server (setpriv and taskset exec it: same PID)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = []
    for node in cluster.nodes:
        assert node.proc is not None
        fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / ticks)
    return out


def seed_url(cluster: LocalCluster) -> str:
    """Every master as a seed."""
    return ",".join(f"redis://{node.address}" for node in cluster.nodes)


# --- the subscriber process ------------------------------------------------------------


async def _subscribe_and_count(
    port: int, groups: list[list[bytes]], counts: list[int], index: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for group in groups:
            parts = [b"*%d\r\n$10\r\nSSUBSCRIBE\r\n" % (len(group) + 1)]
            parts += [b"$%d\r\n%s\r\n" % (len(c), c) for c in group]
            writer.write(b"".join(parts))
        await writer.drain()
        tail = b""
        while chunk := await reader.read(1 << 16):
            data = tail + chunk
            counts[index] += data.count(SMESSAGE)
            tail = data[-(len(SMESSAGE) - 1) :]  # a marker split across two reads
    finally:
        writer.close()


async def _subscriber_main(ports: list[int], pods: int, tickers: int) -> None:
    from pricestream.codec import cluster_price_channel
    from pricestream.tools.feed import ticker_universe
    from redis.crc import key_slot

    owners = json.loads(sys.stdin.readline())  # slot -> port
    by_port: dict[int, dict[int, list[bytes]]] = {p: {} for p in ports}
    for ticker in ticker_universe(tickers):
        channel = cluster_price_channel(ticker).encode()
        slot = key_slot(channel)
        by_port[owners[str(slot)]].setdefault(slot, []).append(channel)
    counts = [0] * (pods * len(ports))
    tasks = [
        asyncio.create_task(
            _subscribe_and_count(port, list(by_port[port].values()), counts, pod * len(ports) + i)
        )
        for pod in range(pods)
        for i, port in enumerate(ports)
    ]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("subscribed", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"delivered": sum(counts)}), flush=True)


# --- one measurement --------------------------------------------------------------------


async def _publish(url: str, tickers: int, rate: float, seconds: float) -> int:
    from pricestream.redis.cluster_client import make_cluster_client
    from pricestream.redis.sharded_broker import ClusterPricePublisher
    from pricestream.settings import load_settings
    from pricestream.tools.feed import run_feed, ticker_universe

    client = make_cluster_client(load_settings(redis_url=url, redis_mode="cluster"))
    publisher = ClusterPricePublisher(client)
    try:
        return await run_feed(publisher, ticker_universe(tickers), rate, seconds)
    finally:
        await client.aclose()


def measure(
    shards: int, pods: int, tickers: int, rate: float, seconds: float, workdir: Path
) -> dict:
    cores = os.cpu_count() or 1
    load_cpus = f"1-{cores - 1}" if cores > 2 else "1"
    # No replicas; Redis's default cluster-node-timeout (its cluster-bus chatter is part of
    # the CPU measured); every redis-server on core 0.
    cluster = LocalCluster(workdir, masters=shards, replicas=0, node_timeout_ms=15000, cpus="0")
    ports = [node.port for node in cluster.nodes]
    subscriber = None
    try:
        cluster.start()
        owners = cluster.slots()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "service")}
        subscriber = subprocess.Popen(
            ["taskset", "-c", load_cpus, sys.executable, __file__, "--subscriber",
             "--ports", ",".join(map(str, ports)), "--pods", str(pods),
             "--tickers", str(tickers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        assert subscriber.stdin is not None and subscriber.stdout is not None
        subscriber.stdin.write(json.dumps(owners) + "\n")
        subscriber.stdin.flush()
        if subscriber.stdout.readline().strip() != "subscribed":
            raise RuntimeError("bench subscriber did not start")
        time.sleep(0.5)  # SSUBSCRIBE replies
        cpu_before, started = cpu_seconds(cluster), time.monotonic()
        published = asyncio.run(_publish(seed_url(cluster), tickers, rate, seconds))
        time.sleep(0.3)  # the last deliveries
        elapsed = time.monotonic() - started
        cpu = [b - a for a, b in zip(cpu_before, cpu_seconds(cluster), strict=True)]
        subscriber.send_signal(signal.SIGTERM)
        delivered = json.loads(subscriber.stdout.readline())["delivered"]
        subscriber.wait(timeout=10)
    finally:
        if subscriber is not None and subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()
        cluster.stop()
    busiest = max(cpu) / elapsed
    # The busiest master carries about published / shards of the publishes (tickers spread
    # evenly over slots); at 100% of a core it would carry published_rate / shards / busiest.
    sustain = (published / elapsed / shards) / busiest if busiest > 0 else float("inf")
    return {
        "shards": shards,
        "pods": pods,
        "tickers": tickers,
        "published_per_s": round(published / elapsed),
        "delivered_per_s": round(delivered / elapsed),
        "delivered_ratio": round(delivered / max(1, published * pods), 3),
        "redis_cpu_us_per_delivered": round(sum(cpu) / max(1, delivered) * 1e6, 2),
        "busiest_master_core_share": round(busiest, 3),
        "projected_publish_rate_per_master": round(sustain),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| masters | pods subscribed | published/s | delivered/s | delivered / (published x "
        "pods) | Redis CPU per delivered update | busiest master, share of a core | publish "
        "rate one master sustains (projected) |\n|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['shards']} | {r['pods']} | {r['published_per_s']:,} | {r['delivered_per_s']:,} "
        f"| {r['delivered_ratio']} | {r['redis_cpu_us_per_delivered']} µs | "
        f"{r['busiest_master_core_share']:.1%} | {r['projected_publish_rate_per_master']:,}/s |\n"
        for r in rows
    )


def run(shards: list[int], pods: list[int], tickers: int, rate: float, seconds: float) -> str:
    tools = ("taskset", "setpriv", "redis-server", "redis-cli")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench_shards: needs {', '.join(missing)} (make setup)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pricestream-shards-") as tmp:
        for count in shards:
            for pod_count in pods:
                workdir = Path(tmp) / f"{count}x{pod_count}"
                workdir.mkdir()
                print(f"bench_shards: {count} master(s), {pod_count} pod(s) ...", file=sys.stderr)
                row = measure(count, pod_count, tickers, rate, seconds, workdir)
                print(f"bench_shards: {json.dumps(row)}", file=sys.stderr)
                rows.append(row)
    return table(rows)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=_ints, default=[1, 3], help="masters, e.g. 1,3")
    parser.add_argument("--pods", type=_ints, default=[1, 4, 16], help="pods, e.g. 1,4,16")
    parser.add_argument("--tickers", type=int, default=500)
    parser.add_argument("--rate", type=float, default=5000.0, help="updates published per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscriber:
        asyncio.run(_subscriber_main(_ints(args.ports), args.pods[0], args.tickers))
        return 0
    print(run(args.shards, args.pods, args.tickers, args.rate, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
