"""Abuse of the browser port, each bounded: a reconnect storm (every socket dropped at once, as
an ingress reload does), slow handshakes in bulk, floods of bad requests. Afterwards the pod is
ready and its bookkeeping balanced (invariant 1)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import websockets
from pricestream.api.server import Server
from support.invariants import read_metrics, samples, wait_invariant
from support.servers import ready_server
from support.settings import fast_settings
from support.waiting import wait_until
from support.web_clients import create_session

SUBPROTOCOL = "pricestream.v1.json"
SOCKETS = 200


async def stream_until_snapshot(url: str, rng: random.Random, deadline: float) -> int:
    """Connect as the live page does: on 1013 (try later) or 1001, back off with full jitter
    and try again; the attempts it took to get this session's snapshot."""
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        ws = await websockets.connect(url, subprotocols=[SUBPROTOCOL], open_timeout=10)
        try:
            frame = await asyncio.wait_for(ws.recv(), 10)
            assert '"type":"snapshot"' in frame
            await ws.close()
            return attempt
        except websockets.ConnectionClosed:
            assert ws.close_code in (1013, 1001), ws.close_code
        await asyncio.sleep(rng.uniform(0, min(2.0, 0.1 * 2**attempt)))
    raise AssertionError(f"{url} did not stream again in time")


async def test_reconnect_storm_is_admitted_at_a_bounded_rate_and_every_session_resumes(
    redis,
) -> None:
    settings = fast_settings(
        redis.url, web_accept_rate=100.0, web_accept_burst=50, session_ttl=60.0,
        resume_grace=30.0,
    )  # fmt: skip
    async with ready_server(settings) as server:
        sessions = [await create_session(server.web_port, ["AAPL", "MSFT"]) for _ in range(SOCKETS)]
        # Every socket open (admitted over a few seconds: 50 at once, then 100 per second).
        rng = random.Random(3)
        deadline = time.monotonic() + 30
        opened = await asyncio.gather(
            *(stream_until_snapshot(s["stream_url"], rng, deadline) for s in sessions)
        )
        assert sum(opened) > SOCKETS  # some were told 1013 and came back
        # The storm: all reconnect at once, after an ingress reload dropped them.
        ready_throughout = True

        async def watch_readiness() -> None:
            nonlocal ready_throughout
            while True:
                ready_throughout &= server.engine.ready
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_readiness())
        started = time.monotonic()
        attempts = await asyncio.gather(
            *(stream_until_snapshot(s["stream_url"], rng, started + 30) for s in sessions)
        )
        took = time.monotonic() - started
        watcher.cancel()
        # Admitted at the bounded rate: SOCKETS - burst at 100/s, plus the clients' jitter.
        assert took < (SOCKETS - 50) / 100 + 10, took
        assert max(attempts) > 1 and sum(attempts) >= SOCKETS
        assert ready_throughout
        exposition = read_metrics(server)
        refused = samples(exposition).get("pricestream_web_handshakes_refused_total", 0)
        assert refused >= SOCKETS - 2 * 50  # the rate, not luck, spread them
        assert 'reason="rate"' in exposition
        # No session lost: each stream had its own session's snapshot; all closed cleanly.
        values = await wait_invariant(server, timeout=10)
        assert values["pricestream_ws_connections_opened_total"] == sum(opened) + sum(attempts)
        print(
            f"\nreconnect storm: {SOCKETS} sockets back in {took:.1f}s, "
            f"{sum(attempts) - SOCKETS} refusals (1013) on the way"
        )


async def test_slow_handshakes_in_bulk_are_dropped_and_the_pod_stays_ready(redis) -> None:
    async with ready_server(fast_settings(redis.url)) as server:
        server._web.limits = replace(server._web.limits, head_timeout=0.5)
        streams = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.web_port)
            writer.write(b"GET /v1/sessions/x/ws HTTP/1.1\r\nHost: x\r\n")  # never finished
            streams.append((reader, writer))
        # A real client is served meanwhile.
        session = await create_session(server.web_port, ["AAPL"])
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            assert '"snapshot"' in await asyncio.wait_for(ws.recv(), 5)
        for reader, writer in streams:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
        await wait_until(lambda: server.engine.ready, 5, "ready")
        await wait_until(lambda: not server._web._connections, 5, "every connection released")
        await wait_invariant(server, timeout=5)


async def test_a_flood_of_bad_requests_is_answered_and_leaves_nothing(server: Server) -> None:
    bad = [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n",
        b"GET /v1/sessions/x/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",  # no key
        b"GET /v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/ws HTTP/1.1\r\nHost: x\r\nOrigin: http://evil\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ]
    statuses = []
    for round_ in range(20):
        for request in bad:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.web_port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(200), 5)
            statuses.append(int(answer.split(b" ", 2)[1]))
            writer.close()
        assert server.engine.ready, round_
    assert sorted(set(statuses)) == [400, 403, 413, 431]
    await wait_until(lambda: not server._web._connections, 5, "every connection released")
    await wait_invariant(server, timeout=5)
