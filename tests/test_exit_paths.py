"""Every way a stream can end releases everything: one test per exit path, each ending with
DESIGN.md invariant 1 (gauges back to 0, every opened == closed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import websockets
from pricestream.api.server import Server
from pricestream.engine.stream import RECONNECT_HINT
from pricestream.errors import BACKEND_MESSAGE, DRAINING_MESSAGE
from pricestream.redis.broker import RedisPricePublisher
from pricestream.redis.client import make_client, make_pool
from pricestream.tasks import cancel_and_wait
from pricestream.tools.feed import run_feed
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.h2client import H2Client
from support.invariants import samples, wait_invariant
from support.servers import ready_server, wait_ready
from support.settings import fast_settings
from support.streams import next_batch, read_to_end
from support.waiting import wait_until
from support.web_clients import create_session, rest

TICKERS = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA"]
SUBPROTOCOL = "pricestream.v1.json"
STREAM_PATH = "/pricestream.v1.PriceStreamService/StreamPriceUpdates"
CLIENT_SCRIPT = Path(__file__).parent / "clients" / "stream_forever.py"


@contextlib.asynccontextmanager
async def running_feed(redis_url: str, rate: float = 200.0) -> AsyncIterator[None]:
    client = make_client(make_pool(fast_settings(redis_url)))
    task = asyncio.create_task(run_feed(RedisPricePublisher(client), TICKERS, rate))
    try:
        yield
    finally:
        await cancel_and_wait([task])
        await client.aclose()


def pod(redis_url: str, **overrides: object):
    """A ready in-process server with the fast settings."""
    return ready_server(fast_settings(redis_url, **overrides))


async def open_stream(stub: PriceStreamServiceStub, **call_options):
    session = await stub.CreateSession(pb.CreateSessionRequest(tickers=TICKERS[:3]))
    call = stub.StreamPriceUpdates(
        pb.StreamPriceUpdatesRequest(session_id=session.session_id), **call_options
    )
    await next_batch(call)
    return session, call


def reasons(server: Server) -> dict[str, float]:
    out = {}
    for line in server.engine.metrics.exposition().decode().splitlines():
        if line.startswith("pricestream_streams_closed_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


async def test_normal_end_by_close_session(redis) -> None:
    async with running_feed(redis.url), pod(redis.url) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session, call = await open_stream(stub)
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            assert await read_to_end(call) == grpc.StatusCode.OK
        await wait_invariant(server)
        assert reasons(server) == {"closed": 1}


async def test_client_cancel(redis) -> None:
    async with running_feed(redis.url), pod(redis.url) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            _, call = await open_stream(PriceStreamServiceStub(channel))
            call.cancel()
        await wait_invariant(server)
        assert reasons(server) == {"client_gone": 1}


async def test_channel_closed_abruptly(redis) -> None:
    async with running_feed(redis.url), pod(redis.url) as server:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        await open_stream(PriceStreamServiceStub(channel))
        await channel.close(grace=None)
        await wait_invariant(server)
        assert reasons(server) == {"client_gone": 1}


async def test_client_process_killed(redis) -> None:
    async with running_feed(redis.url), pod(redis.url) as server:
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENT_SCRIPT), f"127.0.0.1:{server.grpc_port}", "20", *TICKERS,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), 20)
        assert line.strip() == b"streaming 20"
        assert server.engine.streams_active == 20
        client.kill()  # SIGKILL: no FIN from the application, the kernel resets the socket
        await client.wait()
        await wait_invariant(server)
        assert reasons(server) == {"client_gone": 20}


async def test_deadline(redis) -> None:
    async with running_feed(redis.url), pod(redis.url) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            _, call = await open_stream(PriceStreamServiceStub(channel), timeout=1.0)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                while True:
                    await next_batch(call)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_invariant(server)
        assert set(reasons(server)) <= {"deadline", "client_gone"}
        assert sum(reasons(server).values()) == 1


async def test_send_error(redis) -> None:
    # A batch larger than the server's send limit makes the write itself fail.
    async with (
        running_feed(redis.url),
        pod(redis.url, max_send_message_bytes=128) as server,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = PriceStreamServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(tickers=TICKERS))
            call = stub.StreamPriceUpdates(
                pb.StreamPriceUpdatesRequest(session_id=session.session_id)
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                while True:
                    await next_batch(call)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await wait_invariant(server)
        assert reasons(server) == {"send_error": 1}


async def test_close_session_from_another_pod(redis) -> None:
    async with (
        running_feed(redis.url),
        pod(redis.url) as pod_a,
        pod(redis.url) as pod_b,
    ):
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{pod_a.grpc_port}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{pod_b.grpc_port}") as channel_b,
        ):
            session, call = await open_stream(PriceStreamServiceStub(channel_a))
            await PriceStreamServiceStub(channel_b).CloseSession(
                pb.CloseSessionRequest(session_id=session.session_id)
            )
            assert await read_to_end(call) == grpc.StatusCode.OK
        await wait_invariant(pod_a)
        await wait_invariant(pod_b)
        assert reasons(pod_a) == {"closed": 1}


async def test_server_shutdown(redis) -> None:
    # The full SIGTERM path of a real process is test_processes.py::test_sigterm_drains_...;
    # here the drain is checked in process, before the gRPC server itself stops.
    async with running_feed(redis.url):
        server = Server(fast_settings(redis.url))
        async with server:
            await wait_ready(server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                calls = [(await open_stream(stub))[1] for _ in range(5)]
                await server.drain()
                for call in calls:
                    assert await read_to_end(call) == grpc.StatusCode.UNAVAILABLE
                    assert "resume the session" in await call.details()
                    assert RECONNECT_HINT in tuple(await call.trailing_metadata())
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateSession(pb.CreateSessionRequest(tickers=["AAPL"]))
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        values = await wait_invariant(server, timeout=1)
        assert reasons(server) == {"shutdown": 5}
        assert values["pricestream_redis_pubsub_connections_active"] == 0


async def test_redis_outage_longer_than_limit(own_redis) -> None:
    async with (
        running_feed(own_redis.url),
        pod(own_redis.url, redis_outage_limit=1.0) as server,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            _, call = await open_stream(PriceStreamServiceStub(channel))
            own_redis.kill()
            assert await read_to_end(call, timeout=15) == grpc.StatusCode.UNAVAILABLE
            assert "Redis unreachable" in await call.details()
        values = await wait_invariant(server)
        assert reasons(server) == {"redis_unavailable": 1}
        assert values["pricestream_redis_up"] == 0
        assert values["pricestream_redis_pubsub_connections_active"] == 0


async def test_a_failed_redis_call_is_one_fixed_sentence_on_every_api(own_redis) -> None:
    """With Redis gone, REST, SSE and gRPC refuse with the same sentence: never the
    exception's text, which names Redis's address (an internal host and port)."""
    async with pod(own_redis.url) as server:
        session = await create_session(server.web_port, ["AAPL"])
        own_redis.kill()
        answers = [
            await rest(server.web_port, "POST", "/v1/sessions", {"tickers": ["AAPL"]}),
            await rest(server.web_port, "GET", f"/v1/sessions/{session['session_id']}"),
            await rest(server.web_port, "GET", f"/v1/sessions/{session['session_id']}/events"),
        ]
        for status, headers, body in answers:
            assert (status, headers["Retry-After"], body["error"]) == (
                503,
                "2",
                {"code": "backend", "message": BACKEND_MESSAGE},
            )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await PriceStreamServiceStub(channel).CreateSession(
                    pb.CreateSessionRequest(tickers=["AAPL"]), timeout=10
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == BACKEND_MESSAGE


async def test_slow_consumer_cut_off(redis) -> None:
    async with (
        running_feed(redis.url, rate=2000),
        pod(redis.url, flush_interval=0.01) as server,
    ):
        tiny_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=tiny_window
        ) as channel:
            stub = PriceStreamServiceStub(channel)
            _, stalled = await open_stream(stub)  # then not read until it is cut off
            _, healthy = await open_stream(stub)
            deadline = asyncio.get_running_loop().time() + 30
            while server.engine.metrics.slow_consumer_disconnects._value.get() == 0:
                assert asyncio.get_running_loop().time() < deadline, "never cut off"
                await next_batch(healthy)  # the other stream keeps flowing meanwhile
            for _ in range(50):  # released within moments, unread or not
                if server.engine.streams_active == 1:
                    break
                await asyncio.sleep(0.02)
            assert server.engine.streams_active == 1
            # Once the slow client reads again it finds the buffered batches, then the status.
            assert await read_to_end(stalled) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "did not read" in await stalled.details()
            await next_batch(healthy)
            healthy.cancel()
        await wait_invariant(server)
        assert reasons(server) == {"slow_consumer": 1, "client_gone": 1}


async def test_injected_fault_leaks_and_invariant_check_catches_it(redis) -> None:
    """The seed's bug on purpose: proves the invariant check can fail."""
    async with (
        running_feed(redis.url),
        pod(redis.url, faults="skip_cleanup_on_send_error") as srv,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            _, call = await open_stream(PriceStreamServiceStub(channel))
            call.cancel()
        with pytest.raises(AssertionError, match=r"sessions_active = 1\.0"):
            await wait_invariant(srv, timeout=1.5)
        values = samples(srv.engine.metrics.exposition().decode())
        assert values["pricestream_streams_active"] == 0  # counted at the RPC boundary
        assert values["pricestream_pubsub_subscriptions_active"] == 3  # the orphans


async def test_lease_release_that_times_out_says_what_failed(redis, caplog) -> None:
    """A release that does not finish in time is logged with what failed, not an empty text."""
    async with running_feed(redis.url), pod(redis.url, redis_timeout=0.2) as server:

        async def never(session_id: str, owner: str) -> None:
            await asyncio.Event().wait()

        server.engine.store.release = never
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            _, call = await open_stream(PriceStreamServiceStub(channel))
            call.cancel()
        await wait_invariant(server)
    warnings = [r.getMessage() for r in caplog.records if "could not release" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].endswith("(it expires by itself): TimeoutError"), warnings


async def test_lease_refresh_goes_in_small_slices_spread_over_the_period(redis) -> None:
    """Every open stream's lease is refreshed once per round, in slices of at most 200,
    spread over the time given instead of all at once."""
    from types import SimpleNamespace

    from pricestream.engine.engine import LEASE_REFRESH_SLICE

    async with pod(redis.url) as server:
        engine = server.engine
        background = [t for t in engine._tasks if t.get_name() == "lease-refresh"]
        await cancel_and_wait(background)  # this test drives one round itself
        writer = SimpleNamespace(end_reason=None)
        fakes = [
            SimpleNamespace(session_id=f"s{i}", owner=f"o{i}", tickers=("AAPL",), writer=writer)
            for i in range(1_000)
        ]
        engine.registry.streaming = lambda: fakes
        calls: list[tuple[float, int]] = []

        async def record(claims):
            calls.append((time.monotonic(), len(claims)))
            return {}

        engine.store.refresh = record
        started = time.monotonic()
        await engine._refresh_leases(spread=0.4)
        del engine.registry.streaming  # the real registry again, for shutdown
    assert [n for _, n in calls] == [LEASE_REFRESH_SLICE] * 5
    offsets = [at - started for at, _ in calls]
    assert offsets[0] < 0.05 and 0.3 <= offsets[-1] <= 0.6, offsets


def lease_held(redis, session_id: str) -> bool:
    """Whether Redis still holds a stream's lease on the session."""
    client = redis.client()
    try:
        return client.exists(f"pricestream:lease:{session_id}") == 1
    finally:
        client.close()


async def open_and_leave(
    transport: str,
    server: Server,
    session: dict,
    clients: contextlib.AsyncExitStack,
    waiting: asyncio.Event,
) -> None:
    """Open a stream of ``session`` (its clients kept by ``clients``) and, once the server is
    ``waiting`` in the Redis call under test, end it from the client's side: the socket
    aborted, the event stream's response closed, the gRPC call cancelled. "grpc-deadline" is a
    raw HTTP/2 call with ``grpc-timeout: 1S`` that never resets: only its deadline ends it."""
    request = pb.StreamPriceUpdatesRequest(session_id=session["session_id"])
    if transport == "websocket":
        ws = await clients.enter_async_context(
            websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL])
        )
        await asyncio.wait_for(waiting.wait(), 5)
        ws.transport.abort()
    elif transport == "sse":
        http = await clients.enter_async_context(aiohttp.ClientSession())
        response = await http.get(session["events_url"])
        assert response.status == 200
        await asyncio.wait_for(waiting.wait(), 5)
        response.close()
    elif transport == "grpc-deadline":
        client = await clients.enter_async_context(
            await H2Client.connect("127.0.0.1", server.grpc_port)
        )
        await client.send_grpc_request(STREAM_PATH, request, timeout="1S")
    else:
        channel = await clients.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        )
        stream = PriceStreamServiceStub(channel).StreamPriceUpdates(request)
        await asyncio.wait_for(waiting.wait(), 5)
        stream.cancel()


class LosesOneCancel:
    """Stands in for an awaited Redis call (the session claim, the seed's read of last prices)
    that swallows the cancel of its task, as Python 3.11's ``asyncio.wait_for`` inside redis-py
    does when the cancel lands just as its operation completes: the call waits until the test
    releases it, returns normally even if cancelled meanwhile, and counts the cancels lost."""

    def __init__(self, owner: object, method: str) -> None:
        self._real = getattr(owner, method)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.lost = 0
        setattr(owner, method, self)

    async def __call__(self, *args: object) -> object:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.lost += 1
            await self.release.wait()
        return await self._real(*args)


@pytest.mark.parametrize(
    ("transport", "reason"),
    [
        ("websocket", "client_gone"),
        ("sse", "client_gone"),
        ("grpc", "client_gone"),
        ("grpc-deadline", "deadline"),
    ],
)
async def test_a_stream_whose_cancel_is_lost_in_a_redis_call_still_ends(
    redis, transport: str, reason: str
) -> None:
    """Something ends a stream (its client leaves, its deadline passes) while the stream's
    task waits on Redis for its first batch (the last prices), and the cancel that should end
    the task is lost there: the stream still ends, for that reason, and gives everything back,
    instead of staying registered (on a closed socket, past its deadline) with its session held.
    The deadline's client stays connected and never resets its stream. (The claim before it
    is shielded, so a cancel is never lost there: see the next test.)"""
    async with pod(redis.url) as server, contextlib.AsyncExitStack() as clients:
        session = await create_session(server.web_port, ["AAPL"])
        # No price is known, so the stream's first batch reads Redis for one.
        call = LosesOneCancel(server.engine.broker, "last_prices")
        await open_and_leave(transport, server, session, clients, call.entered)
        await wait_until(lambda: call.lost == 1, 5, "the cancel reached the Redis call")
        call.release.set()
        await wait_invariant(server)
        assert reasons(server) == {reason: 1}
        # The session is free again: a new stream of it gets its snapshot.
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "snapshot"


@pytest.mark.parametrize("transport", ["websocket", "grpc"])
async def test_a_claim_that_reaches_redis_after_its_stream_was_cancelled_gives_the_lease_back(
    redis, transport: str
) -> None:
    """The client leaves while its stream's claim is queued, and the claim reaches Redis only
    after that (the batcher sends a queued command whether or not its caller still waits): the
    lease it takes is given back once Redis has answered, so the client's next socket streams
    instead of being told "already streaming" (4009) until the lease expires (30 s here). A
    release sent at the cancel would have reached Redis first and done nothing."""
    async with pod(redis.url, lease_ttl=30.0) as server:
        session = await create_session(server.web_port, ["AAPL"])
        store = server.engine.store
        real_claim = store.claim
        queued, send = asyncio.Event(), asyncio.Event()
        sent_anyway: list[asyncio.Future[tuple[str, ...]]] = []

        async def claim_sent_when_told(session_id: str, owner: str) -> tuple[str, ...]:
            await send.wait()
            return await real_claim(session_id, owner)

        async def claim(session_id: str, owner: str) -> tuple[str, ...]:
            queued.set()
            sending = asyncio.ensure_future(claim_sent_when_told(session_id, owner))
            try:
                return await asyncio.shield(sending)
            except asyncio.CancelledError:
                sent_anyway.append(sending)
                raise

        store.claim = claim
        async with contextlib.AsyncExitStack() as clients:
            await open_and_leave(transport, server, session, clients, queued)
            await asyncio.sleep(0.3)  # the cancel, and whatever it sends at once, go first
            send.set()
            # Counted as never started (the SLOs' denominator leaves those out).
            await wait_until(lambda: reasons(server) == {"rejected": 1}, 5, "the stream ended")
        for sending in sent_anyway:
            await sending
        assert not lease_held(redis, session["session_id"])
        store.claim = real_claim
        async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "snapshot"
        await wait_invariant(server)
        assert reasons(server) == {"rejected": 1, "client_gone": 1}


@pytest.mark.parametrize("transport", ["websocket", "grpc"])
async def test_a_stream_claimed_as_the_pod_starts_draining_is_refused_like_one_after(
    redis, transport: str
) -> None:
    """SIGTERM's drain begins while a stream's claim is in Redis: the stream is not registered
    behind the drain's back (nothing would stop it, and the drain would wait its whole timeout
    for it), it is refused as any stream is once the pod drains (1001 / UNAVAILABLE) and its
    lease is given back for the pod its client goes to."""
    async with pod(redis.url, drain_timeout=30.0) as server:
        session = await create_session(server.web_port, ["AAPL"])
        store = server.engine.store
        real_claim = store.claim
        drains: list[asyncio.Task[None]] = []

        async def claim(session_id: str, owner: str) -> tuple[str, ...]:
            tickers = await real_claim(session_id, owner)
            drains.append(asyncio.create_task(server.drain()))  # SIGTERM's first step
            await asyncio.sleep(0.05)
            return tickers

        store.claim = claim
        started = time.monotonic()
        if transport == "websocket":
            async with websockets.connect(session["stream_url"], subprotocols=[SUBPROTOCOL]) as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)  # no snapshot: refused
            assert (ws.close_code, ws.close_reason) == (1001, DRAINING_MESSAGE)
        else:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                call = PriceStreamServiceStub(channel).StreamPriceUpdates(
                    pb.StreamPriceUpdatesRequest(session_id=session["session_id"])
                )
                assert await read_to_end(call) == grpc.StatusCode.UNAVAILABLE
                assert await call.details() == DRAINING_MESSAGE
        await asyncio.wait_for(drains[0], 5)  # not its 30 s timeout
        assert time.monotonic() - started < 5
        assert not lease_held(redis, session["session_id"])
        assert reasons(server) == {"rejected": 1}
