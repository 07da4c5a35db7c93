"""HTTP/2 abuse against the gRPC port (issue 12, item 4): each attack gets a bounded answer.

Every test attacks a real in-process server from tests/support/h2client.py over loopback, asserts
what the attacker's connection gets (GOAWAY and its code, RST_STREAM, a closed socket), then that
nothing else noticed: the server is still ready, a stock grpcio client creates a session and
streams, /metrics answers within a second, the memory the attack left behind (tracemalloc) is
small, the transport holds no connection or call of the attacker's any more, and invariant 1 holds.
Floods are bounded in count and run in well under a few seconds each.

Floods that must be seen across reads go in lockstep (a batch, then a PING whose ACK says the
server has read it): the server then never closes a socket with unread bytes in it, which would
turn its FIN into a TCP reset and lose the GOAWAY on the way.

What the transport answers, and why that is right by RFC 9113:

| attack | answer |
|---|---|
| rapid reset (HEADERS + RST_STREAM) | GOAWAY ENHANCE_YOUR_CALM past the early-reset budget |
| ... reset in the read that opened it | no answer, no handler started; counted in the budget |
| CONTINUATION flood | GOAWAY PROTOCOL_ERROR after 64 CONTINUATION frames (h2's bound) |
| HPACK bomb | GOAWAY ENHANCE_YOUR_CALM at 16 KiB decoded (§10.5.1) |
| SETTINGS flood | GOAWAY ENHANCE_YOUR_CALM past the SETTINGS budget (§10.5) |
| PING flood | GOAWAY ENHANCE_YOUR_CALM ``too_many_pings`` (gRPC's ping-abuse rule) |
| (both, in one read) | h2 ACKs every frame of the read first: never more bytes out than in |
| zero window | ended after the stall timeout: trailers grpc-status 8 (HEADERS skip flow control) |
| a stream over MAX_CONCURRENT_STREAMS | GOAWAY PROTOCOL_ERROR (h2's; §5.1.2 with §5.4) |
| ... past as many handlers still ending (streams reset by the client) | RST_STREAM REFUSED_STREAM |
| garbage instead of the preface | closed at once, after our SETTINGS; no GOAWAY (§3.4 allows it) |
| garbage after the preface | GOAWAY FRAME_SIZE_ERROR or PROTOCOL_ERROR (§4.2, §5.4.1) |
| a frame header over MAX_FRAME_SIZE | GOAWAY FRAME_SIZE_ERROR at its header (§4.2) |
| HTTP/1.x request line | ``505 HTTP Version Not Supported`` text, closed |
| connect and silence, preface and no SETTINGS | closed after the handshake timeout |
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from pricestream.v1.pricestream_pb2_grpc import PriceStreamServiceStub
from support.h2client import H2Client, StreamResult, grpc_message
from support.invariants import scrape, wait_invariant
from support.market import Market
from support.servers import ready_server
from support.settings import fast_settings
from support.streams import next_batch

SERVICE = "/pricestream.v1.PriceStreamService"
CREATE = f"{SERVICE}/CreateSession"
STREAM = f"{SERVICE}/StreamPriceUpdates"
HOST = "127.0.0.1"
MEMORY_BOUND = 2 * 1024 * 1024  # bytes an attack may leave allocated (caches, logs, metrics)
METRICS_BOUND = 1.0  # seconds /metrics may take after an attack


# --- what every test checks after its attack ---------------------------------------------------


class Memory:
    """Python allocations since ``start`` (tracemalloc), after a full collection."""

    def __init__(self) -> None:
        self.before = 0

    def start(self) -> None:
        gc.collect()
        tracemalloc.start()
        self.before = tracemalloc.get_traced_memory()[0]

    def growth(self) -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - self.before

    @property
    def peak(self) -> int:
        return tracemalloc.get_traced_memory()[1] - self.before


@contextlib.asynccontextmanager
async def attacked(server: Server, redis_url: str) -> AsyncIterator[Memory]:
    """Warm the server up with one normal client, measure memory across the attack in the
    body, then check that the server serves as before and let go of everything."""
    await serves_normally(server, redis_url)  # warm caches: methods, metrics, the pool
    memory = Memory()
    memory.start()
    try:
        yield memory
        await transport_is_empty(server)
        growth = memory.growth()
        print(f"memory: growth {growth / 1024:.0f} KiB, peak {memory.peak / 1024:.0f} KiB")
        assert growth < MEMORY_BOUND, f"the attack left {growth} bytes allocated"
    finally:
        tracemalloc.stop()
    await serves_normally(server, redis_url)
    await transport_is_empty(server)
    values = await wait_invariant(server)
    assert values.get("grpc_server_started_total") == values.get("grpc_server_handled_total")


async def serves_normally(server: Server, redis_url: str) -> None:
    """Ready; a grpcio client creates a session and gets a first batch; /metrics is fast."""
    assert server.engine.ready
    market = Market(redis_url, ["AAPL"])
    await market.tick("AAPL")
    await market.aclose()
    async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
        stub = PriceStreamServiceStub(channel)
        request = pb.CreateSessionRequest(tickers=["AAPL"])
        session = await stub.CreateSession(request, timeout=5)
        call = stub.StreamPriceUpdates(
            pb.StreamPriceUpdatesRequest(session_id=session.session_id), timeout=10
        )
        batch = await next_batch(call)
        assert [u.ticker for u in batch.updates] == ["AAPL"]
        call.cancel()
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=5)
    started = time.monotonic()
    text = await asyncio.to_thread(scrape, server.http_port)
    took = time.monotonic() - started
    assert "pricestream_sessions_active" in text
    assert took < METRICS_BOUND, f"/metrics took {took:.2f} s"


async def transport_is_empty(server: Server, timeout: float = 5.0) -> None:
    """No connection and no call left in the transport (the normal client's included)."""
    grpc_server = server._grpc
    deadline = time.monotonic() + timeout
    while grpc_server._connections or list(grpc_server.calls()) or grpc_server._live_calls:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"transport still holds {len(grpc_server._connections)} connections, "
                f"{len(list(grpc_server.calls()))} calls, {grpc_server._live_calls} live calls"
            )
        await asyncio.sleep(0.02)


@pytest.fixture
async def memory(server: Server, redis) -> AsyncIterator[Memory]:
    """The test runs as the attack of ``attacked`` on the ``server`` fixture's server: memory
    measured across it, the server checked to serve as before afterwards."""
    async with attacked(server, redis.url) as memory:
        yield memory


@pytest.fixture
async def client(server: Server, memory: Memory) -> AsyncIterator[H2Client]:
    """The attacker: a raw HTTP/2 client (preface and SETTINGS sent) inside ``memory``'s
    attack, closed before the checks after it."""
    async with await H2Client.connect(HOST, server.grpc_port) as client:
        yield client


# --- attack helpers ------------------------------------------------------------------------------


async def sync(client: H2Client, timeout: float = 5.0) -> bool:
    """PING and wait for its ACK: the server has read all we sent. False if it closed first."""
    data = random.randbytes(8)
    await client.ping(data)
    try:
        await client.until(lambda: data in client.ping_acks, timeout)
    except ConnectionError:
        return False
    return True


async def barrier(client: H2Client, timeout: float = 5.0) -> bool:
    """A call the server answers at once (UNIMPLEMENTED), for floods where PINGs would count
    as ping abuse: its answer says the server has read all we sent. False if it closed."""
    stream_id = await client.send_grpc_request("/no.such.Service/Method", b"")
    try:
        await client.response(stream_id, timeout)
    except ConnectionError:
        return False
    return client.streams[stream_id].grpc_status == 12


async def closed_with_goaway(client: H2Client, timeout: float = 5.0) -> float:
    """Read until the server closes the socket; seconds it took. Asserts a GOAWAY came."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        await client.until(lambda: client.closed, timeout)
    assert client.goaway is not None, "the server closed without GOAWAY"
    return time.monotonic() - started


async def read_until_closed(client: H2Client, timeout: float = 5.0) -> bytes:
    """Raw bytes until the server closes (for answers that are not HTTP/2)."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while chunk := await client.read_raw(deadline - time.monotonic()):
        received += chunk
    return bytes(received)


def parse_frames(data: bytes) -> list[Frame]:
    """The HTTP/2 frames in raw bytes read past h2 (a torn tail is an error)."""
    frames = []
    offset = 0
    while offset < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[offset : offset + 9]))
        frame.parse_body(memoryview(data[offset + 9 : offset + 9 + length]))
        frames.append(frame)
        offset += 9 + length
    return frames


async def grpcio_session(server: Server, tickers: Iterable[str]) -> str:
    async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
        request = pb.CreateSessionRequest(tickers=list(tickers))
        session = await PriceStreamServiceStub(channel).CreateSession(request, timeout=5)
    return session.session_id


# --- rapid reset ---------------------------------------------------------------------------------


def ignore_stream_limit(client: H2Client) -> None:
    """Let the client's h2 open more streams than the server advertised (an attacker's)."""
    client.conn.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 1 << 30
    client.conn.remote_settings.acknowledge()


def open_and_reset(client: H2Client, count: int) -> None:
    """Queue ``count`` CreateSession calls, each complete (its request, END_STREAM: the
    handler starts) and reset at once (RST_STREAM CANCEL). ``client.flush()`` sends them."""
    request = grpc_message(pb.CreateSessionRequest(tickers=["AAPL"]))
    for _ in range(count):
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, client.grpc_headers(CREATE))
        client.conn.send_data(stream_id, request, end_stream=True)
        client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)


async def test_rapid_reset_gets_goaway_enhance_your_calm(server: Server, client: H2Client) -> None:
    """CVE-2023-44487: calls opened and reset at once, in lockstep batches of 50 (an answered
    call after each, so the server reads them batch by batch), up to 2,000 of them."""
    burst = server._grpc.limits.early_resets_burst
    started = time.monotonic()
    sent = 0
    while sent < 2000 and client.goaway is None:
        open_and_reset(client, 50)
        sent += 50
        await client.flush()
        if not await barrier(client):
            break
    took = await closed_with_goaway(client) + (time.monotonic() - started)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.goaway.additional_data == b"too many streams reset early"
    handled = (client.goaway.last_stream_id + 1) // 2
    print(f"rapid reset: GOAWAY at stream {handled} ({sent} reset), {took:.2f} s")
    # The burst plus what the rate refilled meanwhile (and one batch in flight), and
    # the answered call after each batch, whose streams count among the handled ones.
    assert burst < handled <= burst + 50 + 20 * took + 1 + sent // 50


async def test_reset_streams_still_ending_are_bounded(redis) -> None:
    """A stream the client reset frees its slot at once (the count the client keeps, and
    the one advertised), but the work of its handler, still ending, has a bound of its own
    (``Limits.max_ending_calls``; as many as the stream limit by default, 2 here). With a
    limit of 5: 5 StreamPriceUpdates run; then one write resets them and opens 5 more calls.
    2 are served, 3 refused (REFUSED_STREAM) while the old handlers wind down: never more than
    5 + 2 handlers at once, and the connection lives on. (tests/test_h2_edges.py shows a client
    reusing its slots at once under the default bound, never refused.)"""
    async with ready_server(fast_settings(redis.url, max_sessions=5)) as server:
        grpc_server = server._grpc
        grpc_server.limits = dataclasses.replace(grpc_server.limits, max_ending_calls=2)
        assert grpc_server.limits.max_concurrent_streams == 5
        assert grpc_server.limits.max_calls == 7
        peak = 0
        call_started = grpc_server.call_started

        def counting_call_started() -> None:
            nonlocal peak
            call_started()
            peak = max(peak, grpc_server._live_calls)

        grpc_server.call_started = counting_call_started  # type: ignore[method-assign]
        async with attacked(server, redis.url):
            peak = 0
            market = Market(redis.url, ["AAPL"])
            await market.tick("AAPL")
            await market.aclose()
            sessions = [await grpcio_session(server, ["AAPL"]) for _ in range(5)]
            async with await H2Client.connect(HOST, server.grpc_port) as client:
                await client.until(lambda: client.conn.remote_settings.max_concurrent_streams == 5)
                ids = [
                    await client.send_grpc_request(
                        STREAM, pb.StreamPriceUpdatesRequest(session_id=s)
                    )
                    for s in sessions
                ]
                await client.until(lambda: all(client.streams[i].data for i in ids))
                for stream_id in ids:
                    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                request = grpc_message(pb.CreateSessionRequest(tickers=["AAPL"]))
                new = []
                for _ in range(5):
                    stream_id = client.conn.get_next_available_stream_id()
                    client.conn.send_headers(stream_id, client.grpc_headers(CREATE))
                    client.conn.send_data(stream_id, request, end_stream=True)
                    client.streams[stream_id] = StreamResult(stream_id)
                    new.append(stream_id)
                await client.flush()  # one write: 5 RST_STREAM, 5 new calls
                await client.until(lambda: all(client.streams[i].finished for i in new))
                refused = [i for i in new if client.streams[i].reset == ErrorCodes.REFUSED_STREAM]
                print(f"handlers at once: at most {peak}; new streams refused: {len(refused)} of 5")
                assert peak <= 7
                assert len(refused) == 3
                assert client.goaway is None and not client.closed
                # Once the old handlers have ended, the connection serves a call again.
                await transport_calls_end(server)
                stream_id = await client.send_grpc_request(
                    f"{SERVICE}/CloseSession", pb.CloseSessionRequest(session_id=sessions[0])
                )
                assert (await client.response(stream_id)).grpc_status == 0
            async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                for session_id in sessions[1:]:
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


async def transport_calls_end(server: Server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while list(server._grpc.calls()) or server._grpc._live_calls:
        assert time.monotonic() < deadline, "calls did not end"
        await asyncio.sleep(0.02)


# --- CONTINUATION flood --------------------------------------------------------------------------


@pytest.mark.parametrize("frame_size", [1, 16_384])
async def test_continuation_flood_gets_goaway_protocol_error(
    server: Server, memory: Memory, client: H2Client, frame_size: int
) -> None:
    """HEADERS without END_HEADERS, then up to 200 CONTINUATION frames that never end the
    block. Tiny frames go in one write (read at once: the GOAWAY is sure to arrive); 16 KiB
    frames 8 a write (so that this client holds little of them itself)."""
    # Settings exchanged first: our h2 must owe nothing (an ACK) inside the block.
    await client.until(lambda: client.settings_acks >= 1)
    await client.flush()
    block = client.header_block(client.grpc_headers(CREATE))
    started = time.monotonic()
    await client.send_frame(HeadersFrame(1, block))  # no END_HEADERS
    per_write = 200 if frame_size == 1 else 8
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 200:
            frame = ContinuationFrame(1, b"\x00" * frame_size)
            await client.send_frame(*[frame] * per_write)
            sent += per_write
    with contextlib.suppress(ConnectionError):
        await client.until(lambda: client.closed, 5)
    took = time.monotonic() - started
    print(
        f"CONTINUATION flood ({frame_size} B frames): {sent} written, closed after "
        f"{took:.3f} s, {client.goaway}"
    )
    if frame_size == 1:
        assert client.goaway is not None
    # With big frames the server closes with our last writes unread: the kernel then
    # turns its FIN into a reset, which can overtake the GOAWAY. Closed it must be.
    if client.goaway is not None:
        assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        assert client.goaway.last_stream_id == 0  # the block never made a request
    # h2 buffers at most 64 frames of max_frame_size (16 KiB) before it gives up.
    assert memory.peak < 64 * 16_384 * 2 + MEMORY_BOUND


# --- HPACK bomb ----------------------------------------------------------------------------------


async def test_hpack_bomb_gets_goaway_enhance_your_calm(
    server: Server, memory: Memory, client: H2Client
) -> None:
    """One 4,000-byte header put in the dynamic table, then referenced 4,000 times: a 8 KB
    header block that decodes to 16 MB. hpack stops at our 16 KiB header list size."""
    encoder = Encoder()  # a fresh one: this block is the connection's last
    encoder.header_table_size = 4096
    bomb = ("x-bomb", "a" * 4000)
    block = encoder.encode([*client.grpc_headers(CREATE), *[bomb] * 4000])
    assert len(block) < 8200
    frames = []
    # Split over frames of at most 16 KiB (one frame here; kept general).
    chunks = [block[i : i + 16_384] for i in range(0, len(block), 16_384)]
    head = HeadersFrame(1, chunks[0])
    frames.append(head)
    for chunk in chunks[1:]:
        frames.append(ContinuationFrame(1, chunk))
    frames[-1].flags.add("END_HEADERS")
    await client.send_frame(*frames)
    took = await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    print(f"HPACK bomb ({len(block)} B encoded, 16 MB decoded): closed in {took:.3f} s")
    assert memory.peak < MEMORY_BOUND  # the 16 MB were never built


# --- SETTINGS and PING floods -------------------------------------------------------------------


async def test_settings_flood_in_one_write_gets_goaway_enhance_your_calm(
    server: Server, client: H2Client
) -> None:
    """1,000 SETTINGS frames in one write."""
    burst = server._grpc.limits.settings_burst
    frame = SettingsFrame(0, {SettingCodes.MAX_FRAME_SIZE: 16_384})
    await client.send_frame(*[frame] * 1000)
    await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.goaway.additional_data == b"too many SETTINGS frames"
    # h2 acknowledges every SETTINGS of a read as it parses it, before the transport sees
    # one: the answer to a read is never larger than the read.
    print(f"SETTINGS flood: {client.settings_acks} ACKs, then GOAWAY")
    assert client.settings_acks <= 1000 + 1
    assert burst < 1000


async def test_settings_flood_in_lockstep_gets_goaway_enhance_your_calm(
    server: Server, client: H2Client
) -> None:
    """SETTINGS, wait for the ACK, again: up to 500, each in its own read by the server."""
    burst = server._grpc.limits.settings_burst
    await client.until(lambda: client.settings_acks >= 1)
    frame = SettingsFrame(0, {SettingCodes.MAX_FRAME_SIZE: 16_384})
    started = time.monotonic()
    sent = 0
    while sent < 500 and not client.closed:
        await client.send_frame(frame)
        sent += 1
        wanted = client.settings_acks + 1
        with contextlib.suppress(ConnectionError):
            await client.until(lambda n=wanted: client.settings_acks >= n or client.closed)
    took = time.monotonic() - started
    await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    print(f"SETTINGS lockstep flood: GOAWAY after {sent} frames, {took:.2f} s")
    assert sent <= burst + 10 * took + 2


async def test_ping_flood_in_one_write_gets_goaway_too_many_pings(
    server: Server, client: H2Client
) -> None:
    """1,000 PINGs in one write."""
    strikes = server._grpc.limits.max_ping_strikes
    await client.send_frame(*[PingFrame(0, b"floodfld")] * 1000)
    await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.goaway.additional_data == b"too_many_pings"
    # h2 acknowledges every PING of a read as it parses it, before the transport sees
    # one: the answer to a read is never larger than the read (9+8 bytes per PING).
    print(f"PING flood: {len(client.ping_acks)} ACKs, then GOAWAY")
    assert len(client.ping_acks) <= 1000
    assert strikes < 1000


async def test_ping_flood_in_lockstep_gets_goaway_too_many_pings(
    server: Server, client: H2Client
) -> None:
    """PING, wait for the ACK, again (up to 200): the server's own PING ACKs are no data that
    would excuse the next ping."""
    strikes = server._grpc.limits.max_ping_strikes
    sent = 0
    while sent < 200 and client.goaway is None and await sync(client):
        sent += 1
    await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.goaway.additional_data == b"too_many_pings"
    # The ping over the strikes is still acknowledged (h2 answers it as it parses it),
    # then the GOAWAY follows in the same write.
    print(f"PING lockstep flood: GOAWAY with the ACK of ping {sent}")
    assert sent == strikes + 2


async def test_pings_after_data_are_no_strikes(server: Server, client: H2Client) -> None:
    """A client pinging once per response it gets (as grpc's BDP probe does) is never cut."""
    for _ in range(10):
        stream_id = await client.send_grpc_request(
            CREATE, pb.CreateSessionRequest(tickers=["AAPL"])
        )
        result = await client.response(stream_id)
        assert result.grpc_status == 0
        await client.ping()
        assert await sync(client)
        session = pb.Session.FromString(result.messages()[0])
        close = await client.send_grpc_request(
            f"{SERVICE}/CloseSession",
            pb.CloseSessionRequest(session_id=session.session_id),
        )
        assert (await client.response(close)).grpc_status == 0
    assert client.goaway is None and not client.closed


# --- zero-window slow readers -------------------------------------------------------------------


async def tick_until_ended(
    client: H2Client,
    ids: list[int],
    market: Market,
    tickers: list[str],
    started: float,
    within: float,
) -> float:
    """Publish prices and read until every stream in ``ids`` has ended or ``within`` seconds
    since ``started`` have passed; the seconds it took."""
    while time.monotonic() - started < within and not all(client.streams[i].finished for i in ids):
        await market.tick(*tickers)
        with contextlib.suppress(TimeoutError):
            await client.read_events(0.05)
    return time.monotonic() - started


async def test_zero_stream_window_reader_is_ended_after_the_stall_timeout(
    server: Server, redis
) -> None:
    """INITIAL_WINDOW_SIZE 0 and never a WINDOW_UPDATE, on 10 streams of 50 tickers with
    prices ticking: each stream ends with trailers grpc-status 8 after the stall timeout."""
    tickers = [f"T{n:03d}" for n in range(50)]
    stall = server.settings.stall_timeout
    async with attacked(server, redis.url) as memory:
        market = Market(redis.url, tickers)
        await market.tick(*tickers)
        sessions = [await grpcio_session(server, tickers) for _ in range(10)]
        settings = {SettingCodes.INITIAL_WINDOW_SIZE: 0}
        async with await H2Client.connect(
            HOST, server.grpc_port, settings=settings, auto_ack_data=False
        ) as client:
            started = time.monotonic()
            ids = [
                await client.send_grpc_request(STREAM, pb.StreamPriceUpdatesRequest(session_id=s))
                for s in sessions
            ]
            # The request DATA went out on the client's own window (65,535 by default).
            took = await tick_until_ended(client, ids, market, tickers, started, stall + 3)
            for i in ids:
                result = client.streams[i]
                assert result.finished, f"stream {i} was never ended"
                assert not result.data  # not one byte beyond the window
                assert result.reset is not None or result.grpc_status == 8, result
            print(f"zero stream window: 10 streams ended after {took:.2f} s (stall {stall} s)")
            assert stall <= took < stall + 3
            assert not list(server._grpc.calls())
            await market.aclose()
        print(f"peak while stalled: {memory.peak / 1024:.0f} KiB")


async def test_connection_window_never_reopened_ends_every_stream(server: Server, redis) -> None:
    """Streams have 1 MiB windows but the client never returns connection credit: after the
    first 65,535 bytes every stream is stalled, and each is ended after the stall timeout."""
    tickers = [f"T{n:03d}" for n in range(100)]
    stall = server.settings.stall_timeout
    async with attacked(server, redis.url) as memory:
        market = Market(redis.url, tickers)
        await market.tick(*tickers)
        sessions = [await grpcio_session(server, tickers) for _ in range(20)]
        settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
        async with await H2Client.connect(
            HOST, server.grpc_port, settings=settings, auto_ack_data=False
        ) as client:
            started = time.monotonic()
            ids = [
                await client.send_grpc_request(STREAM, pb.StreamPriceUpdatesRequest(session_id=s))
                for s in sessions
            ]
            took = await tick_until_ended(client, ids, market, tickers, started, stall + 5)
            received = sum(len(client.streams[i].data) for i in ids)
            assert received <= 65_535  # the connection window, never more
            assert received > 60_000  # and it was used up
            for i in ids:
                result = client.streams[i]
                assert result.finished, f"stream {i} was never ended"
                assert result.reset is not None or result.grpc_status == 8, result
            print(f"shut connection window: {received} B, 20 streams ended after {took:.2f} s")
            assert took < stall + 5
            assert not list(server._grpc.calls())
            await market.aclose()
        print(f"peak while stalled: {memory.peak / 1024:.0f} KiB")


async def test_stream_window_overflow_is_judged_on_the_exact_window(server: Server, redis) -> None:
    """After the server has sent on a stream, a WINDOW_UPDATE that brings the stream's window
    to exactly 2^31-1 is taken (the stream goes on) and one more byte of credit is a stream
    error (RST_STREAM FLOW_CONTROL_ERROR): the window h2 checks is the one the sends used."""
    max_window = (1 << 31) - 1
    async with attacked(server, redis.url):
        market = Market(redis.url, ["AAPL"])
        await market.tick("AAPL")
        session = await grpcio_session(server, ["AAPL"])
        async with await H2Client.connect(HOST, server.grpc_port, auto_ack_data=False) as client:
            stream_id = await client.send_grpc_request(
                STREAM, pb.StreamPriceUpdatesRequest(session_id=session)
            )
            result = client.streams.setdefault(stream_id, StreamResult(stream_id))
            await client.until(lambda: len(result.data) > 0)
            first = len(result.data)
            # Past the client's h2 (which would refuse to overflow a window itself).
            await client.send_frame(
                WindowUpdateFrame(stream_id, window_increment=max_window - (65_535 - first))
            )
            await market.tick("AAPL")
            await client.until(lambda: len(result.data) > first)
            assert result.reset is None and not result.finished
            second = len(result.data) - first  # the window is now max_window - second
            await client.send_frame(WindowUpdateFrame(stream_id, window_increment=second + 1))
            await client.until(lambda: result.finished)
            assert result.reset == ErrorCodes.FLOW_CONTROL_ERROR, result
            assert client.goaway is None  # a stream error, not the connection's
            await market.aclose()
        await wait_invariant(server)  # the call ended and its session is released


# --- more streams than allowed ------------------------------------------------------------------


async def test_a_stream_over_the_limit_gets_goaway_protocol_error(redis) -> None:
    """max_sessions 3 is the per-connection stream limit, advertised as
    SETTINGS_MAX_CONCURRENT_STREAMS: 3 streams run, a 4th HEADERS (sent past the client's h2,
    which would refuse to) is a connection error PROTOCOL_ERROR (h2's answer; RFC 9113 §5.1.2
    names a stream error, and §5.4 lets an endpoint treat one as a connection error). The 3
    streams end with the connection, their sessions stay for a resume, nothing leaks."""
    async with ready_server(fast_settings(redis.url, max_sessions=3)) as server:
        async with attacked(server, redis.url):
            market = Market(redis.url, ["AAPL"])
            await market.tick("AAPL")
            sessions = [await grpcio_session(server, ["AAPL"]) for _ in range(3)]
            async with await H2Client.connect(HOST, server.grpc_port) as client:
                await client.until(lambda: client.conn.remote_settings.max_concurrent_streams == 3)
                ids = [
                    await client.send_grpc_request(
                        STREAM, pb.StreamPriceUpdatesRequest(session_id=s)
                    )
                    for s in sessions
                ]
                await client.until(lambda: all(client.streams[i].data for i in ids))
                ignore_stream_limit(client)
                await client.send_grpc_request(CREATE, pb.CreateSessionRequest(tickers=["KO"]))
                took = await closed_with_goaway(client)
                assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
                assert client.goaway.last_stream_id == ids[-1]  # the 4th was never processed
                print(f"4th stream over a limit of 3: GOAWAY PROTOCOL_ERROR in {took:.3f} s")
            await market.aclose()
            await transport_is_empty(server)
            async with grpc.aio.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
                stub = PriceStreamServiceStub(channel)
                for session_id in sessions:
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


# --- not HTTP/2 at all --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
async def test_garbage_instead_of_the_preface_gets_goaway_protocol_error(
    server: Server, redis, seed: int
) -> None:
    garbage = random.Random(seed).randbytes(16_384)
    async with attacked(server, redis.url):
        async with await H2Client.connect(HOST, server.grpc_port, preface=False) as client:
            await client.send_raw(garbage)
            started = time.monotonic()
            frames = parse_frames(await read_until_closed(client))
            # The server's SETTINGS (sent at accept), then it hangs up: h2 refuses a bad
            # preface before it has a connection to send GOAWAY on (RFC 9113 §3.4: "a GOAWAY
            # frame MAY be omitted in this case").
            assert [type(f) for f in frames] == [SettingsFrame], frames
            assert time.monotonic() - started < 1.0


async def test_garbage_after_the_preface_gets_goaway(server: Server, client: H2Client) -> None:
    """A good preface and SETTINGS, then random bytes as frames: a connection error."""
    garbage = random.Random(3).randbytes(16_384)
    await client.until(lambda: client.settings_acks >= 1)
    with contextlib.suppress(ConnectionError):
        await client.send_raw(garbage)
    frames = parse_frames(await read_until_closed(client))
    assert isinstance(frames[-1], GoAwayFrame), frames
    # Random frame headers mostly announce lengths over our 16 KiB MAX_FRAME_SIZE.
    assert frames[-1].error_code in (ErrorCodes.FRAME_SIZE_ERROR, ErrorCodes.PROTOCOL_ERROR)


async def test_frame_announcing_16_mib_gets_goaway_frame_size_error(
    server: Server, memory: Memory, client: H2Client
) -> None:
    """A frame header announcing 16 MiB (the most its 24 bits say; we allow 16 KiB), then 64 KiB
    of its body: refused at its header, not after the server has buffered 16 MiB."""
    await client.until(lambda: client.settings_acks >= 1)
    header = (2**24 - 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    started = time.monotonic()
    await client.send_raw(header + bytes(65_536))
    took = await closed_with_goaway(client)
    assert client.goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
    print(f"16 MiB frame header: GOAWAY FRAME_SIZE_ERROR after {took:.3f} s")
    assert time.monotonic() - started < 1.0
    assert memory.peak < MEMORY_BOUND


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /pricestream.v1.PriceStreamService/CreateSession HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ],
)
async def test_http1_request_gets_505_and_is_closed(
    server: Server, redis, request_line: bytes
) -> None:
    async with attacked(server, redis.url):
        async with await H2Client.connect(HOST, server.grpc_port, preface=False) as client:
            started = time.monotonic()
            await client.send_raw(request_line)
            received = await read_until_closed(client)
            took = time.monotonic() - started
            # The server's SETTINGS frame went out at accept, before it knew; then the answer.
            answer = received[received.find(b"HTTP/1.1") :]
            assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), received
            assert answer.endswith(b"this port serves gRPC over HTTP/2 (h2 or h2c) only\n")
            assert took < 1.0


# --- half-open connections ----------------------------------------------------------------------


@pytest.mark.parametrize("sends", ["nothing", "preface only"])
async def test_half_open_connections_are_closed_after_the_handshake_timeout(
    server: Server, redis, sends: str
) -> None:
    """50 connections that never finish the handshake (a TCP connect and silence, or the
    preface's magic and no SETTINGS) are all closed after the handshake timeout (0.5 s here;
    the Limits of the in-process server are replaced for the connections to come)."""
    grpc_server = server._grpc
    production = grpc_server.limits
    grpc_server.limits = dataclasses.replace(production, handshake_timeout=0.5)
    clients: list[H2Client] = []
    try:
        async with attacked(server, redis.url):
            connected_at = []
            for _ in range(50):
                clients.append(await H2Client.connect(HOST, server.grpc_port, preface=False))
                connected_at.append(time.monotonic())
                if sends == "preface only":
                    await clients[-1].send_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            await asyncio.sleep(0.1)
            # Every connection younger than the timeout is held (on a busy host the first ones
            # may already be past it when the last is made).
            now = time.monotonic()
            young = sum(1 for t in connected_at if now - t < 0.4)
            assert young > 0 and len(grpc_server._connections) >= young
            closed_at = await asyncio.gather(
                *(closed_after(c, t) for c, t in zip(clients, connected_at, strict=True))
            )
            print(f"half-open ({sends}): closed after {min(closed_at):.2f}-{max(closed_at):.2f} s")
            # Not before the timeout; well before the production 10 s (slack for a busy host).
            assert min(closed_at) >= 0.45 and max(closed_at) < 3.0
    finally:
        grpc_server.limits = production
        for client in clients:
            await client.close()
    assert production.handshake_timeout == 10.0  # the production default is untouched


async def closed_after(client: H2Client, started: float) -> float:
    await read_until_closed(client, timeout=5)
    return time.monotonic() - started
