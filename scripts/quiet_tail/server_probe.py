"""An in-process `pricestream serve` (same Server class) with instruments: event-loop blocks over
20 ms (10 ms ticker), GC pauses, and the duration of each lease refresh round."""

import asyncio
import gc
import os
import time

import uvloop
from pricestream.api.server import Server
from pricestream.settings import load_settings

blocks: list[tuple[float, float]] = []
gcs: list[tuple[float, float, int]] = []
refreshes: list[tuple[float, float, int]] = []
_gc_start = [0.0]


def on_gc(phase, info):
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        d = time.perf_counter() - _gc_start[0]
        if info["generation"] == 2 or d > 0.005:
            gcs.append((time.time(), d, info["generation"]))


async def main() -> None:
    settings = load_settings(
        redis_url=os.environ["URL"],
        grpc_host="127.0.0.1",
        grpc_port=int(os.environ["GRPC"]),
        http_host="127.0.0.1",
        http_port=int(os.environ["HTTP"]),
        flush_interval=0.1,
        session_create_rate=100000,
        session_create_burst=100000,
        log_level="WARNING",
        stall_timeout=30,
    )
    gc.callbacks.append(on_gc)
    async with Server(settings) as server:
        engine = server.engine
        original = engine.store.refresh

        async def timed(claims):
            t = time.perf_counter()
            try:
                return await original(claims)
            finally:
                refreshes.append((time.time(), time.perf_counter() - t, len(claims)))

        engine.store.refresh = timed
        if os.environ.get("NOREFRESH"):

            async def nothing(claims):
                return {}

            engine.store.refresh = nothing
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        last_report = time.time()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            over = loop.time() - t - 0.01
            if over > 0.02:
                blocks.append((time.time(), over))
            if time.time() - last_report > 10:
                last_report = time.time()
                bl = sorted(d for _, d in blocks)
                print(
                    f"[{time.strftime('%X')}] streams={engine.streams_active} "
                    f"loop blocks>20ms: {len(bl)} max {max(bl, default=0) * 1000:.0f} ms "
                    f"top {[round(x * 1000) for x in bl[-5:]]}; "
                    f"gc gen2/slow: {[(g, round(d * 1000)) for _, d, g in gcs[-5:]]}; "
                    f"refresh rounds: {[(n, round(d * 1000)) for _, d, n in refreshes[-3:]]}",
                    flush=True,
                )
                # which blocks coincide with a refresh round or a gc
                near_r = sum(
                    1
                    for bt, d in blocks
                    if any(rt - rd - 0.05 <= bt <= rt + 0.05 for rt, rd, _ in refreshes)
                )
                near_g = sum(
                    1 for bt, d in blocks if any(abs(bt - gt) < 0.05 + d for gt, _, _ in gcs)
                )
                print(
                    f"   blocks during a refresh round: {near_r}, near a GC: {near_g}", flush=True
                )
                blocks.clear()


uvloop.run(main())
